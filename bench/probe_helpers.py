"""Which helpers may a BPF_PROG_TYPE_CGROUP_DEVICE program call on this kernel? (root)

Loads, for each helper, a tiny device program `r1 = arg; call helper; r0 = 1; exit` through
pelagos_bpf.bpfsys.prog_load. The verifier accepts the call only if cgroup_dev_func_proto
offers the helper, so "ok" / "EINVAL" is the kernel's own answer (no headers, no bcc).
It also runs the program for real: a device program at a scratch cgroup stores what
bpf_get_current_cgroup_id and bpf_get_current_ancestor_cgroup_id return into an array map,
to check they name the task's cgroup (and its ancestor at a level) inside the device hook.

Usage: .venv/bin/python bench/probe_helpers.py
"""

from __future__ import annotations

import errno
import os
import platform
import struct
import sys
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pelagos_bpf import bpfsys
from pelagos_bpf.bpfsys import AttachType, MapType, ProgType
from pelagos_bpf.errors import BpfError
from pelagos_bpf.hierarchy import discover

HELPERS = {  # enum bpf_func_id (uapi/linux/bpf.h)
    "get_current_uid_gid": 15,
    "get_current_pid_tgid": 14,
    "get_current_cgroup_id": 80,
    "get_current_ancestor_cgroup_id": 123,
    "get_current_task": 35,
    "ktime_get_ns": 5,
    "get_cgroup_classid": 17,
}


def insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


MOV64K, MOV64X, CALL, EXIT, STXDW, LDDW = 0xB7, 0xBF, 0x85, 0x95, 0x7B, 0x18
ADD64K, STW = 0x07, 0x62


def call_prog(helper: int, arg: int = 1) -> bytes:
    return b"".join(
        [insn(MOV64K, 1, imm=arg), insn(CALL, imm=helper), insn(MOV64K, 0, imm=1), insn(EXIT)]
    )


def probe_verifier() -> dict[str, str]:
    out = {}
    for name, fid in HELPERS.items():
        try:
            fd = bpfsys.prog_load(ProgType.CGROUP_DEVICE, call_prog(fid), name="probe")
            os.close(fd)
            out[name] = "ok"
        except BpfError as e:
            out[name] = errno.errorcode.get(e.errno or 0, str(e.errno))
    return out


def ld_map_fd(reg: int, fd: int) -> list[bytes]:
    return [insn(LDDW, reg, 1, imm=fd), insn(0, imm=0)]  # BPF_PSEUDO_MAP_FD


def store_call(map_fd: int, slot: int, helper: int, arg: int) -> list[bytes]:
    """value[slot] = helper(arg), through map_update_elem(map, &slot, &r0, 0)."""
    return [
        insn(MOV64K, 1, imm=arg),
        insn(CALL, imm=helper),
        insn(STXDW, 10, 0, off=-16),  # *(u64 *)(fp - 16) = r0
        insn(STW, 10, off=-4, imm=slot),  # *(u32 *)(fp - 4) = slot
        *ld_map_fd(1, map_fd),
        insn(MOV64X, 2, 10),
        insn(ADD64K, 2, imm=-4),
        insn(MOV64X, 3, 10),
        insn(ADD64K, 3, imm=-16),
        insn(MOV64K, 4, imm=0),
        insn(CALL, imm=2),  # map_update_elem
    ]


def probe_runtime() -> None:
    root = discover().root
    parent = root / f"pelagos-probe-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    child = parent / "inner"
    child.mkdir(parents=True)
    level_parent = len(parent.relative_to(root).parts)  # root is level 0
    m = bpfsys.map_create(MapType.ARRAY, 4, 8, 4, name="probe_out")
    prog_fd = cg_fd = -1
    try:
        code = [
            *store_call(m, 0, HELPERS["get_current_cgroup_id"], 0),
            *store_call(m, 1, HELPERS["get_current_ancestor_cgroup_id"], level_parent),
            *store_call(m, 2, HELPERS["get_current_ancestor_cgroup_id"], level_parent + 5),
            insn(MOV64K, 0, imm=1),
            insn(EXIT),
        ]
        prog_fd = bpfsys.prog_load(ProgType.CGROUP_DEVICE, b"".join(code), name="probe_rt")
        cg_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
        bpfsys.prog_attach(prog_fd, cg_fd, AttachType.CGROUP_DEVICE, bpfsys.BPF_F_ALLOW_MULTI)
        pid = os.fork()
        if pid == 0:
            (child / "cgroup.procs").write_text(str(os.getpid()))
            os.close(os.open("/dev/null", os.O_RDONLY))
            os._exit(0)
        os.waitpid(pid, 0)
        got = [
            struct.unpack("<Q", bpfsys.map_lookup(m, struct.pack("<I", i), 8) or bytes(8))[0]
            for i in range(3)
        ]
        print(f"runtime check: a task in {child.relative_to(root)} (level {level_parent + 1})")
        print(f"  get_current_cgroup_id() = {got[0]}  (inner's inode {os.stat(child).st_ino})")
        print(
            f"  get_current_ancestor_cgroup_id({level_parent}) = {got[1]}  "
            f"(parent's inode {os.stat(parent).st_ino})"
        )
        print(
            f"  get_current_ancestor_cgroup_id({level_parent + 5}) = {got[2]}  (below the task: 0)"
        )
        bpfsys.prog_detach(prog_fd, cg_fd, AttachType.CGROUP_DEVICE)
    finally:
        for fd in (prog_fd, cg_fd, m):
            if fd >= 0:
                os.close(fd)
        child.rmdir()
        parent.rmdir()


def main() -> int:
    print(f"kernel {platform.release()}: helpers a CGROUP_DEVICE program may call (verifier)")
    for name, verdict in probe_verifier().items():
        print(f"  bpf_{name:32} {verdict}")
    probe_runtime()
    return 0


if __name__ == "__main__":
    sys.exit(main())
