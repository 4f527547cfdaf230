"""Map encoding (pure) and a userspace model of bpf/device.c's 4-lookup decision."""

from __future__ import annotations

from device_helpers import PROBE_DEVICES, rules_st
from hypothesis import given, settings
from hypothesis import strategies as st

from pelagos_bpf.devices import DEFAULT_DEVICE_RULES, device_allowed
from pelagos_bpf.devices import encode as enc
from pelagos_bpf.devices.rules import CgroupDeviceRule as R

ANY = enc.ANY


def test_encode_expands_a_and_packs_winners() -> None:
    rules = [R(False, "a", -1, -1, "rwm"), R(True, "c", 1, 3, "rw"), R(True, "c", -1, -1, "m")]
    t = enc.encode_rules(rules)
    deny0 = (1 + 0) << 1  # rule 0, deny
    assert t[(enc.TYPE_BLOCK, ANY, ANY)] == (deny0, deny0, deny0)
    # rule 2 (allow) overrides rule 0 for mknod only on char
    assert t[(enc.TYPE_CHAR, ANY, ANY)] == ((3 << 1) | 1, deny0, deny0)
    assert t[(enc.TYPE_CHAR, 1, 3)] == (0, (2 << 1) | 1, (2 << 1) | 1)
    assert len(t) == 3


def test_default_rules_table_size() -> None:
    # deny-all -> 2 patterns (b, c *:*), the m rules reuse them, 10 allowlist entries
    assert len(enc.encode_rules(DEFAULT_DEVICE_RULES)) == 12


def test_rule_entries_index_then_patterns_then_sentinels() -> None:
    t = enc.encode_rules([R(True, "c", 1, 3, "r"), R(False, "b", 8, -1, "w")])
    entries = enc.rule_entries(77, 5, 2, t)
    assert len(entries) == 5  # index, 2 patterns, 2 sentinels
    (ik, iv), (pk0, pv0), (pk1, _), (sk0, sv0), (sk1, _) = entries
    assert enc.RULE_KEY.unpack(ik) == (77, 5, 2, enc.TYPE_INDEX, 0, 0)
    assert set(enc.index_patterns(iv)) == {
        (enc.TYPE_CHAR, 1, 3),
        (enc.TYPE_BLOCK, 8, ANY),
        (enc.TYPE_BLOCK, ANY, ANY),
        (enc.TYPE_CHAR, ANY, ANY),
    }
    assert enc.RULE_KEY.unpack(pk0) == (77, 5, 2, enc.TYPE_CHAR, 1, 3)
    assert enc.RULE_VAL.unpack(pv0) == (0, (1 << 1) | 1, 0, 1)  # exact entries are final
    assert enc.RULE_KEY.unpack(pk1) == (77, 5, 2, enc.TYPE_BLOCK, 8, ANY)
    # the *:* sentinels come last, with no winners (no rule has that pattern)
    assert {enc.RULE_KEY.unpack(k)[3:] for k in (sk0, sk1)} == {
        (enc.TYPE_BLOCK, ANY, ANY),
        (enc.TYPE_CHAR, ANY, ANY),
    }
    assert enc.RULE_VAL.unpack(sv0)[:3] == (0, 0, 0)
    assert all(len(k) == 24 and len(v) == 128 for k, v in entries)


def test_index_chunks_cover_every_pattern() -> None:
    rules = [R(True, "c", 242, i, "r") for i in range(40)]
    entries = enc.rule_entries(2, 1, 3, enc.encode_rules(rules))
    index = [v for k, v in entries if enc.RULE_KEY.unpack(k)[3] == enc.TYPE_INDEX]
    assert len(index) == 3  # 16 + 16 + 10 (40 patterns + 2 sentinels)
    listed = [p for v in index for p in enc.index_patterns(v)]
    patterns = [enc.RULE_KEY.unpack(k)[3:6] for k, _ in entries]
    assert sorted(listed) == sorted(p for p in patterns if p[0] != enc.TYPE_INDEX)


@given(
    type_=st.sampled_from((enc.TYPE_BLOCK, enc.TYPE_CHAR)),
    major=st.one_of(st.just(ANY), st.integers(0, 4095)),
    minor=st.one_of(st.just(ANY), st.integers(0, 1_048_575)),
)
def test_pattern_packing_round_trips(type_: int, major: int, minor: int) -> None:
    packed = enc.pack_pattern((type_, major, minor))
    assert packed != 0
    assert enc.unpack_pattern(packed) == (type_, major, minor)


def _reference_template(table: dict) -> tuple[tuple[bytes, bytes], ...]:
    """entry_template as its docstring says, written plainly: a stable sort by write_rank,
    pack_pattern per index slot, the keys packed whole then cut after the (cgroup, gen, owner)
    head."""
    items = sorted(enc.resolve(table).items(), key=lambda it: enc.write_rank(it[0]))
    head = 14
    out = []
    for c in range(0, len(items), enc.INDEX_CHUNK):
        packed = [enc.pack_pattern(p) for p, _ in items[c : c + enc.INDEX_CHUNK]]
        packed += [0] * (enc.INDEX_CHUNK - len(packed))
        chunk = enc.index_key(0, 0, 0, c // enc.INDEX_CHUNK)[head:]
        out.append((chunk, enc.INDEX_VAL.pack(*packed)))
    for p, (v, final) in items:
        out.append((enc.RULE_KEY.pack(0, 0, 0, *p)[head:], enc.RULE_VAL.pack(*v, final)))
    return tuple(out)


def _reference_resolve(table: dict) -> dict:
    """resolve as its docstring says, written plainly: an exact entry takes the max over all 4
    patterns, M:* and *:* the max with *:* when the type has no *:m pattern."""
    none = (0, 0, 0)
    table = {**{(t, ANY, ANY): none for t in enc.TYPE_NAMES}, **table}
    any_minor = {t for t, ma, mi in table if ma == ANY and mi != ANY}
    out = {}
    for (t, ma, mi), v in table.items():
        if ma != ANY and mi != ANY:
            for p in ((t, ma, ANY), (t, ANY, ANY), (t, ANY, mi)):
                v = tuple(max(a, b) for a, b in zip(v, table.get(p, none), strict=True))
            out[(t, ma, mi)] = (v, True)
        elif mi == ANY and t not in any_minor:
            star = table[(t, ANY, ANY)]
            out[(t, ma, mi)] = (tuple(max(a, b) for a, b in zip(v, star, strict=True)), True)
        else:
            out[(t, ma, mi)] = (v, False)
    return out


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(rules=rules_st)
def test_resolve_is_the_plain_four_pattern_merge(rules: list[R]) -> None:
    """The merge-skipping resolve (setup's hot path) stores exactly what the plain form does."""
    table = enc.encode_rules(rules)
    assert enc.resolve(table) == _reference_resolve(table)


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(rules=rules_st)
def test_template_is_the_plain_sort_by_write_rank(rules: list[R]) -> None:
    """The inlined entry_template (setup's hot path) writes exactly what the plain form does."""
    table = enc.encode_rules(rules)
    assert enc.entry_template(table) == _reference_template(table)


def test_template_of_many_patterns_spans_index_chunks() -> None:
    rules = [R(i % 3 == 0, "abc"[i % 3], 240 + i % 7, i if i % 5 else -1, "rw") for i in range(60)]
    table = enc.encode_rules(rules)
    assert len(table) > 2 * enc.INDEX_CHUNK
    assert enc.entry_template(table) == _reference_template(table)


@settings(max_examples=200, derandomize=True, database=None, deadline=None)
@given(rules=rules_st)
def test_any_prefix_of_the_write_never_allows_more(rules: list[R]) -> None:
    """A rule set cut short (a writer died mid-batch, an entry deleted) denies at least what
    the whole set denies: the *:* sentinels come last and their absence denies."""
    entries = enc.resolve(enc.encode_rules(rules))
    order = sorted(entries, key=enc.write_rank)
    for cut in range(len(order)):
        partial = {p: entries[p] for p in order[:cut]}
        for kind, major, minor in PROBE_DEVICES:
            t = enc.TYPES[kind]
            for acc in (1, 2, 4, 7):
                if enc.decide(partial, t, major, minor, acc):
                    assert enc.decide(entries, t, major, minor, acc)


@settings(max_examples=300, derandomize=True, database=None, deadline=None)
@given(rules=rules_st)
def test_decoded_rules_are_equivalent(rules: list[R]) -> None:
    """read_state's rule list decides every probe exactly as the stored entries do."""
    entries = enc.resolve(enc.encode_rules(rules))
    back = enc.decode_rules(entries)
    for kind, major, minor in (*PROBE_DEVICES, ("b", 1, 3), ("c", 242, 2)):
        for access in ("r", "w", "m", "rwm"):
            want = enc.decide(entries, enc.TYPES[kind], major, minor, enc.access_mask(access))
            assert device_allowed(back, kind, major, minor, access) == want


def test_decoded_default_rules_read_like_the_defaults() -> None:
    back = enc.decode_rules(enc.resolve(enc.encode_rules(DEFAULT_DEVICE_RULES)))
    # rule 0's m bit is overridden everywhere by the two mknod rules, so it is not stored
    assert back[:3] == [
        R(False, "a", -1, -1, "rw"),
        R(True, "c", -1, -1, "m"),
        R(True, "b", -1, -1, "m"),
    ]
    assert R(True, "c", 1, 3, "rwm") in back


def test_denial_labels_and_decode() -> None:
    k1 = enc.DENY_KEY.pack(9, 1, enc.TYPE_CHAR, 240, 1, 2 | 4)
    k2 = enc.DENY_KEY.pack(9, 1, enc.TYPE_BLOCK, 8, 0, 1)
    k3 = enc.DENY_KEY.pack(10, 1, enc.TYPE_CHAR, 1, 3, 2)
    k4 = enc.DENY_KEY.pack(9, 2, enc.TYPE_CHAR, 240, 1, 2 | 4)  # the hook's set denied it too
    items = [(k, enc.DENY_VAL.pack(n)) for k, n in ((k1, 3), (k2, 1), (k3, 5), (k4, 2))]
    by_owner = enc.decode_denials(items, 9)
    assert by_owner == {1: {"c 240:1 rw": 3, "b 8:0 m": 1}, 2: {"c 240:1 rw": 2}}
    # one access refused by two owners' programs was counted by both: the max, not the sum
    assert enc.merge_denials(by_owner) == {"c 240:1 rw": 3, "b 8:0 m": 1}
    assert enc.access_str(7) == "rwm"
    assert enc.access_mask("mr") == 3


@settings(max_examples=400, derandomize=True, database=None, deadline=None)
@given(rules=rules_st)
def test_model_matches_evaluator(rules: list[R]) -> None:
    table = enc.encode_rules(rules)
    resolved = enc.resolve(table)
    # no early exit: all 4 lookups (with the sentinels every rule set carries)
    raw = {**{p: (v, False) for p, v in table.items()}}
    for t in enc.TYPE_NAMES:
        raw.setdefault((t, ANY, ANY), ((0, 0, 0), False))
    for kind, major, minor in (*PROBE_DEVICES, ("b", 1, 3), ("c", 242, 2)):
        t = enc.TYPES[kind]
        # early exit at final entries gives the same winners as all 4 lookups
        assert enc.winners(resolved, t, major, minor)[0] == enc.winners(raw, t, major, minor)[0]
        for access in ("r", "w", "rw", "m", "rwm", "wm"):
            got = enc.decide(resolved, t, major, minor, enc.access_mask(access))
            assert got == device_allowed(rules, kind, major, minor, access)


def test_resolve_marks_final_entries() -> None:
    c, b = enc.TYPE_CHAR, enc.TYPE_BLOCK
    rules = [*DEFAULT_DEVICE_RULES, R(False, "c", 1, 3, "w")]
    res = enc.resolve(enc.encode_rules(rules))
    deny0, null_allow, null_deny = 1 << 1, (4 << 1) | 1, (14 << 1)
    # /dev/null: one lookup, its value already the max over c 1:3 and c *:*
    assert res[(c, 1, 3)] == ((null_allow, null_allow, null_deny), True)
    assert res[(c, 1, 5)] == (((5 << 1) | 1,) * 3, True)
    assert res[(c, 136, ANY)][1] is True  # no *:m pattern for char: M:* is final
    assert res[(c, ANY, ANY)] == (((2 << 1) | 1, deny0, deny0), True)
    assert res[(b, ANY, ANY)][1] is True
    with_any_minor = enc.resolve(enc.encode_rules([*rules, R(True, "c", -1, 5, "r")]))
    assert with_any_minor[(c, 136, ANY)][1] is False  # *:5 may still add to c 136:5
    assert with_any_minor[(c, ANY, ANY)][1] is False
    assert with_any_minor[(c, ANY, 5)][1] is False
    assert with_any_minor[(b, ANY, ANY)][1] is True  # per type
