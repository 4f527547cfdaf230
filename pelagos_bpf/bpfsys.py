"""The one low-level BPF layer: bpf(2) issued directly, by our C extension pelagos_bpf._sys
when it was built (setup.py, optional) or else through libc's `syscall()` with ctypes.

Why no libbpf: dlopening `libbpf.so.1` is paid again by every fresh process (the OCI hook's
fallback, a CLI call), and its first map create probes the kernel with extra PROG_LOADs. Why the
extension: ctypes makes a fresh process build the CDLL and the prototype before its first call,
and converts arguments on every call (bench/bench_backends.py times both backends side by
side); `BACKEND` says which one this process uses, and
$PELAGOS_BPF_CTYPES=1 forces ctypes. Both return -errno, so nothing above can tell them apart.
What libbpf gave us is kept here: every command's `union bpf_attr` is a zero-filled buffer of
ATTR_SIZE bytes (the layouts are in bpfabi.py); PROG_LOAD is retried on EAGAIN (libbpf's 5
attempts); map and program names are cut to the kernel's 15 bytes; fds 0-2 are never returned
(libbpf's ensure_good_fd: a runtime that closed stdio must not get a BPF object as stdin); the
possible-CPU count is parsed from /sys/devices/system/cpu/possible as libbpf_num_possible_cpus()
does.
Every other module goes through these functions; none touches ctypes or bpf(2) itself
(statfs(2), for the pin dir's filesystem type, comes from here too).
"""

from __future__ import annotations

import ctypes as ct
import errno
import fcntl
import os
import threading
from collections.abc import Callable
from functools import cache

from .bpfabi import (
    ATTR_SIZE,
    BPF_ANY,
    BPF_EXIST,
    BPF_F_ALLOW_MULTI,
    BPF_F_ALLOW_OVERRIDE,
    BPF_F_QUERY_EFFECTIVE,
    BPF_F_REPLACE,
    BPF_NOEXIST,
    CMDS,
    SYS_BPF,
    AttachAttr,
    AttachType,
    Attr,
    BatchAttr,
    ElemAttr,
    IdAttr,
    InfoAttr,
    MapCreateAttr,
    MapInfo,
    MapInfoStruct,
    MapType,
    ObjAttr,
    ProgInfo,
    ProgInfoStruct,
    ProgLoadAttr,
    ProgType,
    QueryAttr,
)
from .errors import BpfError

try:
    from . import _sys as _ext

    HAVE_EXT = True
except ImportError:  # not built: an install without a C compiler works through ctypes
    HAVE_EXT = False

PROG_LOAD_ATTEMPTS = 5  # libbpf's default for PROG_LOAD on EAGAIN
POSSIBLE_CPUS = "/sys/devices/system/cpu/possible"
__all__ = [
    "BPF_ANY",
    "BPF_EXIST",
    "BPF_F_ALLOW_MULTI",
    "BPF_F_ALLOW_OVERRIDE",
    "BPF_F_QUERY_EFFECTIVE",
    "BPF_F_REPLACE",
    "BPF_NOEXIST",
    "AttachType",
    "MapInfo",
    "MapType",
    "ProgInfo",
    "ProgType",
]


@cache
def libc() -> ct.CDLL:
    """The process's libc, one handle for every module: each CDLL makes a new ctypes class,
    which a fresh process pays for."""
    return ct.CDLL(None, use_errno=True)


@cache
def _syscall() -> tuple[Callable[..., int], int]:
    """libc's syscall() and __NR_bpf for this machine."""
    # os.uname() is what platform.machine() reads, without importing `platform` (a module
    # import of its own on every fresh process).
    machine = os.uname().machine
    nr = SYS_BPF.get(machine)
    if nr is None:
        raise BpfError(errno.ENOSYS, "bpf(2)", f"no bpf syscall number known for {machine}")
    fn = libc().syscall
    fn.argtypes = (ct.c_long, ct.c_int, ct.c_void_p, ct.c_uint)
    fn.restype = ct.c_long
    return fn, nr


def _bpf_ctypes(op: str, attr: Attr) -> int:
    """One bpf(2) call; the result, or -errno on failure (as libbpf 1.x returned)."""
    fn, nr = _syscall()
    ret = fn(nr, CMDS[op], ct.byref(attr), ATTR_SIZE)
    return -ct.get_errno() if ret < 0 else ret


def _bpf_ext(op: str, attr: Attr) -> int:
    """_bpf_ctypes through pelagos_bpf._sys (the attr passes as a writable buffer)."""
    return _ext.bpf(CMDS[op], attr)


class _Statfs(ct.Structure):
    # struct statfs starts with f_type (__fsword_t, a long) on every Linux ABI; room for the rest.
    _fields_ = (("f_type", ct.c_long), ("rest", ct.c_byte * 248))


def _statfs_ctypes(path: bytes) -> int:
    buf = _Statfs()
    if libc().statfs(path, ct.byref(buf)) != 0:
        return -ct.get_errno()
    return int(buf.f_type) & 0xFFFF_FFFF


def statfs_type(path: str | os.PathLike[str]) -> int | None:
    """The f_type of the filesystem holding `path` (os.statvfs has none); None if statfs fails."""
    ret = _statfs(os.fsencode(path))
    return None if ret < 0 else ret


def use_backend(name: str) -> str:
    """Issue syscalls through "ext" (pelagos_bpf._sys) or "ctypes"; returns the previous one.
    For tests and benchmarks that compare the two; "ext" raises ImportError if not built."""
    global _bpf, _statfs, BACKEND
    if name == "ext" and not HAVE_EXT:
        raise ImportError("pelagos_bpf._sys was not built (no C compiler at install?)")
    if name not in ("ext", "ctypes"):
        raise ValueError(f"unknown backend {name!r}")
    prev, BACKEND = BACKEND, name
    if name == "ext":
        _bpf, _statfs = _bpf_ext, _ext.statfs_type
    else:
        _bpf, _statfs = _bpf_ctypes, _statfs_ctypes
    return prev


CTYPES_ENV = "PELAGOS_BPF_CTYPES"
BACKEND = "ctypes"
_bpf: Callable[[str, Attr], int] = _bpf_ctypes
_statfs: Callable[[bytes], int] = _statfs_ctypes
if HAVE_EXT and not os.environ.get(CTYPES_ENV):
    use_backend("ext")


def _call(op: str, attr: Attr, detail: str = "") -> int:
    return _check(_bpf(op, attr), op, detail)


def _charged(op: str, attr: Attr) -> int:
    """A MAP_CREATE or PROG_LOAD: kernels before 5.11 charge BPF memory to RLIMIT_MEMLOCK
    (64 KiB by default there) and say EPERM when it runs out; 5.11+ charge the memcg. So, as
    libbpf's bump_rlimit_memlock does for those kernels, an EPERM while the limit is finite
    raises it (to infinity, else to the hard limit) and the call is retried once; a real
    permission error stays EPERM."""
    ret = _bpf(op, attr)
    if ret == -errno.EPERM and _raise_memlock():
        ret = _bpf(op, attr)
    return ret


def _raise_memlock() -> bool:
    """Raise RLIMIT_MEMLOCK (to infinity, which needs CAP_SYS_RESOURCE, else the soft limit to
    the hard one); False when it cannot go any higher."""
    import resource

    inf = resource.RLIM_INFINITY
    soft, hard = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if soft == inf:
        return False
    for limit in ((inf, inf), (hard, hard)):
        if limit[0] == soft:
            continue  # no higher than it is
        try:
            resource.setrlimit(resource.RLIMIT_MEMLOCK, limit)
        except (OSError, ValueError):
            continue
        return True
    return False


def _new_fd(fd: int) -> int:
    """A new fd, moved above 0-2 (libbpf's ensure_good_fd): stdio must never be a BPF object."""
    if fd >= 3:
        return fd
    try:
        return fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 3)
    finally:
        os.close(fd)


def _check(ret: int, op: str, detail: str = "") -> int:
    if ret < 0:
        err = -ret
        raise BpfError(err, op, f"{detail}: {os.strerror(err)}" if detail else os.strerror(err))
    return ret


def _addr(obj: ct.Array[ct.c_char] | ct.Array[ct.c_uint32] | ct.Structure | None) -> int:
    """Where the kernel writes obj: an output pointer is a plain u64 in bpf_attr."""
    return ct.addressof(obj) if obj is not None else 0


def _out_buffer(size: int) -> tuple[bytearray, int]:
    """A zeroed output buffer and its address. A bytearray, not `ct.c_char * size`: ctypes
    makes (and caches) a new array type per size, a cost in every fresh process, and a first
    attach would make four."""
    buf = bytearray(max(size, 1))
    return buf, ct.addressof(ct.c_char.from_buffer(buf))


def _u32s(buf: bytearray, n: int) -> list[int]:
    return memoryview(buf).cast("I")[:n].tolist()


def close(fd: int) -> None:
    os.close(fd)


def map_create(
    map_type: int, key_size: int, value_size: int, max_entries: int, name: str = "", flags: int = 0
) -> int:
    """Create a map; the name is cut to the kernel's 15 bytes (as libbpf's strlcpy did)."""
    attr = MapCreateAttr(
        map_type=map_type,
        key_size=key_size,
        value_size=value_size,
        max_entries=max_entries,
        map_flags=flags,
        map_name=name.encode()[:15],
    )
    ret = _charged("BPF_MAP_CREATE", attr)
    return _new_fd(_check(ret, "BPF_MAP_CREATE", f"type {int(map_type)} {name!r}"))


def _elem(op: str, fd: int, key: bytes | None, value: bytes | int | None, flags: int = 0) -> int:
    """A MAP_*_ELEM command; `value` is bytes going in, or the address of an output buffer."""
    return _bpf(op, ElemAttr(map_fd=fd, key=key, value=value, flags=flags))


def map_update(fd: int, key: bytes, value: bytes, flags: int = BPF_ANY) -> None:
    ret = _elem("BPF_MAP_UPDATE_ELEM", fd, key, value, flags)
    _check(ret, "BPF_MAP_UPDATE_ELEM")


def map_lookup(fd: int, key: bytes, value_size: int) -> bytes | None:
    """The value for key, or None when the key is absent."""
    out, addr = _out_buffer(value_size)
    ret = _elem("BPF_MAP_LOOKUP_ELEM", fd, key, addr)
    if ret == -errno.ENOENT:
        return None
    _check(ret, "BPF_MAP_LOOKUP_ELEM")
    return bytes(out[:value_size])


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
    ret = _elem("BPF_MAP_DELETE_ELEM", fd, key, None)
    if ret == -errno.ENOENT:
        return False
    _check(ret, "BPF_MAP_DELETE_ELEM")
    return True


class PartialWrite(BpfError):
    """A batch update failed after writing the first `written` entries (in order)."""

    def __init__(self, errno_: int, op: str, detail: str, written: int) -> None:
        super().__init__(errno_, op, detail)
        self.written = written


def map_update_batch(fd: int, items: list[tuple[bytes, bytes]], flags: int = BPF_ANY) -> None:
    """Write many entries in one syscall (kernel >= 5.6); PartialWrite says how many of the
    first entries were written when it fails, so a rollback deletes exactly those.

    Why: a device rule set is a dozen entries or more; one BPF_MAP_UPDATE_BATCH is one syscall
    and one map lock round instead of one per entry, on the container-start path.
    """
    if not items:
        return
    keys = b"".join(k for k, _ in items)
    values = b"".join(v for _, v in items)
    attr = BatchAttr(keys=keys, values=values, count=len(items), map_fd=fd, elem_flags=flags)
    ret = _bpf("BPF_MAP_UPDATE_BATCH", attr)
    if ret < 0:
        err = -ret
        detail = f"{attr.count} of {len(items)} written: {os.strerror(err)}"
        raise PartialWrite(err, "BPF_MAP_UPDATE_BATCH", detail, attr.count)


def map_delete_batch(fd: int, keys: list[bytes]) -> int:
    """Delete many keys in one syscall; absent keys are skipped. Returns how many were deleted.

    The kernel stops at the first absent key; the call resumes after it. The keys are joined
    once and each resumption passes an address into that one buffer, so a list with many
    absent keys costs O(keys), not O(keys^2) (a failed setup's rollback deletes what it may
    not have written).
    """
    if not keys:
        return 0
    size = len(keys[0])
    blob = ct.create_string_buffer(b"".join(keys), size * len(keys))
    base = ct.addressof(blob)
    deleted = i = 0
    while i < len(keys):
        attr = BatchAttr(keys=base + i * size, count=len(keys) - i, map_fd=fd)
        ret = _bpf("BPF_MAP_DELETE_BATCH", attr)
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
    prev: bytes | None = None
    while True:
        ret = _elem("BPF_MAP_GET_NEXT_KEY", fd, prev, ct.addressof(cur))
        if ret == -errno.ENOENT:
            return keys
        _check(ret, "BPF_MAP_GET_NEXT_KEY")
        keys.append(cur.raw)
        prev = cur.raw


def map_count(fd: int, key_size: int) -> int:
    """How many keys the map holds (a snapshot), without keeping them: the agent's fill level
    of a 262,144-entry rule map would otherwise build a list of every key per scrape."""
    n = 0
    cur = ct.create_string_buffer(key_size)
    prev: bytes | None = None
    while True:
        ret = _elem("BPF_MAP_GET_NEXT_KEY", fd, prev, ct.addressof(cur))
        if ret == -errno.ENOENT:
            return n
        _check(ret, "BPF_MAP_GET_NEXT_KEY")
        n += 1
        prev = cur.raw


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
    log_size = 0
    while True:
        log = ct.create_string_buffer(log_size) if log_size else None
        attr = ProgLoadAttr(
            prog_type=prog_type,
            insn_cnt=len(insns) // 8,
            insns=insns,
            license=license.encode(),
            log_level=1 if log_size else 0,
            log_size=log_size,
            log_buf=_addr(log),
            prog_name=name.encode()[:15],
            expected_attach_type=expected_attach_type or 0,
        )
        for _ in range(PROG_LOAD_ATTEMPTS):
            ret = _charged("BPF_PROG_LOAD", attr)
            if ret != -errno.EAGAIN:
                break
        if ret >= 0:
            return _new_fd(ret)
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
    attr = AttachAttr(
        target_fd=target_fd, attach_bpf_fd=prog_fd, attach_type=attach_type, attach_flags=flags
    )
    if replace_fd is not None:
        attr.attach_flags |= BPF_F_REPLACE
        attr.replace_bpf_fd = replace_fd
    _call("BPF_PROG_ATTACH", attr, f"attach type {int(attach_type)}")


def prog_detach(prog_fd: int, target_fd: int, attach_type: int) -> None:
    attr = AttachAttr(target_fd=target_fd, attach_bpf_fd=prog_fd, attach_type=attach_type)
    _call("BPF_PROG_DETACH", attr, f"attach type {int(attach_type)}")


QUERY_IDS = 64  # ids a first PROG_QUERY makes room for (the kernel says when there are more)
_query_bufs = threading.local()


def _query_buffer() -> tuple[bytearray, int]:
    """This thread's output buffer for QUERY_IDS ids, made once: a container start queries
    four attach types, and a new buffer each time was half the cost of a query."""
    try:
        got: tuple[bytearray, int] = _query_bufs.buf
    except AttributeError:
        got = _query_bufs.buf = _out_buffer(4 * QUERY_IDS)
    return got


def prog_query(target_fd: int, attach_type: int, effective: bool = False) -> list[int]:
    """Ids of the programs attached (or, effective=True, in effect) at a cgroup."""
    cnt = QUERY_IDS
    ids, addr = _query_buffer()
    while True:
        attr = QueryAttr(
            target_fd=target_fd,
            attach_type=attach_type,
            query_flags=BPF_F_QUERY_EFFECTIVE if effective else 0,
            prog_ids=addr,
            prog_cnt=cnt,
        )
        ret = _bpf("BPF_PROG_QUERY", attr)
        if ret == -errno.ENOSPC and attr.prog_cnt > cnt:
            cnt = attr.prog_cnt
            ids, addr = _out_buffer(4 * cnt)
            continue
        _check(ret, "BPF_PROG_QUERY", f"attach type {int(attach_type)}")
        return _u32s(ids, attr.prog_cnt) if attr.prog_cnt else []


def prog_get_fd_by_id(prog_id: int) -> int:
    return _new_fd(_call("BPF_PROG_GET_FD_BY_ID", IdAttr(start_id=prog_id), f"id {prog_id}"))


def prog_ids() -> list[int]:
    """Ids of every program loaded on the host (a snapshot), for garbage collection."""
    out: list[int] = []
    attr = IdAttr()
    while True:
        ret = _bpf("BPF_PROG_GET_NEXT_ID", attr)
        if ret == -errno.ENOENT:
            return out
        _check(ret, "BPF_PROG_GET_NEXT_ID")
        out.append(attr.next_id)
        attr.start_id = attr.next_id


def map_get_fd_by_id(map_id: int) -> int:
    return _new_fd(_call("BPF_MAP_GET_FD_BY_ID", IdAttr(start_id=map_id), f"id {map_id}"))


def _obj_info(fd: int, info: ct.Structure) -> None:
    attr = InfoAttr(bpf_fd=fd, info_len=ct.sizeof(info), info=_addr(info))
    _call("BPF_OBJ_GET_INFO_BY_FD", attr)


def prog_info(fd: int) -> ProgInfo:
    """Id, type, name, tag and map ids of a loaded program."""
    nmaps = 16
    while True:
        ids, addr = _out_buffer(4 * nmaps)
        info = ProgInfoStruct(nr_map_ids=nmaps, map_ids=addr)
        _obj_info(fd, info)
        if info.nr_map_ids <= nmaps:
            return ProgInfo(
                id=info.id,
                type=info.type,
                name=info.name.decode(errors="replace"),
                tag=bytes(info.tag).hex(),
                map_ids=_u32s(ids, info.nr_map_ids),
            )
        nmaps = info.nr_map_ids


def prog_xlated(fd: int) -> bytes:
    """The program's instructions as the kernel translated them (what `devices check` runs for a
    foreign program; map references and helper calls appear as the kernel rewrote them)."""
    info = ProgInfoStruct()
    _obj_info(fd, info)
    size = info.xlated_prog_len
    buf, addr = _out_buffer(size)
    info = ProgInfoStruct(xlated_prog_len=size, xlated_prog_insns=addr)
    _obj_info(fd, info)
    return bytes(buf[: min(size, info.xlated_prog_len)])


def map_info(fd: int) -> MapInfo:
    info = MapInfoStruct()
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
    attr = ObjAttr(pathname=os.fsencode(path), bpf_fd=fd)
    _call("BPF_OBJ_PIN", attr, str(path))


def obj_get(path: str | os.PathLike[str]) -> int:
    attr = ObjAttr(pathname=os.fsencode(path))
    return _new_fd(_call("BPF_OBJ_GET", attr, str(path)))


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
        raise BpfError(
            e.errno or errno.EIO, "possible CPUs", f"{POSSIBLE_CPUS}: {e}", path=POSSIBLE_CPUS
        ) from e
    try:
        return count_cpu_list(text)
    except ValueError as e:
        raise BpfError(
            errno.EINVAL, "possible CPUs", f"{POSSIBLE_CPUS}: {text!r}", path=POSSIBLE_CPUS
        ) from e
