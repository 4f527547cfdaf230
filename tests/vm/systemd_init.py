"""`--init systemd`: the guest's second stage is systemd 252 (the host root's) as PID 1.

Why the host root: the runner already builds an overlay of it, and it has systemd and dbus, so
no image is built. The busybox first stage (init.sh) builds that root as usual, leaves the
cgroup2 and bpffs mounts to systemd (which mounts them as on a real host: nsdelegate,
memory_recursiveprot; /sys/fs/bpf mode 0700), runs `stage.sh` below inside the root, then
`switch_root`s to systemd. systemd boots `pelagos-vm.target` only (basic.target plus the job
service), not the host's default target, and what is slow or pointless under TCG is masked.
The job service writes the same `started` / `status` / `output.log` files as the busybox path,
then powers off at once (`systemctl poweroff -ff`: no unit is stopped, the share is synced).
"""

from __future__ import annotations

from pathlib import Path

from . import qemu

STAGE_NAME = "systemd"  # the dir in the writable share (guest: /run/pelagos-vm/systemd)
SYSTEMD = "/lib/systemd/systemd"
# Passed on systemd's own command line (after switch_root): boot our target only.
SYSTEMD_ARGS = ("--unit=pelagos-vm.target", "--show-status=1", "--log-level=notice")
# systemd reads these from /proc/cmdline: pure cgroup v2 (252's default too, said explicitly).
KERNEL_ARGS = ("systemd.unified_cgroup_hierarchy=1",)

# Units basic.target/sysinit.target would pull in on the host root that cost boot time under
# TCG and serve no test: timers (apt, man-db, fstrim...), first-boot and TPM steps, journal
# flush to /var, utmp, the podman socket, time sync, pstore, binfmt.
MASKED = (
    "timers.target",
    "podman.socket",
    "systemd-pstore.service",
    "systemd-timesyncd.service",
    "systemd-firstboot.service",
    "systemd-machine-id-commit.service",
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "systemd-pcrphase.service",
    "systemd-pcrphase-sysinit.service",
    "systemd-repart.service",
    "systemd-journal-flush.service",
    "systemd-update-utmp.service",
    "systemd-random-seed.service",
    "systemd-sysusers.service",
    "systemd-ask-password-console.path",
    "e2scrub_reap.service",
)

TARGET = """\
[Unit]
Description=pelagos-bpf VM guest (tests/vm --init systemd)
Requires=basic.target
Wants=pelagos-vm-job.service
After=basic.target
AllowIsolate=yes
"""

# Type=exec: the unit counts as started once the wrapper runs, so the boot transaction ends
# and the job sees a finished boot (`systemctl is-system-running` says running).
JOB_SERVICE = f"""\
[Unit]
Description=pelagos-bpf VM job
After=basic.target dbus.socket
Wants=dbus.socket

[Service]
Type=exec
ExecStart=/bin/sh {qemu.GUEST_OUT}/{STAGE_NAME}/job-wrapper.sh
StandardInput=null
StandardOutput=journal+console
FailureAction=poweroff-force
"""

# The busybox path's last lines, as a service: same result files, then an immediate power-off.
JOB_WRAPPER = f"""\
O={qemu.GUEST_OUT}
uname -r >$O/started
/usr/bin/env -i /bin/sh $O/job.sh >$O/output.log 2>&1 </dev/null
echo $? >$O/status
sync
exec systemctl poweroff -ff
"""

# Run by init.sh inside the new root (chroot, the host's tools) before switch_root. The root is
# the overlay's tmpfs upper layer, so nothing here reaches the host. Generators are masked too:
# the host's fstab, getty, sysv, gpt-auto... have nothing to give a test guest.
STAGE_SCRIPT = f"""\
set -e
S={qemu.GUEST_OUT}/{STAGE_NAME}
U=/etc/systemd/system
# A host root made from a container image has /.dockerenv: systemd would then think it runs in
# a container and skip what a VM gets (bpffs at /sys/fs/bpf among others). Whited out here.
rm -f /.dockerenv /run/.containerenv
cp $S/pelagos-vm.target $S/pelagos-vm-job.service $U/
for u in {" ".join(MASKED)}; do ln -sf /dev/null $U/$u; done
mkdir -p /etc/systemd/system-generators
for g in /lib/systemd/system-generators/*; do
  ln -sf /dev/null /etc/systemd/system-generators/${{g##*/}}
done
"""


def write_stage(dest: Path) -> Path:
    """Write the stage dir (units, wrapper, stage script) into dest; copied into the share."""
    dest.mkdir(parents=True, exist_ok=True)
    files = {
        "pelagos-vm.target": TARGET,
        "pelagos-vm-job.service": JOB_SERVICE,
        "job-wrapper.sh": JOB_WRAPPER,
        "stage.sh": STAGE_SCRIPT,
    }
    for name, text in files.items():
        (dest / name).write_text(text)
    return dest


def guest_env() -> dict[str, str]:
    """vm.env entries init.sh reads to take the systemd path."""
    return {
        "VM_INIT": "systemd",
        "VM_SYSTEMD": SYSTEMD,
        "VM_SYSTEMD_ARGS": " ".join(SYSTEMD_ARGS),
    }
