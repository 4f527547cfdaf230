"""Small cgroupfs primitives: one-write file writes, tolerant reads, subtree walks, diagnoses."""

from __future__ import annotations

import errno
import os
from pathlib import Path

from .errors import CgroupError

# cgroup v2 controller name -> its cgroup v1 name (for the "bound to v1" diagnosis).
_V1_NAME = {"io": "blkio"}


def write_file(path: Path, value: str, setting: str, *, dir_fd: int | None = None) -> None:
    """One write(2) of `value` (cgroupfs parses one value per write); errors name the setting.

    dir_fd: the fd of path's directory; the file is opened through it (no path walk)."""
    try:
        name = path if dir_fd is None else path.name
        fd = os.open(name, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC, dir_fd=dir_fd)  # as runc
    except OSError as e:
        raise CgroupError(
            e.errno, f"{setting}: cannot open {path}: {e.strerror}", setting=setting, path=path
        ) from e
    try:
        os.write(fd, value.encode())
    except OSError as e:
        raise CgroupError(
            e.errno,
            f"{setting}: writing {value!r} to {path} failed: {e.strerror}",
            setting=setting,
            path=path,
        ) from e
    finally:
        os.close(fd)


def read_text(path: Path) -> str:
    try:
        return path.read_text()
    except (FileNotFoundError, ProcessLookupError):
        return ""


def read_at(dir_fd: int, name: str) -> str:
    """A small cgroup file read through its directory's fd (no path walk, no io stack); ""
    when it is gone."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_CLOEXEC, dir_fd=dir_fd)
    except (FileNotFoundError, ProcessLookupError):
        return ""
    try:
        chunks = []
        while chunk := os.read(fd, 65536):
            chunks.append(chunk)
        return b"".join(chunks).decode()
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ESRCH, errno.ENODEV):  # removed under us
            return ""
        raise
    finally:
        os.close(fd)


def _v1_bound() -> dict[str, tuple[int, bool]]:
    """/proc/cgroups: controller -> (v1 hierarchy id, enabled)."""
    out = {}
    for line in read_text(Path("/proc/cgroups")).splitlines():
        if line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) >= 4:
            out[parts[0]] = (int(parts[1]), parts[3] == "1")
    return out


def missing_controller_reason(ctrl: str, root: Path) -> str:
    """Why `ctrl` is not offered in root/cgroup.controllers, as precisely as the host tells."""
    base = f"the {ctrl} controller is not available in {root}/cgroup.controllers"
    info = _v1_bound().get(_V1_NAME.get(ctrl, ctrl))
    if info is not None and not info[1]:
        return base + " (it is disabled on the kernel command line)"
    if info is not None and info[0] != 0:
        return base + " (it is bound to cgroup v1 on this host)"
    return base + " (not enabled in the parent's cgroup.subtree_control, or not built in)"


def subtree_dirs(path: Path) -> list[Path]:
    """All cgroup dirs under and including path, deepest first."""
    out: list[Path] = []

    def walk(p: Path) -> None:
        try:
            entries = list(os.scandir(p))
        except FileNotFoundError:
            return
        for e in entries:
            if e.is_dir(follow_symlinks=False):
                walk(Path(e.path))
        out.append(p)

    walk(path)
    return out
