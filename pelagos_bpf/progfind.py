"""Find this library's programs attached at a cgroup, and their maps, from any process.

Why from the kernel: a runtime may set a cgroup up in one process and update or tear it down in
another, so devices and net both recover their state with PROG_QUERY -> program info (matched
by name and type) -> map ids, checking each map's layout so a program left by another
pelagos_bpf version is refused instead of misread. Every fd returned is the caller's to close.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Mapping, Sequence

from . import bpfsys
from .errors import BpfError


def open_attached(
    cg_fd: int, attach_type: int, name: str, prog_type: int
) -> list[tuple[int, bpfsys.ProgInfo]]:
    """(fd, info) of each program named `name` of `prog_type` attached at the cgroup."""
    out: list[tuple[int, bpfsys.ProgInfo]] = []
    try:
        for prog_id in bpfsys.prog_query(cg_fd, attach_type):
            fd = open_prog(prog_id)
            if fd is None:
                continue
            try:
                info = bpfsys.prog_info(fd)
            except BaseException:
                os.close(fd)
                raise
            if info.name == name and info.type == prog_type:
                out.append((fd, info))
            else:
                os.close(fd)
    except BaseException:
        for fd, _ in out:
            os.close(fd)
        raise
    return out


def open_prog(prog_id: int) -> int | None:
    """An fd for a program id; None if it went away or belongs to someone we may not touch."""
    try:
        return bpfsys.prog_get_fd_by_id(prog_id)
    except BpfError as e:
        if e.errno in (errno.ENOENT, errno.EPERM):
            return None
        raise


def open_maps(info: bpfsys.ProgInfo, specs: Mapping[str, Sequence[int]]) -> dict[str, int]:
    """fds of the program's maps named in `specs` ({name: (type, key_size, value_size, ...)}).

    Raises BpfError (EPROTO) when a map's layout differs from its spec.
    """
    fds: dict[str, int] = {}
    try:
        for map_id in info.map_ids:
            fd = bpfsys.map_get_fd_by_id(map_id)
            try:
                mi = bpfsys.map_info(fd)
            except BaseException:
                os.close(fd)
                raise
            spec = specs.get(mi.name)
            if spec is None or mi.name in fds:
                os.close(fd)
                continue
            fds[mi.name] = fd
            if (mi.type, mi.key_size, mi.value_size) != tuple(spec[:3]):
                raise BpfError(
                    errno.EPROTO,
                    f"{info.name} maps",
                    f"map {mi.name!r} of program id {info.id} has another layout "
                    "(attached by a different pelagos_bpf version?)",
                )
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return fds
