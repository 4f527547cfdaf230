"""Boot one kernel under QEMU (TCG) with the host's root shared read-only, run a job, collect it.

Why these choices (measured, see /work/shared/FACTS.md): the host's KVM cannot run ordinary
kernels, so TCG with `thread=single` (multi-threaded TCG oopsed ~2 % of boots); virtiofs beats
9p by 25-50 %; QEMU 7.2's C virtiofsd has no read-only flag, so it serves a read-only bind mount
made in a private mount namespace (the host tree can never be written by the guest).
The guest reports through a second, writable share: `started` (job about to run), `status`
(its exit code), `output.log`. No status means a crash or timeout.
"""

from __future__ import annotations

import functools
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import initramfs
from .kernels import Kernel

VIRTIOFSD_CANDIDATES = ("/usr/lib/qemu/virtiofsd", "/usr/libexec/virtiofsd", "/usr/bin/virtiofsd")
QEMU = "qemu-system-x86_64"
GUEST_OUT = "/run/pelagos-vm"  # where the writable share appears in the guest
# no_timer_check: under TCG on a busy host the vCPU can miss the timer IRQ the kernel's IO-APIC
# check waits for ("IO-APIC + timer doesn't work!" panics, seen with two guests on 2 cores).
CMDLINE = "console=ttyS0 rdinit=/init panic=-1 oops=panic loglevel=4 mitigations=off no_timer_check"


class BootError(RuntimeError):
    """The guest could not be launched (virtiofsd or QEMU failed to start), or was stopped."""


# Set to stop every guest of this process (a pool's SIGTERM or teardown): each boot loop sees it
# within 0.2 s, stops its QEMU and virtiofsds and raises BootError.
STOP = threading.Event()


def virtiofsd_path() -> str | None:
    return next((p for p in VIRTIOFSD_CANDIDATES if os.access(p, os.X_OK)), None)


def missing_tools() -> list[str]:
    """What this host lacks to boot guests (empty when all is there)."""
    missing = [t for t in (QEMU, "unshare", "apt-get", "dpkg", "depmod") if not shutil.which(t)]
    if virtiofsd_path() is None:
        missing.append("virtiofsd")
    try:
        initramfs.busybox_path()
    except FileNotFoundError:
        missing.append("busybox-static")
    if os.geteuid() != 0:
        missing.append("root (virtiofsd and the read-only bind mount need it)")
    return missing


@dataclass
class GuestRun:
    """What one boot produced."""

    status: int | None  # the job's exit code; None = crash or timeout
    started: bool  # the job was launched (the guest got past its own setup)
    boot_seconds: float | None  # launch -> job start
    wall_seconds: float
    timed_out: bool
    console: str  # the serial console (kernel + init messages)
    output: str  # the job's stdout+stderr
    files: dict[str, bytes] = field(default_factory=dict)  # other result files from the share


# Guest directories that get a fresh tmpfs: host paths below them must be shared on their own.
GUEST_TMPFS = (Path("/tmp"), Path("/var/tmp"), Path("/run"), Path("/dev/shm"))


def _mountpoint(p: Path) -> Path:
    while not os.path.ismount(p):
        p = p.parent
    return p


def extra_mounts(paths: list[Path], root: Path = Path("/")) -> list[Path]:
    """Host dirs to share besides the root (which is shared without its submounts).

    A needed dir below a guest tmpfs (a CI clone in /tmp) is shared itself; a dir on another
    filesystem brings that filesystem's mount point. Both are mounted after the tmpfs mounts.
    With another root than the host's (tests/vm/roots.py), every needed dir is shared itself.
    """
    out: set[Path] = set()
    for p in (q.resolve() for q in paths):
        if root != Path("/") or any(p == t or t in p.parents for t in GUEST_TMPFS):
            out.add(p)
        elif (m := _mountpoint(p)) != Path("/"):
            out.add(m)
    # drop dirs inside another shared dir
    return sorted(p for p in out if not any(q in p.parents for q in out))


def _ro_virtiofsd(source: Path, mnt: Path, sock: Path, log: Path) -> subprocess.Popen[bytes]:
    script = (
        'mount --bind "$1" "$2" && mount -o remount,bind,ro "$2" && '
        'exec "$3" --socket-path="$4" -o source="$2" -o cache=always -o sandbox=chroot'
    )
    mnt.mkdir()
    argv = ["unshare", "-m", "--propagation", "private", "sh", "-c", script, "sh"]
    argv += [str(source), str(mnt), virtiofsd_path() or "", str(sock)]
    return _spawn(argv, log)


def _rw_virtiofsd(source: Path, sock: Path, log: Path) -> subprocess.Popen[bytes]:
    argv = [virtiofsd_path() or "", f"--socket-path={sock}", "-o", f"source={source}"]
    argv += ["-o", "cache=none", "-o", "sandbox=chroot"]
    return _spawn(argv, log)


def _spawn(argv: list[str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as f:  # the child keeps its own copy of the fd
        return subprocess.Popen(
            argv, stdout=f, stderr=subprocess.STDOUT, preexec_fn=die_with_parent()
        )


def die_with_parent() -> Callable[[], None]:
    """A preexec_fn: the kernel SIGKILLs the child when the thread that started it ends (a
    guest runs within one runner thread) or the runner dies without cleaning up (e.g.
    `timeout` SIGKILLs pytest), so no QEMU or virtiofsd is ever left behind. prctl is looked
    up here, in the parent: the fork of a threaded runner must not dlopen."""
    prctl = _libc_prctl()
    return lambda: prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@functools.cache
def _libc_prctl() -> Callable[..., int]:
    import ctypes

    return ctypes.CDLL(None, use_errno=True).prctl


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """Turn SIGTERM into an exception while a guest runs, so the cleanup below still happens."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: object) -> None:
        raise SystemExit(f"vm: terminated by signal {signum}")

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _stop(proc: subprocess.Popen[bytes], grace: float = 3.0) -> None:
    """End a process this module started (by its pid), politely first."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)


def _env_file(values: dict[str, str]) -> str:
    return "".join(f"{k}={shlex.quote(v)}\n" for k, v in values.items())


def boot(kernel: Kernel, job: str, **kw: Any) -> GuestRun:
    """Boot `kernel`, run the shell script `job` as root in the guest, and return its result.

    Keyword arguments: see `_boot`. SIGTERM during the run still cleans up.
    """
    with _sigterm_raises():
        return _boot(kernel, job, **kw)


def _boot(
    kernel: Kernel,
    job: str,
    *,
    share_paths: list[Path],
    root: Path = Path("/"),
    prefill: dict[str, Path] | None = None,
    preload_modules: tuple[str, ...] = ("loop",),
    boot_timeout: float = 180.0,
    timeout: float = 1800.0,
    memory: str = "2G",
    smp: int = 2,
    keep: Path | None = None,
    progress: Callable[[float, str], None] | None = None,
    heartbeat: float = 30.0,
    guest_env: dict[str, str] | None = None,
    kernel_args: tuple[str, ...] = (),
) -> GuestRun:
    """share_paths: host paths the job needs (project, interpreter); their filesystems are shared.
    root: the host dir shared read-only as the guest's root (`/`, or a tests/vm/roots.py tree).
    prefill: name -> host dir copied into the writable share before boot (e.g. the BPF cache).
    progress: called every `heartbeat` seconds with the elapsed time and the job's last output
    line, so a person watching a long TCG run sees it moving.
    guest_env: extra vm.env entries for init.sh; kernel_args: appended to the kernel cmdline
    (both for a second stage such as systemd_init).
    """
    if STOP.is_set():
        raise BootError("stopped before boot: the runner is shutting down")
    run = Path(tempfile.mkdtemp(prefix="pelagos-vm-"))
    procs: list[subprocess.Popen[bytes]] = []
    t0 = time.monotonic()
    started_at: float | None = None
    timed_out = False
    try:
        out = run / "out"
        out.mkdir()
        for name, src in (prefill or {}).items():
            shutil.copytree(src, out / name, symlinks=True)
        extras = extra_mounts(share_paths, root)
        tags = {f"extra{i}": m for i, m in enumerate(extras)}
        (out / "vm.env").write_text(
            _env_file(
                {
                    "VM_MODULES_DIR": str(kernel.modules_dir),
                    "VM_PRELOAD_MODULES": " ".join(preload_modules),
                    "VM_EXTRA_SHARES": " ".join(f"{t}:{m}" for t, m in tags.items()),
                    **(guest_env or {}),
                }
            )
        )
        (out / "job.sh").write_text(job)
        initrd = initramfs.build(kernel, run / "initramfs.cpio")

        shares = {
            "hostroot": _ro_virtiofsd(
                root, run / "ro", run / "hostroot.sock", run / "virtiofsd-hostroot.log"
            )
        }
        for tag, m in tags.items():
            shares[tag] = _ro_virtiofsd(
                m, run / f"ro-{tag}", run / f"{tag}.sock", run / f"virtiofsd-{tag}.log"
            )
        shares["out"] = _rw_virtiofsd(out, run / "out.sock", run / "virtiofsd-out.log")
        procs.extend(shares.values())
        _wait_sockets(run, list(shares), shares)

        argv = [
            QEMU, "-accel", "tcg,thread=single", "-M", "q35,memory-backend=mem", "-cpu", "max",
            "-smp", str(smp), "-m", memory, "-nodefaults", "-no-user-config", "-no-reboot",
            "-display", "none",
            "-object", f"memory-backend-memfd,id=mem,size={memory},share=on",
            "-kernel", str(kernel.boot_image), "-initrd", str(initrd),
            "-append", " ".join((CMDLINE, *kernel_args)),
            "-chardev", f"file,id=con,path={run / 'console.log'}", "-serial", "chardev:con",
        ]  # fmt: skip
        for i, tag in enumerate(shares):
            argv += ["-chardev", f"socket,id=fs{i},path={run / (tag + '.sock')}"]
            argv += ["-device", f"vhost-user-fs-pci,chardev=fs{i},tag={tag}"]
        qemu = _spawn(argv, run / "qemu.log")
        procs.insert(0, qemu)
        beat = t0 + heartbeat
        while qemu.poll() is None:
            if STOP.is_set():  # `finally` below stops the processes and removes the run dir
                raise BootError("stopped: the runner is shutting down")
            now = time.monotonic()
            if started_at is None and (out / "started").exists():
                started_at = now
            if progress is not None and now >= beat:
                beat = now + heartbeat
                idle = "(booting)" if started_at is None else "(job started, no output yet)"
                progress(now - t0, last_line(out / "output.log") or idle)
            if (started_at is None and now - t0 > boot_timeout) or now - t0 > timeout:
                timed_out = True
                break
            time.sleep(0.2)
        if started_at is None and (out / "started").exists():
            started_at = time.monotonic()
        wall = time.monotonic() - t0
        for p in procs:
            _stop(p)
        status_file = out / "status"
        status_text = status_file.read_text().strip() if status_file.exists() else ""
        status = int(status_text) if status_text.lstrip("-").isdigit() else None
        console = _read(run / "console.log") + _read(run / "qemu.log")
        files = {
            p.name: p.read_bytes()
            for p in out.iterdir()
            if p.is_file() and p.name not in {"vm.env", "job.sh", "output.log"}
        }
        return GuestRun(
            status=status,
            started=started_at is not None,
            boot_seconds=None if started_at is None else started_at - t0,
            wall_seconds=wall,
            timed_out=timed_out,
            console=console,
            output=_read(out / "output.log"),
            files=files,
        )
    finally:
        for p in procs:
            _stop(p)
        if keep is not None:
            shutil.copytree(
                run, keep, dirs_exist_ok=True, ignore=shutil.ignore_patterns("*.sock", "ro*")
            )
        _remove_run_dir(run)


def _wait_sockets(run: Path, tags: list[str], procs: dict[str, subprocess.Popen[bytes]]) -> None:
    deadline = time.monotonic() + 15
    for tag in tags:
        sock = run / f"{tag}.sock"
        while not sock.exists():
            if procs[tag].poll() is not None:
                raise BootError(
                    f"virtiofsd for {tag} exited: {_read(run / f'virtiofsd-{tag}.log')}"
                )
            if time.monotonic() > deadline:
                raise BootError(f"virtiofsd for {tag} did not create {sock}")
            time.sleep(0.05)


def _remove_run_dir(run: Path) -> None:
    """Remove the run dir, never descending into a mount (rmtree would cross into the host /)."""
    # The ro* mount points exist only inside the virtiofsds' private namespaces, gone by now;
    # on the host they are empty directories. Check anyway, since rmtree follows mounts.
    for d in run.glob("ro*"):
        if os.path.ismount(d):
            print(f"vm: {d} is still a mount point; leaving {run} in place")
            return
        d.rmdir()
    shutil.rmtree(run, ignore_errors=True)


def last_line(p: Path, limit: int = 160) -> str:
    """The last non-empty line of a growing log (pytest's progress dots included)."""
    try:
        with p.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            tail = f.read().decode(errors="replace")
    except OSError:
        return ""
    lines = [ln.strip() for ln in tail.replace("\r", "\n").splitlines() if ln.strip()]
    return lines[-1][-limit:] if lines else ""


def _read(p: Path) -> str:
    try:
        return p.read_text(errors="replace")
    except FileNotFoundError:
        return ""
