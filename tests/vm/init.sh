#!/bin/sh
# PID 1 of a matrix guest (busybox, from the initramfs). Why hand-rolled: a full init costs
# seconds under TCG; this reaches the job in ~4 s.
#   1. load the few modules needed to see the host (6.1 builds virtio/virtiofs as modules),
#   2. mount the writable "out" share (job script, status, logs) and the read-only host root,
#   3. build the guest root: an overlay of the host root with a tmpfs upper layer (so the
#      guest kernel's own modules can sit at /lib/modules/$(uname -r) for modprobe), plus
#      proc/sys/dev, tmpfs /run /tmp /var/tmp, pure cgroup2, bpffs, loopback,
#   4. run the job in a chroot with its output in the share, write its exit status, power off;
#      or (VM_INIT=systemd) switch_root to systemd, whose job service does the same
#      (tests/vm/systemd_init.py).
# A missing status file tells the host the guest crashed or timed out.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for ko in $(cat /modules.order 2>/dev/null); do
  insmod "/modules/$ko" || echo "vm-init: insmod $ko failed"
done

fail() {
  echo "vm-init: FAILED: $*"
  poweroff -f
  sleep 5
  reboot -f
}

mkdir -p /out /host /newroot /ovl
mount -t virtiofs out /out || fail "mount virtiofs out"
echo booted >/out/booted
. /out/vm.env
mount -t virtiofs hostroot /host || fail "mount virtiofs hostroot"

# The host root stays read-only (the share is a read-only bind mount); writes land in RAM.
mount -t tmpfs -o mode=755 tmpfs /ovl
mkdir -p /ovl/upper /ovl/work
if mount -t overlay overlay -o lowerdir=/host,upperdir=/ovl/upper,workdir=/ovl/work /newroot; then
  OVERLAY=1
else
  echo "vm-init: overlay failed; the guest root is the read-only host root (no modprobe)"
  OVERLAY=0
  mount --bind /host /newroot
fi
R=/newroot
mount -t proc proc $R/proc
mount -t sysfs sysfs $R/sys
mount -t devtmpfs devtmpfs $R/dev
mkdir -p $R/dev/pts $R/dev/shm
mount -t devpts -o newinstance,ptmxmode=0666 devpts $R/dev/pts
mount -t tmpfs -o mode=1777 tmpfs $R/dev/shm
mount -t tmpfs -o mode=755 tmpfs $R/run
mount -t tmpfs -o mode=1777 tmpfs $R/tmp
mount -t tmpfs -o mode=1777 tmpfs $R/var/tmp
if [ "$VM_INIT" != systemd ]; then  # systemd mounts both itself, as on a real host
  mount -t cgroup2 -o nsdelegate cgroup2 $R/sys/fs/cgroup || fail "mount cgroup2"
  mount -t bpf -o mode=700 bpf $R/sys/fs/bpf || fail "mount bpffs"
fi
# Host dirs the root share lacks: other filesystems, or dirs below the tmpfs mounts above
# (each its own share, "extraN:/path" pairs).
for pair in $VM_EXTRA_SHARES; do
  mkdir -p "$R${pair#*:}" 2>/dev/null
  mount -t virtiofs "${pair%%:*}" "$R${pair#*:}" || fail "mount extra share $pair"
done
mkdir -p $R/run/pelagos-vm
mount --move /out $R/run/pelagos-vm
O=$R/run/pelagos-vm

REL=$(uname -r)
if [ "$OVERLAY" = 1 ] && [ -n "$VM_MODULES_DIR" ]; then
  mkdir -p "$R/lib/modules/$REL"
  mount --bind "$R$VM_MODULES_DIR" "$R/lib/modules/$REL"
  # The kernel's module autoloader (veth, sch_htb, ...) execs this path from the initramfs
  # root: hand it to the host's modprobe inside the guest root (PID 1's cwd, see below).
  printf '#!/bin/sh\nexec chroot /proc/1/cwd /sbin/modprobe "$@"\n' >/bin/modprobe-chroot
  chmod 755 /bin/modprobe-chroot
  echo /bin/modprobe-chroot >/proc/sys/kernel/modprobe
  for m in $VM_PRELOAD_MODULES; do
    chroot $R /sbin/modprobe "$m" || echo "vm-init: modprobe $m failed"
  done
fi
ip link set lo up
hostname "vm-$REL"

if [ "$VM_INIT" = systemd ]; then  # tests/vm/systemd_init.py: its job service reports
  chroot $R /bin/sh /run/pelagos-vm/systemd/stage.sh || fail "systemd stage"
  echo /sbin/modprobe >/proc/sys/kernel/modprobe  # the helper above vanishes with switch_root
  umount /sys /proc
  exec switch_root $R $VM_SYSTEMD $VM_SYSTEMD_ARGS
fi
echo "$REL" >$O/started
# Stack the guest root on / as switch_root does; PID 1 keeps the initramfs as its root and the
# guest root as its cwd. Why: setns(2) into a mount namespace starts at the mounts stacked on
# its root, so `runc exec` (which joins a container's namespace) finds the container's tree
# there; from a plain chroot it would land in the initramfs.
cd $R && mount --move . / || fail "move the guest root onto /"
chroot . /usr/bin/env -i /bin/sh /run/pelagos-vm/job.sh >run/pelagos-vm/output.log 2>&1 </dev/null
echo $? >run/pelagos-vm/status
sync
poweroff -f
sleep 5
reboot -f
