"""Device rules: the rule type and its grammar, validation, the default allowlist and the
reference evaluator.

The evaluator is the specification: the kernel program, the map encoding and the tests
are all checked against it. Per requested access bit, the LAST rule matching the device and
carrying that bit decides; a bit no rule mentions is allowed; an access is allowed only if every
requested bit is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from itertools import permutations
from typing import Any

from ..errors import ConfigError
from ..numbers import parse_dec


@dataclass(frozen=True)
class CgroupDeviceRule:
    """One device allow/deny rule, as in OCI `linux.resources.devices`.

    kind is 'a' (all), 'b' (block) or 'c' (char); major/minor -1 is a wildcard; access is a
    non-empty subset of "rwm".
    """

    allow: bool
    kind: str = "a"
    major: int = -1
    minor: int = -1
    access: str = "rwm"

    def __str__(self) -> str:
        def num(n: int) -> str:
            return "*" if n == -1 else str(n)

        verb = "allow" if self.allow else "deny"
        return f"{verb} {self.kind} {num(self.major)}:{num(self.minor)} {self.access}"

    @classmethod
    def parse(cls, text: str) -> CgroupDeviceRule:
        """ "allow c 1:3 rw" -> rule (the grammar `str(rule)` prints; ConfigError if bad)."""
        return parse_rule(text)


MAJOR_MAX = 4095  # Linux dev_t: 12-bit major
MINOR_MAX = 1_048_575  # 20-bit minor
KINDS = ("a", "b", "c")
ACCESS = "rwm"


def _rwm(kind: str, major: int, minor: int = -1) -> CgroupDeviceRule:
    return CgroupDeviceRule(True, kind, major, minor, "rwm")


DEFAULT_DEVICE_RULES: tuple[CgroupDeviceRule, ...] = (
    CgroupDeviceRule(False, "a", -1, -1, "rwm"),  # deny by default ...
    CgroupDeviceRule(True, "c", -1, -1, "m"),  # ... but mknod of any node (runc/crun)
    CgroupDeviceRule(True, "b", -1, -1, "m"),
    _rwm("c", 1, 3),  # /dev/null
    _rwm("c", 1, 5),  # /dev/zero
    _rwm("c", 1, 7),  # /dev/full
    _rwm("c", 1, 8),  # /dev/random
    _rwm("c", 1, 9),  # /dev/urandom
    _rwm("c", 5, 0),  # /dev/tty
    _rwm("c", 5, 1),  # /dev/console
    _rwm("c", 5, 2),  # /dev/ptmx
    _rwm("c", 136, -1),  # /dev/pts/*
    _rwm("c", 10, 200),  # /dev/net/tun
)
"""Deny-all, then the usual container allowlist; user rules appended after it override it."""


def _int(setting: str, value: Any, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(setting, value, "must be an integer")
    if value != -1 and not 0 <= value <= hi:
        raise ConfigError(setting, value, f"must be -1 (any) or 0..{hi}")


def validate_device_rule(rule: Any, setting: str = "device_rule") -> None:
    """Raise ConfigError naming `setting.field` if one rule is malformed."""
    if not isinstance(rule, CgroupDeviceRule):
        raise ConfigError(setting, rule, "must be a CgroupDeviceRule")
    if not isinstance(rule.allow, bool):
        raise ConfigError(f"{setting}.allow", rule.allow, "must be True or False")
    if rule.kind not in KINDS:
        raise ConfigError(f"{setting}.kind", rule.kind, "must be 'a' (all), 'b' or 'c'")
    acc = rule.access
    if not isinstance(acc, str) or not acc or set(acc) - set(ACCESS) or len(set(acc)) != len(acc):
        raise ConfigError(
            f"{setting}.access", acc, "must be a non-empty subset of 'rwm' without repeats"
        )
    _int(f"{setting}.major", rule.major, MAJOR_MAX)
    _int(f"{setting}.minor", rule.minor, MINOR_MAX)


def validate_device_rules(rules: Any) -> None:
    """Raise ConfigError naming `device_rules[i].field` for the first malformed rule."""
    if not isinstance(rules, list | tuple):
        raise ConfigError("device_rules", rules, "must be a list of CgroupDeviceRule")
    if all(map(_exact, rules)):
        _validated(tuple(rules))  # a rule list seen before is not checked again
    else:
        _check_each(rules)


def _exact(rule: Any) -> bool:
    """Exact field types, so equal rules are identical rules (True == 1 would fool a cache)."""
    return (
        type(rule) is CgroupDeviceRule
        and type(rule.allow) is bool
        and type(rule.kind) is str
        and type(rule.major) is int
        and type(rule.minor) is int
        and type(rule.access) is str
    )


_ACCESS_OK = frozenset("".join(p) for n in (1, 2, 3) for p in permutations(ACCESS, n))


def _fine(rule: Any) -> bool:
    """Fast path for the common case (no strings built); validate_device_rule says why not."""
    return (
        _exact(rule)
        and rule.kind in KINDS
        and rule.access in _ACCESS_OK
        and (rule.major == -1 or 0 <= rule.major <= MAJOR_MAX)
        and (rule.minor == -1 or 0 <= rule.minor <= MINOR_MAX)
    )


def _check_each(rules: Sequence[Any]) -> None:
    for i, rule in enumerate(rules):
        if not _fine(rule):
            validate_device_rule(rule, f"device_rules[{i}]")


@lru_cache(maxsize=256)
def _validated(rules: tuple[Any, ...]) -> None:
    _check_each(rules)


def validate_access(access: Any, setting: str = "access") -> None:
    """An access query: non-empty subset of 'rwm' (repeats are harmless here)."""
    if not isinstance(access, str) or not access or set(access) - set(ACCESS):
        raise ConfigError(setting, access, "must be a non-empty subset of 'rwm'")


def rule_matches(rule: CgroupDeviceRule, kind: str, major: int, minor: int) -> bool:
    """Does the rule's pattern cover this device (ignoring access)?"""
    return rule.kind in ("a", kind) and rule.major in (-1, major) and rule.minor in (-1, minor)


def deciding_rules(
    rules: Sequence[CgroupDeviceRule], kind: str, major: int, minor: int, access: str
) -> dict[str, int | None]:
    """For each requested bit, the index of the rule that decides it (None: no rule, allowed)."""
    out: dict[str, int | None] = {}
    for bit in dict.fromkeys(access):
        out[bit] = None
        for i, rule in enumerate(rules):
            if bit in rule.access and rule_matches(rule, kind, major, minor):
                out[bit] = i
    return out


def device_allowed(
    rules: Sequence[CgroupDeviceRule], kind: str, major: int, minor: int, access: str
) -> bool:
    """Reference evaluator: would an access of `access` bits to device kind major:minor pass?

    kind is 'b' or 'c' (a real device has one); an empty rule list allows everything.
    """
    if kind not in ("b", "c"):
        raise ConfigError("kind", kind, "a device is 'b' (block) or 'c' (char)")
    validate_access(access)
    winners = deciding_rules(rules, kind, major, minor, access)
    return all(i is None or rules[i].allow for i in winners.values())


def _rule_number(text: str, rule: str, what: str, hi: int) -> int:
    if text == "*":
        return -1
    try:
        return parse_dec(text, "device rule", 0, hi)
    except ConfigError as e:
        raise ConfigError("device rule", rule, f"{what} {text!r}: {e.reason} or '*'") from None


def parse_rule(text: str) -> CgroupDeviceRule:
    """The one rule grammar (CLI flags, `CgroupDeviceRule.parse`, the OCI hook's annotation):
    what `str(rule)` prints.

    "allow|deny KIND MAJ:MIN [ACCESS]": KIND a/b/c, MAJ and MIN decimal numbers or `*`, ACCESS
    a subset of "rwm" (default "rwm", as in OCI). e.g. "deny a *:* rwm", "allow c 1:3 rw",
    "allow b 8:*". Printable ASCII only, words separated by spaces or tabs: a rule in fullwidth
    digits, with '+', '_' or a Unicode space is refused, so every reader (an admission policy
    matching text included) sees the same rule.
    """
    grammar = "expected 'allow|deny KIND MAJ:MIN [ACCESS]'"
    line = text.replace("\t", " ") if isinstance(text, str) else ""
    if not line.isascii() or not line.isprintable():  # ASCII 0x20-0x7e (and tabs) only
        raise ConfigError("device rule", text, f"{grammar} in printable ASCII")
    parts = line.split(" ")
    parts = [p for p in parts if p]
    if len(parts) not in (3, 4) or parts[0] not in ("allow", "deny"):
        raise ConfigError("device rule", text, grammar)
    major_s, sep, minor_s = parts[2].partition(":")
    if not sep:
        raise ConfigError("device rule", text, f"{grammar}; {parts[2]!r} is not MAJ:MIN")
    major = _rule_number(major_s, text, "major", MAJOR_MAX)
    minor = _rule_number(minor_s, text, "minor", MINOR_MAX)
    access = parts[3] if len(parts) == 4 else ACCESS
    rule = CgroupDeviceRule(parts[0] == "allow", parts[1], major, minor, access)
    validate_device_rule(rule, "device rule")
    return rule
