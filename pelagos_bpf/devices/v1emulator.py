"""cgroup v1 device semantics as a pure transform to an equivalent last-match rule list.

Why: runtimes migrating from cgroup v1 (or from runc, which replays OCI rules through a v1
emulator) wrote their rule lists for v1's exception-list model, which differs from our
per-bit last-match model (docs/DEVICE_SEMANTICS.md). `device_semantics="v1"` replays the list
the way the v1 kernel does (security/device_cgroup.c) and emits last-match rules that decide
every access the same way, so the BPF program and its maps stay unchanged.

The v1 model: a default (allow or deny) plus a list of exceptions keyed by (type, major,
minor), each with a set of access bits.
- A rule of type `a` resets: default := its verdict, exceptions cleared; its major, minor and
  access are ignored (the kernel returns before parsing them).
- A rule whose verdict differs from the default adds an exception (bits merge with an equal
  key); one whose verdict equals the default removes bits from the exception with exactly its
  key. The kernel silently ignores a removal that only a wildcard exception covers ("punching a
  hole"): we refuse it, naming the rule, as runc's emulator does.
- Deny-by-default: an access passes when ONE exception matching the device holds every
  requested bit. Allow-by-default: it fails when any matching exception holds any requested bit.

The one v1 decision last-match cannot express: under deny-by-default, r and w granted to the
same device by two different exceptions (e.g. `c 1:* r` and `c 1:3 w`) allow O_RDONLY and
O_WRONLY but refuse O_RDWR. Such lists are refused with a ConfigError naming both rules.
A new v1 cgroup under an allow-all parent starts allow-by-default, with no exceptions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from ..errors import ConfigError
from .rules import CgroupDeviceRule

SEMANTICS = ("last-match", "v1")
Key = tuple[str, int, int]  # (kind 'b'|'c', major, minor); -1 is a wildcard
ACCESS = "rwm"


@lru_cache(maxsize=64)
def _bits(access: str) -> str:
    return "".join(c for c in ACCESS if c in access)


@dataclass
class V1State:
    """The v1 cgroup after a replay: the default verdict and the exceptions (key -> bits)."""

    default_allow: bool = True
    exceptions: dict[Key, str] = field(default_factory=dict)
    origin: dict[Key, int] = field(default_factory=dict)  # key -> index of the last rule adding


def _covers(ex: Key, kind: str, major: int, minor: int) -> bool:
    return ex[0] == kind and ex[1] in (-1, major) and ex[2] in (-1, minor)


def replay(rules: Sequence[CgroupDeviceRule], *, refuse_holes: bool = True) -> V1State:
    """Apply rules in order as the v1 kernel does; refuse_holes=False is the kernel exactly."""
    st = V1State()
    for i, rule in enumerate(rules):
        if rule.kind == "a":
            st = V1State(default_allow=rule.allow)
            continue
        key = (rule.kind, rule.major, rule.minor)
        bits = _bits(rule.access)
        if rule.allow != st.default_allow:  # add an exception
            st.exceptions[key] = _bits(st.exceptions.get(key, "") + bits)
            st.origin[key] = i
            continue
        if refuse_holes:
            _refuse_hole(st, i, rule, key, bits)
        left = "".join(c for c in st.exceptions.get(key, "") if c not in bits)
        if left:
            st.exceptions[key] = left
        else:
            st.exceptions.pop(key, None)
            st.origin.pop(key, None)
    return st


def _refuse_hole(st: V1State, i: int, rule: CgroupDeviceRule, key: Key, bits: str) -> None:
    kind, major, minor = key
    for wild in ((kind, -1, minor), (kind, major, -1), (kind, -1, -1)):
        if wild == key:
            continue
        common = [c for c in st.exceptions.get(wild, "") if c in bits]
        if common:
            w = CgroupDeviceRule(not rule.allow, *wild, st.exceptions[wild])
            raise ConfigError(
                f"device_rules[{i}]",
                str(rule),
                f"cgroup v1 would silently ignore it: it punches a hole in the wildcard "
                f"exception '{w}' from device_rules[{st.origin[wild]}] (runc refuses this too: "
                f"'cannot punch hole in existing wildcard rule'); list specific devices instead",
            )


def _check_split(st: V1State) -> None:
    """Refuse r and w of one device granted only by different exceptions (see module doc)."""
    if st.default_allow:
        return
    items = list(st.exceptions.items())
    for k1, b1 in items:
        for k2, b2 in items:
            if k1 == k2 or "r" not in b1 or "w" not in b2 or k1[0] != k2[0]:
                continue
            if "w" in b1 or "r" in b2:  # k1 or k2 itself holds rw and covers their overlap
                continue
            if not (k1[1] in (-1, k2[1]) or k2[1] == -1) or not (
                k1[2] in (-1, k2[2]) or k2[2] == -1
            ):
                continue
            meet = (k1[0], k1[1] if k1[1] != -1 else k2[1], k1[2] if k1[2] != -1 else k2[2])
            if any(
                "r" in b and "w" in b and ex[1] in (-1, meet[1]) and ex[2] in (-1, meet[2])
                for ex, b in items
                if ex[0] == meet[0]
            ):
                continue
            i, j = sorted((st.origin[k1], st.origin[k2]))
            later = (k2, b2) if st.origin[k2] == j else (k1, b1)
            raise ConfigError(
                f"device_rules[{j}]",
                str(CgroupDeviceRule(True, *later[0], later[1])),
                f"with device_rules[{i}] it grants r and w of {meet[0]} "
                f"{_num(meet[1])}:{_num(meet[2])} in different rules: cgroup v1 then refuses "
                "O_RDWR opens, which last-match rules cannot express; grant 'rw' in one rule",
            )


def _num(n: int) -> str:
    return "*" if n == -1 else str(n)


def to_last_match(rules: Sequence[CgroupDeviceRule]) -> list[CgroupDeviceRule]:
    """An equivalent last-match rule list for a v1-semantics list; ConfigError where none is.

    Deny-by-default: deny-all, then one allow per exception. Allow-by-default: one deny per
    exception (an empty list: allow everything, as a v1 cgroup with no rules).
    """
    st = replay(rules)
    _check_split(st)
    ordered = sorted(st.exceptions.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0]))
    out = [CgroupDeviceRule(not st.default_allow, k, ma, mi, b) for (k, ma, mi), b in ordered]
    if not st.default_allow:
        out.insert(0, CgroupDeviceRule(False, "a", -1, -1, "rwm"))
    return out


def v1_allowed(
    rules: Sequence[CgroupDeviceRule], kind: str, major: int, minor: int, access: str
) -> bool:
    """Reference evaluator of the v1 kernel (holes ignored, as the kernel does): would the
    access pass? (match_exception / match_exception_partial in security/device_cgroup.c)"""
    st = replay(rules, refuse_holes=False)
    matching = [b for ex, b in st.exceptions.items() if _covers(ex, kind, major, minor)]
    if st.default_allow:
        return not any(c in b for b in matching for c in access)
    return any(all(c in b for c in access) for b in matching)


def effective_rules(rules: Sequence[CgroupDeviceRule], semantics: str) -> list[CgroupDeviceRule]:
    """The last-match rules to install for a config's `device_rules` and `device_semantics`."""
    return to_last_match(rules) if semantics == "v1" else list(rules)
