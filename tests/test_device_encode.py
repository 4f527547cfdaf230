"""Map encoding (pure) and a userspace model of bpf/device.c's 4-lookup decision."""

from __future__ import annotations

from device_helpers import PROBE_DEVICES, rules_st
from hypothesis import given, settings
from hypothesis import strategies as st

from pelagos_bpf.config import CgroupDeviceRule as R
from pelagos_bpf.devices import DEFAULT_DEVICE_RULES, device_allowed
from pelagos_bpf.devices import encode as enc

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


def test_rule_entries_index_then_pattern() -> None:
    t = enc.encode_rules([R(True, "c", 1, 3, "r"), R(False, "b", 8, -1, "w")])
    entries = enc.rule_entries(enc.ruleset_key(77, 1), t)
    assert len(entries) == 3
    (ik, iv), (pk0, pv0), (pk1, _) = entries
    assert enc.RULE_KEY.unpack(ik) == (155, enc.TYPE_INDEX, 0, 0)
    assert enc.index_patterns(iv) == [(enc.TYPE_CHAR, 1, 3), (enc.TYPE_BLOCK, 8, ANY)]
    assert enc.RULE_KEY.unpack(pk0) == (155, enc.TYPE_CHAR, 1, 3)
    assert enc.RULE_VAL.unpack(pv0) == (0, (1 << 1) | 1, 0, 1)  # exact entries are final
    assert enc.RULE_KEY.unpack(pk1) == (155, enc.TYPE_BLOCK, 8, ANY)
    assert all(len(k) == 24 and len(v) == 128 for k, v in entries)


def test_index_chunks_cover_every_pattern() -> None:
    rules = [R(True, "c", 242, i, "r") for i in range(40)]
    entries = enc.rule_entries(2, enc.encode_rules(rules))
    index = [v for k, v in entries if enc.RULE_KEY.unpack(k)[1] == enc.TYPE_INDEX]
    assert len(index) == 3  # 16 + 16 + 8
    listed = [p for v in index for p in enc.index_patterns(v)]
    patterns = [enc.RULE_KEY.unpack(k)[1:4] for k, _ in entries]
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


def test_ruleset_key_never_zero() -> None:
    assert enc.ruleset_key(1, 0) == 2
    assert enc.ruleset_key(1, 1) == 3


def test_denial_labels_and_decode() -> None:
    k1 = enc.DENY_KEY.pack(9, enc.TYPE_CHAR, 240, 1, 2 | 4)
    k2 = enc.DENY_KEY.pack(9, enc.TYPE_BLOCK, 8, 0, 1)
    k3 = enc.DENY_KEY.pack(10, enc.TYPE_CHAR, 1, 3, 2)
    items = [(k, enc.DENY_VAL.pack(n)) for k, n in ((k1, 3), (k2, 1), (k3, 5))]
    assert enc.decode_denials(items, 9) == {"c 240:1 rw": 3, "b 8:0 m": 1}
    assert enc.access_str(7) == "rwm"
    assert enc.access_mask("mr") == 3


@settings(max_examples=400, derandomize=True, database=None, deadline=None)  # TCG, shared CPUs
@given(rules=rules_st)
def test_model_matches_evaluator(rules: list[R]) -> None:
    table = enc.encode_rules(rules)
    resolved = enc.resolve(table)
    raw = {p: (v, False) for p, v in table.items()}  # no early exit: all 4 lookups
    for kind, major, minor in (*PROBE_DEVICES, ("b", 1, 3), ("c", 242, 2)):
        t = enc.TYPES[kind]
        # early exit at final entries gives the same winners as all 4 lookups
        assert enc.winners(resolved, t, major, minor) == enc.winners(raw, t, major, minor)
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
