"""The device feature on the shared runtime: per-owner rule sets in maps, written fail-closed.

One program per owner role (bpf/device.c, declared in layout.py), attached with
BPF_F_ALLOW_MULTI only while that owner has a rule set on the cgroup; the kernel allows an access
only if every attached program allows it, so owners' sets are AND-ed. The cgroup storage
`dev_cur` (one entry per cgroup, shared by the owners' programs) names each owner's rule set in
force (a generation per owner); the rules are entries of the shared `dev_rules` hash under
(cgroup, generation, owner). A start costs map writes plus one PROG_ATTACH; a live update is map
writes plus one storage write.

Fail closed by construction (docs/DEVICES.md): writers hold the cgroup's flock; a generation is
never reused, so no writer deletes a rule set that may be live; every rule set ends with `*:*`
sentinels, so an absent or half-written set denies; an owner touches only its own program, its
own storage slot and its own entries.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from .. import bpfsys, bytecode
from ..cgref import CgroupRef, Liveness, opened
from ..errors import BpfError, ConfigError
from ..feature import Attached, Feature
from ..layers import Layer, storage_key
from ..loader import Loaded
from ..locks import flock_until
from ..owners import OWNER_IDS, OWNER_NAMES, RUNTIME, Owner
from . import encode as enc
from . import layout as lay
from . import usage
from .rules import CgroupDeviceRule, validate_device_rules

log = logging.getLogger(__name__)

FEATURE = Feature(lay.LAYER, (lay.LAYER_V2, lay.LAYER_V1))
GEN_MAX = 0xFFFF_FFFF
_STORAGE = storage_key  # (cgroup id, attach type) -> the storage key


def compiled(owner: Owner = RUNTIME) -> bytecode.CompiledProgram:
    """An owner's program's bytecode (shipped with the package)."""
    return bytecode.get_program(lay.SOURCE, lay.FUNCS[owner], lay.PROG_TYPE)


def own_program() -> Loaded:
    """This process's programs and maps (loaded once, or fetched from the node's pins)."""
    return FEATURE.loaded()


# ---------------------------------------------------------------- rule sets in the maps


@dataclass(frozen=True)
class Prepared:
    """A validated rule list, encoded (the map entries minus their (cgroup, gen, owner) head)."""

    n_patterns: int
    template: tuple[tuple[bytes, bytes], ...]

    @property
    def n_entries(self) -> int:
        return len(self.template)


@lru_cache(maxsize=256)
def _prepare(rules: tuple[CgroupDeviceRule, ...]) -> Prepared:
    table = enc.encode_rules(rules)
    return Prepared(len(table), enc.entry_template(table))


def check_size(rules: Sequence[CgroupDeviceRule], setting: str = "device_rules") -> None:
    """The per-set rule limit ($PELAGOS_BPF_RULES_PER_SET), before anything is encoded."""
    limit = usage.per_set_limit()
    if len(rules) > limit:
        raise ConfigError(
            setting,
            f"{len(rules)} rules",
            f"more than the {limit} a cgroup's rule set may hold ({usage.PER_SET_ENV})",
        )


def prepare(rules: Sequence[CgroupDeviceRule], *, validated: bool = False) -> Prepared:
    """Check the size, validate (unless the caller just did: setup's validate_config) and encode
    (memoized: a repeated rule list costs a dict lookup)."""
    check_size(rules)
    if not validated:
        validate_device_rules(rules)  # valid rules have exact types, so the cache key is exact
    return _prepare(tuple(rules))


def read_cur(maps: dict[str, int], cgroup_id: int) -> tuple[list[int], int]:
    """(generation per owner slot, audit cap) in this cgroup's storage; zeros when absent."""
    raw = bpfsys.map_lookup(maps["dev_cur"], _STORAGE(cgroup_id, lay.ATTACH), enc.CUR.size)
    if raw is None:
        return [0] * lay.SLOTS, 0
    vals = enc.CUR.unpack(raw)
    return list(vals[1 : 1 + lay.SLOTS]), vals[1 + lay.SLOTS]


def current_gen(maps: dict[str, int], cgroup_id: int, owner: Owner = RUNTIME) -> int:
    """The owner's generation in this cgroup's storage (0 = none: its program denies all)."""
    return read_cur(maps, cgroup_id)[0][OWNER_IDS[owner]]


def _audit_cap() -> int:
    """Distinct denial counters per CPU, so that all CPUs together stay under AUDIT_ITEMS."""
    return max(1, lay.AUDIT_ITEMS // bpfsys.possible_cpus())


def _switch(maps: dict[str, int], cgroup_id: int, owner: Owner, gen: int) -> None:
    """One storage write: the owner's program sees its old rule set or its new one, never a
    mix; the other owners' slots are written back as they were (every writer holds the
    cgroup's flock, so nobody changed them in between)."""
    gens, _ = read_cur(maps, cgroup_id)
    gens[OWNER_IDS[owner]] = gen
    value = enc.CUR.pack(cgroup_id, *gens, _audit_cap(), 0)
    bpfsys.map_update(maps["dev_cur"], _STORAGE(cgroup_id, lay.ATTACH), value)


def set_keys(
    maps: dict[str, int], cgroup_id: int, gen: int, owner_id: int
) -> tuple[list[bytes], list[bytes]]:
    """(rule keys, index keys) of one stored rule set, found through its index (no scan)."""
    fd = maps["dev_rules"]
    rule_keys: list[bytes] = []
    index_keys: list[bytes] = []
    while True:
        key = enc.index_key(cgroup_id, gen, owner_id, len(index_keys))
        val = bpfsys.map_lookup(fd, key, lay.VAL_SIZE)
        if val is None:
            break
        index_keys.append(key)
        patterns = enc.index_patterns(val)
        rule_keys.extend(enc.rule_key(cgroup_id, gen, owner_id, p) for p in patterns)
        if len(patterns) < enc.INDEX_CHUNK:  # chunks fill in order: a partial one is the last
            break
    return rule_keys, index_keys


def delete_keys(maps: dict[str, int], keys: tuple[list[bytes], list[bytes]]) -> int:
    """Delete what set_keys found and give the entries back to the fill level; returns entries
    removed.

    Reverse write order (sentinels first), the index last: any state on the way is a prefix of
    the write, which the program treats as strictly as the whole set (encode.write_rank).
    """
    rule_keys, index_keys = keys
    if not index_keys:
        return 0
    n = bpfsys.map_delete_batch(maps["dev_rules"], rule_keys[::-1])
    n += bpfsys.map_delete_batch(maps["dev_rules"], index_keys)
    usage.release(maps["dev_rules"], n)
    return n


def delete_set(maps: dict[str, int], cgroup_id: int, gen: int, owner_id: int) -> int:
    """Delete every entry of one rule set (found through its index); returns entries removed."""
    return delete_keys(maps, set_keys(maps, cgroup_id, gen, owner_id))


def write_set(cg: CgroupRef, maps: dict[str, int], gen: int, owner: Owner, prep: Prepared) -> None:
    """Store a rule set under a generation no program reads yet; all or nothing.

    Admission first (usage.admit: the fill level and the reserve), then one batch. A full map
    (E2BIG from the kernel: the count had drifted) reclaims the entries of dead cgroups,
    recounts and retries once. A failed write deletes what it wrote, in time linear in it.
    """
    fd = maps["dev_rules"]
    oid = OWNER_IDS[owner]
    delete_set(maps, cg.id, gen, oid)  # leftovers of a writer that died before its switch
    entries = enc.with_ruleset(cg.id, gen, oid, prep.template)

    def store() -> None:
        usage.admit(fd, len(entries), "device_rules")
        try:
            bpfsys.map_update_batch(fd, entries)  # one syscall; the sentinels are written last
        except BaseException as e:
            # Undo exactly what was written (in write order: a prefix), newest first: one
            # syscall, linear in what it wrote. Unknown (interrupted): every key.
            written = e.written if isinstance(e, bpfsys.PartialWrite) else len(entries)
            bpfsys.map_delete_batch(fd, [key for key, _ in entries[:written]][::-1])
            usage.release(fd, len(entries))
            log.info(
                "device_rules: %s's write of generation %d on %s failed (%s): rolled back %d "
                "of %d entries",
                owner,
                gen,
                cg.path,
                e,
                written,
                len(entries),
            )
            raise

    try:
        try:
            store()
        except BpfError as e:
            if e.errno != errno.E2BIG:
                raise
            log.info(
                "device_rules: rule map full for %s: reclaiming dead cgroups' entries, then "
                "one retry",
                cg.path,
            )
            FEATURE.purge_dead(cg, maps)  # entries of dead cgroups may be what fills it
            usage.recount(fd)
            store()
    except BpfError as e:
        if e.errno == errno.E2BIG:
            raise BpfError(
                errno.E2BIG,
                "device_rules",
                f"cannot store {prep.n_patterns} rule patterns ({len(entries)} entries): "
                + (
                    str(e.strerror)
                    if isinstance(e, usage.Refused)  # names the reserve setting itself
                    else f"{e.strerror}; the node setting {lay.RULES_ENV} sizes the map"
                ),
                setting="device_rules",
                path=cg.path,
            ) from e
        raise BpfError(
            e.errno or errno.EIO,
            "device_rules",
            f"cannot store {prep.n_patterns} rule patterns: {e.strerror}",
            setting="device_rules",
            path=cg.path,
        ) from e


def _next_gen(gen: int) -> int:
    return gen + 1 if gen < GEN_MAX else 1  # wraps after 4 G updates of one cgroup


# ---------------------------------------------------------------- attach / update / detach


def _attach_new(cg: CgroupRef, cgfd: int, owner: Owner, prep: Prepared) -> None:
    loaded = FEATURE.loaded()
    func = lay.FUNCS[owner]
    FEATURE.attach(
        loaded.progs[func], cgfd, lay.LAYER.prog(func), "device_rules", os.fspath(cg.path)
    )
    gen = 0
    try:
        # The owner's slot reads 0 (deny all) on a new attachment, or a stale generation whose
        # entries are gone (no sentinel: deny all) if this owner had our program here before.
        gen = _next_gen(current_gen(loaded.maps, cg.id, owner))
        write_set(cg, loaded.maps, gen, owner, prep)
        _switch(loaded.maps, cg.id, owner, gen)
    except BaseException as e:
        bpfsys.prog_detach(loaded.progs[func], cgfd, lay.ATTACH)
        if gen:
            delete_set(loaded.maps, cg.id, gen, OWNER_IDS[owner])
        log.info("device_rules: %s's attach to %s rolled back (%s)", owner, cg.path, e)
        raise
    log.info(
        "device_rules: %s attached its program to %s: %d patterns, generation %d",
        owner,
        cg.path,
        prep.n_patterns,
        gen,
    )


def attach_fresh(
    cg: CgroupRef,
    cgfd: int,
    rules: Sequence[CgroupDeviceRule],
    *,
    owner: Owner = RUNTIME,
    validated: bool = False,
) -> None:
    """`apply` for a cgroup the caller has just created (setup's fast path), through its fd.

    Write the whole rule set (generation 1), attach, switch: no find() of the programs of every
    layout version, no storage read beyond the switch's. The flock stays: the directory is new,
    but any process may open it by path, so this writer serialises like every other. Under the
    lock one PROG_QUERY must come back empty (no writer got in between our mkdir and our lock;
    every writer attaches under the lock), else the general `apply` runs. The rule set write
    still deletes an index it finds first (one lookup): a writer that got in, failed, and died
    between its detach and its deletes may have left generation 1 entries of this id.
    validated: the caller validated `rules` (validate_config), so they are not checked twice.
    """
    prep = prepare(rules, validated=validated)
    flock_until(
        cgfd, f"device_rules: cgroup {cg.path}", setting="device_rules", path=os.fspath(cg.path)
    )
    try:
        fresh = not bpfsys.prog_query(cgfd, lay.ATTACH)
        if fresh:
            loaded = FEATURE.loaded()
            oid = OWNER_IDS[owner]
            write_set(cg, loaded.maps, 1, owner, prep)
            prog = loaded.progs[lay.FUNCS[owner]]
            attached = False
            try:
                FEATURE.attach(
                    prog, cgfd, lay.LAYER.prog(lay.FUNCS[owner]), "device_rules", os.fspath(cg.path)
                )
                attached = True
                _switch(loaded.maps, cg.id, owner, 1)
            except BaseException as e:
                if attached:
                    bpfsys.prog_detach(prog, cgfd, lay.ATTACH)
                delete_set(loaded.maps, cg.id, 1, oid)
                log.info("device_rules: %s's attach to %s rolled back (%s)", owner, cg.path, e)
                raise
            log.info(
                "device_rules: %s attached its program to new cgroup %s: %d patterns, generation 1",
                owner,
                cg.path,
                prep.n_patterns,
            )
    finally:
        fcntl.flock(cgfd, fcntl.LOCK_UN)  # the caller keeps the fd: unlock for other writers
    if not fresh:
        log.info("device_rules: %s: a program is already attached: general path", cg.path)
        apply(cg, rules, owner=owner)


def removal_keys(cg: CgroupRef) -> tuple[list[bytes], list[bytes]] | None:
    """Keys of every owner's rule sets of the cgroup in this process's maps, read before an
    rmdir (teardown's fast path: rmdir frees the attachments, these entries go after it in one
    batch).

    None when this process's maps have no storage for the cgroup (never attached here, or
    detached from inside): the caller then takes the general detach path.
    """
    loaded = FEATURE.loaded_if_any()
    if loaded is None:
        return None
    raw = bpfsys.map_lookup(loaded.maps["dev_cur"], _STORAGE(cg.id, lay.ATTACH), enc.CUR.size)
    if raw is None:
        return None
    gens = enc.CUR.unpack(raw)[1 : 1 + lay.SLOTS]
    rule_keys: list[bytes] = []
    index_keys: list[bytes] = []
    for oid in OWNER_NAMES:
        gen = gens[oid]
        # as _detach: the kept previous set, the live one, a dead writer's next
        for g in (gen - 1, gen, gen + 1) if gen else (1,):
            if 0 < g <= GEN_MAX:
                r, i = set_keys(loaded.maps, cg.id, g, oid)
                rule_keys += r
                index_keys += i
    return rule_keys, index_keys


def remove_entries(keys: tuple[list[bytes], list[bytes]]) -> None:
    """After the cgroup's rmdir (no task can run the programs for it any more): drop the rule
    sets `removal_keys` found, in one batch.

    The cgroup's denial counters stay for gc (`pelagos-bpf gc`, and the collection a full rule
    map triggers): finding them means a walk of the counter hash, more than the rest of
    teardown. A dead cgroup's counters mislead no reader (cgroup ids are never reused).
    """
    rule_keys, index_keys = keys
    if index_keys:  # no program reads them any more: any order, one syscall
        fd = FEATURE.loaded().maps["dev_rules"]
        usage.release(fd, bpfsys.map_delete_batch(fd, rule_keys + index_keys))


def _update(cg: CgroupRef, group: Attached, owner: Owner, prep: Prepared) -> None:
    oid = OWNER_IDS[owner]
    old = current_gen(group.maps, cg.id, owner)
    new = _next_gen(old)
    write_set(cg, group.maps, new, owner, prep)
    try:
        _switch(group.maps, cg.id, owner, new)
    except BaseException:
        delete_set(group.maps, cg.id, new, oid)
        raise
    # The replaced set `old` stays until the next update: a program run that read `old` just
    # before the switch still finds complete entries. The one before it goes now; being a
    # distinct generation, it cannot be what the switch made live.
    if old > 1:
        delete_set(group.maps, cg.id, old - 1, oid)
    log.info(
        "device_rules: %s updated its rule set on %s: %d patterns, generation %d -> %d",
        owner,
        cg.path,
        prep.n_patterns,
        old,
        new,
    )


def _detach_owner(cg: CgroupRef, group: Attached, cgfd: int, owner: Owner) -> None:
    """Detach the owner's program of a current-layout group, clear its slot, drop its sets
    and its denial counters. Entries go only after the detach: the program never runs
    without its rule set."""
    func = lay.FUNCS[owner]
    oid = OWNER_IDS[owner]
    gen = current_gen(group.maps, cg.id, owner)
    FEATURE.detach(group, cgfd, keep=set(group.progs) - {func})
    if gen:
        _switch(group.maps, cg.id, owner, 0)
    for g in (gen - 1, gen, gen + 1) if gen else (1,):
        if 0 < g <= GEN_MAX:
            delete_set(group.maps, cg.id, g, oid)
    fd = group.maps["dev_denials"]
    mine = [
        k
        for k in bpfsys.map_keys(fd, enc.DENY_KEY.size)
        if enc.DENY_KEY.unpack(k)[:2] == (cg.id, oid)
    ]
    if mine:
        bpfsys.map_delete_batch(fd, mine)
    log.info(
        "device_rules: %s detached its program from %s (generation %d; %d denial counters dropped)",
        owner,
        cg.path,
        gen,
        len(mine),
    )


def _detach_legacy(cg: CgroupRef, group: Attached, cgfd: int) -> None:
    """An older release's program (its rule set is the runtime's): detach, then reclaim by
    scanning (rare: migrations and teardown of cgroups an older release set up)."""
    FEATURE.detach(group, cgfd)
    FEATURE.purge(group.layer, group.maps, lambda i: i == cg.id)
    log.info("device_rules: detached layout v%d programs from %s", group.version, cg.path)


def _owned(group: Attached, owner: Owner) -> bool:
    """Does `group` hold `owner`'s program? (An older layout's belongs to the runtime.)"""
    if group.version != lay.VERSION:
        return owner == RUNTIME
    return lay.FUNCS[owner] in group.progs


def apply(cg: CgroupRef, rules: Sequence[CgroupDeviceRule], *, owner: Owner = RUNTIME) -> None:
    """Make `rules` the `owner`'s device rules on the cgroup: attach its program, update its
    set in place, or ([]) detach it. Other owners' programs and sets are never touched.

    A cgroup with a runtime program of an older layout version is migrated when the runtime
    writes: its program is attached (and switched to the new rules) first, the old one detached
    after; with MULTI both run in between, so nothing either denies is allowed.
    """
    prep = prepare(rules)
    with opened(cg, "device_rules") as cgfd, FEATURE.find(cgfd) as groups:
        func = lay.FUNCS[owner]
        current = [g for g in groups if g.version == lay.VERSION]
        mine = [g for g in current if func in g.progs]
        legacy = [g for g in groups if g.version != lay.VERSION] if owner == RUNTIME else []
        if not rules:
            for g in mine:
                _detach_owner(cg, g, cgfd, owner)
            for g in legacy:
                _detach_legacy(cg, g, cgfd)
            return
        if mine:
            _update(cg, mine[0], owner, prep)
        else:
            _attach_new(cg, cgfd, owner, prep)
        for g in mine[1:]:  # two loads of ours (pins off, two processes): keep one
            _detach_owner(cg, g, cgfd, owner)
        for g in legacy:
            _detach_legacy(cg, g, cgfd)


def detach(cg: CgroupRef, *, owner: Owner = RUNTIME) -> None:
    """Detach the owner's program and delete its entries (a runtime also detaches programs of
    older layouts, whose sets were the runtime's). Idempotent; other owners' stay."""

    def detach_group(cg: CgroupRef, g: Attached, cgfd: int) -> None:
        if g.version == lay.VERSION:
            if lay.FUNCS[owner] in g.progs:
                _detach_owner(cg, g, cgfd, owner)
        elif owner == RUNTIME:
            _detach_legacy(cg, g, cgfd)

    FEATURE.detach_cgroup(cg, "device_rules", detach_group, purge_when_gone=False)


def detach_all(cg: CgroupRef) -> None:
    """Every owner's program and entries (teardown of a cgroup this library removes, gc of an
    abandoned one). Idempotent."""

    def detach_group(cg: CgroupRef, g: Attached, cgfd: int) -> None:
        if g.version != lay.VERSION:
            _detach_legacy(cg, g, cgfd)
            return
        for owner, func in lay.FUNCS.items():
            if func in g.progs:
                _detach_owner(cg, g, cgfd, owner)

    FEATURE.detach_cgroup(cg, "device_rules", detach_group)


FEATURE.teardown = detach_all


# ---------------------------------------------------------------- garbage collection


def reclaim_stale_generations(maps: dict[str, int], live: Liveness) -> int:
    """Delete rule sets of LIVE cgroups that no program can read any more; returns entries
    removed (gc's job: O(entries)).

    Each (cgroup, owner) keeps at most its current generation and the one before it (an update
    keeps the replaced set until the next, for program runs that read the old generation just
    before the switch). A writer killed after its switch but before deleting the set before
    that leaves an older one behind, forever unless reclaimed here. Under the cgroup's writer
    lock (taken without waiting: a cgroup being written is skipped, never raced) there is no
    in-flight writer, so everything else, a dead writer's next generation included, is stale.
    """
    sets: dict[int, set[tuple[int, int]]] = {}  # cgroup id -> {(owner id, generation)}
    for key in bpfsys.map_keys(maps["dev_rules"], enc.RULE_KEY.size):
        cgroup, gen, oid, _type = enc.key_head(key)
        if cgroup and gen:
            sets.setdefault(cgroup, set()).add((oid, gen))
    removed = 0
    for cgroup_id, present in sets.items():
        fd = live.open_fd(cgroup_id)
        if fd is None:
            continue  # gone: its entries are purged as a dead cgroup's
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                # a writer is at work: its generations are not ours to judge
                log.info("gc: cgroup id %d skipped: a writer holds its lock", cgroup_id)
                continue
            gens, _ = read_cur(maps, cgroup_id)
            for oid, gen in sorted(present):
                cur = gens[oid] if 0 < oid < lay.SLOTS else 0
                if cur and gen in (cur, cur - 1):
                    log.debug("gc: cgroup id %d owner %d generation %d kept", cgroup_id, oid, gen)
                    continue
                n = delete_set(maps, cgroup_id, gen, oid)
                removed += n
                log.info(
                    "gc: removed %d entries of stale generation %d (owner %s, current %d) of "
                    "live cgroup id %d",
                    n,
                    gen,
                    OWNER_NAMES.get(oid, oid),
                    cur,
                    cgroup_id,
                )
        finally:
            os.close(fd)  # releases the lock
    return removed


def _collect(layer: Layer, maps: dict[str, int], live: Liveness) -> dict[str, int]:
    """gc's device-specific part: stale generations of live cgroups, then a recount of the
    rule map's fill level (which killed writers may have left high)."""
    if layer.version != lay.VERSION:
        return {}
    n = reclaim_stale_generations(maps, live)
    usage.recount(maps["dev_rules"])
    return {"dev_rules (stale generations of live cgroups)": n} if n else {}


FEATURE.collect = _collect


# ---------------------------------------------------------------- reading back


@dataclass(frozen=True)
class OwnerSet:
    """One owner's rule set in force on a cgroup."""

    owner: Owner
    program_id: int
    tag: str
    trusted: bool
    generation: int = 0
    installed: bool = False
    rules: tuple[CgroupDeviceRule, ...] = ()
    denials: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class DeviceState:
    """What the kernel enforces on a cgroup, read from our programs and their maps.

    `owners` holds each owner's set: `installed` False means that owner's program denies
    everything (no rule set, or an incomplete one). An access is allowed only if every owner's
    set (and every foreign program) allows it. `denials` is one count per denied access (the
    largest of the owners' counts); `denials_not_itemised` counts denials past the cgroup's cap
    of distinct counters. `version` is the layout of the first program found (an older one is
    the runtime's, read as `legacy`).
    """

    attached: bool
    owners: tuple[OwnerSet, ...] = ()
    version: int | None = None
    legacy_program_ids: tuple[int, ...] = ()
    denials: dict[str, int] = field(default_factory=dict)
    denials_not_itemised: int = 0

    @property
    def installed(self) -> bool:
        return bool(self.owners) and all(o.installed for o in self.owners)

    def owner(self, owner: Owner) -> OwnerSet | None:
        return next((o for o in self.owners if o.owner == owner), None)


def _trusted_tags(owner: Owner) -> frozenset[str]:
    ident = bytecode.ident(lay.SOURCE, lay.FUNCS[owner], lay.PROG_TYPE)
    return frozenset(t.hex() for t in ident.tags)


def read_entries(
    maps: dict[str, int], cgroup_id: int, gen: int, owner_id: int
) -> dict[enc.Pattern, enc.Entry] | None:
    """The stored entries of a rule set; None when it is incomplete (the program denies)."""
    fd = maps["dev_rules"]
    table: dict[enc.Pattern, enc.Entry] = {}
    chunk = 0
    while (
        ival := bpfsys.map_lookup(
            fd, enc.index_key(cgroup_id, gen, owner_id, chunk), enc.INDEX_VAL.size
        )
    ) is not None:
        for p in enc.index_patterns(ival):
            val = bpfsys.map_lookup(
                fd, enc.rule_key(cgroup_id, gen, owner_id, p), enc.RULE_VAL.size
            )
            if val is None:
                return None
            m, r, w, final = enc.RULE_VAL.unpack(val)
            table[p] = ((m, r, w), bool(final))
        chunk += 1
    if any((t, enc.ANY, enc.ANY) not in table for t in enc.TYPE_NAMES):
        return None
    return table


def _denial_items(fd: int, cgroup_id: int | None = None) -> list[tuple[bytes, bytes]]:
    items = []
    for key in bpfsys.map_keys(fd, enc.DENY_KEY.size):
        if cgroup_id is None or enc.DENY_KEY.unpack(key)[0] == cgroup_id:
            val = bpfsys.map_lookup(fd, key, enc.DENY_VAL.size)
            if val is not None:
                items.append((key, val))
    return items


def not_itemised(maps: dict[str, int], cgroup_id: int) -> int:
    """Denials counted only in the cgroup's overflow counter (summed over CPUs)."""
    vals = bpfsys.map_lookup_percpu(
        maps["dev_audit"], _STORAGE(cgroup_id, lay.ATTACH), enc.AUDIT.size
    )
    return sum(enc.AUDIT.unpack(v)[1] for v in vals or [])


def denials_many(cgs: Sequence[CgroupRef]) -> list[dict[str, int]]:
    """denials() of many cgroups (a node agent's poll): the counter map, shared by every
    cgroup our programs serve, is walked once per distinct map instead of once per cgroup."""
    out: list[dict[str, int]] = [{} for _ in cgs]
    walks: dict[int, dict[int, list[tuple[bytes, bytes]]]] = {}  # map id -> cgroup id -> items
    for i, cg in enumerate(cgs):
        with FEATURE.find_at(cg) as groups:
            for g in groups:
                if g.version != lay.VERSION:
                    continue
                fd = g.maps["dev_denials"]
                mid = bpfsys.map_info(fd).id
                if mid not in walks:
                    by_cg: dict[int, list[tuple[bytes, bytes]]] = {}
                    for key, val in _denial_items(fd):
                        by_cg.setdefault(enc.DENY_KEY.unpack(key)[0], []).append((key, val))
                    walks[mid] = by_cg
                merged = enc.merge_denials(enc.decode_denials(walks[mid].get(cg.id, []), cg.id))
                for label, n in merged.items():
                    out[i][label] = max(out[i].get(label, 0), n)
    return out


def read_state(cg: CgroupRef) -> DeviceState:
    """The device rules in force on the cgroup, per owner, as the kernel sees them (no lock)."""
    with FEATURE.find_at(cg) as groups:
        if not groups:
            return DeviceState(attached=False)
        legacy = tuple(i for g in groups if g.version != lay.VERSION for i in g.ids.values())
        current = [g for g in groups if g.version == lay.VERSION]
        if not current:
            return DeviceState(attached=True, version=groups[0].version, legacy_program_ids=legacy)
        g = current[0]
        gens, _ = read_cur(g.maps, cg.id)
        by_owner = enc.decode_denials(_denial_items(g.maps["dev_denials"], cg.id), cg.id)
        owners = []
        for owner, func in lay.FUNCS.items():
            if func not in g.progs:
                continue
            oid = OWNER_IDS[owner]
            gen = gens[oid]
            entries = read_entries(g.maps, cg.id, gen, oid) if gen else None
            owners.append(
                OwnerSet(
                    owner=owner,
                    program_id=g.ids[func],
                    tag=g.tags[func],
                    trusted=g.tags[func] in _trusted_tags(owner),
                    generation=gen,
                    installed=entries is not None,
                    rules=tuple(enc.decode_rules(entries)) if entries is not None else (),
                    denials=by_owner.get(oid, {}),
                )
            )
        return dataclasses.replace(
            DeviceState(attached=True, version=lay.VERSION, legacy_program_ids=legacy),
            owners=tuple(owners),
            denials=enc.merge_denials(by_owner),
            denials_not_itemised=not_itemised(g.maps, cg.id),
        )


def denials(cg: CgroupRef) -> dict[str, int]:
    """Denied accesses counted by our programs on this cgroup, e.g. {"c 240:1 rw": 3}."""
    return denials_many([cg])[0]
