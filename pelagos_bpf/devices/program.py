"""The device feature on the shared runtime: rule sets in maps, written fail-closed.

One generic program (bpf/device.c, declared in layout.py) is attached with BPF_F_ALLOW_MULTI to
every container cgroup. The cgroup storage `dev_cur` names the rule set in force (cgroup id,
generation); the rules are entries of the shared `dev_rules` hash under that key. A start costs
map writes plus one PROG_ATTACH; a live update is map writes plus one storage write.

Fail closed by construction (docs/DEVICES.md): writers hold the cgroup's flock; a generation is
never reused, so no writer deletes a rule set that may be live; every rule set ends with `*:*`
sentinels, so an absent or half-written set denies.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from .. import bpfsys, bytecode
from ..cgref import CgroupRef, opened
from ..errors import BpfError
from ..feature import Attached, Feature
from ..layers import storage_key
from ..loader import Loaded
from . import encode as enc
from . import layout as lay
from .rules import CgroupDeviceRule, validate_device_rules

FEATURE = Feature(lay.LAYER, (lay.LAYER_V1,))
GEN_MAX = 0xFFFF_FFFF


def compiled() -> bytecode.CompiledProgram:
    """The program's bytecode (shipped with the package)."""
    return bytecode.get_program(lay.SOURCE, lay.FUNC, lay.LAYER.progs[0].prog_type)


PROG_NAME = lay.PROG_NAME  # (bench/ finds pins by it)


def own_program() -> Loaded:
    """This process's program and maps (loaded once, or fetched from the pins)."""
    return FEATURE.loaded()


# ---------------------------------------------------------------- rule sets in the maps


@dataclass(frozen=True)
class Prepared:
    """A validated rule list, encoded (the map entries minus their (cgroup, gen) head)."""

    n_patterns: int
    template: tuple[tuple[bytes, bytes], ...]


@lru_cache(maxsize=256)
def _prepare(rules: tuple[CgroupDeviceRule, ...]) -> Prepared:
    table = enc.encode_rules(rules)
    return Prepared(len(table), enc.entry_template(table))


def prepare(rules: Sequence[CgroupDeviceRule], *, validated: bool = False) -> Prepared:
    """Validate (unless the caller just did: setup's validate_config) and encode (memoized: a
    repeated rule list costs a dict lookup)."""
    if not validated:
        validate_device_rules(rules)  # valid rules have exact types, so the cache key is exact
    return _prepare(tuple(rules))


def current_gen(maps: dict[str, int], cgroup_id: int) -> int:
    """The generation in this cgroup's storage (0 = not installed: the program denies all)."""
    raw = bpfsys.map_lookup(maps["dev_cur"], storage_key(cgroup_id, lay.ATTACH), enc.CUR.size)
    return enc.CUR.unpack(raw)[1] if raw else 0


def set_keys(maps: dict[str, int], cgroup_id: int, gen: int) -> tuple[list[bytes], list[bytes]]:
    """(rule keys, index keys) of one stored rule set, found through its index (no scan)."""
    fd = maps["dev_rules"]
    rule_keys: list[bytes] = []
    index_keys: list[bytes] = []
    while True:
        key = enc.index_key(cgroup_id, gen, len(index_keys))
        val = bpfsys.map_lookup(fd, key, lay.VAL_SIZE)
        if val is None:
            break
        index_keys.append(key)
        patterns = enc.index_patterns(val)
        rule_keys.extend(enc.RULE_KEY.pack(cgroup_id, gen, *p) for p in patterns)
        if len(patterns) < enc.INDEX_CHUNK:  # chunks fill in order: a partial one is the last
            break
    return rule_keys, index_keys


def delete_keys(maps: dict[str, int], keys: tuple[list[bytes], list[bytes]]) -> int:
    """Delete what set_keys found; returns patterns removed.

    Reverse write order (sentinels first), the index last: any state on the way is a prefix of
    the write, which the program treats as strictly as the whole set (encode.write_rank).
    """
    rule_keys, index_keys = keys
    if not index_keys:
        return 0
    n = bpfsys.map_delete_batch(maps["dev_rules"], rule_keys[::-1])
    bpfsys.map_delete_batch(maps["dev_rules"], index_keys)
    return n


def delete_set(maps: dict[str, int], cgroup_id: int, gen: int) -> int:
    """Delete every entry of one rule set (found through its index); returns patterns removed."""
    return delete_keys(maps, set_keys(maps, cgroup_id, gen))


def write_set(cg: CgroupRef, maps: dict[str, int], gen: int, prep: Prepared) -> None:
    """Store a rule set under a generation no program reads yet; all or nothing.

    A full map first reclaims the entries of dead cgroups (GC) and retries once.
    """
    fd = maps["dev_rules"]
    delete_set(maps, cg.id, gen)  # leftovers of a writer that died before its switch
    entries = enc.with_ruleset(cg.id, gen, prep.template)

    def store() -> None:
        try:
            bpfsys.map_update_batch(fd, entries)  # one syscall; the sentinels are written last
        except BpfError:
            bpfsys.map_delete_batch(fd, [key for key, _ in entries][::-1])
            raise

    try:
        FEATURE.retry_when_full(cg, maps, store)
    except BpfError as e:
        hint = (
            f" (dev_rules map full, even after reclaiming dead cgroups: {len(entries)} entries "
            f"per set; raise the node setting {lay.RULES_ENV}, read when a process first loads "
            "the program, or remove stale pins)"
            if e.errno == errno.E2BIG
            else ""
        )
        raise BpfError(
            e.errno or errno.EIO,
            "device_rules",
            f"cannot store {prep.n_patterns} rule patterns{hint}: {e.strerror}",
        ) from e


def _switch(maps: dict[str, int], cgroup_id: int, gen: int) -> None:
    """One storage write: the program sees the old rule set or the new one, never a mix."""
    key = storage_key(cgroup_id, lay.ATTACH)
    bpfsys.map_update(maps["dev_cur"], key, enc.CUR.pack(cgroup_id, gen, 0))


def _next_gen(gen: int) -> int:
    return gen + 1 if gen < GEN_MAX else 1  # wraps after 4 G updates of one cgroup


# ---------------------------------------------------------------- attach / update / detach


def _attach_new(cg: CgroupRef, cgfd: int, prep: Prepared) -> None:
    loaded = FEATURE.loaded()
    spec = lay.LAYER.progs[0]
    FEATURE.attach(loaded.progs[lay.FUNC], cgfd, spec, "device_rules")
    gen = 0
    try:
        # The storage reads gen 0 (deny all) on a new attachment, or a stale generation whose
        # entries are gone (no sentinel: deny all) if this cgroup had our program before.
        gen = _next_gen(current_gen(loaded.maps, cg.id))
        write_set(cg, loaded.maps, gen, prep)
        _switch(loaded.maps, cg.id, gen)
    except BaseException:
        bpfsys.prog_detach(loaded.progs[lay.FUNC], cgfd, lay.ATTACH)
        if gen:
            delete_set(loaded.maps, cg.id, gen)
        raise


def attach_fresh(
    cg: CgroupRef, cgfd: int, rules: Sequence[CgroupDeviceRule], *, validated: bool = False
) -> None:
    """`apply` for a cgroup the caller has just created (setup's fast path), through its fd.

    Write the whole rule set (generation 1), attach, switch: no find() of the programs of every
    layout version, no storage read. The flock stays (one syscall): the directory is new, but
    any process may open it by path, so this writer serialises like every other. Under the
    lock one PROG_QUERY must come back empty (no writer got in between our mkdir and our
    lock; every writer attaches under the lock), else the general `apply` runs. The rule set
    write still deletes an index it finds first (one lookup): a writer that got in, failed, and
    died between its detach and its deletes may have left generation 1 entries of this id.
    validated: the caller validated `rules` (validate_config), so they are not checked twice.
    """
    prep = prepare(rules, validated=validated)
    fcntl.flock(cgfd, fcntl.LOCK_EX)
    try:
        fresh = not bpfsys.prog_query(cgfd, lay.ATTACH)
        if fresh:
            loaded = FEATURE.loaded()
            write_set(cg, loaded.maps, 1, prep)
            prog = loaded.progs[lay.FUNC]
            attached = False
            try:
                FEATURE.attach(prog, cgfd, lay.LAYER.progs[0], "device_rules")
                attached = True
                _switch(loaded.maps, cg.id, 1)
            except BaseException:
                if attached:
                    bpfsys.prog_detach(prog, cgfd, lay.ATTACH)
                delete_set(loaded.maps, cg.id, 1)
                raise
    finally:
        fcntl.flock(cgfd, fcntl.LOCK_UN)  # the caller keeps the fd: unlock for other writers
    if not fresh:
        apply(cg, rules)


def removal_keys(cg: CgroupRef) -> tuple[list[bytes], list[bytes]] | None:
    """Keys of this process's rule sets of the cgroup, read before an rmdir (teardown's fast
    path: rmdir frees the attachment, these entries go after it in one batch).

    None when this process's program has no storage for the cgroup (never attached here, or
    detached from inside): the caller then takes the general detach path.
    """
    loaded = FEATURE.loaded_if_any()
    if loaded is None:
        return None
    raw = bpfsys.map_lookup(loaded.maps["dev_cur"], storage_key(cg.id, lay.ATTACH), enc.CUR.size)
    if raw is None:
        return None
    gen = enc.CUR.unpack(raw)[1]
    rule_keys: list[bytes] = []
    index_keys: list[bytes] = []
    for g in (gen - 1, gen, gen + 1):  # as _detach: the kept previous set, a dead writer's next
        if 0 < g <= GEN_MAX:
            r, i = set_keys(loaded.maps, cg.id, g)
            rule_keys += r
            index_keys += i
    return rule_keys, index_keys


def remove_entries(keys: tuple[list[bytes], list[bytes]]) -> None:
    """After the cgroup's rmdir (no task can run the program for it any more): drop the rule
    sets `removal_keys` found, in one batch.

    The cgroup's denial counters stay for gc (`pelagos-bpf gc`, and the collection a full rule
    map triggers): finding them means a walk of the counter hash, and an empty 16 Ki-bucket
    hash costs ~100 us to walk (GET_NEXT_KEY scans buckets), more than the rest of teardown.
    A dead cgroup's counters mislead no reader (cgroup ids are never reused).
    """
    rule_keys, index_keys = keys
    if index_keys:  # no program reads them any more: any order, one syscall
        bpfsys.map_delete_batch(FEATURE.loaded().maps["dev_rules"], rule_keys + index_keys)


def _update(cg: CgroupRef, group: Attached, prep: Prepared) -> None:
    old = current_gen(group.maps, cg.id)
    new = _next_gen(old)
    write_set(cg, group.maps, new, prep)
    try:
        _switch(group.maps, cg.id, new)
    except BaseException:
        delete_set(group.maps, cg.id, new)
        raise
    # The replaced set `old` stays until the next update: a program run that read `old` just
    # before the switch still finds complete entries. The one before it goes now; being a
    # distinct generation, it cannot be what the switch made live.
    if old > 1:
        delete_set(group.maps, cg.id, old - 1)


def _detach(cg: CgroupRef, group: Attached, cgfd: int) -> None:
    gen = current_gen(group.maps, cg.id) if group.version == lay.VERSION else 0
    FEATURE.detach(group, cgfd)
    # Entries go only after the detach: the program never runs without its rule set.
    if group.version == lay.VERSION:
        for g in (gen - 1, gen, gen + 1):
            if 0 < g <= GEN_MAX:
                delete_set(group.maps, cg.id, g)
        FEATURE.purge(group.layer, {"dev_denials": group.maps["dev_denials"]}, lambda i: i == cg.id)
    else:  # an older release's layout: reclaim by scanning (rare: migrations only)
        FEATURE.purge(group.layer, group.maps, lambda i: i == cg.id)


def apply(cg: CgroupRef, rules: Sequence[CgroupDeviceRule]) -> None:
    """Make `rules` the cgroup's device rules: attach, update in place, or detach ([]).

    A cgroup with a program of an older layout version is migrated: ours is attached (and
    switched to the new rules) first, the old one detached after; with MULTI both run in
    between, so nothing either denies is allowed.
    """
    prep = prepare(rules)
    with opened(cg, "device_rules") as cgfd, FEATURE.find(cgfd) as groups:
        assert cgfd is not None
        current = [g for g in groups if g.version == lay.VERSION]
        others = [g for g in groups if g.version != lay.VERSION] + current[1:]
        if not rules:
            for g in groups:
                _detach(cg, g, cgfd)
            return
        if current:
            _update(cg, current[0], prep)
        else:
            _attach_new(cg, cgfd, prep)
        for g in others:  # older versions, or two programs after a race of old releases
            _detach(cg, g, cgfd)


def detach(cg: CgroupRef) -> None:
    """Detach our programs (any version) and delete this cgroup's entries. Idempotent."""
    FEATURE.detach_cgroup(cg, "device_rules", _detach)


FEATURE.teardown = detach


# ---------------------------------------------------------------- reading back


@dataclass(frozen=True)
class DeviceState:
    """What the kernel enforces on a cgroup, read from the program and its maps.

    `installed` False with `attached` True means the program denies everything (generation 0:
    "denied: rule set not installed", or an incomplete rule set). `trusted` says whether the
    program's tag equals the tag of the bytecode this release loads. `rules` is an ordered
    list equivalent (last match wins) to the rule set in force.
    """

    attached: bool
    program_id: int | None = None
    tag: str | None = None
    trusted: bool = False
    version: int | None = None
    generation: int = 0
    installed: bool = False
    rules: tuple[CgroupDeviceRule, ...] = ()
    denials: dict[str, int] = field(default_factory=dict)
    other_programs: tuple[int, ...] = ()  # more of ours attached (e.g. mid-migration)


def _trusted_tags() -> frozenset[str]:
    return frozenset(t.hex() for t in bytecode.ident(lay.SOURCE, lay.FUNC, lay.PROG_TYPE).tags)


def _read_entries(
    maps: dict[str, int], cgroup_id: int, gen: int
) -> dict[enc.Pattern, enc.Entry] | None:
    """The stored entries of a rule set; None when it is incomplete (the program denies)."""
    fd = maps["dev_rules"]
    table: dict[enc.Pattern, enc.Entry] = {}
    chunk = 0
    while (
        ival := bpfsys.map_lookup(fd, enc.index_key(cgroup_id, gen, chunk), enc.INDEX_VAL.size)
    ) is not None:
        for p in enc.index_patterns(ival):
            val = bpfsys.map_lookup(fd, enc.RULE_KEY.pack(cgroup_id, gen, *p), enc.RULE_VAL.size)
            if val is None:
                return None
            m, r, w, final = enc.RULE_VAL.unpack(val)
            table[p] = ((m, r, w), bool(final))
        chunk += 1
    if any((t, enc.ANY, enc.ANY) not in table for t in enc.TYPE_NAMES):
        return None
    return table


def _denials(maps: dict[str, int], cgroup_id: int) -> dict[str, int]:
    fd = maps["dev_denials"]
    items = []
    for key in bpfsys.map_keys(fd, enc.DENY_KEY.size):
        if enc.DENY_KEY.unpack(key)[0] == cgroup_id:
            val = bpfsys.map_lookup(fd, key, enc.DENY_VAL.size)
            if val is not None:
                items.append((key, val))
    return enc.decode_denials(items, cgroup_id)


def denials_many(cgs: Sequence[CgroupRef]) -> list[dict[str, int]]:
    """denials() of many cgroups (a node agent's poll): the counter map, shared by every
    cgroup our program serves, is walked once per distinct map instead of once per cgroup."""
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
                    for key in bpfsys.map_keys(fd, enc.DENY_KEY.size):
                        val = bpfsys.map_lookup(fd, key, enc.DENY_VAL.size)
                        if val is not None:
                            by_cg.setdefault(enc.DENY_KEY.unpack(key)[0], []).append((key, val))
                    walks[mid] = by_cg
                for label, n in enc.decode_denials(walks[mid].get(cg.id, []), cg.id).items():
                    out[i][label] = out[i].get(label, 0) + n
    return out


def read_state(cg: CgroupRef) -> DeviceState:
    """The device rules in force on the cgroup, as the kernel sees them (no lock taken)."""
    with FEATURE.find_at(cg) as groups:
        if not groups:
            return DeviceState(attached=False)
        g = groups[0]
        state = DeviceState(
            attached=True,
            program_id=g.ids[lay.FUNC],
            tag=g.tags[lay.FUNC],
            trusted=g.version == lay.VERSION and g.tags[lay.FUNC] in _trusted_tags(),
            version=g.version,
            other_programs=tuple(x.ids[lay.FUNC] for x in groups[1:]),
        )
        if g.version != lay.VERSION:
            return state
        gen = current_gen(g.maps, cg.id)
        entries = _read_entries(g.maps, cg.id, gen) if gen else None
        return dataclasses.replace(
            state,
            generation=gen,
            installed=entries is not None,
            rules=tuple(enc.decode_rules(entries)) if entries is not None else (),
            denials=_denials(g.maps, cg.id),
        )


def denials(cg: CgroupRef) -> dict[str, int]:
    """Denied accesses counted by our current programs on this cgroup, e.g. {"c 240:1 rw": 3}."""
    with FEATURE.find_at(cg) as groups:
        out: dict[str, int] = {}
        for g in groups:
            if g.version == lay.VERSION:
                for label, n in _denials(g.maps, cg.id).items():
                    out[label] = out.get(label, 0) + n
        return out
