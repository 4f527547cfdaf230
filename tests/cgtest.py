"""Plain helper functions for cgroup tests (fixtures live in helpers.py, loaded as a plugin)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

from pelagos_bpf.hierarchy import discover


def rel(cg_root: Path, *parts: str) -> str:
    """A cfg.path (relative to the hierarchy root) that lives inside the test's cg_root."""
    return str(cg_root.relative_to(discover().root).joinpath(*parts))


def procs_of(path: Path) -> list[int]:
    return [int(x) for x in (path / "cgroup.procs").read_text().split()]


def subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_dir())


def root_controllers() -> set[str]:
    return set((discover().root / "cgroup.controllers").read_text().split())


LOOP_CTL_GET_FREE = 0x4C82
LOOP_SET_FD = 0x4C00
LOOP_CLR_FD = 0x4C01


@contextlib.contextmanager
def loop_device(size: int = 8 << 20) -> Iterator[Path]:
    """Attach a fresh loop device to a temp file (ioctls, so no losetup binary is needed)."""
    with tempfile.NamedTemporaryFile(prefix="pelagos-loop-", dir="/tmp") as backing:
        backing.write(os.urandom(1 << 16) * (size >> 16))
        backing.flush()
        ctl = os.open("/dev/loop-control", os.O_RDWR | os.O_CLOEXEC)
        try:
            n = fcntl.ioctl(ctl, LOOP_CTL_GET_FREE)
        finally:
            os.close(ctl)
        dev = Path(f"/dev/loop{n}")
        made = not dev.exists()
        if made:  # no devtmpfs node (minimal guests): make one and remove it afterwards
            os.mknod(dev, 0o600 | stat.S_IFBLK, os.makedev(7, n))
        fd = os.open(dev, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.ioctl(fd, LOOP_SET_FD, backing.fileno())
            try:
                yield dev
            finally:
                fcntl.ioctl(fd, LOOP_CLR_FD, 0)
        finally:
            os.close(fd)
            if made:
                dev.unlink()
