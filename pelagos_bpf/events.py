"""Cgroup events without polling: OOM / oom_kill counts from `memory.events`, and a file watch.

Why inotify: cgroupfs raises a modify event on `memory.events` and `cgroup.events` whenever a
counter or a state in them changes (kernfs notifications), so a runtime can sleep in the kernel
until an OOM happens or a freeze settles, as runc and crun do, instead of re-reading files on a
timer. inotify comes from libc through ctypes (no dependency); the fd also works in a caller's
own select/poll/epoll loop (`FileWatch.fileno()`).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import select
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Protocol

from . import bpfsys
from .cgroupfs import read_text
from .errors import CgroupError
from .stats import parse_flat_keyed

log = logging.getLogger(__name__)

IN_MODIFY = 0x002
IN_DELETE = 0x200
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

MEMORY_EVENTS = "memory.events"
OOM_KILL = "oom_kill"
"""The counter an OOM event is about, as in runc: `oom` alone grows when the limit was hit and
reclaim failed, a moment before the kill (it can also grow without one)."""


class _HasPath(Protocol):
    @property
    def path(self) -> Path: ...


CgroupLike = _HasPath | str | os.PathLike[str]


def cgroup_path(cg: CgroupLike) -> Path:
    """A Cgroup handle's directory, or the path itself."""
    return Path(cg.path) if hasattr(cg, "path") else Path(cg)


@cache
def _libc() -> ctypes.CDLL:
    """The process's libc (bpfsys's handle: find_library would run ldconfig, a subprocess) with the
    inotify prototypes."""
    libc = bpfsys.libc()
    libc.inotify_init1.argtypes = [ctypes.c_int]
    libc.inotify_init1.restype = ctypes.c_int
    libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    libc.inotify_add_watch.restype = ctypes.c_int
    return libc


class FileWatch:
    """An inotify fd watching files for modification and a cgroup dir for removal; close() it.

    `wait(timeout)` sleeps until something changed (True) or the timeout passed (False).
    `gone` turns True once the cgroup directory was removed: kernfs raises no event on its own
    files then, but the parent directory sees IN_DELETE with the cgroup's name.
    """

    def __init__(self, cgroup_dir: Path, *files: Path) -> None:
        libc = _libc()
        fd = int(libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC))
        if fd < 0:
            e = ctypes.get_errno()
            raise CgroupError(e, f"inotify_init1 failed: {os.strerror(e)}", path=cgroup_dir)
        self.fd = fd
        self.gone = False
        self._name = os.fsencode(cgroup_dir.name)
        try:
            self._parent_wd = self._add(cgroup_dir.parent, IN_DELETE)
            for p in files:
                self._add(p, IN_MODIFY)
        except BaseException:
            os.close(fd)
            raise

    def _add(self, path: Path, mask: int) -> int:
        wd = _libc().inotify_add_watch(self.fd, os.fsencode(path), mask)
        if wd < 0:
            e = ctypes.get_errno()
            what = "no such file" if e == errno.ENOENT else os.strerror(e)
            raise CgroupError(e, f"cannot watch {path}: {what}", path=path)
        return int(wd)

    def fileno(self) -> int:
        return self.fd

    def wait(self, timeout: float | None = None) -> bool:
        """Block until a watched file changed (True) or `timeout` seconds passed (False)."""
        poller = select.poll()
        poller.register(self.fd, select.POLLIN)
        ms = None if timeout is None else max(0, int(timeout * 1000))
        if not poller.poll(ms):
            return False
        self._drain()
        return True

    def _drain(self) -> None:
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return
        off = 0
        while off + 16 <= len(data):  # struct inotify_event {int wd; u32 mask, cookie, len}
            wd, mask, _cookie, length = struct.unpack_from("iIII", data, off)
            name = data[off + 16 : off + 16 + length].rstrip(b"\0")
            if wd == self._parent_wd and mask & IN_DELETE and name == self._name:
                self.gone = True
            off += 16 + length

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> FileWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_for(path: Path, done: Callable[[str], bool], timeout: float | None, what: str) -> str:
    """Sleep (inotify) until done(path's text) holds; return that text. Re-check after arming
    the watch so a change between the first read and the watch is not missed."""
    deadline = None if timeout is None else time.monotonic() + timeout
    with FileWatch(path.parent, path) as w:
        while True:
            text = read_text(path)
            if done(text):
                return text
            if w.gone or not path.exists():
                raise CgroupError(
                    errno.ENOENT, f"{path.parent} was removed while {what}", path=path.parent
                )
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                raise CgroupError(
                    errno.ETIMEDOUT, f"{path.parent}: {what} took over {timeout}s", path=path.parent
                )
            w.wait(left)


# ---------------------------------------------------------------- memory.events / cgroup.events


@dataclass(frozen=True)
class Event:
    """One snapshot: `cgroup.events` (populated, frozen), `memory.events` (None without the
    memory controller) and how much each memory counter grew since the previous snapshot."""

    cgroup: dict[str, int]
    memory: dict[str, int] | None
    new: dict[str, int]

    @property
    def oom(self) -> int:
        return (self.memory or {}).get("oom", 0)

    @property
    def oom_kill(self) -> int:
        return (self.memory or {}).get("oom_kill", 0)

    def to_dict(self) -> dict[str, object]:
        return {"cgroup": self.cgroup, "memory": self.memory, "new": self.new}


def read_memory_events(cg: CgroupLike) -> dict[str, int]:
    """memory.events as a dict (low, high, max, oom, oom_kill, oom_group_kill, ...).

    Raises CgroupError when the cgroup has no memory controller (the file is absent)."""
    p = cgroup_path(cg) / MEMORY_EVENTS
    try:
        return parse_flat_keyed(p.read_text())
    except FileNotFoundError:
        raise CgroupError(
            errno.ENOENT,
            f"{p} does not exist (no memory controller in this cgroup)",
            setting=MEMORY_EVENTS,
            path=p,
        ) from None


def _snapshot(p: Path, last: dict[str, int] | None) -> Event:
    mem_text = read_text(p / MEMORY_EVENTS)
    memory = parse_flat_keyed(mem_text) if mem_text else None
    new = {}
    if memory is not None and last is not None:
        new = {k: v - last.get(k, 0) for k, v in memory.items() if v != last.get(k, 0)}
    return Event(parse_flat_keyed(read_text(p / "cgroup.events")), memory, new)


def watch(cg: CgroupLike, timeout: float | None = None) -> Iterator[Event]:
    """Yield a snapshot now, then one each time `cgroup.events` or `memory.events` changes,
    sleeping in the kernel in between. Ends when the cgroup is removed, or `timeout` seconds
    after the call (None: never)."""
    p = cgroup_path(cg)
    if not (p / "cgroup.events").exists():
        raise CgroupError(errno.ENOENT, f"not a non-root cgroup v2 directory: {p}", path=p)
    deadline = None if timeout is None else time.monotonic() + timeout
    files = [p / "cgroup.events"] + [p / MEMORY_EVENTS] * (p / MEMORY_EVENTS).exists()
    with FileWatch(p, *files) as w:
        ev = _snapshot(p, None)  # read once armed: nothing slips in between
        yield ev
        while w.wait(None if deadline is None else max(0.0, deadline - time.monotonic())):
            if w.gone or not p.exists():
                return
            nxt = _snapshot(p, ev.memory)
            if nxt.cgroup != ev.cgroup or nxt.memory != ev.memory:
                log.debug("events of %s: %s", p, nxt.to_dict())
                yield nxt
            ev = nxt


def wait_oom(cg: CgroupLike, timeout: float | None = None) -> Event | None:
    """Sleep until the OOM killer killed a process of the cgroup (oom_kill grows); None on
    timeout or removal.

    Raises CgroupError when the cgroup has no memory controller (nothing could ever arrive)."""
    read_memory_events(cg)
    for ev in watch(cg, timeout):
        if ev.new.get(OOM_KILL):
            return ev
    return None
