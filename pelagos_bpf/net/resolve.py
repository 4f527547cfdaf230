"""Interface name -> ifindex in the network namespace of a given process.

A container's `eth0` lives in the container's netns, not ours, so names are resolved there:
open /proc/<pid>/ns/net and, unless it is our own netns, look the names up from a short-lived
thread that setns()es into it (setns(CLONE_NEWNET) changes only the calling thread, so the rest
of the process never leaves its namespace). One if_nametoindex ioctl per name, no netlink
dump, no subprocess: this is on the container-start path. The full interface list is read
only to word the error when a name is missing.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable
from typing import TypeVar

from ..errors import ConfigError
from .plan import NetPlan, build_plan, validate_net

T = TypeVar("T")

CLONE_NEWNET = 0x40000000


def _setns(fd: int) -> None:
    setns = getattr(os, "setns", None)  # Python >= 3.12
    if setns is not None:
        setns(fd, CLONE_NEWNET)
        return
    # Python 3.11: libc's setns, not pyroute2's (whose import is slow and large, and its
    # memory would be paid by a resident agent for its whole life)
    import ctypes

    from ..bpfsys import libc

    if libc().setns(fd, CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns(CLONE_NEWNET): {os.strerror(err)}")


def run_in_netns(ns_fd: int, fn: Callable[[], T]) -> T:
    """Run `fn` in a thread that first joins the netns `ns_fd`; return its result or raise."""
    result: list[T] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            _setns(ns_fd)
            result.append(fn())
        except BaseException as e:  # re-raised in the caller's thread
            error.append(e)

    t = threading.Thread(target=body, name="pelagos-netns", daemon=True)
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]


def _own_table() -> dict[str, int]:
    return {name: index for index, name in socket.if_nameindex()}


def netns_inode(pid: int | None) -> int:
    """The netns inode of `pid` (ours when None); raises OSError when the process is gone."""
    return os.stat(f"/proc/{pid}/ns/net" if pid else "/proc/thread-self/ns/net").st_ino


def _in_netns_of(pid: int | None, fn: Callable[[], T]) -> T:
    if pid is None:
        return fn()
    fd = os.open(f"/proc/{pid}/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_ino == os.stat("/proc/thread-self/ns/net").st_ino:
            return fn()
        return run_in_netns(fd, fn)
    finally:
        os.close(fd)


def interface_table(pid: int | None) -> dict[str, int]:
    """{ifname: ifindex} of every interface in the netns of `pid` (ours when None)."""
    return _in_netns_of(pid, _own_table)


def lookup_ifindexes(pid: int | None, names: list[str]) -> dict[str, int]:
    """{ifname: ifindex} for the given names that exist in pid's netns (one ioctl each)."""

    def lookup() -> dict[str, int]:
        out = {}
        for name in names:
            with contextlib.suppress(OSError):
                out[name] = socket.if_nametoindex(name)
        return out

    return _in_netns_of(pid, lookup)


def resolve_net(
    classid: int | None,
    priorities: list[tuple[str, int]] | None,
    pid: int | None,
    carrier: str = "auto",
) -> NetPlan:
    """Validate and resolve the net settings for a cgroup whose first process is `pid`.

    Interface names are looked up in pid's netns (ours when pid is None). An unknown name is a
    ConfigError naming net_priorities[i]. No side effects: this runs before the cgroup exists.
    """
    if not priorities:
        return build_plan(classid, [], carrier, {})  # which validates
    validate_net(classid, priorities, carrier)  # before the netns is read
    where = f"the network namespace of pid {pid}" if pid else "this network namespace"
    try:
        inode = netns_inode(pid)
        names = [p[0] for p in priorities if isinstance(p, list | tuple) and len(p) == 2]
        table = lookup_ifindexes(pid, names)
        if len(table) < len(names):  # build_plan will raise: list what does exist
            table = interface_table(pid)
    except OSError as e:
        raise ConfigError(
            "net_priorities", priorities, f"cannot read {where}: {e.strerror or e}"
        ) from e
    return build_plan(classid, priorities, carrier, table, where, inode)
