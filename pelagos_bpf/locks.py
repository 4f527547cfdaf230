"""flock with a deadline, and the node-wide lock files under the run directory.

Why deadlines: a writer holding a lock can be stopped (SIGSTOP, a debugger, a wedged kernel
call); every waiter then waits forever unless the wait is bounded. A resident agent serving
many clients must answer with a clear error instead. flock has no timeout, so a wait polls
LOCK_NB with a short backoff (the locks are held for microseconds: contention is rare).

Why node-wide lock files: some state is shared by every process using the same maps (the rule
map's fill level), so its writers serialise on a file all of them can reach. The run dir
($PELAGOS_BPF_RUN_DIR, default /run/pelagos-bpf) is created root-owned 0755 and trust-checked,
so nobody else can swap the lock file.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import threading
import time
from collections.abc import Iterator

from . import trust
from .errors import PelagosError

RUN_DIR_ENV = "PELAGOS_BPF_RUN_DIR"
DEFAULT_RUN_DIR = "/run/pelagos-bpf"
LOCK_TIMEOUT = 10.0  # s: a lock is held for microseconds; this long means a stuck holder


class LockTimeout(PelagosError, OSError):
    """A lock was not acquired before its deadline (errno ETIMEDOUT); `.setting` and `.path`
    as CgroupError's when the caller knows them."""

    def __init__(
        self, errno_: int, message: str, *, setting: str | None = None, path: str | None = None
    ) -> None:
        super().__init__(errno_, message)
        self.setting = setting
        self.path = path


def run_dir() -> str:
    return os.environ.get(RUN_DIR_ENV) or DEFAULT_RUN_DIR


def flock_until(
    fd: int,
    what: str,
    timeout: float | None = None,
    *,
    setting: str | None = None,
    path: str | None = None,
) -> None:
    """flock(LOCK_EX) on `fd`, giving up after `timeout` seconds (default: LOCK_TIMEOUT, which a
    resident agent sets with --lock-timeout) with LockTimeout naming `what` (and carrying
    `setting` and `path`)."""
    if timeout is None:
        timeout = LOCK_TIMEOUT
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pass
    deadline = time.monotonic() + timeout
    delay = 0.0001
    while True:
        time.sleep(delay)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise LockTimeout(
                    errno.ETIMEDOUT,
                    f"{what}: lock not acquired within {timeout:g} s",
                    setting=setting,
                    path=path,
                ) from None
            # at most 2 ms apart: another process's threads hand the lock to each other at
            # once, so a waiter that sleeps long would seldom find it free
            delay = min(delay * 2, 0.002)


_FILES: dict[str, int] = {}
_THREAD_LOCKS: dict[str, threading.Lock] = {}
_GUARD = threading.Lock()


def _lock_file(name: str) -> tuple[int, threading.Lock, str]:
    """The fd of run_dir()/locks/<name> (opened once per process), its in-process lock
    (flock is per open file: threads sharing the fd would not exclude each other), its path."""
    path = f"{run_dir()}/locks/{name}"
    with _GUARD:
        fd = _FILES.get(path)
        if fd is None:
            dirfd = trust.open_trusted_dir(f"{run_dir()}/locks", "run dir", create=True)
            try:
                flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
                fd = os.open(name, flags, 0o600, dir_fd=dirfd)
            finally:
                os.close(dirfd)
            _FILES[path] = fd
            _THREAD_LOCKS[path] = threading.Lock()
        return fd, _THREAD_LOCKS[path], path


@contextlib.contextmanager
def node_lock(name: str, timeout: float | None = None) -> Iterator[None]:
    """Hold the node-wide lock `name` (threads of this process and other processes alike)."""
    if timeout is None:
        timeout = LOCK_TIMEOUT
    fd, tlock, path = _lock_file(name)
    if not tlock.acquire(timeout=timeout):
        raise LockTimeout(
            errno.ETIMEDOUT,
            f"{name}: lock not acquired within {timeout:g} s",
            setting=RUN_DIR_ENV,
            path=path,
        )
    try:
        flock_until(fd, name, timeout, setting=RUN_DIR_ENV, path=path)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        tlock.release()
