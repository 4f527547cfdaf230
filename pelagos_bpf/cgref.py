"""The one cgroup handle every feature takes, and the per-cgroup writer lock.

Why a protocol: features need only the cgroup's path, its id (the cgroup2 inode number, the
key of every BPF map entry) and a directory fd for bpf(2) attach calls, so they never import
`cgroup.py` (no cycle) and a runtime may pass its own handle type.
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import errno
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal, Protocol, overload

from . import bpfsys
from .errors import CgroupError
from .locks import flock_until

"""Seconds a writer waits for a cgroup's lock before failing with EAGAIN; None: as long as it
takes. A resident daemon (the agent) sets it, so one stuck writer elsewhere (a hung CLI, a
stopped runtime) cannot hold its request threads forever."""


class CgroupRef(Protocol):
    @property
    def path(self) -> os.PathLike[str] | str: ...
    @property
    def id(self) -> int: ...
    def open_fd(self) -> int: ...


@dataclass(frozen=True)
class Ref:
    """A minimal CgroupRef for a path (id read from the directory's inode)."""

    path: str
    id: int

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> Ref:
        p = os.fspath(path)
        return cls(p, os.stat(p).st_ino)

    def open_fd(self) -> int:
        return open_dir(self.path)


def open_dir(path: str | os.PathLike[str]) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


@overload
def opened(
    cg: CgroupRef, what: str, *, missing_ok: Literal[False] = False
) -> contextlib.AbstractContextManager[int]: ...


@overload
def opened(
    cg: CgroupRef, what: str, *, missing_ok: bool
) -> contextlib.AbstractContextManager[int | None]: ...


def opened(
    cg: CgroupRef, what: str, *, missing_ok: bool = False
) -> contextlib.AbstractContextManager[int | None]:
    """The cgroup's dir fd, locked (flock LOCK_EX) for the duration: one writer at a time.

    Why flock on the cgroup directory: it serialises writers across processes (two runtimes,
    or a runtime and `pelagos-bpf update`) without any file of our own, it is released by the
    kernel when a writer dies (SIGKILL included), and it lives and dies with the cgroup.
    Readers (the program itself, `read_state`) never take it. None when the directory is gone
    and missing_ok.
    """
    return _opened(cg, what, missing_ok)


@contextlib.contextmanager
def _opened(cg: CgroupRef, what: str, missing_ok: bool) -> Iterator[int | None]:
    try:
        fd = cg.open_fd()
    except FileNotFoundError:
        if missing_ok:
            yield None
            return
        raise CgroupError(
            errno.ENOENT, f"{what}: cgroup {cg.path} does not exist", setting=what, path=cg.path
        ) from None
    except OSError as e:
        raise CgroupError(
            e.errno,
            f"{what}: cannot open cgroup {cg.path}: {e.strerror}",
            setting=what,
            path=cg.path,
        ) from e
    try:
        _lock(fd, what, cg.path)
        yield fd
    finally:
        os.close(fd)  # closing the last fd of the open file releases the flock


def _lock(fd: int, what: str, path: object) -> None:
    """flock LOCK_EX with the deadline every lock wait has (locks.flock_until)."""
    flock_until(fd, f"{what}: cgroup {path}", path=str(path))


class _FileHandle(ct.Structure):
    # struct file_handle carrying a kernfs node id (FILEID_KERNFS): the cgroup id.
    _fields_ = (("handle_bytes", ct.c_uint32), ("handle_type", ct.c_int), ("id", ct.c_uint64))


_FILEID_KERNFS = 0xFE


class Liveness:
    """Answers "does the cgroup with this id still exist?" with open_by_handle_at.

    Why not a tree walk: a walk sees only our cgroup namespace's subtree, so it would call
    other cgroups dead. A handle lookup asks the kernel about one id; only ESTALE (the node is
    gone, and cgroup ids are never reused) counts as dead, anything else as alive, so an error
    can only make garbage collection keep an entry, never delete a live one.
    """

    def __init__(self, cgroup2_dir: str | os.PathLike[str]) -> None:
        self._mount_fd = open_dir(cgroup2_dir)
        self._open_by_handle_at = bpfsys.libc().open_by_handle_at
        self._open_by_handle_at.argtypes = (ct.c_int, ct.c_void_p, ct.c_int)
        own = os.fstat(self._mount_fd).st_ino
        if self._probe(own) != 0:  # the handle path must work before we trust an ESTALE
            err = self._probe(own)
            self.close()
            raise CgroupError(
                err, f"open_by_handle_at on {cgroup2_dir}: {os.strerror(err)}", path=cgroup2_dir
            )

    def _open(self, cgroup_id: int) -> int:
        """An fd of the cgroup's directory, or -errno."""
        fh = _FileHandle(8, _FILEID_KERNFS, cgroup_id)
        fd = self._open_by_handle_at(
            self._mount_fd, ct.byref(fh), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
        )
        return int(fd) if fd >= 0 else -ct.get_errno()

    def _probe(self, cgroup_id: int) -> int:
        fd = self._open(cgroup_id)
        if fd >= 0:
            os.close(fd)
            return 0
        return -fd

    def open_fd(self, cgroup_id: int) -> int | None:
        """The directory fd of a live cgroup by id (the caller closes it; e.g. to take its
        writer lock); None when it is gone or cannot be opened."""
        fd = self._open(cgroup_id)
        return fd if fd >= 0 else None

    def dead(self, cgroup_id: int) -> bool:
        return self._probe(cgroup_id) == errno.ESTALE

    def open(self, cgroup_id: int) -> int | None:
        """A directory fd of the cgroup with this id (the caller closes it); None when it is
        gone or not reachable from our mount. The kernel reconnects a directory's dentry when
        it decodes the handle, so /proc/self/fd/N names its real path."""
        fh = _FileHandle(8, _FILEID_KERNFS, cgroup_id)
        fd = self._open_by_handle_at(
            self._mount_fd, ct.byref(fh), os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
        )
        return fd if fd >= 0 else None

    def close(self) -> None:
        os.close(self._mount_fd)

    def __enter__(self) -> Liveness:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
