"""The compiled bpf/device.c bytecode, run in a userspace interpreter, equals the evaluator.

No root needed: the package ships the bytecode (pelagos_bpf.devices.interp runs it).
"""

from __future__ import annotations

import pytest
from device_helpers import PROBE_DEVICES, rules_st
from hypothesis import given, settings

from pelagos_bpf import bytecode
from pelagos_bpf.devices import DEFAULT_DEVICE_RULES, device_allowed, program
from pelagos_bpf.devices import encode as enc
from pelagos_bpf.devices import layout as lay
from pelagos_bpf.devices.interp import HashMap, Machine, Storage
from pelagos_bpf.devices.rules import CgroupDeviceRule as R
from pelagos_bpf.owners import OWNER_IDS, Owner

CG = 4242


CAP = 1000  # dev_cur.audit_cap in these machines, unless a test says otherwise


@pytest.fixture(scope="module")
def compiled() -> bytecode.CompiledProgram:
    return program.compiled("runtime")


def machine(
    prog: bytecode.CompiledProgram,
    rules: list[R],
    gen: int = 3,
    keep: int | None = None,
    owner: Owner = "runtime",
    slot: Owner | None = None,
    denials_max: int = 1 << 30,
    cap: int = CAP,
):
    """A machine whose `owner` rule set is generation 3 (only the first `keep` entries when
    given); the storage names `gen` in `slot`'s place (default: the owner's own)."""
    rules_map = HashMap(enc.RULE_KEY.size, enc.RULE_VAL.size)
    oid = OWNER_IDS[owner]
    for k, v in enc.rule_entries(CG, 3, oid, enc.encode_rules(rules))[:keep]:
        rules_map.data[k] = bytearray(v)
    gens = [0] * lay.SLOTS
    gens[OWNER_IDS[slot or owner]] = gen
    maps: dict[str, HashMap | Storage] = {
        "dev_cur": Storage(bytearray(enc.CUR.pack(CG, *gens, cap, 0))),
        "dev_audit": Storage(bytearray(enc.AUDIT.size)),
        "dev_rules": rules_map,
        "dev_denials": HashMap(enc.DENY_KEY.size, enc.DENY_VAL.size, max_entries=denials_max),
    }
    return Machine(prog.insns, dict(prog.relocs), maps), maps


def _denials(maps: dict[str, HashMap | Storage]) -> dict[str, int]:
    denials = maps["dev_denials"]
    assert isinstance(denials, HashMap)
    items = [(k, bytes(v)) for k, v in denials.data.items()]
    return enc.merge_denials(enc.decode_denials(items, CG))


def _audit(maps: dict[str, HashMap | Storage]) -> tuple[int, int]:
    audit = maps["dev_audit"]
    assert isinstance(audit, Storage)
    itemised, overflow = enc.AUDIT.unpack(bytes(audit.value))
    return itemised, overflow


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
    assert _denials(maps) == expect


def test_bytecode_counts_repeated_denials(compiled: bytecode.CompiledProgram) -> None:
    m, maps = machine(compiled, list(DEFAULT_DEVICE_RULES))
    for _ in range(3):
        assert m.run(ctx("c", 240, 0, "rw")) == 0
    assert m.run(ctx("c", 1, 3, "rw")) == 1
    assert _denials(maps) == {"c 240:0 rw": 3}
    assert _audit(maps) == (1, 0)


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
    n = len(enc.rule_entries(CG, 3, 1, enc.encode_rules(rules)))
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


@pytest.mark.parametrize("owner", ["runtime", "hook", "nri"])
def test_each_owners_program_reads_only_its_own_slot_and_entries(owner: Owner) -> None:
    """An owner's program decides by its own generation and its own entries: another owner's
    set under the same cgroup and generation is invisible to it (and its slot at 0 denies)."""
    prog = program.compiled(owner)
    allow_all = [R(True, "a", -1, -1, "rwm")]
    m, _ = machine(prog, allow_all, owner=owner)
    assert m.run(ctx("c", 1, 3, "r")) == 1
    other: Owner = "hook" if owner != "hook" else "runtime"
    m, _ = machine(prog, allow_all, owner=other, slot=owner)  # entries are the other's
    assert m.run(ctx("c", 1, 3, "r")) == 0  # its own set is absent: deny
    m, _ = machine(prog, allow_all, owner=owner, slot=other)  # only the other's slot is set
    assert m.run(ctx("c", 1, 3, "r")) == 0  # its own slot reads 0: deny


def test_denial_counters_of_a_cgroup_stop_at_its_cap_then_overflow() -> None:
    """A cgroup creates at most audit_cap distinct counters (per CPU); later distinct denials
    are still counted, in its overflow counter: none goes uncounted."""
    m, maps = machine(program.compiled("runtime"), list(DEFAULT_DEVICE_RULES), cap=8)
    for minor in range(8 + 5):
        assert m.run(ctx("c", 240, minor, "r")) == 0
    assert m.run(ctx("c", 240, 0, "r")) == 0  # an itemised one still counts there
    assert len(_denials(maps)) == 8
    assert _denials(maps)["c 240:0 r"] == 2
    assert _audit(maps) == (8, 5)


def test_a_full_counter_map_overflows_into_the_cgroups_own_counter() -> None:
    """When the node-wide counter hash is full (other cgroups filled it), this cgroup's
    denials are still counted in its own storage."""
    m, maps = machine(program.compiled("runtime"), list(DEFAULT_DEVICE_RULES), denials_max=2)
    for minor in range(5):
        assert m.run(ctx("c", 240, minor, "w")) == 0
    assert len(_denials(maps)) == 2
    assert _audit(maps) == (2, 3)
