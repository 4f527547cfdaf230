"""Device rule semantics side by side (pure): ours (last match per bit), cgroup v1 / runc, crun.

The cases are the rows of docs/DEVICE_SEMANTICS.md; each row's verdicts are computed here by
the three evaluators, so the table cannot drift from the code. `device_semantics="v1"` is
checked against the v1 kernel model over many random lists (hypothesis).
"""

from __future__ import annotations

import pytest
from device_helpers import PROBE_DEVICES, rules_st
from hypothesis import given, settings

from pelagos_bpf.config import CgroupConfig
from pelagos_bpf.config import CgroupDeviceRule as R
from pelagos_bpf.devices import DEFAULT_DEVICE_RULES, device_allowed
from pelagos_bpf.devices.rules import rule_matches
from pelagos_bpf.devices.v1emulator import effective_rules, replay, to_last_match, v1_allowed
from pelagos_bpf.errors import ConfigError
from pelagos_bpf.validate import validate_config

DENY_ALL = R(False, "a", -1, -1, "rwm")
REQUESTS = ("r", "w", "rw", "m")

# crun's built-in allowlist (src/libcrun/cgroup-resources.c default_devices), checked first.
CRUN_DEFAULTS = [
    R(True, "c", -1, -1, "m"),
    R(True, "b", -1, -1, "m"),
    *(R(True, "c", ma, mi, "rwm") for ma, mi in ((1, 3), (1, 8), (1, 7), (5, 0), (1, 5))),
    *(R(True, "c", ma, mi, "rwm") for ma, mi in ((1, 9), (5, 1), (136, -1), (5, 2), (10, 200))),
]


def crun_allowed(rules: list[R], kind: str, major: int, minor: int, access: str) -> bool:
    """Model of crun 1.8's BPF program (src/libcrun/ebpf.c + cgroup-resources.c): its
    defaults first, then the OCI rules last to first; the first rule whose type, major, minor
    match and whose access holds EVERY requested bit decides; nothing matched: denied."""
    for rule in [*CRUN_DEFAULTS, *reversed(rules)]:
        if rule_matches(rule, kind, major, minor) and set(access) <= set(rule.access):
            return rule.allow
    return False


def runc_allowed(rules: list[R], kind: str, major: int, minor: int, access: str) -> bool:
    """Model of runc's filter (libcontainer/cgroups/devices/devicefilter.go, 1.1): the list
    replayed through its v1 emulator (a hole in a wildcard: refused, ConfigError here), then
    one first-match block per exception that matches only when the exception holds EVERY
    requested bit (`if (access & rule) != access goto next`); nothing matched: the default.
    Under deny-by-default that is v1 exactly; under allow-by-default a deny of one bit does not
    stop a request of more bits (case H), where v1 denies on any bit."""
    st = replay(rules)
    for (k, ma, mi), bits in st.exceptions.items():
        if k == kind and ma in (-1, major) and mi in (-1, minor) and set(access) <= set(bits):
            return not st.default_allow
    return st.default_allow


REFUSED = None  # runc refuses the list (its emulator: "cannot punch hole ...")

# (name, rules, probe, ours, v1 kernel, runc, crun, v1-mode outcome) -- docs/DEVICE_SEMANTICS.md
CASES = [
    (
        "A: type a with a major/minor",
        [DENY_ALL, R(True, "c", 240, 0, "rw"), R(False, "a", 240, 0, "w")],
        ("c", 240, 0, "r"),
        True,
        False,
        False,
        True,
        "ok",
    ),
    (
        "B: hole punched in a wildcard",
        [DENY_ALL, R(True, "c", 240, -1, "rw"), R(False, "c", 240, 1, "w")],
        ("c", 240, 1, "w"),
        False,
        True,
        REFUSED,
        False,
        "refused",
    ),
    (
        "C: r and w granted by different rules",
        [DENY_ALL, R(True, "c", 240, -1, "r"), R(True, "c", 240, 1, "w")],
        ("c", 240, 1, "rw"),
        True,
        False,
        False,
        False,
        "refused",
    ),
    (
        "D: a later deny of one bit of an allowed device",
        [DENY_ALL, R(True, "c", 240, 1, "rw"), R(False, "c", 240, 1, "w")],
        ("c", 240, 1, "rw"),
        False,
        False,
        False,
        True,
        "ok",
    ),
    (
        "E: a wildcard deny after a specific allow",
        [DENY_ALL, R(True, "c", 240, 1, "rw"), R(False, "c", 240, -1, "rw")],
        ("c", 240, 1, "r"),
        False,
        True,
        True,
        False,
        "ok",
    ),
    (
        "F: a user deny of a default device",
        [*DEFAULT_DEVICE_RULES, R(False, "c", 1, 9, "w")],
        ("c", 1, 9, "w"),
        False,
        False,
        False,
        True,
        "ok",
    ),
    (
        "G: no deny-all first",
        [R(False, "c", 240, -1, "w")],
        ("c", 240, 0, "r"),
        True,
        True,
        True,
        False,
        "ok",
    ),
    (
        "H: a type a reset to allow-all, then a deny of one bit",
        [
            DENY_ALL,
            R(True, "c", 240, 1, "r"),
            R(True, "a", -1, -1, "rwm"),
            R(False, "c", 240, 1, "w"),
        ],
        ("c", 240, 1, "rw"),
        False,
        False,
        True,
        True,
        "ok",
    ),
    (
        "common: deny-all, then allow listed devices",
        [DENY_ALL, R(True, "c", 240, 1, "rw"), R(True, "b", 240, -1, "r")],
        ("c", 240, 1, "rw"),
        True,
        True,
        True,
        True,
        "ok",
    ),
]


@pytest.mark.parametrize(
    ("rules", "probe", "ours", "v1", "runc", "crun", "v1_mode"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_documented_case(
    rules: list[R],
    probe: tuple,
    ours: bool,
    v1: bool,
    runc: bool | None,
    crun: bool,
    v1_mode: str,
) -> None:
    assert device_allowed(rules, *probe) is ours
    assert v1_allowed(rules, *probe) is v1
    if runc is REFUSED:
        with pytest.raises(ConfigError, match="punches a hole"):
            runc_allowed(rules, *probe)
    else:
        assert runc_allowed(rules, *probe) is runc
    assert crun_allowed(rules, *probe) is crun
    if v1_mode == "refused":
        with pytest.raises(ConfigError):
            to_last_match(rules)
        return
    assert device_allowed(to_last_match(rules), *probe) is v1


def test_type_a_resets_whatever_its_major_minor_and_access() -> None:
    st = replay([DENY_ALL, R(True, "c", 240, 0, "rw"), R(True, "a", 7, 7, "m")])
    assert st.default_allow is True
    assert st.exceptions == {}
    assert to_last_match([DENY_ALL, R(True, "a", 7, 7, "m")]) == []  # v1: allow everything


def test_allows_merge_and_denies_subtract_exact_keys() -> None:
    rules = [
        DENY_ALL,
        R(True, "c", 240, 1, "r"),
        R(True, "c", 240, 1, "w"),
        R(True, "b", 8, -1, "rwm"),
        R(False, "b", 8, -1, "m"),
    ]
    assert to_last_match(rules) == [
        DENY_ALL,
        R(True, "b", 8, -1, "rw"),
        R(True, "c", 240, 1, "rw"),
    ]


def test_allow_by_default_becomes_denies() -> None:
    rules = [R(False, "c", 240, -1, "w"), R(False, "b", 8, 0, "rwm")]
    assert to_last_match(rules) == [R(False, "b", 8, 0, "rwm"), R(False, "c", 240, -1, "w")]


def test_hole_error_names_the_rule_and_the_wildcard() -> None:
    rules = [
        DENY_ALL,
        R(True, "c", 1, 3, "rw"),
        R(True, "c", 240, -1, "rw"),
        R(False, "c", 240, 1, "w"),
    ]
    with pytest.raises(ConfigError) as e:
        to_last_match(rules)
    assert e.value.setting == "device_rules[3]"
    assert "allow c 240:* rw" in e.value.reason
    assert "device_rules[2]" in e.value.reason
    assert "cannot punch hole" in e.value.reason


def test_hole_in_an_allow_by_default_cgroup_is_refused() -> None:
    with pytest.raises(ConfigError) as e:
        to_last_match([R(False, "c", -1, -1, "r"), R(True, "c", 5, 1, "r")])
    assert e.value.setting == "device_rules[1]"


def test_hole_only_on_overlapping_bits() -> None:
    """runc: the wildcard matters only if its bits overlap the removed ones."""
    rules = [
        DENY_ALL,
        R(True, "c", 240, -1, "m"),
        R(True, "c", 240, 1, "rw"),
        R(False, "c", 240, 1, "w"),
    ]
    assert to_last_match(rules) == [DENY_ALL, R(True, "c", 240, -1, "m"), R(True, "c", 240, 1, "r")]


def test_split_error_names_both_rules() -> None:
    rules = [
        DENY_ALL,
        R(True, "c", 240, -1, "r"),
        R(True, "c", 1, 3, "rwm"),
        R(True, "c", 240, 1, "w"),
    ]
    with pytest.raises(ConfigError) as e:
        to_last_match(rules)
    assert e.value.setting == "device_rules[3]"
    assert "device_rules[1]" in e.value.reason
    assert "c 240:1" in e.value.reason


def test_split_covered_by_a_third_rule_is_fine() -> None:
    rules = [
        DENY_ALL,
        R(True, "c", 240, -1, "r"),
        R(True, "c", 240, 1, "w"),
        R(True, "c", -1, -1, "rw"),
    ]
    out = to_last_match(rules)
    for op in REQUESTS:
        assert device_allowed(out, "c", 240, 1, op) is v1_allowed(rules, "c", 240, 1, op)


def test_defaults_need_no_change_under_v1() -> None:
    out = to_last_match(list(DEFAULT_DEVICE_RULES))
    for kind, major, minor in [*PROBE_DEVICES, ("c", 1, 9), ("c", 136, 4), ("b", 8, 0)]:
        for op in REQUESTS:
            expect = device_allowed(DEFAULT_DEVICE_RULES, kind, major, minor, op)
            assert device_allowed(out, kind, major, minor, op) is expect
            assert v1_allowed(DEFAULT_DEVICE_RULES, kind, major, minor, op) is expect


@settings(max_examples=250, deadline=None, database=None)
@given(rules=rules_st)
def test_v1_transform_is_exact_or_refuses(rules: list[R]) -> None:
    """Every accepted list decides every probe as the v1 kernel model does."""
    try:
        out = to_last_match(rules)
    except ConfigError:
        return
    devices = [*PROBE_DEVICES, ("c", 242, 2), ("b", 242, 1), ("c", 1, 3)]
    for kind, major, minor in devices:
        for op in REQUESTS:
            assert device_allowed(out, kind, major, minor, op) is v1_allowed(
                rules, kind, major, minor, op
            ), (rules, out, (kind, major, minor, op))


@settings(max_examples=250, deadline=None, database=None)
@given(rules=rules_st)
def test_runc_differs_from_v1_only_in_case_h(rules: list[R]) -> None:
    """Where runc accepts a list, it decides as v1 does, except a request of several bits
    under allow-by-default that one exception covers only in part (case H): v1 denies, runc
    allows. So "v1" (which follows the kernel) is at least as strict as runc everywhere."""
    try:
        st = replay(rules)
    except ConfigError:
        return  # runc refuses it too
    devices = [*PROBE_DEVICES, ("c", 242, 2), ("b", 242, 1), ("c", 1, 3)]
    for kind, major, minor in devices:
        for op in REQUESTS:
            runc = runc_allowed(rules, kind, major, minor, op)
            v1 = v1_allowed(rules, kind, major, minor, op)
            if runc is not v1:
                assert st.default_allow and len(op) > 1 and runc and not v1, (rules, op)


@settings(max_examples=100, deadline=None, database=None)
@given(rules=rules_st)
def test_v1_transform_refuses_only_holes_and_splits(rules: list[R]) -> None:
    """A refusal is either a hole (kernel replay differs from runc's) or a split grant."""
    try:
        to_last_match(rules)
    except ConfigError as e:
        assert "punches a hole" in e.reason or "different rules" in e.reason


def test_config_device_semantics_validates_and_selects() -> None:
    hole = [DENY_ALL, R(True, "c", 240, -1, "rw"), R(False, "c", 240, 1, "w")]
    validate_config(CgroupConfig(device_rules=hole))  # last-match: a fine list
    with pytest.raises(ConfigError) as e:
        validate_config(CgroupConfig(device_rules=hole, device_semantics="v1"))
    assert e.value.setting == "device_rules[2]"
    case_e = [DENY_ALL, R(True, "c", 240, 1, "rw"), R(False, "c", 240, -1, "rw")]
    assert effective_rules(case_e, "last-match") == case_e
    assert effective_rules(case_e, "v1") == [DENY_ALL, R(True, "c", 240, 1, "rw")]
