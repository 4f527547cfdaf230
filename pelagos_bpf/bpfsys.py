"""The one low-level BPF layer: bpf(2) issued directly through libc's `syscall()` (ctypes).

Why no libbpf: dlopening `libbpf.so.1` costs ~0.6 ms in every fresh process, more than half the
budget of a container's first attach, while `CDLL(None)` (libc, already mapped) costs ~0.08 ms.
What libbpf gave us is kept here: every command's `union bpf_attr` is a zero-filled buffer of
ATTR_SIZE bytes, bigger than any kernel's union we know (the kernel takes a bigger size when the
tail is zero, and fields a newer kernel writes back, such as PROG_QUERY's `revision` on 6.17+,
land in owned memory); PROG_LOAD is retried on EAGAIN (libbpf's 5 attempts); map and program
names are cut to the kernel's 15 characters; fds 0-2 are never returned (libbpf's
ensure_good_fd: a runtime that closed stdio must not get a BPF object as stdin); the possible-CPU
count is parsed from /sys/devices/system/cpu/possible as libbpf_num_possible_cpus() does. The
attr layouts mirror /usr/include/linux/bpf.h; tests/test_bpfsys_layout.py checks every offset
against that header with the system C compiler.
Every other module goes through these functions; none touches ctypes or bpf(2) itself.
"""

from __future__ import annotations

import ctypes as ct
import errno
import fcntl
import os
from collections.abc import Callable
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

ATTR_SIZE = 256  # > sizeof(union bpf_attr) of every kernel we know (6.18: < 160 bytes)
PROG_LOAD_ATTEMPTS = 5  # libbpf's default for PROG_LOAD on EAGAIN
POSSIBLE_CPUS = "/sys/devices/system/cpu/possible"

# __NR_bpf per `uname -m` (the kernel's syscall tables; asm-generic arches share 280). Only
# 64-bit arches: the attrs below rely on c_uint64 being 8-byte aligned, as __aligned_u64 is.
SYS_BPF = {"x86_64": 321, "aarch64": 280, "riscv64": 280, "ppc64le": 361, "s390x": 351}


class Cmd(IntEnum):
    """enum bpf_cmd: the commands this layer issues."""

    MAP_CREATE = 0
    MAP_LOOKUP_ELEM = 1
    MAP_UPDATE_ELEM = 2
    MAP_DELETE_ELEM = 3
    MAP_GET_NEXT_KEY = 4
    PROG_LOAD = 5
    OBJ_PIN = 6
    OBJ_GET = 7
    PROG_ATTACH = 8
    PROG_DETACH = 9
    PROG_GET_NEXT_ID = 11
    PROG_GET_FD_BY_ID = 13
    MAP_GET_FD_BY_ID = 14
    OBJ_GET_INFO_BY_FD = 15
    PROG_QUERY = 16
    MAP_UPDATE_BATCH = 26
    MAP_DELETE_BATCH = 27


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


_U32 = ct.c_uint32
_U64 = ct.c_uint64  # __aligned_u64; pointers go in as ct.addressof(...)


ATTRS: list[type[ct.Structure]] = []  # every command's attr layout, for the layout test


def _attr(prefix: str) -> Callable[[type[ct.Structure]], type[ct.Structure]]:
    """Pad a command's leading fields with zeros to ATTR_SIZE bytes.

    `prefix` is how the header names the command's struct inside the union ("" for anonymous
    structs), so the layout test can ask the C compiler for `offsetof(union bpf_attr, prefix+f)`.
    """

    def pad(head: type[ct.Structure]) -> type[ct.Structure]:
        tail = (("_tail", ct.c_uint8 * (ATTR_SIZE - ct.sizeof(head))),)
        cls = type(head.__name__, (head,), {"_fields_": tail, "c_prefix": prefix})
        ATTRS.append(cls)
        return cls

    return pad


@_attr("")
class _MapCreateAttr(ct.Structure):
    _fields_ = (
        ("map_type", _U32),
        ("key_size", _U32),
        ("value_size", _U32),
        ("max_entries", _U32),
        ("map_flags", _U32),
        ("inner_map_fd", _U32),
        ("numa_node", _U32),
        ("map_name", ct.c_char * 16),
    )


@_attr("")
class _ElemAttr(ct.Structure):
    # `value` is `next_key` for MAP_GET_NEXT_KEY (a union in the header).
    _fields_ = (("map_fd", _U32), ("key", _U64), ("value", _U64), ("flags", _U64))


@_attr("batch.")
class _BatchAttr(ct.Structure):
    _fields_ = (
        ("in_batch", _U64),
        ("out_batch", _U64),
        ("keys", _U64),
        ("values", _U64),
        ("count", _U32),
        ("map_fd", _U32),
        ("elem_flags", _U64),
        ("flags", _U64),
    )


@_attr("")
class _ProgLoadAttr(ct.Structure):
    _fields_ = (
        ("prog_type", _U32),
        ("insn_cnt", _U32),
        ("insns", _U64),
        ("license", _U64),
        ("log_level", _U32),
        ("log_size", _U32),
        ("log_buf", _U64),
        ("kern_version", _U32),
        ("prog_flags", _U32),
        ("prog_name", ct.c_char * 16),
        ("prog_ifindex", _U32),
        ("expected_attach_type", _U32),
    )


@_attr("")
class _ObjAttr(ct.Structure):
    _fields_ = (("pathname", _U64), ("bpf_fd", _U32), ("file_flags", _U32))


@_attr("")
class _AttachAttr(ct.Structure):
    _fields_ = (
        ("target_fd", _U32),
        ("attach_bpf_fd", _U32),
        ("attach_type", _U32),
        ("attach_flags", _U32),
        ("replace_bpf_fd", _U32),
    )


@_attr("")
class _IdAttr(ct.Structure):
    # `start_id` is also `prog_id` / `map_id` (a union in the header).
    _fields_ = (("start_id", _U32), ("next_id", _U32), ("open_flags", _U32))


@_attr("info.")
class _InfoAttr(ct.Structure):
    _fields_ = (("bpf_fd", _U32), ("info_len", _U32), ("info", _U64))


@_attr("query.")
class _QueryAttr(ct.Structure):
    _fields_ = (
        ("target_fd", _U32),
        ("attach_type", _U32),
        ("query_flags", _U32),
        ("attach_flags", _U32),
        ("prog_ids", _U64),
        ("prog_cnt", _U32),
    )


class _ProgInfo(ct.Structure):
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


class _MapInfo(ct.Structure):
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


@cache
def _syscall() -> Callable[..., int]:
    """libc's syscall(), bound to __NR_bpf for this machine."""
    # os.uname() is what platform.machine() reads; `import platform` alone costs ~4 ms.
    machine = os.uname().machine
    nr = SYS_BPF.get(machine)
    if nr is None:
        raise BpfError(errno.ENOSYS, "bpf(2)", f"no bpf syscall number known for {machine}")
    fn = ct.CDLL(None, use_errno=True).syscall
    fn.argtypes = (ct.c_long, ct.c_int, ct.c_void_p, ct.c_uint)
    fn.restype = ct.c_long

    def bpf(cmd: int, attr: ct.Structure) -> int:
        return fn(nr, cmd, ct.byref(attr), ATTR_SIZE)

    return bpf


def _bpf(cmd: Cmd, attr: ct.Structure) -> int:
    """One bpf(2) call; the result, or -errno on failure (as libbpf 1.x returned)."""
    ret = _syscall()(cmd, attr)
    return -ct.get_errno() if ret < 0 else ret


def _bpf_fd(cmd: Cmd, attr: ct.Structure) -> int:
    """A call that returns a new fd (or -errno); never 0-2, as libbpf's ensure_good_fd."""
    fd = _bpf(cmd, attr)
    if 0 <= fd < 3:
        try:
            return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
        finally:
            os.close(fd)
    return fd


def _check(ret: int, op: str, detail: str = "") -> int:
    if ret < 0:
        err = -ret
        raise BpfError(err, op, f"{detail}: {os.strerror(err)}" if detail else os.strerror(err))
    return ret


_Buf = ct.Array[ct.c_char]


def _buf(data: bytes) -> _Buf:
    return ct.create_string_buffer(data, len(data))


def _addr(obj: ct.Array[ct.c_char] | ct.Array[ct.c_uint32] | ct.Structure | None) -> int:
    """Where the kernel finds (or writes) obj: a pointer field is a plain u64 in bpf_attr."""
    return ct.addressof(obj) if obj is not None else 0


def close(fd: int) -> None:
    os.close(fd)


def map_create(
    map_type: int, key_size: int, value_size: int, max_entries: int, name: str = "", flags: int = 0
) -> int:
    """Create a map; name is truncated to the kernel's 15 characters."""
    attr = _MapCreateAttr(
        map_type=map_type,
        key_size=key_size,
        value_size=value_size,
        max_entries=max_entries,
        map_flags=flags,
        map_name=name[:15].encode(),
    )
    return _check(_bpf_fd(Cmd.MAP_CREATE, attr), "BPF_MAP_CREATE", f"type {int(map_type)} {name!r}")


def _elem(cmd: Cmd, fd: int, key: _Buf | None, value: _Buf | None, flags: int = 0) -> int:
    return _bpf(cmd, _ElemAttr(map_fd=fd, key=_addr(key), value=_addr(value), flags=flags))


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    ret = _elem(Cmd.MAP_UPDATE_ELEM, fd, _buf(key), _buf(value), flags)
    _check(ret, "BPF_MAP_UPDATE_ELEM")


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value for key, or None when the key is absent."""
    out = ct.create_string_buffer(value_size)
    ret = _elem(Cmd.MAP_LOOKUP_ELEM, fd, _buf(key), out)
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
    ret = _elem(Cmd.MAP_DELETE_ELEM, fd, _buf(key), None)
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
    keys = _buf(b"".join(k for k, _ in items))
    values = _buf(b"".join(v for _, v in items))
    attr = _BatchAttr(
        keys=_addr(keys), values=_addr(values), count=len(items), map_fd=fd, elem_flags=flags
    )
    ret = _bpf(Cmd.MAP_UPDATE_BATCH, attr)
    _check(ret, "BPF_MAP_UPDATE_BATCH", f"{attr.count} of {len(items)} written")


def map_delete_batch(fd: int, keys: list[bytes]) -> int:
    """Delete many keys in one syscall; absent keys are skipped. Returns how many were deleted."""
    deleted = i = 0
    while i < len(keys):
        rest = _buf(b"".join(keys[i:]))
        attr = _BatchAttr(keys=_addr(rest), count=len(keys) - i, map_fd=fd)
        ret = _bpf(Cmd.MAP_DELETE_BATCH, attr)
        deleted += attr.count
        if ret == 0:
            break
        if ret != -errno.ENOENT:
            _check(ret, "BPF_MAP_DELETE_BATCH")
        i += attr.count + 1  # the kernel stopped at an absent key: skip it and go on
    return deleted


def map_keys(fd: int, key_size: int) -> list[bytes]:
    """All keys (a snapshot; concurrent updates may add or drop some)."""
    keys: list[bytes] = []
    cur = ct.create_string_buffer(key_size)
    prev: _Buf | None = None
    while True:
        ret = _elem(Cmd.MAP_GET_NEXT_KEY, fd, prev, cur)
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
    lic = ct.create_string_buffer(license.encode())
    log_size = 0
    while True:
        log = ct.create_string_buffer(log_size) if log_size else None
        attr = _ProgLoadAttr(
            prog_type=prog_type,
            insn_cnt=len(insns) // 8,
            insns=_addr(code),
            license=_addr(lic),
            log_level=1 if log_size else 0,
            log_size=log_size,
            log_buf=_addr(log),
            prog_name=name[:15].encode(),
            expected_attach_type=expected_attach_type or 0,
        )
        for _ in range(PROG_LOAD_ATTEMPTS):
            ret = _bpf_fd(Cmd.PROG_LOAD, attr)
            if ret != -errno.EAGAIN:
                break
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
    attr = _AttachAttr(
        target_fd=target_fd, attach_bpf_fd=prog_fd, attach_type=attach_type, attach_flags=flags
    )
    if replace_fd is not None:
        attr.attach_flags |= BPF_F_REPLACE
        attr.replace_bpf_fd = replace_fd
    _check(_bpf(Cmd.PROG_ATTACH, attr), "BPF_PROG_ATTACH", f"attach type {int(attach_type)}")


def prog_detach(prog_fd: int, target_fd: int, attach_type: int) -> None:
    attr = _AttachAttr(target_fd=target_fd, attach_bpf_fd=prog_fd, attach_type=attach_type)
    _check(_bpf(Cmd.PROG_DETACH, attr), "BPF_PROG_DETACH", f"attach type {int(attach_type)}")


def prog_query(target_fd: int, attach_type: int, effective: bool = False) -> list[int]:
    """Ids of the programs attached (or, effective=True, in effect) at a cgroup."""
    cnt = 64
    while True:
        ids = (ct.c_uint32 * cnt)()
        attr = _QueryAttr(
            target_fd=target_fd,
            attach_type=attach_type,
            query_flags=BPF_F_QUERY_EFFECTIVE if effective else 0,
            prog_ids=_addr(ids),
            prog_cnt=cnt,
        )
        ret = _bpf(Cmd.PROG_QUERY, attr)
        if ret == -errno.ENOSPC and attr.prog_cnt > cnt:
            cnt = attr.prog_cnt
            continue
        _check(ret, "BPF_PROG_QUERY", f"attach type {int(attach_type)}")
        return list(ids[: attr.prog_cnt])


def prog_get_fd_by_id(prog_id: int) -> int:
    ret = _bpf_fd(Cmd.PROG_GET_FD_BY_ID, _IdAttr(start_id=prog_id))
    return _check(ret, "BPF_PROG_GET_FD_BY_ID", f"id {prog_id}")


def prog_ids() -> list[int]:
    """Ids of every program loaded on the host (a snapshot), for garbage collection."""
    out: list[int] = []
    attr = _IdAttr()
    while True:
        ret = _bpf(Cmd.PROG_GET_NEXT_ID, attr)
        if ret == -errno.ENOENT:
            return out
        _check(ret, "BPF_PROG_GET_NEXT_ID")
        out.append(attr.next_id)
        attr.start_id = attr.next_id


def map_get_fd_by_id(map_id: int) -> int:
    ret = _bpf_fd(Cmd.MAP_GET_FD_BY_ID, _IdAttr(start_id=map_id))
    return _check(ret, "BPF_MAP_GET_FD_BY_ID", f"id {map_id}")


def _obj_info(fd: int, info: ct.Structure) -> None:
    attr = _InfoAttr(bpf_fd=fd, info_len=ct.sizeof(info), info=_addr(info))
    _check(_bpf(Cmd.OBJ_GET_INFO_BY_FD, attr), "BPF_OBJ_GET_INFO_BY_FD")


def prog_info(fd: int) -> ProgInfo:
    """Id, type, name, tag and map ids of a loaded program."""
    nmaps = 16
    while True:
        ids = (ct.c_uint32 * nmaps)()
        info = _ProgInfo(nr_map_ids=nmaps, map_ids=_addr(ids))
        _obj_info(fd, info)
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
    _obj_info(fd, info)
    return MapInfo(
        id=info.id,
        type=info.type,
        name=info.name.decode(errors="replace"),
        key_size=info.key_size,
        value_size=info.value_size,
        max_entries=info.max_entries,
    )


def obj_pin(fd: int, path: str | os.PathLike[str]) -> None:
    name = ct.create_string_buffer(os.fsencode(path))
    attr = _ObjAttr(pathname=_addr(name), bpf_fd=fd)
    _check(_bpf(Cmd.OBJ_PIN, attr), "BPF_OBJ_PIN", str(path))


def obj_get(path: str | os.PathLike[str]) -> int:
    name = ct.create_string_buffer(os.fsencode(path))
    attr = _ObjAttr(pathname=_addr(name))
    return _check(_bpf_fd(Cmd.OBJ_GET, attr), "BPF_OBJ_GET", str(path))


def count_cpu_list(text: str) -> int:
    """How many CPUs a kernel cpu list names ("0-3,5-7" -> 7), as libbpf's parse_cpu_mask_str."""
    n = 0
    for part in text.strip().split(","):
        lo, dash, hi = part.partition("-")
        first = int(lo)
        last = int(hi) if dash else first
        if last < first:
            raise ValueError(f"bad CPU range {part!r}")
        n += last - first + 1
    return n


@cache
def possible_cpus() -> int:
    """Possible CPUs: the kernel lays per-CPU map values out one per possible CPU."""
    try:
        with open(POSSIBLE_CPUS) as f:
            text = f.read()
    except OSError as e:
        raise BpfError(e.errno or errno.EIO, "possible CPUs", f"{POSSIBLE_CPUS}: {e}") from e
    try:
        return count_cpu_list(text)
    except ValueError as e:
        raise BpfError(errno.EINVAL, "possible CPUs", f"{POSSIBLE_CPUS}: {text!r}") from e
