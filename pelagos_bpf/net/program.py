"""The net feature on the shared runtime: classify and count through cgroup storage.

One egress and one ingress program (declared in layout.py) are loaded once per process and
attached with BPF_F_ALLOW_MULTI to every cgroup; what differs per cgroup lives in the cgroup
storage the kernel allocates at attach time. A start costs two PROG_ATTACHes and a map write; a
live change is map writes only. Writers hold the cgroup's flock (cgref.opened), so a partial
update's read-modify-write of the config cannot interleave with another writer's.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from dataclasses import dataclass

from .. import bpfsys, bytecode
from ..cgref import CgroupRef, opened
from ..errors import ConfigError, OwnerConflict
from ..feature import Attached, Feature
from ..layers import ProgSpec, storage_key
from ..loader import Loaded
from ..owners import OWNER_IDS, OWNER_NAMES, RUNTIME, Owner
from . import layout as lay
from .plan import F_MARK, F_PRIOS, F_SOCKET, SOCKET_NO_PRIOS, NetPlan, choose_carrier

log = logging.getLogger(__name__)

FEATURE = Feature(lay.LAYER)
EGRESS = lay.EGRESS
INGRESS = lay.INGRESS
NOT_ACCOUNTED = {"not_accounted": 1}
"""read_net_stats of a cgroup classified by carrier "socket": no per-packet program, no counts."""
PROGRAMS: tuple[tuple[str, str, int], ...] = tuple(
    (lay.SOURCE, p.func, int(p.prog_type)) for p in (*lay.LAYER.progs, lay.MARK_CLS)
)
"""(bpf/ source name, function, program type) of every program this package loads."""

_lock = threading.Lock()
_mark_cls: int | None = None


def shared_programs() -> Loaded:
    """This process's egress/ingress programs and their maps (loaded once)."""
    return FEATURE.loaded()


def mark_classifier() -> int:
    """fd of the tc classifier that maps skb->mark to a classid (loaded once per process)."""
    global _mark_cls
    with _lock:
        if _mark_cls is None:
            spec = lay.MARK_CLS
            code = bytecode.get_program(lay.SOURCE, spec.func, spec.prog_type)
            _mark_cls = bytecode.load_program(code, {}, name=spec.name)
        return _mark_cls


# ---------------------------------------------------------------- map contents


def _prio_keys_of(prios_fd: int, prio_key: int) -> list[bytes]:
    """O(entries in the shared hash, and at least a walk of its buckets: ~75 us empty): only
    cgroups whose config has (or had) F_PRIOS pay it, never a classid-only container."""
    return [
        k
        for k in bpfsys.map_keys(prios_fd, lay.PRIO_KEY.size)
        if lay.PRIO_KEY.unpack(k)[0] == prio_key
    ]


def _progs_for(carrier: str) -> tuple[ProgSpec, ...]:
    return lay.SOCKET_PROGS if carrier == "socket" else lay.PACKET_PROGS


def _cfg_at(group: Attached) -> int | None:
    """Which storage entry holds the config of the carrier attached in `group` (cgroup storage
    outlives a detach, so an entry of a carrier switched away from may still be there)."""
    if lay.EG.func in group.progs:
        return EGRESS
    if lay.SK.func in group.progs:
        return lay.SOCK_CREATE
    return None


OWNER_SHIFT = 8  # net_cfg.flags bits 8..15: the owner id (the programs read bits 0..2 only)


def owner_of_flags(flags: int) -> Owner:
    """The owner recorded in a config's flags; none (an older release's) is the runtime's."""
    return OWNER_NAMES.get((flags >> OWNER_SHIFT) & 0xFF, RUNTIME)


def _read_owner(maps: dict[str, int], cgroup_id: int, at: int) -> Owner | None:
    raw = bpfsys.map_lookup(maps["net_cfg"], storage_key(cgroup_id, at), lay.CFG.size)
    return None if raw is None else owner_of_flags(lay.CFG.unpack(raw)[1])


def _read_plan(maps: dict[str, int], cgroup_id: int, at: int = EGRESS) -> NetPlan | None:
    raw = bpfsys.map_lookup(maps["net_cfg"], storage_key(cgroup_id, at), lay.CFG.size)
    if raw is None:
        return None
    classid, flags, prio_key = lay.CFG.unpack(raw)
    flags &= (1 << OWNER_SHIFT) - 1
    if flags & F_SOCKET:
        return NetPlan(classid=classid, carrier="socket")
    prios = []
    for key in _prio_keys_of(maps["net_prios"], prio_key) if flags & F_PRIOS else ():
        val = bpfsys.map_lookup(maps["net_prios"], key, lay.PRIO_VAL.size)
        if val is not None:
            prios.append(("", lay.PRIO_KEY.unpack(key)[1], lay.PRIO_VAL.unpack(val)[0]))
    return NetPlan(
        classid=classid,
        carrier="mark" if flags & F_MARK else "priority",
        priorities=tuple(sorted(prios, key=lambda p: p[1])),
    )


def _write_config(maps: dict[str, int], cg: CgroupRef, plan: NetPlan, owner: Owner) -> None:
    """New priority entries first, then the config that points at them, then drop stale ones.

    Stale ones are looked for only where the programs could read them: the new config has
    priorities, or the one it replaces had (entries a killed writer left on a cgroup whose
    config never pointed at them are never read, and gc removes them with the cgroup)."""
    old = bpfsys.map_lookup(maps["net_cfg"], storage_key(cg.id, EGRESS), lay.CFG.size)
    had_prios = old is not None and bool(lay.CFG.unpack(old)[1] & F_PRIOS)
    wanted = {lay.PRIO_KEY.pack(cg.id, idx, 0): p for idx, p in plan.prio_by_ifindex().items()}

    def store() -> None:
        for key, prio in wanted.items():
            bpfsys.map_update(maps["net_prios"], key, lay.PRIO_VAL.pack(prio))

    FEATURE.retry_when_full(cg, maps, store)  # a full map: GC of dead cgroups, then once more
    cfg = lay.CFG.pack(plan.classid, plan.flags | OWNER_IDS[owner] << OWNER_SHIFT, cg.id)
    for spec in _progs_for(plan.carrier):
        if spec.attach_type != INGRESS:  # the ingress program only counts
            assert spec.attach_type is not None
            bpfsys.map_update(maps["net_cfg"], storage_key(cg.id, spec.attach_type), cfg)
    if not (wanted or had_prios):
        return
    for key in _prio_keys_of(maps["net_prios"], cg.id):
        if key not in wanted:
            bpfsys.map_delete(maps["net_prios"], key)


def _counters(maps: dict[str, int], cgroup_id: int, at: int) -> bytes | None:
    size = bpfsys.percpu_stride(lay.ACCT.size) * bpfsys.possible_cpus()
    return bpfsys.map_lookup(maps["net_acct"], storage_key(cgroup_id, at), size)


def _set_counters(maps: dict[str, int], cgroup_id: int, at: int, raw: bytes | None) -> None:
    """Zero (or carry over) the counters: cgroup storage lives as long as the cgroup, not the
    attachment, so a detach + attach on a living cgroup would otherwise resume old counts."""
    size = bpfsys.percpu_stride(lay.ACCT.size) * bpfsys.possible_cpus()
    bpfsys.map_update(maps["net_acct"], storage_key(cgroup_id, at), raw or bytes(size))


# ---------------------------------------------------------------- the contract


def _merge(
    old: NetPlan | None, new: NetPlan, named: frozenset[str], carrier: str | None
) -> NetPlan:
    """What an update naming only `named` ({"classid", "priorities"}) leaves in force.

    carrier None keeps the cgroup's carrier; "auto" picks one for the merged settings.
    """
    classid = new.classid if old is None or "classid" in named else old.classid
    prios = new.priorities if old is None or "priorities" in named else old.priorities
    if carrier is None and old is not None:
        chosen = old.carrier
        if chosen == "priority" and prios and not classid:
            chosen = "mark"  # no classid is carried: the carrier is free to follow the priorities
    else:
        chosen = choose_carrier(carrier or "auto", bool(prios))
    if chosen == "socket" and prios:
        raise ConfigError("net_carrier", chosen, SOCKET_NO_PRIOS)
    if chosen == "priority" and prios:
        raise ConfigError(
            "net_carrier",
            chosen,
            "net_priorities also write skb->priority, where this cgroup carries its classid: "
            "pass net_carrier='mark'",
        )
    return NetPlan(classid=classid, carrier=chosen, priorities=prios, netns_inode=new.netns_inode)


def _attach_new(
    cg: CgroupRef,
    cg_fd: int,
    plan: NetPlan,
    owner: Owner,
    carry: dict[int, bytes | None],
    present: frozenset[str] = frozenset(),
    setting: str = "net_classid",
) -> None:
    """Attach the programs of the plan's carrier: egress + ingress (per packet) or socket
    create + setsockopt (once per socket), then write the config into the storage of each
    (the kernel creates a cgroup's storage entry at attach time). _write_config also drops
    priority entries the plan does not name, such as a packet carrier's switched away from.
    `present`: these very programs are attached already (a switch that died half-way left
    them): the kernel refuses the same program twice at one hook (EINVAL), so they stay."""
    loaded = FEATURE.loaded()
    done: list[ProgSpec] = []
    try:
        for spec in _progs_for(plan.carrier):
            if spec.func in present:
                continue
            FEATURE.attach(loaded.progs[spec.func], cg_fd, spec, setting, os.fspath(cg.path))
            done.append(spec)
            assert spec.attach_type is not None
            if spec in lay.PACKET_PROGS:
                _set_counters(loaded.maps, cg.id, spec.attach_type, carry.get(spec.attach_type))
        _write_config(loaded.maps, cg, plan, owner)
    except BaseException as exc:
        for spec in reversed(done):
            try:
                bpfsys.prog_detach(loaded.progs[spec.func], cg_fd, spec.attach_type or 0)
            except OSError as undo:
                exc.add_note(f"net rollback: detach failed: {undo}")
        if plan.priorities and plan.carrier != "socket" and not present:  # entries it wrote
            for key in _prio_keys_of(loaded.maps["net_prios"], cg.id):
                bpfsys.map_delete(loaded.maps["net_prios"], key)
        log.info("%s: %s's attach to %s rolled back (%s)", setting, owner, cg.path, exc)
        raise


def _detach(cg: CgroupRef, group: Attached, cg_fd: int) -> None:
    """Detach; the priority entries (the only state outside cgroup storage) are looked for
    with a walk of the shared map only when the config says there are some, or cannot say."""
    prio_key, scan = cg.id, True
    if "net_cfg" in group.maps:
        raw = bpfsys.map_lookup(group.maps["net_cfg"], storage_key(cg.id, EGRESS), lay.CFG.size)
        if raw is not None:
            _, flags, prio_key = lay.CFG.unpack(raw)
            scan = bool(flags & F_PRIOS)
        else:  # the socket carrier's config: its plans have no priority entries
            sock = storage_key(cg.id, lay.SOCK_CREATE)
            scan = bpfsys.map_lookup(group.maps["net_cfg"], sock, lay.CFG.size) is None
    FEATURE.detach(group, cg_fd)
    if scan:
        FEATURE.purge(group.layer, group.maps, lambda i: i in (prio_key, cg.id))


def apply(
    cg: CgroupRef,
    plan: NetPlan,
    *,
    named: frozenset[str] = frozenset({"classid", "priorities"}),
    carrier: str | None = "auto",
    owner: Owner = RUNTIME,
) -> NetPlan:
    """Attach, or update in place, keeping what the update does not name; returns what is now
    in force. `carrier` None keeps the cgroup's carrier ("auto" on a first attach).

    A cgroup's net settings have one owner: the role that attached them. Another role's
    request raises OwnerConflict (nothing is written); the owner's own updates go through."""
    setting = "net_classid" if "classid" in named else "net_priorities"
    with opened(cg, setting) as cg_fd, FEATURE.find(cg_fd) as groups:
        current = [g for g in groups if g.version == lay.VERSION and _cfg_at(g) is not None]
        at = _cfg_at(current[0]) if current else None
        if at is not None:
            holder = _read_owner(current[0].maps, cg.id, at)
            if holder is not None and holder != owner:
                log.info(
                    "%s: refused the %s's request on %s: held by the %s",
                    setting,
                    owner,
                    cg.path,
                    holder,
                )
                raise OwnerConflict(setting, str(cg.path), holder, owner)
        old = _read_plan(current[0].maps, cg.id, at) if at is not None else None
        merged = _merge(old, plan, named, carrier)
        wanted = {spec.func for spec in _progs_for(merged.carrier)}
        if current and set(current[0].progs) == wanted:
            _write_config(current[0].maps, cg, merged, owner)
            stale = [g for g in groups if g is not current[0]]
            log.info("net: %s updated %s: %s", owner, cg.path, merged)
        else:
            carry: dict[int, bytes | None] = {}
            for g in groups:  # carry the counters over a migration
                if "net_acct" in g.maps and lay.EG.func in g.progs:
                    for spec in g.layer.cgroup_progs:
                        if spec.func in g.progs:
                            assert spec.attach_type is not None
                            carry[spec.attach_type] = _counters(g.maps, cg.id, spec.attach_type)
            ids = FEATURE.loaded().ids
            present = frozenset(
                f for g in groups for f, i in g.ids.items() if f in wanted and ids.get(f) == i
            )
            _attach_new(cg, cg_fd, merged, owner, carry, present, setting)
            stale = groups
            log.info("net: %s attached its programs to %s: %s", owner, cg.path, merged)
        own = FEATURE.loaded_if_any()
        for g in stale:
            if own is not None and g.maps == own.maps:  # find() hands out our own map fds
                # A carrier switch in our own maps: the entries are the new carrier's now
                # (written above), so only the old programs go, not the ones of the new
                # carrier that a switch killed half-way had attached already.
                FEATURE.detach(g, cg_fd, keep=wanted)
            else:
                _detach(cg, g, cg_fd)
        return merged


def attach_net(cg: CgroupRef, plan: NetPlan, *, owner: Owner = RUNTIME) -> None:
    """Attach the egress (classify + count) and ingress (count) programs with `plan` (an
    update when ours is already there). A failure half-way leaves nothing behind."""
    apply(cg, plan, carrier=plan.carrier, owner=owner)


def update_net(
    cg: CgroupRef,
    plan: NetPlan,
    named: frozenset[str] = frozenset({"classid", "priorities"}),
    carrier: str | None = None,
    *,
    owner: Owner = RUNTIME,
) -> NetPlan:
    """Change what the update names (classid and/or priorities, optionally the carrier) by map
    writes; the rest keeps its value. Attaches if our programs are not there yet."""
    return apply(cg, plan, named=named, carrier=carrier, owner=owner)


def detach_net(cg: CgroupRef, *, owner: Owner | None = RUNTIME) -> bool:
    """Detach our programs (any version) and drop the cgroup's entries, if `owner` holds the
    cgroup's net settings (None: whoever does, for teardown and gc). Idempotent; False when
    another owner's settings were left in place."""
    kept = False

    def detach_group(cg: CgroupRef, g: Attached, cg_fd: int) -> None:
        nonlocal kept
        at = _cfg_at(g)
        holder = _read_owner(g.maps, cg.id, at) if at is not None and "net_cfg" in g.maps else None
        if owner is not None and holder is not None and holder != owner:
            kept = True
            log.info(
                "net: %s: the %s's settings kept (the %s asked to detach)", cg.path, holder, owner
            )
            return
        _detach(cg, g, cg_fd)
        log.info(
            "net: detached the programs (layout v%d, settings of the %s) from %s, asked by the %s",
            g.version,
            holder or "unknown owner",
            cg.path,
            owner or "teardown",
        )

    FEATURE.detach_cgroup(cg, "net", detach_group, purge_when_gone=owner is None)
    return not kept


def detach_net_any(cg: CgroupRef) -> None:
    """detach_net for every owner (the Feature runtime's teardown hook)."""
    detach_net(cg, owner=None)


FEATURE.teardown = detach_net_any


def removal_key(cg: CgroupRef) -> int | None:
    """The priority-map key of the cgroup in this process's maps, read before an rmdir
    (teardown's fast path: rmdir frees the attachments and the cgroup storage); None when this
    process's programs have no storage for it (the caller takes the general detach path), 0
    when the cgroup has no priorities (nothing outside the storage to delete)."""
    loaded = FEATURE.loaded_if_any()
    if loaded is None:
        return None
    raw = bpfsys.map_lookup(loaded.maps["net_cfg"], storage_key(cg.id, EGRESS), lay.CFG.size)
    if raw is None:  # carrier "socket" only: no priority entries anywhere
        sock = storage_key(cg.id, lay.SOCK_CREATE)
        return None if bpfsys.map_lookup(loaded.maps["net_cfg"], sock, lay.CFG.size) is None else 0
    _, flags, prio_key = lay.CFG.unpack(raw)
    return prio_key if flags & F_PRIOS else 0


def remove_entries(cg_id: int, prio_key: int) -> None:
    """After the cgroup's rmdir: drop its priority entries (the only ones not in storage).

    A walk of the priority hash (O(buckets)): paid only by cgroups with net_priorities."""
    if not prio_key:
        return
    loaded = FEATURE.loaded()
    FEATURE.purge(
        loaded.layer, {"net_prios": loaded.maps["net_prios"]}, lambda i: i in (prio_key, cg_id)
    )


# ---------------------------------------------------------------- reading back


@dataclass(frozen=True)
class NetState:
    """The net settings in force on a cgroup, read from the kernel.

    `priorities` holds (ifindex, ifname or None when no such index in the netns of the
    cgroup's first process, or ours, prio).
    """

    attached: bool
    program_ids: tuple[int, ...] = ()
    trusted: bool = False  # every program's tag is the tag of the bytecode this release loads
    version: int | None = None
    classid: int = 0
    carrier: str | None = None
    priorities: tuple[tuple[int, str | None, int], ...] = ()


def _trusted_tags(func: str) -> frozenset[str]:
    spec = lay.LAYER.prog(func)
    return frozenset(t.hex() for t in bytecode.ident(lay.SOURCE, spec.func, spec.prog_type).tags)


def _ifnames(cg: CgroupRef) -> dict[int, str]:
    from .resolve import interface_table  # resolve is light; imported here to keep it optional

    try:
        with open(os.path.join(os.fspath(cg.path), "cgroup.procs")) as f:
            procs = f.read().split()
        table = interface_table(int(procs[0]) if procs else None)
    except (OSError, ValueError):
        table = {n: i for i, n in socket.if_nameindex()}
    return {i: n for n, i in table.items()}


def read_state(cg: CgroupRef) -> NetState:
    """The classid, carrier and per-interface priorities in force (no lock taken)."""
    with FEATURE.find_at(cg) as groups:
        if not groups:
            return NetState(attached=False)
        g = groups[0]
        at = _cfg_at(g)
        plan = _read_plan(g.maps, cg.id, at) if at is not None else None
        ids = tuple(i for x in groups for i in x.ids.values())
        trusted = g.version == lay.VERSION and all(
            tag in _trusted_tags(func) for func, tag in g.tags.items()
        )
        if plan is None:
            return NetState(attached=True, program_ids=ids, trusted=trusted, version=g.version)
        names = _ifnames(cg) if plan.priorities else {}
        return NetState(
            attached=True,
            program_ids=ids,
            trusted=trusted,
            version=g.version,
            classid=plan.classid,
            carrier=plan.carrier,
            priorities=tuple((idx, names.get(idx), prio) for _, idx, prio in plan.priorities),
        )


def read_config(cg: CgroupRef) -> NetPlan | None:
    """The classid/carrier/priorities in force (ifnames come back as ""); None when our
    programs are not attached."""
    with FEATURE.find_at(cg) as groups:
        for g in groups:
            at = _cfg_at(g)
            if at is not None:
                return _read_plan(g.maps, cg.id, at)
        return None


def read_net_stats(cg: CgroupRef) -> dict[str, int]:
    """Bytes and packets of IPv4/IPv6 traffic of the cgroup's sockets (subtree included).

    Bytes are IP packet lengths (IP header and payload, no link-layer header). Empty when our
    programs are not attached (nothing is counted then); NOT_ACCOUNTED ({"not_accounted": 1},
    no byte or packet keys) when the cgroup's carrier is "socket", which has no per-packet
    program to count with (its traffic still counts in an ancestor with a packet carrier).
    """
    out: dict[str, int] = {}
    with FEATURE.find_at(cg) as groups:
        for g in groups[:1]:
            if lay.EG.func not in g.progs and lay.SK.func in g.progs:
                return dict(NOT_ACCOUNTED)
            for spec, label in ((lay.EG, "egress"), (lay.IN, "ingress")):
                if spec.func not in g.progs or spec.attach_type is None:
                    continue
                vals = bpfsys.map_lookup_percpu(
                    g.maps["net_acct"], storage_key(cg.id, spec.attach_type), lay.ACCT.size
                )
                pairs = [lay.ACCT.unpack(v) for v in vals or []]
                out[f"{label}_bytes"] = sum(b for b, _ in pairs)
                out[f"{label}_packets"] = sum(p for _, p in pairs)
    return out
