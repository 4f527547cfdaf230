"""Finding our programs on a cgroup from any process, and refusing a foreign map layout."""

from __future__ import annotations

import errno
import os
import struct
from collections.abc import Callable

import pytest

from pelagos_bpf import bpfsys, progfind
from pelagos_bpf.bpfsys import AttachType, MapType, ProgType
from pelagos_bpf.cgroup import Cgroup
from pelagos_bpf.devices import program as devprog
from pelagos_bpf.errors import BpfError


def _prog_using(map_fd: int, name: str) -> int:
    """A device program named `name` that references map_fd and allows everything."""
    insns = b"".join(
        [
            struct.pack("<BBhi", 0x18, 0x11, 0, map_fd),  # r1 = map (BPF_PSEUDO_MAP_FD)
            struct.pack("<BBhi", 0, 0, 0, 0),
            struct.pack("<BBhi", 0xB7, 0x00, 0, 1),  # r0 = 1
            struct.pack("<BBhi", 0x95, 0, 0, 0),  # exit
        ]
    )
    return bpfsys.prog_load(ProgType.CGROUP_DEVICE, insns, name=name)


def test_open_attached_matches_name_and_refuses_another_layout(
    make_cgroup: Callable[[str], Cgroup],
) -> None:
    cg = make_cgroup("pf")
    # A map named like ours but with another key size: what an older version could leave.
    bad = bpfsys.map_create(MapType.HASH, 4, devprog.MAP_SPECS["dev_rules"][2], 8, "dev_rules")
    fds = [bad, _prog_using(bad, devprog.PROG_NAME), _prog_using(bad, "someone_else")]
    cgfd = cg.open_fd()
    try:
        for fd in fds[1:]:
            bpfsys.prog_attach(fd, cgfd, AttachType.CGROUP_DEVICE)
        found = progfind.open_attached(
            cgfd, AttachType.CGROUP_DEVICE, devprog.PROG_NAME, ProgType.CGROUP_DEVICE
        )
        try:
            assert [info.id for _, info in found] == [bpfsys.prog_info(fds[1]).id]
            with pytest.raises(BpfError) as e:
                progfind.open_maps(found[0][1], devprog.MAP_SPECS)
            assert e.value.errno == errno.EPROTO and "another layout" in str(e.value)
        finally:
            for fd, _ in found:
                os.close(fd)
        with pytest.raises(BpfError, match="another layout"):
            devprog.denials(cg.path, cg.id)
    finally:
        for fd in fds[1:]:
            bpfsys.prog_detach(fd, cgfd, AttachType.CGROUP_DEVICE)
        for fd in (cgfd, *fds):
            os.close(fd)
