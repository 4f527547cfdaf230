"""Device rule semantics without root: validation messages and reference-evaluator tables."""

from __future__ import annotations

import pytest

from pelagos_bpf.config import CgroupDeviceRule as R
from pelagos_bpf.devices import DEFAULT_DEVICE_RULES, device_allowed, validate_device_rules
from pelagos_bpf.devices.rules import deciding_rules, parse_rule
from pelagos_bpf.errors import ConfigError

DENY_ALL = R(False, "a", -1, -1, "rwm")


@pytest.mark.parametrize(
    ("rule", "setting", "words"),
    [
        (R(True, "x"), "device_rules[1].kind", "'a' (all), 'b' or 'c'"),
        (R(True, "c", 1, 3, ""), "device_rules[1].access", "non-empty subset"),
        (R(True, "c", 1, 3, "rwx"), "device_rules[1].access", "subset of 'rwm'"),
        (R(True, "c", 1, 3, "rr"), "device_rules[1].access", "without repeats"),
        (R(True, "c", -2, 3), "device_rules[1].major", "-1 (any) or 0..4095"),
        (R(True, "c", 4096, 3), "device_rules[1].major", "0..4095"),
        (R(True, "c", 1, 1 << 20), "device_rules[1].minor", "0..1048575"),
        (R(True, "c", True, 3), "device_rules[1].major", "must be an integer"),  # type: ignore[arg-type]
        (R(1, "c", 1, 3), "device_rules[1].allow", "True or False"),  # type: ignore[arg-type]
    ],
)
def test_validation_names_field(rule: R, setting: str, words: str) -> None:
    with pytest.raises(ConfigError) as ei:
        validate_device_rules([R(True, "c", 1, 3), rule])
    assert ei.value.setting == setting
    assert words in ei.value.reason


def test_validation_rejects_non_rules() -> None:
    with pytest.raises(ConfigError, match=r"device_rules\[0\]"):
        validate_device_rules([("allow", "c")])
    with pytest.raises(ConfigError, match="device_rules"):
        validate_device_rules("allow c 1:3")


def test_validation_accepts_defaults_and_edges() -> None:
    validate_device_rules(list(DEFAULT_DEVICE_RULES))
    validate_device_rules([R(True, "b", 4095, 1_048_575, "mwr"), R(False, "a", 0, 0, "m")])
    validate_device_rules([])


def test_empty_rules_allow_everything() -> None:
    for kind in "bc":
        for acc in ("r", "w", "rw", "m", "rwm"):
            assert device_allowed([], kind, 240, 1, acc)


# (rules, kind, major, minor, access, expected)
TABLE = [
    # deny-by-default plus the allowlist
    (DEFAULT_DEVICE_RULES, "c", 1, 3, "rw", True),
    (DEFAULT_DEVICE_RULES, "c", 1, 9, "rwm", True),
    (DEFAULT_DEVICE_RULES, "c", 136, 7, "rw", True),
    (DEFAULT_DEVICE_RULES, "c", 10, 200, "rw", True),
    (DEFAULT_DEVICE_RULES, "c", 10, 201, "r", False),
    (DEFAULT_DEVICE_RULES, "c", 240, 1, "r", False),
    (DEFAULT_DEVICE_RULES, "c", 240, 1, "m", True),  # c *:* m
    (DEFAULT_DEVICE_RULES, "b", 8, 0, "m", True),  # b *:* m
    (DEFAULT_DEVICE_RULES, "b", 8, 0, "r", False),
    (DEFAULT_DEVICE_RULES, "b", 1, 3, "r", False),  # null's numbers, but block
    # a later rule overrides the defaults
    ((*DEFAULT_DEVICE_RULES, R(False, "c", 1, 3, "w")), "c", 1, 3, "r", True),
    ((*DEFAULT_DEVICE_RULES, R(False, "c", 1, 3, "w")), "c", 1, 3, "w", False),
    ((*DEFAULT_DEVICE_RULES, R(False, "c", 1, 3, "w")), "c", 1, 3, "rw", False),  # O_RDWR
    ((*DEFAULT_DEVICE_RULES, R(False, "a", -1, -1, "m")), "c", 240, 0, "m", False),
    # holes punched in wildcards (cgroup v1 ignores these, runc rejects them)
    ((R(True, "c", 240, -1), R(False, "c", 240, 1)), "c", 240, 1, "r", False),
    ((R(True, "c", 240, -1), R(False, "c", 240, 1)), "c", 240, 2, "r", True),
    ((DENY_ALL, R(True, "c", -1, 5, "r")), "c", 240, 5, "r", True),
    ((DENY_ALL, R(True, "c", -1, 5, "r")), "c", 240, 5, "w", False),
    # order matters: the earlier rule loses
    ((R(False, "c", 240, 1), R(True, "c", 240, -1)), "c", 240, 1, "rw", True),
    ((R(True, "c", 240, -1), R(False, "c", -1, 1, "r")), "c", 240, 1, "r", False),
    # per bit: a rule without the bit does not decide it
    ((DENY_ALL, R(True, "c", 240, 1, "r")), "c", 240, 1, "rw", False),
    ((DENY_ALL, R(True, "c", 240, 1, "r"), R(True, "a", 240, 1, "w")), "c", 240, 1, "rw", True),
    ((R(False, "c", 240, 1, "w"),), "c", 240, 1, "r", True),  # no rule with r: allowed
    # kind 'a' covers both; a 'b' rule never touches char devices
    ((R(False, "a", 240, 1),), "b", 240, 1, "r", False),
    ((R(False, "b", 240, 1),), "c", 240, 1, "r", True),
    # 'a' with numbers still matches numbers (the semantics)
    ((R(False, "a", 241, -1, "w"),), "c", 241, 9, "w", False),
    ((R(False, "a", 241, -1, "w"),), "c", 242, 9, "w", True),
]


@pytest.mark.parametrize(("rules", "kind", "major", "minor", "access", "expected"), TABLE)
def test_evaluator_table(
    rules: tuple[R, ...], kind: str, major: int, minor: int, access: str, expected: bool
) -> None:
    assert device_allowed(list(rules), kind, major, minor, access) is expected


def test_deciding_rules_names_the_winner() -> None:
    rules = [DENY_ALL, R(True, "c", 240, 1, "r")]
    assert deciding_rules(rules, "c", 240, 1, "rw") == {"r": 1, "w": 0}
    assert deciding_rules([], "c", 240, 1, "m") == {"m": None}


def test_evaluator_rejects_bad_queries() -> None:
    with pytest.raises(ConfigError, match="kind"):
        device_allowed([], "a", 1, 3, "r")
    with pytest.raises(ConfigError, match="access"):
        device_allowed([], "c", 1, 3, "x")


def test_defaults_shape() -> None:
    assert DEFAULT_DEVICE_RULES[0] == DENY_ALL
    allowed = {
        (r.kind, r.major, r.minor) for r in DEFAULT_DEVICE_RULES if r.allow and r.access == "rwm"
    }
    assert allowed == {
        ("c", 1, 3), ("c", 1, 5), ("c", 1, 7), ("c", 1, 8), ("c", 1, 9), ("c", 5, 0),
        ("c", 5, 1), ("c", 5, 2), ("c", 136, -1), ("c", 10, 200),
    }  # fmt: skip


def test_parse_rule_round_trips_str() -> None:
    for rule in DEFAULT_DEVICE_RULES:
        assert parse_rule(str(rule)) == rule
    with pytest.raises(ConfigError, match="expected"):
        parse_rule("allow c 1")
    with pytest.raises(ConfigError, match="kind"):
        parse_rule("allow q 1:3 r")


def test_validation_cache_is_not_fooled_by_equal_values() -> None:
    good = [R(True, "c", 1, 3)]
    validate_device_rules(good)
    validate_device_rules(good)  # cached
    with pytest.raises(ConfigError, match=r"device_rules\[0\]\.allow"):
        validate_device_rules([R(1, "c", 1, 3)])  # type: ignore[arg-type]  # 1 == True
    with pytest.raises(ConfigError, match=r"device_rules\[0\]\.major"):
        validate_device_rules([R(True, "c", True, 3)])  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match=r"device_rules\[0\]\.major"):
        validate_device_rules([R(True, "c", [1], 3)])  # type: ignore[arg-type]  # unhashable
