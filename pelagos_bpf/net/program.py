"""Load, attach, update, detach and read the net programs of bpf/net.c.

One egress and one ingress program (and their maps) are loaded once per process and attached
with BPF_F_ALLOW_MULTI to every cgroup; what differs per cgroup lives in the cgroup storage the
kernel allocates at attach time. So a container start costs two PROG_ATTACHes and a map write,
and a live change (update_net) is map writes only.

Nothing is remembered in Python objects: every call finds our programs on the cgroup with
PROG_QUERY + prog info (by name) and their maps through the program's map ids, so detach,
update and stats work from any process, whichever process attached.
"""

from __future__ import annotations

import contextlib
import errno
import os
import struct
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .. import bpfsys, progcache, progfind
from ..bpfsys import AttachType, MapType, ProgType
from ..errors import BpfError
from .plan import NetPlan

if TYPE_CHECKING:
    from ..cgroup import Cgroup

SOURCE = "net"
EG_PROG = "pelagos_net_eg"
IN_PROG = "pelagos_net_in"
MARK_CLS_PROG = "pelagos_mark_cls"
EGRESS = AttachType.CGROUP_INET_EGRESS
INGRESS = AttachType.CGROUP_INET_INGRESS

PROGRAMS: tuple[tuple[str, str, ProgType], ...] = (
    (SOURCE, EG_PROG, ProgType.CGROUP_SKB),
    (SOURCE, IN_PROG, ProgType.CGROUP_SKB),
    (SOURCE, MARK_CLS_PROG, ProgType.SCHED_CLS),
)
"""(bpf/ source name, function, program type) of every program this package loads."""

# Layouts mirrored from bpf/net.c.
STORAGE_KEY = struct.Struct("<QI4x")  # struct bpf_cgroup_storage_key {cgroup id, attach type}
CFG = struct.Struct("<IIQ")  # struct net_cfg {classid, flags, prio_key}
ACCT = struct.Struct("<QQ")  # struct net_acct {bytes, packets}
PRIO_KEY = struct.Struct("<QI4x")  # struct prio_key {cgroup, ifindex, pad}
PRIO_VAL = struct.Struct("<I")
PRIOS_MAX = 65536
BPF_F_NO_PREALLOC = 1

# name -> (type, key size, value size, max entries, flags)
MAPS: dict[str, tuple[MapType, int, int, int, int]] = {
    "net_cfg": (MapType.CGROUP_STORAGE, STORAGE_KEY.size, CFG.size, 0, 0),
    "net_acct": (MapType.PERCPU_CGROUP_STORAGE, STORAGE_KEY.size, ACCT.size, 0, 0),
    # No prealloc: 64 Ki preallocated entries would pin megabytes per process for a map that
    # holds a few entries per container.
    "net_prios": (MapType.HASH, PRIO_KEY.size, PRIO_VAL.size, PRIOS_MAX, BPF_F_NO_PREALLOC),
}


# ---------------------------------------------------------------- the per-process programs


@dataclass
class _Shared:
    eg: int
    ing: int
    maps: dict[str, int]


_shared: _Shared | None = None
_lock = threading.Lock()


def _create_maps() -> dict[str, int]:
    fds: dict[str, int] = {}
    try:
        for name, (mtype, ks, vs, n, flags) in MAPS.items():
            fds[name] = bpfsys.map_create(mtype, ks, vs, n, name=name, flags=flags)
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return fds


def shared_programs() -> _Shared:
    """This process's loaded programs and maps (loaded on first use, then reused)."""
    global _shared
    with _lock:
        if _shared is not None:
            return _shared
        eg_code = progcache.get_program(progcache.bpf_source(SOURCE), EG_PROG, ProgType.CGROUP_SKB)
        in_code = progcache.get_program(progcache.bpf_source(SOURCE), IN_PROG, ProgType.CGROUP_SKB)
        maps = _create_maps()
        eg = ing = -1
        try:
            eg = progcache.load_program(eg_code, maps, name=EG_PROG)
            ing = progcache.load_program(in_code, maps, name=IN_PROG)
        except BaseException:
            for fd in (eg, ing, *maps.values()):
                if fd >= 0:
                    os.close(fd)
            raise
        _shared = _Shared(eg, ing, maps)
        return _shared


_mark_cls: int | None = None


def mark_classifier() -> int:
    """fd of the tc classifier that maps skb->mark to a classid (loaded once per process)."""
    global _mark_cls
    with _lock:
        if _mark_cls is None:
            code = progcache.get_program(
                progcache.bpf_source(SOURCE), MARK_CLS_PROG, ProgType.SCHED_CLS
            )
            _mark_cls = progcache.load_program(code, {}, name=MARK_CLS_PROG)
        return _mark_cls


def unload_shared() -> None:
    """Close this process's program and map fds (attachments keep the kernel objects alive)."""
    global _shared, _mark_cls
    with _lock:
        if _mark_cls is not None:
            os.close(_mark_cls)
            _mark_cls = None
        if _shared is None:
            return
        for fd in (_shared.eg, _shared.ing, *_shared.maps.values()):
            os.close(fd)
        _shared = None


# ---------------------------------------------------------------- finding our state on a cgroup


@dataclass
class _Attached:
    """fds of our programs attached to one cgroup and the maps they use (caller closes)."""

    cg_fd: int
    eg: list[int] = field(default_factory=list)
    ing: list[int] = field(default_factory=list)
    maps: dict[str, int] = field(default_factory=dict)

    @property
    def any(self) -> bool:
        return bool(self.eg or self.ing)


@contextlib.contextmanager
def _find(cg: Cgroup) -> Iterator[_Attached | None]:
    """Our programs on cg and their maps; None when the cgroup directory is gone."""
    with contextlib.ExitStack() as stack:
        try:
            cg_fd = cg.open_fd()
        except FileNotFoundError:
            yield None
            return
        stack.callback(os.close, cg_fd)
        found = _Attached(cg_fd)
        for attach_type, name, dest in ((EGRESS, EG_PROG, found.eg), (INGRESS, IN_PROG, found.ing)):
            for fd, info in progfind.open_attached(cg_fd, attach_type, name, ProgType.CGROUP_SKB):
                stack.callback(os.close, fd)
                dest.append(fd)
                for k, v in progfind.open_maps(info, MAPS).items():
                    stack.callback(os.close, v)
                    found.maps.setdefault(k, v)
        yield found


# ---------------------------------------------------------------- map contents


def _storage_key(cg: Cgroup, attach_type: AttachType) -> bytes:
    return STORAGE_KEY.pack(cg.id, int(attach_type))


def _prio_keys_of(prios_fd: int, prio_key: int) -> list[bytes]:
    # O(entries in the shared hash); only cgroups that use net_priorities pay it.
    return [
        k for k in bpfsys.map_keys(prios_fd, PRIO_KEY.size) if PRIO_KEY.unpack(k)[0] == prio_key
    ]


def _reset_counters(cg: Cgroup, maps: dict[str, int], attach_type: AttachType) -> None:
    """Zero the counters: cgroup storage lives as long as the cgroup, not the attachment, so
    a detach + attach on a living cgroup would otherwise resume the old counts."""
    stride = (ACCT.size + 7) & ~7
    zeros = bytes(stride * bpfsys.possible_cpus())
    bpfsys.map_update(maps["net_acct"], _storage_key(cg, attach_type), zeros)


def _write_config(cg: Cgroup, maps: dict[str, int], plan: NetPlan) -> None:
    """New priority entries first, then the config that points at them, then drop stale ones."""
    wanted = {PRIO_KEY.pack(cg.id, idx): prio for idx, prio in plan.prio_by_ifindex().items()}
    for key, prio in wanted.items():
        bpfsys.map_update(maps["net_prios"], key, PRIO_VAL.pack(prio))
    cfg = CFG.pack(plan.classid, plan.flags, cg.id)
    bpfsys.map_update(maps["net_cfg"], _storage_key(cg, EGRESS), cfg)
    for key in _prio_keys_of(maps["net_prios"], cg.id):
        if key not in wanted:
            bpfsys.map_delete(maps["net_prios"], key)


def read_config(cg: Cgroup) -> NetPlan | None:
    """The classid/carrier/priorities in effect on cg, read back from the kernel (ifnames are
    not stored: they come back as ""). None when our programs are not attached."""
    with _find(cg) as found:
        if found is None or not found.eg or "net_cfg" not in found.maps:
            return None
        raw = bpfsys.map_lookup(found.maps["net_cfg"], _storage_key(cg, EGRESS), CFG.size)
        if raw is None:
            return None
        classid, flags, prio_key = CFG.unpack(raw)
        prios = []
        if "net_prios" in found.maps:
            for key in _prio_keys_of(found.maps["net_prios"], prio_key):
                val = bpfsys.map_lookup(found.maps["net_prios"], key, PRIO_VAL.size)
                if val is not None:
                    prios.append(("", PRIO_KEY.unpack(key)[1], PRIO_VAL.unpack(val)[0]))
        return NetPlan(
            classid=classid,
            carrier="mark" if flags & 1 else "priority",
            priorities=tuple(sorted(prios, key=lambda p: p[1])),
        )


# ---------------------------------------------------------------- the contract


def attach_net(cg: Cgroup, plan: NetPlan) -> None:
    """Attach the egress (classify + count) and ingress (count) programs to cg with `plan`.

    Fails with EEXIST if our programs are already there (use update_net). A failure half-way
    detaches what this call attached and removes its map entries: nothing is left behind.
    """
    sh = shared_programs()
    with _find(cg) as found:
        if found is None:
            raise BpfError(errno.ENOENT, "attach_net", f"cgroup {cg.path} does not exist")
        if found.any:
            raise BpfError(
                errno.EEXIST, "attach_net", f"net programs already attached to {cg.path}"
            )
        cg_fd = found.cg_fd
        done: list[tuple[int, AttachType]] = []
        try:
            bpfsys.prog_attach(sh.eg, cg_fd, EGRESS, bpfsys.BPF_F_ALLOW_MULTI)
            done.append((sh.eg, EGRESS))
            _reset_counters(cg, sh.maps, EGRESS)
            _write_config(cg, sh.maps, plan)
            bpfsys.prog_attach(sh.ing, cg_fd, INGRESS, bpfsys.BPF_F_ALLOW_MULTI)
            done.append((sh.ing, INGRESS))
            _reset_counters(cg, sh.maps, INGRESS)
        except BaseException as exc:
            for prog_fd, attach_type in reversed(done):
                try:
                    bpfsys.prog_detach(prog_fd, cg_fd, attach_type)
                except BpfError as undo:
                    exc.add_note(f"attach_net rollback: detach failed: {undo}")
            for key in _prio_keys_of(sh.maps["net_prios"], cg.id):
                bpfsys.map_delete(sh.maps["net_prios"], key)
            raise


def update_net(cg: Cgroup, plan: NetPlan) -> None:
    """Apply a new plan to a live cgroup by map writes (no reload, no re-attach).

    The next packet sees the new classid/priorities. If the programs are not attached yet
    (a cgroup set up without net settings), this attaches them.
    """
    with _find(cg) as found:
        if found is None:
            raise BpfError(errno.ENOENT, "update_net", f"cgroup {cg.path} does not exist")
        if not found.eg:
            if found.ing:
                raise BpfError(
                    errno.EPROTO, "update_net", f"{cg.path} has our ingress program only"
                )
            attached = False
        else:
            _write_config(cg, found.maps, plan)
            attached = True
    if not attached:
        attach_net(cg, plan)


def detach_net(cg: Cgroup) -> None:
    """Detach our programs from cg and drop its map entries; a no-op when nothing is attached."""
    with _find(cg) as found:
        if found is None or not found.any:
            return
        cg_fd = found.cg_fd
        prio_key = cg.id
        if found.eg and "net_cfg" in found.maps:
            raw = bpfsys.map_lookup(found.maps["net_cfg"], _storage_key(cg, EGRESS), CFG.size)
            if raw is not None:
                prio_key = CFG.unpack(raw)[2]
        for attach_type, fds in ((EGRESS, found.eg), (INGRESS, found.ing)):
            for fd in fds:
                try:
                    bpfsys.prog_detach(fd, cg_fd, attach_type)
                except BpfError as e:
                    if e.errno != errno.ENOENT:  # detached concurrently: fine
                        raise
        if "net_prios" in found.maps:
            for key in _prio_keys_of(found.maps["net_prios"], prio_key):
                bpfsys.map_delete(found.maps["net_prios"], key)


def read_net_stats(cg: Cgroup) -> dict[str, int]:
    """Bytes and packets of IPv4/IPv6 traffic of the cgroup's sockets (subtree included).

    Bytes are IP packet lengths (IP header and payload, no link-layer header). Empty when our
    programs are not attached (nothing is counted then).
    """
    with _find(cg) as found:
        if found is None or not found.any or "net_acct" not in found.maps:
            return {}
        out: dict[str, int] = {}
        for attach_type, label, fds in (
            (EGRESS, "egress", found.eg),
            (INGRESS, "ingress", found.ing),
        ):
            if not fds:
                continue
            vals = bpfsys.map_lookup_percpu(
                found.maps["net_acct"], _storage_key(cg, attach_type), ACCT.size
            )
            total_bytes = total_pkts = 0
            for v in vals or []:
                b, p = ACCT.unpack(v)
                total_bytes += b
                total_pkts += p
            out[f"{label}_bytes"] = total_bytes
            out[f"{label}_packets"] = total_pkts
        return out
