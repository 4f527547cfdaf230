"""The bpf(2) ABI as ctypes layouts: commands, enums, flags and the `union bpf_attr` views.

Why a module of its own: these mirror /usr/include/linux/bpf.h field by field and change only
when we issue a new command; bpfsys.py (the calls) reads better without them, and
tests/test_bpfsys_layout.py checks every offset here against the header with the C compiler.
Every command's view is ATTR_SIZE bytes, zero-filled, bigger than any kernel's union we know:
the kernel accepts a bigger size when the tail is zero, and fields a newer kernel writes back
(PROG_QUERY's `revision` on 6.17+) land in owned memory.
"""

from __future__ import annotations

import ctypes as ct
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, TypeAlias

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2
BPF_F_ALLOW_OVERRIDE = 1
BPF_F_ALLOW_MULTI = 2
BPF_F_REPLACE = 4
BPF_F_QUERY_EFFECTIVE = 1

ATTR_SIZE = 256  # > sizeof(union bpf_attr) of every kernel we know (6.18: < 160 bytes)

# __NR_bpf per `uname -m` (the kernel's syscall tables; asm-generic arches share 280). Only
# 64-bit arches: the attrs below rely on c_uint64 being 8-byte aligned, as __aligned_u64 is.
SYS_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}


# enum bpf_cmd: the commands this layer issues, by the name errors report them under.
CMDS = {
    "BPF_MAP_CREATE": 0,
    "BPF_MAP_LOOKUP_ELEM": 1,
    "BPF_MAP_UPDATE_ELEM": 2,
    "BPF_MAP_DELETE_ELEM": 3,
    "BPF_MAP_GET_NEXT_KEY": 4,
    "BPF_PROG_LOAD": 5,
    "BPF_OBJ_PIN": 6,
    "BPF_OBJ_GET": 7,
    "BPF_PROG_ATTACH": 8,
    "BPF_PROG_DETACH": 9,
    "BPF_PROG_GET_NEXT_ID": 11,
    "BPF_PROG_GET_FD_BY_ID": 13,
    "BPF_MAP_GET_FD_BY_ID": 14,
    "BPF_OBJ_GET_INFO_BY_FD": 15,
    "BPF_PROG_QUERY": 16,
    "BPF_MAP_UPDATE_BATCH": 26,
    "BPF_MAP_DELETE_BATCH": 27,
}


class ProgType(IntEnum):
    SCHED_CLS = 3
    CGROUP_SKB = 8
    CGROUP_SOCK = 9
    CGROUP_DEVICE = 15
    CGROUP_SOCKOPT = 25


class AttachType(IntEnum):
    CGROUP_INET_INGRESS = 0
    CGROUP_INET_EGRESS = 1
    CGROUP_INET_SOCK_CREATE = 2
    CGROUP_DEVICE = 6
    CGROUP_SETSOCKOPT = 22


class MapType(IntEnum):
    HASH = 1
    ARRAY = 2
    PERCPU_HASH = 5
    PERCPU_ARRAY = 6
    LRU_HASH = 9
    CGROUP_STORAGE = 19
    PERCPU_CGROUP_STORAGE = 21


_U32 = ct.c_uint32
_U64 = ct.c_uint64  # __aligned_u64: a pointer the kernel writes through goes in as an address
# A pointer the kernel only reads: bytes go in without a copy (ctypes keeps them alive with the
# attr). 8 bytes and 8-aligned, as __aligned_u64, on the 64-bit arches SYS_BPF lists; an int
# address is taken too (MAP_LOOKUP_ELEM's value is an output).
_IN = ct.c_char_p


_Field: TypeAlias = "tuple[str, type[ct._SimpleCData[Any]] | type[ct.Array[Any]]]"


def _padded(*fields: _Field) -> tuple[_Field, ...]:
    """A command's leading fields, then zeros up to ATTR_SIZE bytes (C layout rules)."""
    end = 0
    for _, t in fields:
        align = ct.alignment(t)
        end = (end + align - 1) // align * align + ct.sizeof(t)
    return (*fields, ("_tail", ct.c_uint8 * (ATTR_SIZE - end)))


class Attr(ct.Structure):
    """One command's view of `union bpf_attr`, ATTR_SIZE bytes, zero-filled when made."""

    c_prefix = ""  # the struct's name inside the union ("" for the header's anonymous structs)


class MapCreateAttr(Attr):
    _fields_ = _padded(
        ("map_type", _U32),
        ("key_size", _U32),
        ("value_size", _U32),
        ("max_entries", _U32),
        ("map_flags", _U32),
        ("inner_map_fd", _U32),
        ("numa_node", _U32),
        ("map_name", ct.c_char * 16),
    )


class ElemAttr(Attr):
    # `value` is `next_key` for MAP_GET_NEXT_KEY (a union in the header).
    _fields_ = _padded(("map_fd", _U32), ("key", _IN), ("value", _IN), ("flags", _U64))


class BatchAttr(Attr):
    c_prefix = "batch."
    _fields_ = _padded(
        ("in_batch", _U64),
        ("out_batch", _U64),
        ("keys", _IN),
        ("values", _IN),
        ("count", _U32),
        ("map_fd", _U32),
        ("elem_flags", _U64),
        ("flags", _U64),
    )


class ProgLoadAttr(Attr):
    _fields_ = _padded(
        ("prog_type", _U32),
        ("insn_cnt", _U32),
        ("insns", _IN),
        ("license", _IN),
        ("log_level", _U32),
        ("log_size", _U32),
        ("log_buf", _U64),
        ("kern_version", _U32),
        ("prog_flags", _U32),
        ("prog_name", ct.c_char * 16),
        ("prog_ifindex", _U32),
        ("expected_attach_type", _U32),
    )


class ObjAttr(Attr):
    _fields_ = _padded(("pathname", _IN), ("bpf_fd", _U32), ("file_flags", _U32))


class AttachAttr(Attr):
    _fields_ = _padded(
        ("target_fd", _U32),
        ("attach_bpf_fd", _U32),
        ("attach_type", _U32),
        ("attach_flags", _U32),
        ("replace_bpf_fd", _U32),
    )


class IdAttr(Attr):
    # `start_id` is also `prog_id` / `map_id` (a union in the header).
    _fields_ = _padded(("start_id", _U32), ("next_id", _U32), ("open_flags", _U32))


class InfoAttr(Attr):
    c_prefix = "info."
    _fields_ = _padded(("bpf_fd", _U32), ("info_len", _U32), ("info", _U64))


class QueryAttr(Attr):
    c_prefix = "query."
    _fields_ = _padded(
        ("target_fd", _U32),
        ("attach_type", _U32),
        ("query_flags", _U32),
        ("attach_flags", _U32),
        ("prog_ids", _U64),
        ("prog_cnt", _U32),
    )


class ProgInfoStruct(ct.Structure):
    # Leading part of struct bpf_prog_info; the kernel copies min(its size, ours).
    _fields_ = (
        ("type", _U32),
        ("id", _U32),
        ("tag", ct.c_uint8 * 8),
        ("jited_prog_len", _U32),
        ("xlated_prog_len", _U32),
        ("jited_prog_insns", _U64),
        ("xlated_prog_insns", _U64),
        ("load_time", _U64),
        ("created_by_uid", _U32),
        ("nr_map_ids", _U32),
        ("map_ids", _U64),
        ("name", ct.c_char * 16),
    )


class MapInfoStruct(ct.Structure):
    _fields_ = (
        ("type", _U32),
        ("id", _U32),
        ("key_size", _U32),
        ("value_size", _U32),
        ("max_entries", _U32),
        ("map_flags", _U32),
        ("name", ct.c_char * 16),
    )


@dataclass(frozen=True)
class ProgInfo:
    id: int
    type: int
    name: str
    tag: str
    map_ids: list[int]


@dataclass(frozen=True)
class MapInfo:
    id: int
    type: int
    name: str
    key_size: int
    value_size: int
    max_entries: int
