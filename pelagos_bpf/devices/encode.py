"""Rule list -> map entries for bpf/device.c (pure), and a userspace model of the program.

Per key pattern (type, major|ANY, minor|ANY) the entry holds, for each access bit (mknod, read,
write), the winner `(rule index + 1) << 1 | allow` of the last rule with that pattern and bit
(0 = none). Kind 'a' expands into both 'b' and 'c'. A later rule has a larger winner, so the
program's per-bit max over the 4 patterns matching a device is the last matching rule.

Every rule set carries a `*:*` entry per type (zero winners when no rule has that pattern),
written last: the program treats a rule set whose lookups find neither a final entry nor that
sentinel as absent or half-written, and denies (docs/DEVICES.md). Layouts come from layout.py.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

from . import layout as lay
from .rules import CgroupDeviceRule

ANY = 0xFFFF_FFFF
TYPE_BLOCK = 1  # BPF_DEVCG_DEV_BLOCK
TYPE_CHAR = 2  # BPF_DEVCG_DEV_CHAR
TYPES = {"b": TYPE_BLOCK, "c": TYPE_CHAR}
TYPE_NAMES = {TYPE_BLOCK: "b", TYPE_CHAR: "c"}
ACC_BITS = {"m": 1, "r": 2, "w": 4}  # BPF_DEVCG_ACC_MKNOD / READ / WRITE
BIT_SLOT = {"m": 0, "r": 1, "w": 2}  # index into dev_val.bit[]
TYPE_INDEX = 0  # dev_key.type of index entries (never a device type, so never looked up)

RULE_KEY = lay.KEY.struct  # struct dev_key
RULE_VAL = struct.Struct(f"<{lay.RULE.struct.format[1:]}{lay.VAL_SIZE - lay.RULE.size}x")
INDEX_VAL = lay.INDEX.struct  # struct dev_index: packed patterns, 0 = none
INDEX_CHUNK = INDEX_VAL.size // 8
DENY_KEY = lay.DENY_KEY.struct
DENY_VAL = lay.DENY_VAL.struct
CUR = lay.CUR.struct  # struct dev_cur: cgroup id, a generation per owner (0: none), audit cap
AUDIT = lay.AUDIT.struct  # struct dev_audit (per CPU): itemised, overflow
_HEAD = struct.Struct("<QIH")  # the (cgroup, gen, owner) head of every dev_key

Pattern = tuple[int, int, int]  # (type, major|ANY, minor|ANY)
Winners = tuple[int, int, int]  # (mknod, read, write)
Entry = tuple[Winners, bool]  # winners, final (the program stops at a final entry)


def access_mask(access: str) -> int:
    mask = 0
    for ch in access:
        mask |= ACC_BITS[ch]
    return mask


def access_str(mask: int) -> str:
    """Bits as letters in the usual 'rwm' order."""
    return "".join(ch for ch in "rwm" if mask & ACC_BITS[ch]) or "-"


def _num(n: int) -> int:
    return ANY if n == -1 else n


_KIND_TYPES = {**{k: (t,) for k, t in TYPES.items()}, "a": tuple(TYPES.values())}
_ACCESS_SLOTS: dict[str, tuple[int, ...]] = {}  # "rw" -> (1, 2): dev_val.bit[] indexes


def encode_rules(rules: Sequence[CgroupDeviceRule]) -> dict[Pattern, Winners]:
    """The map contents for one rule list (validated beforehand)."""
    table: dict[Pattern, list[int]] = {}
    for i, rule in enumerate(rules, start=1):
        win = (i << 1) | rule.allow
        major, minor, acc = _num(rule.major), _num(rule.minor), rule.access
        slots_of = _ACCESS_SLOTS.get(acc)
        if slots_of is None:
            slots_of = _ACCESS_SLOTS[acc] = tuple(BIT_SLOT[ch] for ch in acc)
        for type_ in _KIND_TYPES[rule.kind]:
            slots = table.setdefault((type_, major, minor), [0, 0, 0])
            for slot in slots_of:
                slots[slot] = win
    return {p: (s[0], s[1], s[2]) for p, s in table.items()}


def patterns_for(type_: int, major: int, minor: int) -> tuple[Pattern, ...]:
    """The 4 patterns the program looks up for one device, in its order."""
    return (
        (type_, major, minor),
        (type_, major, ANY),
        (type_, ANY, ANY),
        (type_, ANY, minor),
    )


def _max(a: Winners, b: Winners) -> Winners:
    return (
        a[0] if a[0] > b[0] else b[0],
        a[1] if a[1] > b[1] else b[1],
        a[2] if a[2] > b[2] else b[2],
    )


def resolve(table: dict[Pattern, Winners]) -> dict[Pattern, Entry]:
    """Entries as stored: pre-merged and marked final where the program may stop early.

    The program looks up M:m, M:*, *:*, *:m and stops at the first final entry. An exact entry
    is final with the max over all 4 patterns. M:* and *:* entries are final (M:* merged with
    *:*) when the type has no *:m pattern at all: then, having missed the lookups before, the
    rest can only add *:*. Final entries are reached only after the earlier lookups missed, so
    stopping there gives the same max as the full 4 lookups. A `*:*` entry exists for every
    type (the completeness sentinel, zero winners when no rule has that pattern).
    """
    none = (0, 0, 0)
    table = {**{(t, ANY, ANY): none for t in TYPE_NAMES}, **table}  # the sentinels
    any_minor_types = {t for t, ma, mi in table if ma == ANY and mi != ANY}
    star = {t: table[(t, ANY, ANY)] for t in TYPE_NAMES}
    out: dict[Pattern, Entry] = {}
    get = table.get
    # On a never-seen rule set's setup path: the merges an exact entry needs are mostly with
    # *:* alone (M:* and *:m entries are rare), so the lookups that miss are skipped.
    for p, v in table.items():
        t, ma, mi = p
        if ma != ANY and mi != ANY:
            v = _max(v, star[t])
            if (w := get((t, ma, ANY))) is not None:
                v = _max(v, w)
            if t in any_minor_types and (w := get((t, ANY, mi))) is not None:
                v = _max(v, w)
            out[p] = (v, True)
        elif mi == ANY and t not in any_minor_types:
            out[p] = (v if ma == ANY else _max(v, star[t]), True)
        else:
            out[p] = (v, False)
    return out


def winners(
    entries: dict[Pattern, Entry], type_: int, major: int, minor: int
) -> tuple[Winners, bool]:
    """Userspace model of bpf/device.c's lookups: per-bit max, stopping at a final entry; and
    whether the rule set was complete (a final entry or the `*:*` sentinel was found)."""
    best = (0, 0, 0)
    for p in patterns_for(type_, major, minor):
        e = entries.get(p)
        if e is None and p[1] == ANY and p[2] == ANY:
            return best, False
        if e is not None:
            best = _max(best, e[0])
            if e[1]:
                break
    return best, True


def decide(entries: dict[Pattern, Entry], type_: int, major: int, minor: int, acc: int) -> bool:
    """Userspace model of the program's decision: deny if the rule set is incomplete or any
    requested bit's winner denies."""
    best, complete = winners(entries, type_, major, minor)
    if not complete:
        return False
    for ch, bit in ACC_BITS.items():
        win = best[BIT_SLOT[ch]]
        if acc & bit and win and not win & 1:
            return False
    return True


def pack_pattern(p: Pattern) -> int:
    """A pattern in a u64 (never 0): type << 34 | major << 21 | minor, ANY as all-ones."""
    type_, major, minor = p
    return (
        (type_ << 34)
        | ((0x1FFF if major == ANY else major) << 21)
        | (0x1F_FFFF if minor == ANY else minor)
    )


def unpack_pattern(v: int) -> Pattern:
    major = (v >> 21) & 0x1FFF
    minor = v & 0x1F_FFFF
    return (v >> 34, ANY if major == 0x1FFF else major, ANY if minor == 0x1F_FFFF else minor)


def write_rank(p: Pattern) -> int:
    """Write order of a pattern: M:m, M:*, *:m, then the *:* sentinel.

    Why: an entry marked final is right only if the entries the program looks up before it
    exist, so those are written first. Then ANY prefix of the write (a writer killed mid-batch)
    decides no more leniently than the whole set: it stops at a complete final entry, or finds
    no sentinel and denies. Deletion goes in the reverse order.
    """
    _, major, minor = p
    if major != ANY:
        return 0 if minor != ANY else 1
    return 2 if minor != ANY else 3


_KEY_TAIL = struct.Struct("<HII")  # dev_key minus its (cgroup, gen, owner) head: type, major, minor
assert _HEAD.size + _KEY_TAIL.size == RULE_KEY.size


def entry_template(table: dict[Pattern, Winners]) -> tuple[tuple[bytes, bytes], ...]:
    """The entries of a rule set minus the (cgroup, gen, owner) head of each map key, in write
    order.

    Index entries first (type 0, major = chunk number: they let any process find and delete
    exactly this rule set's entries without scanning the shared map), then the patterns in the
    program's lookup order (see write_rank), the `*:*` sentinels last. On every never-seen rule
    set's setup path: bucketing by rank gives the order of a stable sort by write_rank without
    the sort, and keys are packed without their head (tests/test_device_encode.py holds it to
    the plain form).
    """
    ranked: tuple[list[tuple[Pattern, Entry]], ...] = ([], [], [], [])
    for item in resolve(table).items():
        ranked[write_rank(item[0])].append(item)
    items = ranked[0] + ranked[1] + ranked[2] + ranked[3]
    packed = [pack_pattern(p) for p, _ in items]
    packed += [0] * (-len(packed) % INDEX_CHUNK)
    key, rule = _KEY_TAIL.pack, RULE_VAL.pack
    out = [
        (key(TYPE_INDEX, c // INDEX_CHUNK, 0), INDEX_VAL.pack(*packed[c : c + INDEX_CHUNK]))
        for c in range(0, len(packed), INDEX_CHUNK)
    ]
    out += [(key(*p), rule(v[0], v[1], v[2], final)) for p, (v, final) in items]
    return tuple(out)


def with_ruleset(
    cgroup_id: int, gen: int, owner: int, template: Sequence[tuple[bytes, bytes]]
) -> list[tuple[bytes, bytes]]:
    """Packed (key, value) pairs of a template for one owner's rule set generation."""
    head = _HEAD.pack(cgroup_id, gen, owner)
    return [(head + suffix, val) for suffix, val in template]


def rule_entries(
    cgroup_id: int, gen: int, owner: int, table: dict[Pattern, Winners]
) -> list[tuple[bytes, bytes]]:
    """Packed (key, value) pairs for one rule set (see entry_template)."""
    return with_ruleset(cgroup_id, gen, owner, entry_template(table))


def rule_key(cgroup_id: int, gen: int, owner: int, p: Pattern) -> bytes:
    return RULE_KEY.pack(cgroup_id, gen, owner, *p)


def index_key(cgroup_id: int, gen: int, owner: int, chunk: int) -> bytes:
    return RULE_KEY.pack(cgroup_id, gen, owner, TYPE_INDEX, chunk, 0)


def key_head(key: bytes) -> tuple[int, int, int, int]:
    """(cgroup, gen, owner, type) of a dev_rules key: which rule set an entry belongs to."""
    cgroup, gen, owner, type_, _major, _minor = RULE_KEY.unpack(key)
    return cgroup, gen, owner, type_


def index_patterns(index_value: bytes) -> list[Pattern]:
    """The patterns an index entry lists."""
    return [unpack_pattern(v) for v in INDEX_VAL.unpack(index_value) if v]


def decode_rules(entries: dict[Pattern, Entry]) -> list[CgroupDeviceRule]:
    """An ordered rule list equivalent to stored entries (what `read_state` shows).

    Each winner `(i + 1) << 1 | allow` is a rule at position i; its own pattern is the most
    general one it appears in (resolve() only copies wildcard winners into narrower, final
    entries), so a plain list reads back as written. A rule shows the access bits it still
    decides: one overridden in every bit is gone, as it is for the kernel. b and c twins fold
    into 'a'. Evaluated with last-match-wins, the list decides exactly as the program does.
    """
    seen: dict[int, dict[Pattern, str]] = {}
    for pattern, (wins, _final) in entries.items():
        for ch, win in zip("mrw", wins, strict=True):
            if win:
                chars = seen.setdefault(win, {})
                chars[pattern] = chars.get(pattern, "") + ch
    out: list[CgroupDeviceRule] = []
    for win in sorted(seen):
        pats = seen[win]
        wild = max((ma == ANY) + (mi == ANY) for _t, ma, mi in pats)
        by_num: dict[tuple[int, int, str], list[int]] = {}
        for (t, ma, mi), bits in pats.items():
            if (ma == ANY) + (mi == ANY) == wild:
                access = "".join(ch for ch in "rwm" if ch in bits)
                by_num.setdefault((ma, mi, access), []).append(t)
        for (ma, mi, access), types in by_num.items():
            out.append(
                CgroupDeviceRule(
                    allow=bool(win & 1),
                    kind="a" if len(types) == 2 else TYPE_NAMES[types[0]],
                    major=-1 if ma == ANY else ma,
                    minor=-1 if mi == ANY else mi,
                    access=access,
                )
            )
    return out


def denial_label(type_: int, major: int, minor: int, acc: int) -> str:
    """ "c 240:1 rw": the device and the access that was refused."""
    return f"{TYPE_NAMES.get(type_, '?')} {major}:{minor} {access_str(acc)}"


def decode_denials(
    items: Iterable[tuple[bytes, bytes]], cgroup_id: int
) -> dict[int, dict[str, int]]:
    """Denial counters of one cgroup from raw (key, value) pairs of dev_denials, per owner id."""
    out: dict[int, dict[str, int]] = {}
    for k, v in items:
        cg, owner, type_, major, minor, acc = DENY_KEY.unpack(k)
        if cg == cgroup_id:
            label = denial_label(type_, major, minor, acc)
            mine = out.setdefault(owner, {})
            mine[label] = mine.get(label, 0) + DENY_VAL.unpack(v)[0]
    return out


def merge_denials(by_owner: dict[int, dict[str, int]]) -> dict[str, int]:
    """One count per denied access: an access several owners' sets deny was refused once but
    counted by each of their programs, so take the largest count, not the sum."""
    out: dict[str, int] = {}
    for counts in by_owner.values():
        for label, n in counts.items():
            out[label] = max(out.get(label, 0), n)
    return out
