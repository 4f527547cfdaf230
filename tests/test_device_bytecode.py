"""The compiled bpf/device.c bytecode, run in a userspace interpreter, equals the evaluator.

No root needed once the bytecode cache holds the program (`pelagos-bpf compile`); as root the
test compiles it on a miss.
"""

from __future__ import annotations

import pytest
from device_helpers import PROBE_DEVICES, rules_st
from device_interp import HashMap, Machine, Storage
from hypothesis import given, settings

from pelagos_bpf import bytecode
from pelagos_bpf.config import CgroupDeviceRule as R
from pelagos_bpf.devices import DEFAULT_DEVICE_RULES, device_allowed, program
from pelagos_bpf.devices import encode as enc

CG = 4242


@pytest.fixture(scope="module")
def compiled() -> bytecode.CompiledProgram:
    spec = program.FEATURE.current.progs[0]
    return bytecode.get_program(program.FEATURE.current.source, spec.func, spec.prog_type)


def machine(prog: bytecode.CompiledProgram, rules: list[R], gen: int = 3, keep: int | None = None):
    """A machine whose rule set is generation 3 (only the first `keep` entries when given)."""
    rules_map = HashMap(enc.RULE_KEY.size, enc.RULE_VAL.size)
    for k, v in enc.rule_entries(CG, 3, enc.encode_rules(rules))[:keep]:
        rules_map.data[k] = bytearray(v)
    maps = {
        "dev_cur": Storage(bytearray(enc.CUR.pack(CG, gen, 0))),
        "dev_rules": rules_map,
        "dev_denials": HashMap(enc.DENY_KEY.size, enc.DENY_VAL.size),
    }
    return Machine(prog.insns, dict(prog.relocs), maps), maps


def ctx(kind: str, major: int, minor: int, access: str) -> bytes:
    return (
        ((enc.access_mask(access) << 16) | enc.TYPES[kind]).to_bytes(4, "little")
        + major.to_bytes(4, "little")
        + minor.to_bytes(4, "little")
    )


@settings(max_examples=150, derandomize=True, database=None, deadline=None)
@given(rules=rules_st)
def test_bytecode_matches_evaluator(compiled: bytecode.CompiledProgram, rules: list[R]) -> None:
    """Every probe device x access, one fresh machine per rule list."""
    m, maps = machine(compiled, rules)
    expect: dict[str, int] = {}
    for dev in (*PROBE_DEVICES, ("b", 1, 3), ("c", 242, 2)):
        for access in ("r", "w", "rw", "m", "rwm"):
            allowed = m.run(ctx(*dev, access)) == 1
            assert allowed == device_allowed(rules, *dev, access), (dev, access)
            if not allowed:
                acc = enc.access_mask(access)
                expect[enc.denial_label(enc.TYPES[dev[0]], dev[1], dev[2], acc)] = 1
    denials = maps["dev_denials"]
    assert isinstance(denials, HashMap)
    assert enc.decode_denials(((k, bytes(v)) for k, v in denials.data.items()), CG) == expect


def test_bytecode_counts_repeated_denials(compiled: bytecode.CompiledProgram) -> None:
    m, maps = machine(compiled, list(DEFAULT_DEVICE_RULES))
    for _ in range(3):
        assert m.run(ctx("c", 240, 0, "rw")) == 0
    assert m.run(ctx("c", 1, 3, "rw")) == 1
    denials = maps["dev_denials"]
    assert isinstance(denials, HashMap)
    items = [(k, bytes(v)) for k, v in denials.data.items()]
    assert enc.decode_denials(items, CG) == {"c 240:0 rw": 3}


def test_bytecode_unset_storage_denies(compiled: bytecode.CompiledProgram) -> None:
    m, maps = machine(compiled, [R(True, "a", -1, -1, "rwm")], gen=0)
    assert m.run(ctx("c", 1, 3, "r")) == 0
    assert maps["dev_denials"].data == {}  # type: ignore[attr-defined]


def test_bytecode_absent_rule_set_denies(compiled: bytecode.CompiledProgram) -> None:
    """Storage naming a generation with no entries (deleted, or never written) denies."""
    m, _ = machine(compiled, [R(True, "a", -1, -1, "rwm")], gen=4)
    assert m.run(ctx("c", 1, 3, "r")) == 0
    ok, _ = machine(compiled, [R(True, "a", -1, -1, "rwm")])
    assert ok.run(ctx("c", 1, 3, "r")) == 1  # the same rules, the live generation: allowed


@settings(max_examples=60, derandomize=True, database=None, deadline=None)
@given(rules=rules_st)
def test_bytecode_partial_rule_set_never_allows_more(
    compiled: bytecode.CompiledProgram, rules: list[R]
) -> None:
    """Every prefix of the write order (a writer cut short) allows at most what the whole
    set allows: the program itself fails closed."""
    n = len(enc.rule_entries(CG, 3, enc.encode_rules(rules)))
    full, _ = machine(compiled, rules)
    for keep in range(n):
        m, _ = machine(compiled, rules, keep=keep)
        for dev in PROBE_DEVICES:
            for access in ("r", "w", "m"):
                if m.run(ctx(*dev, access)) == 1:
                    assert full.run(ctx(*dev, access)) == 1, (keep, dev, access)


def test_bytecode_cost_is_flat(compiled: bytecode.CompiledProgram) -> None:
    """Executed instructions do not grow with the number of rules: an UNLISTED device (no
    final entry: all the lookups) costs the same with 1 or 1000 listed devices."""
    steps = []
    for n in (1, 16, 1000):
        rules = [*DEFAULT_DEVICE_RULES, *(R(True, "c", 242, i, "r") for i in range(n))]
        m, _ = machine(compiled, rules)
        assert m.run(ctx("c", 240, 0, "rw")) == 0
        steps.append(m.steps)
    assert steps[0] == steps[1] == steps[2]


def test_bytecode_listed_device_is_one_lookup(compiled: bytecode.CompiledProgram) -> None:
    """Final entries stop the lookups: /dev/null under the defaults runs fewer instructions."""
    m, _ = machine(compiled, list(DEFAULT_DEVICE_RULES))
    m.run(ctx("c", 1, 3, "rw"))
    listed = m.steps
    m2, _ = machine(compiled, [*DEFAULT_DEVICE_RULES, R(True, "c", -1, 77, "r")])
    m2.run(ctx("c", 240, 0, "m"))  # misses M:m and M:*, *:* not final: all 4 lookups
    assert listed < m2.steps
