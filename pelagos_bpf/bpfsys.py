"""The one low-level BPF layer: libbpf's syscall wrappers (`libbpf.so.1`) through ctypes.

Why libbpf and not hand-packed `union bpf_attr`: libbpf zero-fills a full-size attr for every
command (so kernel fields added later, such as PROG_QUERY's `revision` that 6.17+ writes
whatever size is passed, land in owned memory), retries PROG_LOAD on EAGAIN, and needs no LLVM.
Every other module goes through these functions; none touches ctypes or bpf(2) itself.
"""

from __future__ import annotations

import ctypes as ct
import errno
import os
from dataclasses import dataclass
from enum import IntEnum
from functools import cache

from .errors import BpfError

BPF_ANY = 0
BPF_NOEXIST = 1
BPF_EXIST = 2
BPF_F_ALLOW_OVERRIDE = 1
BPF_F_ALLOW_MULTI = 2
BPF_F_REPLACE = 4
BPF_F_QUERY_EFFECTIVE = 1


class ProgType(IntEnum):
    SCHED_CLS = 3
    CGROUP_SKB = 8
    CGROUP_SOCK = 9
    CGROUP_DEVICE = 15


class AttachType(IntEnum):
    CGROUP_INET_INGRESS = 0
    CGROUP_INET_EGRESS = 1
    CGROUP_INET_SOCK_CREATE = 2
    CGROUP_DEVICE = 6


class MapType(IntEnum):
    HASH = 1
    ARRAY = 2
    PERCPU_HASH = 5
    PERCPU_ARRAY = 6
    LRU_HASH = 9
    CGROUP_STORAGE = 19
    PERCPU_CGROUP_STORAGE = 21


class _MapCreateOpts(ct.Structure):
    _fields_ = (
        ("sz", ct.c_size_t),
        ("btf_fd", ct.c_uint32),
        ("btf_key_type_id", ct.c_uint32),
        ("btf_value_type_id", ct.c_uint32),
        ("btf_vmlinux_value_type_id", ct.c_uint32),
        ("inner_map_fd", ct.c_uint32),
        ("map_flags", ct.c_uint32),
        ("map_extra", ct.c_uint64),
        ("numa_node", ct.c_uint32),
        ("map_ifindex", ct.c_uint32),
    )


class _ProgLoadOpts(ct.Structure):
    _fields_ = (
        ("sz", ct.c_size_t),
        ("attempts", ct.c_int),
        ("expected_attach_type", ct.c_int),
        ("prog_btf_fd", ct.c_uint32),
        ("prog_flags", ct.c_uint32),
        ("prog_ifindex", ct.c_uint32),
        ("kern_version", ct.c_uint32),
        ("attach_btf_id", ct.c_uint32),
        ("attach_prog_fd", ct.c_uint32),
        ("attach_btf_obj_fd", ct.c_uint32),
        ("fd_array", ct.c_void_p),
        ("func_info", ct.c_void_p),
        ("func_info_cnt", ct.c_uint32),
        ("func_info_rec_size", ct.c_uint32),
        ("line_info", ct.c_void_p),
        ("line_info_cnt", ct.c_uint32),
        ("line_info_rec_size", ct.c_uint32),
        ("log_level", ct.c_uint32),
        ("log_size", ct.c_uint32),
        ("log_buf", ct.c_char_p),
    )


class _ProgAttachOpts(ct.Structure):
    _fields_ = (("sz", ct.c_size_t), ("flags", ct.c_uint32), ("replace_prog_fd", ct.c_int))


class _BatchOpts(ct.Structure):
    _fields_ = (("sz", ct.c_size_t), ("elem_flags", ct.c_uint64), ("flags", ct.c_uint64))


class _ProgInfo(ct.Structure):
    # Leading part of struct bpf_prog_info; the kernel copies min(its size, ours).
    _fields_ = (
        ("type", ct.c_uint32),
        ("id", ct.c_uint32),
        ("tag", ct.c_uint8 * 8),
        ("jited_prog_len", ct.c_uint32),
        ("xlated_prog_len", ct.c_uint32),
        ("jited_prog_insns", ct.c_uint64),
        ("xlated_prog_insns", ct.c_uint64),
        ("load_time", ct.c_uint64),
        ("created_by_uid", ct.c_uint32),
        ("nr_map_ids", ct.c_uint32),
        ("map_ids", ct.c_uint64),
        ("name", ct.c_char * 16),
    )


class _MapInfo(ct.Structure):
    _fields_ = (
        ("type", ct.c_uint32),
        ("id", ct.c_uint32),
        ("key_size", ct.c_uint32),
        ("value_size", ct.c_uint32),
        ("max_entries", ct.c_uint32),
        ("map_flags", ct.c_uint32),
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


_P = ct.c_void_p
_U32 = ct.c_uint32
_INT = ct.c_int

_SIGNATURES: dict[str, tuple[list[object], object]] = {
    "bpf_map_create": ([_INT, ct.c_char_p, _U32, _U32, _U32, _P], _INT),
    "bpf_map_update_elem": ([_INT, _P, _P, ct.c_uint64], _INT),
    "bpf_map_lookup_elem": ([_INT, _P, _P], _INT),
    "bpf_map_delete_elem": ([_INT, _P], _INT),
    "bpf_map_get_next_key": ([_INT, _P, _P], _INT),
    "bpf_map_update_batch": ([_INT, _P, _P, _P, _P], _INT),
    "bpf_map_delete_batch": ([_INT, _P, _P, _P], _INT),
    "bpf_prog_load": ([_INT, ct.c_char_p, ct.c_char_p, _P, ct.c_size_t, _P], _INT),
    "bpf_prog_attach_opts": ([_INT, _INT, _INT, _P], _INT),
    "bpf_prog_detach2": ([_INT, _INT, _INT], _INT),
    "bpf_prog_query": ([_INT, _INT, _U32, _P, _P, _P], _INT),
    "bpf_prog_get_fd_by_id": ([_U32], _INT),
    "bpf_prog_get_next_id": ([_U32, ct.POINTER(_U32)], _INT),
    "bpf_map_get_fd_by_id": ([_U32], _INT),
    "bpf_obj_get_info_by_fd": ([_INT, _P, _P], _INT),
    "bpf_obj_pin": ([_INT, ct.c_char_p], _INT),
    "bpf_obj_get": ([ct.c_char_p], _INT),
    "libbpf_num_possible_cpus": ([], _INT),
}


@cache
def _lib() -> ct.CDLL:
    try:
        lib = ct.CDLL("libbpf.so.1", use_errno=True)
    except OSError as e:
        raise BpfError(errno.ENOENT, "dlopen libbpf.so.1", "install Debian's libbpf1") from e
    for fn, (argtypes, restype) in _SIGNATURES.items():
        f = getattr(lib, fn)
        f.argtypes = argtypes
        f.restype = restype
    return lib


def _check(ret: int, op: str, detail: str = "") -> int:
    # libbpf 1.x returns -errno directly (and also sets errno).
    if ret < 0:
        err = -ret
        raise BpfError(err, op, f"{detail}: {os.strerror(err)}" if detail else os.strerror(err))
    return ret


def _buf(data: bytes) -> ct.Array[ct.c_char]:
    return ct.create_string_buffer(data, len(data))


def close(fd: int) -> None:
    os.close(fd)


def map_create(
    map_type: int, key_size: int, value_size: int, max_entries: int, name: str = "", flags: int = 0
) -> int:
    """Create a map; name is truncated to the kernel's 15 characters."""
    opts = _MapCreateOpts(sz=ct.sizeof(_MapCreateOpts), map_flags=flags)
    ret = _lib().bpf_map_create(
        int(map_type), name[:15].encode() or None, key_size, value_size, max_entries, ct.byref(opts)
    )
    return _check(ret, "BPF_MAP_CREATE", f"type {int(map_type)} {name!r}")


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    _check(_lib().bpf_map_update_elem(fd, _buf(key), _buf(value), flags), "BPF_MAP_UPDATE_ELEM")


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value for key, or None when the key is absent."""
    out = ct.create_string_buffer(value_size)
    ret = _lib().bpf_map_lookup_elem(fd, _buf(key), out)
    if ret == -errno.ENOENT:
        return None
    _check(ret, "BPF_MAP_LOOKUP_ELEM")
    return out.raw


def percpu_stride(value_size: int) -> int:
    """Per-CPU map values come (and go) one per possible CPU, each rounded up to 8 bytes."""
    return (value_size + 7) & ~7


def map_lookup_percpu(fd: int, key: bytes, value_size: int) -> list[bytes] | None:
    """One value per possible CPU."""
    stride = percpu_stride(value_size)
    raw = map_lookup(fd, key, stride * possible_cpus())
    if raw is None:
        return None
    return [raw[i * stride : i * stride + value_size] for i in range(possible_cpus())]


def map_delete(fd: int, key: bytes) -> bool:
    """Delete key; False when it was absent (so teardown can be idempotent)."""
    ret = _lib().bpf_map_delete_elem(fd, _buf(key))
    if ret == -errno.ENOENT:
        return False
    _check(ret, "BPF_MAP_DELETE_ELEM")
    return True


def map_update_batch(fd: int, items: list[tuple[bytes, bytes]], flags: int = BPF_ANY) -> None:
    """Write many entries in one syscall (kernel >= 5.6); raises after a partial write too.

    Why: a device rule set is ~15 entries; one BPF_MAP_UPDATE_BATCH costs what ~3 single
    updates do, on the container-start path.
    """
    if not items:
        return
    keys = b"".join(k for k, _ in items)
    values = b"".join(v for _, v in items)
    count = ct.c_uint32(len(items))
    opts = _BatchOpts(sz=ct.sizeof(_BatchOpts), elem_flags=flags)
    ret = _lib().bpf_map_update_batch(fd, _buf(keys), _buf(values), ct.byref(count), ct.byref(opts))
    _check(ret, "BPF_MAP_UPDATE_BATCH", f"{count.value} of {len(items)} written")


def map_delete_batch(fd: int, keys: list[bytes]) -> int:
    """Delete many keys in one syscall; absent keys are skipped. Returns how many were deleted."""
    deleted = i = 0
    while i < len(keys):
        rest = keys[i:]
        count = ct.c_uint32(len(rest))
        opts = _BatchOpts(sz=ct.sizeof(_BatchOpts))
        ret = _lib().bpf_map_delete_batch(fd, _buf(b"".join(rest)), ct.byref(count), ct.byref(opts))
        deleted += count.value
        if ret == 0:
            break
        if ret != -errno.ENOENT:
            _check(ret, "BPF_MAP_DELETE_BATCH")
        i += count.value + 1  # the kernel stopped at an absent key: skip it and go on
    return deleted


def map_keys(fd: int, key_size: int) -> list[bytes]:
    """All keys (a snapshot; concurrent updates may add or drop some)."""
    keys: list[bytes] = []
    cur = ct.create_string_buffer(key_size)
    prev: ct.Array[ct.c_char] | None = None
    while True:
        ret = _lib().bpf_map_get_next_key(fd, prev, cur)
        if ret == -errno.ENOENT:
            return keys
        _check(ret, "BPF_MAP_GET_NEXT_KEY")
        keys.append(cur.raw)
        prev = _buf(cur.raw)


def prog_load(
    prog_type: int,
    insns: bytes,
    name: str = "",
    license: str = "GPL",
    expected_attach_type: int | None = None,
) -> int:
    """Load bytecode; on failure load again with a verifier log so the error says why."""
    if len(insns) % 8:
        raise BpfError(errno.EINVAL, "BPF_PROG_LOAD", "bytecode length is not a multiple of 8")
    code = _buf(insns)
    log_size = 0
    while True:
        log = ct.create_string_buffer(log_size) if log_size else None
        opts = _ProgLoadOpts(
            sz=ct.sizeof(_ProgLoadOpts),
            expected_attach_type=expected_attach_type or 0,
            log_level=1 if log_size else 0,
            log_size=log_size,
            log_buf=ct.cast(log, ct.c_char_p) if log is not None else None,
        )
        ret = _lib().bpf_prog_load(
            int(prog_type),
            name[:15].encode() or None,
            license.encode(),
            code,
            len(insns) // 8,
            ct.byref(opts),
        )
        if ret >= 0:
            return ret
        err = -ret
        if log is None and err in (errno.EACCES, errno.EINVAL, errno.E2BIG):
            log_size = 1 << 16
            continue
        if log is not None and err == errno.ENOSPC and log_size < (1 << 24):
            log_size <<= 2
            continue
        text = log.value.decode(errors="replace") if log is not None else ""
        raise BpfError(err, "BPF_PROG_LOAD", f"{name or 'program'}: {os.strerror(err)}", text)


def prog_attach(
    prog_fd: int,
    target_fd: int,
    attach_type: int,
    flags: int = BPF_F_ALLOW_MULTI,
    replace_fd: int | None = None,
) -> None:
    """Attach to a cgroup; MULTI by default because exclusive locks out child cgroups."""
    opts = _ProgAttachOpts(sz=ct.sizeof(_ProgAttachOpts), flags=flags)
    if replace_fd is not None:
        opts.flags |= BPF_F_REPLACE
        opts.replace_prog_fd = replace_fd
    ret = _lib().bpf_prog_attach_opts(prog_fd, target_fd, int(attach_type), ct.byref(opts))
    _check(ret, "BPF_PROG_ATTACH", f"attach type {int(attach_type)}")


def prog_detach(prog_fd: int, target_fd: int, attach_type: int) -> None:
    ret = _lib().bpf_prog_detach2(prog_fd, target_fd, int(attach_type))
    _check(ret, "BPF_PROG_DETACH", f"attach type {int(attach_type)}")


def prog_query(target_fd: int, attach_type: int, effective: bool = False) -> list[int]:
    """Ids of the programs attached (or, effective=True, in effect) at a cgroup."""
    cnt = 64
    while True:
        ids = (ct.c_uint32 * cnt)()
        n = ct.c_uint32(cnt)
        flags = ct.c_uint32(0)
        ret = _lib().bpf_prog_query(
            target_fd,
            int(attach_type),
            BPF_F_QUERY_EFFECTIVE if effective else 0,
            ct.byref(flags),
            ids,
            ct.byref(n),
        )
        if ret == -errno.ENOSPC and n.value > cnt:
            cnt = n.value
            continue
        _check(ret, "BPF_PROG_QUERY", f"attach type {int(attach_type)}")
        return list(ids[: n.value])


def prog_get_fd_by_id(prog_id: int) -> int:
    return _check(_lib().bpf_prog_get_fd_by_id(prog_id), "BPF_PROG_GET_FD_BY_ID", f"id {prog_id}")


def prog_ids() -> list[int]:
    """Ids of every program loaded on the host (a snapshot), for garbage collection."""
    out: list[int] = []
    nxt = ct.c_uint32(0)
    while True:
        ret = _lib().bpf_prog_get_next_id(nxt.value, ct.byref(nxt))
        if ret == -errno.ENOENT:
            return out
        _check(ret, "BPF_PROG_GET_NEXT_ID")
        out.append(nxt.value)


def map_get_fd_by_id(map_id: int) -> int:
    return _check(_lib().bpf_map_get_fd_by_id(map_id), "BPF_MAP_GET_FD_BY_ID", f"id {map_id}")


def prog_info(fd: int) -> ProgInfo:
    """Id, type, name, tag and map ids of a loaded program."""
    nmaps = 16
    while True:
        ids = (ct.c_uint32 * nmaps)()
        info = _ProgInfo(nr_map_ids=nmaps, map_ids=ct.addressof(ids))
        size = ct.c_uint32(ct.sizeof(info))
        _check(
            _lib().bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(size)),
            "BPF_OBJ_GET_INFO_BY_FD",
        )
        if info.nr_map_ids <= nmaps:
            return ProgInfo(
                id=info.id,
                type=info.type,
                name=info.name.decode(errors="replace"),
                tag=bytes(info.tag).hex(),
                map_ids=list(ids[: info.nr_map_ids]),
            )
        nmaps = info.nr_map_ids


def map_info(fd: int) -> MapInfo:
    info = _MapInfo()
    size = ct.c_uint32(ct.sizeof(info))
    _check(
        _lib().bpf_obj_get_info_by_fd(fd, ct.byref(info), ct.byref(size)), "BPF_OBJ_GET_INFO_BY_FD"
    )
    return MapInfo(
        id=info.id,
        type=info.type,
        name=info.name.decode(errors="replace"),
        key_size=info.key_size,
        value_size=info.value_size,
        max_entries=info.max_entries,
    )


def obj_pin(fd: int, path: str | os.PathLike[str]) -> None:
    _check(_lib().bpf_obj_pin(fd, os.fsencode(path)), "BPF_OBJ_PIN", str(path))


def obj_get(path: str | os.PathLike[str]) -> int:
    return _check(_lib().bpf_obj_get(os.fsencode(path)), "BPF_OBJ_GET", str(path))


@cache
def possible_cpus() -> int:
    return _check(_lib().libbpf_num_possible_cpus(), "libbpf_num_possible_cpus")
