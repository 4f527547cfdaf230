"""The admin policy: what pod authors may ask for by annotation, per Kubernetes namespace.

Why: annotations come from pod authors. A classid or a priority is a claim on the node's
bandwidth (HTB class 1:10 may be the best one), a device grant a claim on its devices, and
every rule a claim on the node-wide rule map. Without a policy any pod could put itself in the
best class. The runtime's own settings (config.json fields, library calls) are not pod input
and are not checked here.

File: /etc/pelagos-bpf/policy.toml ($PELAGOS_BPF_POLICY overrides), read with tomllib, only
if it and every directory above it are root-owned and not writable by group or others
(pelagos_bpf.trust: whoever could write it could grant themselves anything). No file: the
built-in default (BUILTIN). A file that exists but cannot be used (untrusted, unparsable, an
unknown key) fails closed: every request it would govern is refused with PolicyFileError.

    version = 1
    [default]                      # namespaces not listed below, and containers without one
    classids = []                  # "1:10", "1:20-1:2f" (hex, as tc), "1:*", or "*"
    priorities = []                # 5, "0-6": plain priorities, within 0..65535
    priority_classids = false      # a priority > 0xffff (it selects HTB class major:minor)
                                   # only if true, and then only a classid `classids` allows
    device_grants = false          # `allow` rules in io.pelagos-bpf.devices (deny: always)
    rules_per_set = 64             # rules in one container's io.pelagos-bpf.devices
    entries_per_namespace = 16384  # rule-map entries of all the namespace's hook rule sets
    [namespaces.batch]             # a Kubernetes namespace: keys it omits come from [default]
    classids = ["1:20-1:2f"]

Callers: `load()` once per hook exec (the agent: once, and again on SIGHUP; a reload applies to
new containers only), then `Policy.check(namespace, claim)` before anything is written and
`Policy.check_entries(...)` with the namespace's current total (the hook counts its records,
ocihook.records.entries_by_namespace; the agent its own view).
"""

from __future__ import annotations

import errno
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from .devices.rules import CgroupDeviceRule
from .errors import ConfigError, PelagosError
from .numbers import parse_classid, parse_dec, parse_hex

POLICY_ENV = "PELAGOS_BPF_POLICY"
DEFAULT_PATH = "/etc/pelagos-bpf/policy.toml"
MAX_FILE = 1 << 20  # a policy is a few KiB
VERSION = 1
PRIO_MAX = 0xFFFF
U32_MAX = 0xFFFF_FFFF
NAMESPACE = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # a DNS-1123 label, as Kubernetes


class PolicyError(PelagosError):
    """The policy refuses a request: names the input (`setting`, e.g. the annotation) and the
    policy key that decided (`rule`, e.g. "namespaces.batch.classids")."""

    def __init__(self, setting: str, rule: str, reason: str) -> None:
        self.setting = setting
        self.rule = rule
        self.reason = reason
        super().__init__(f"{setting}: {reason} (policy {rule})")


class PolicyFileError(PelagosError):
    """The policy file cannot be used; every request it would govern is refused."""

    def __init__(self, path: str, key: str, reason: str) -> None:
        self.path = path
        self.key = key
        self.reason = reason
        where = f"{path}: {key}" if key else path
        super().__init__(f"policy {where}: {reason}")


@dataclass(frozen=True)
class ClassidRange:
    """Classids lo..hi (inclusive), as written in the file."""

    lo: int
    hi: int
    text: str

    def __contains__(self, classid: object) -> bool:
        return isinstance(classid, int) and self.lo <= classid <= self.hi


@dataclass(frozen=True)
class Rules:
    """The policy of one namespace, with the section each key came from (for messages)."""

    classids: tuple[ClassidRange, ...] = ()
    priorities: tuple[tuple[int, int], ...] = ()
    priority_classids: bool = False
    device_grants: bool = False
    rules_per_set: int = 64
    entries_per_namespace: int = 16384
    origin: Mapping[str, str] = field(default_factory=dict, compare=False)

    def key(self, name: str) -> str:
        """The key as written in the file ("namespaces.batch.classids"), or the bare name
        when the built-in default decided."""
        where = self.origin.get(name)
        return f"{where}.{name}" if where else name

    def classid_allowed(self, classid: int) -> bool:
        return any(classid in r for r in self.classids)

    def priority_allowed(self, prio: int) -> bool:
        return any(lo <= prio <= hi for lo, hi in self.priorities)


BUILTIN = Rules()
"""No policy file: no classid or priority by annotation, no device grants; deny rules (up to 64
per container) and the denial audit pass. Fail closed: a pod cannot pick its own class until
an admin says which ones it may (docs/OCI_HOOK.md, "Admin policy", for the migration)."""
KEYS = tuple(f for f in Rules.__dataclass_fields__ if f != "origin")


@dataclass(frozen=True)
class Claim:
    """What a pod's annotations ask for: the parts the policy governs. The *_setting names are
    the inputs the messages name (the hook passes its annotation keys)."""

    classid: int | None = None
    priorities: tuple[tuple[str, int], ...] = ()
    device_rules: tuple[CgroupDeviceRule, ...] = ()
    classid_setting: str = "net classid"
    priorities_setting: str = "net priorities"
    devices_setting: str = "device rules"

    @property
    def empty(self) -> bool:
        return self.classid is None and not self.priorities and not self.device_rules


def format_classid(classid: int) -> str:
    """0x10010 -> "1:10" (tc's MAJ:MIN, hex)."""
    return f"{classid >> 16:x}:{classid & 0xFFFF:x}"


def namespace_label(namespace: str | None) -> str:
    return f"namespace {namespace!r}" if namespace else "containers without a namespace"


@dataclass(frozen=True)
class Policy:
    """A loaded policy: `default` plus per-namespace rules; `source` says where it came from."""

    source: str
    default: Rules = BUILTIN
    namespaces: Mapping[str, Rules] = field(default_factory=dict)

    def rules_for(self, namespace: str | None) -> Rules:
        return self.namespaces.get(namespace or "", self.default)

    def _refuse(self, setting: str, rules: Rules, key: str, reason: str) -> PolicyError:
        return PolicyError(setting, f"{self.source}: {rules.key(key)}", reason)

    def check(self, namespace: str | None, claim: Claim) -> None:
        """Raise PolicyError for the first part of `claim` the namespace may not ask for."""
        rules = self.rules_for(namespace)
        who = namespace_label(namespace)
        if claim.classid and not rules.classid_allowed(claim.classid):
            raise self._refuse(
                claim.classid_setting,
                rules,
                "classids",
                f"classid {format_classid(claim.classid)} is not allowed for {who} "
                f"(allowed: {_listed(r.text for r in rules.classids)})",
            )
        for name, prio in claim.priorities:
            self._check_priority(claim.priorities_setting, rules, who, name, prio)
        n = len(claim.device_rules)
        if n > rules.rules_per_set:
            raise self._refuse(
                claim.devices_setting,
                rules,
                "rules_per_set",
                f"{n} rules: more than the {rules.rules_per_set} allowed for {who}",
            )
        grant = next((r for r in claim.device_rules if r.allow), None)
        if grant is not None and not rules.device_grants:
            raise self._refuse(
                claim.devices_setting,
                rules,
                "device_grants",
                f"{grant!s}: device grants (allow rules) are not allowed for {who}; deny rules are",
            )

    def _check_priority(self, setting: str, rules: Rules, who: str, name: str, prio: int) -> None:
        if prio <= PRIO_MAX:
            if not rules.priority_allowed(prio):
                allowed = _listed(
                    f"{lo}-{hi}" if lo != hi else str(lo) for lo, hi in rules.priorities
                )
                raise self._refuse(
                    setting,
                    rules,
                    "priorities",
                    f"{name}={prio}: priority not allowed for {who} (allowed: {allowed})",
                )
            return
        cls = format_classid(prio)
        if not rules.priority_classids:
            raise self._refuse(
                setting,
                rules,
                "priority_classids",
                f"{name}={prio}: a priority above {PRIO_MAX} selects HTB class {cls} (or its "
                f"unshaped direct queue); not allowed for {who}",
            )
        if not rules.classid_allowed(prio):
            raise self._refuse(
                setting,
                rules,
                "classids",
                f"{name}={prio}: selects class {cls}, which is not allowed for {who} "
                f"(allowed: {_listed(r.text for r in rules.classids)})",
            )

    def check_entries(
        self, namespace: str | None, in_use: int, adding: int, setting: str = "device rules"
    ) -> None:
        """Raise PolicyError when `adding` rule-map entries would take the namespace's total
        (`in_use`: what its live containers' hook rule sets hold) over its quota."""
        rules = self.rules_for(namespace)
        if in_use + adding > rules.entries_per_namespace:
            raise self._refuse(
                setting,
                rules,
                "entries_per_namespace",
                f"{adding} rule-map entries on top of the {in_use} in use would exceed the "
                f"{rules.entries_per_namespace} allowed for {namespace_label(namespace)}",
            )


def _listed(items: Any) -> str:
    return ", ".join(items) or "none"


# ---------------------------------------------------------------- loading


def policy_path() -> str:
    return os.environ.get(POLICY_ENV) or DEFAULT_PATH


def builtin(path: str | None = None) -> Policy:
    """The policy in force when there is no file at `path`."""
    return Policy(f"built-in default (no {path or policy_path()})")


def load(path: str | None = None) -> Policy:
    """The policy at `path` (default: $PELAGOS_BPF_POLICY or /etc/pelagos-bpf/policy.toml);
    the built-in default when there is no file. PolicyFileError when it cannot be used."""
    path = os.path.abspath(path or policy_path())
    raw = _read_trusted(path)
    if raw is None:
        return builtin(path)
    return parse(raw, path)


def _read_trusted(path: str) -> bytes | None:
    """The file's bytes; None when it (or its directory) does not exist. Refuses, as
    PolicyFileError, a file or directory others could write, a symlink, a non-regular file."""
    from . import trust  # the pin checks' walk: root-owned, not group/world writable, no links

    directory, name = os.path.split(path)
    try:
        dirfd = trust.open_trusted_dir(directory, "policy directory")
    except PelagosError as e:
        if isinstance(e, OSError) and e.errno == errno.ENOENT:
            return None
        raise PolicyFileError(path, "", _why(e)) from None
    try:
        raw = trust.read_trusted_file(dirfd, name, directory, "policy file")
    except PelagosError as e:
        raise PolicyFileError(path, "", _why(e)) from None
    finally:
        os.close(dirfd)
    if raw is not None and len(raw) > MAX_FILE:
        raise PolicyFileError(path, "", f"{len(raw)} bytes: more than {MAX_FILE}")
    return raw


def _why(e: Exception) -> str:
    return e.strerror if isinstance(e, OSError) and e.strerror else str(e)


def parse(raw: bytes | str, path: str = "<policy>") -> Policy:
    """A policy from TOML text; PolicyFileError names the first bad key."""
    import tomllib  # here: only a request that needs the policy file pays for the parser

    try:
        text = raw.decode() if isinstance(raw, bytes) else raw
        doc = tomllib.loads(text)
    except UnicodeDecodeError as e:
        raise PolicyFileError(path, "", f"not UTF-8 ({e})") from None
    except tomllib.TOMLDecodeError as e:
        raise PolicyFileError(path, "", f"not valid TOML: {e}") from None
    except RecursionError:
        raise PolicyFileError(path, "", "nested too deeply") from None
    return _build(doc, path)


def _build(doc: Mapping[str, Any], path: str) -> Policy:
    for key in doc:
        if key not in ("version", "default", "namespaces"):
            raise PolicyFileError(path, key, "unknown key (want version, default, namespaces)")
    version = doc.get("version", VERSION)
    if version != VERSION or isinstance(version, bool):
        raise PolicyFileError(path, "version", f"{version!r}: this release reads version 1")
    default = _section(doc.get("default", {}), "default", BUILTIN, path)
    spaces = doc.get("namespaces", {})
    if not isinstance(spaces, Mapping):
        raise PolicyFileError(path, "namespaces", "want a table of [namespaces.NAME] tables")
    namespaces = {}
    for name, table in spaces.items():
        if not NAMESPACE.fullmatch(name):
            raise PolicyFileError(
                path, f"namespaces.{name}", "not a Kubernetes namespace name (DNS-1123 label)"
            )
        namespaces[name] = _section(table, f"namespaces.{name}", default, path)
    return Policy(path, default, namespaces)


def _section(table: Any, where: str, base: Rules, path: str) -> Rules:
    """`base` with the keys `table` sets (and their origin) replaced."""
    if not isinstance(table, Mapping):
        raise PolicyFileError(path, where, "want a table")
    changes: dict[str, Any] = {}
    for key, value in table.items():
        setting = f"{where}.{key}"
        if key not in KEYS:
            raise PolicyFileError(path, setting, f"unknown key (want one of {', '.join(KEYS)})")
        try:
            changes[key] = _VALUE[key](value, setting)
        except ConfigError as e:
            raise PolicyFileError(path, setting, f"{e.value!r}: {e.reason}") from None
    origin = {**base.origin, **dict.fromkeys(changes, where)}
    return replace(base, **changes, origin=origin)


def _list(value: Any, setting: str) -> Sequence[Any]:
    if not isinstance(value, list):
        raise ConfigError(setting, value, "want a list")
    return value


def _classids(value: Any, setting: str) -> tuple[ClassidRange, ...]:
    return tuple(_classid_range(v, setting) for v in _list(value, setting))


def _classid_range(text: Any, setting: str) -> ClassidRange:
    """ "*", "MAJ:*", "MAJ:MIN" or "MAJ:MIN-MAJ:MIN" (halves in hex, as tc)."""
    if not isinstance(text, str):
        raise ConfigError(setting, text, 'want a string: "1:10", "1:20-1:2f", "1:*" or "*"')
    if text == "*":
        return ClassidRange(0, U32_MAX, text)
    major, sep, minor = text.partition(":")
    lo_s, dash, hi_s = text.partition("-")
    try:
        if sep and minor == "*":
            m = parse_hex(major, setting)
            return ClassidRange(m << 16, (m << 16) | 0xFFFF, text)
        lo = parse_classid(lo_s, setting)
        hi = parse_classid(hi_s, setting) if dash else lo
    except ConfigError as e:
        raise ConfigError(setting, text, e.reason) from None
    if lo > hi:
        raise ConfigError(setting, text, "range is empty (its start is above its end)")
    return ClassidRange(lo, hi, text)


def _priorities(value: Any, setting: str) -> tuple[tuple[int, int], ...]:
    """Each 5 or "5" or "0-6" (decimal, within 0..65535)."""
    out = []
    for v in _list(value, setting):
        if isinstance(v, int) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(v, str):
            raise ConfigError(setting, v, 'want a priority (5) or a range ("0-6")')
        lo_s, dash, hi_s = v.partition("-")
        lo = parse_dec(lo_s, setting, 0, PRIO_MAX)
        hi = parse_dec(hi_s, setting, 0, PRIO_MAX) if dash else lo
        if lo > hi:
            raise ConfigError(setting, v, "range is empty (its start is above its end)")
        out.append((lo, hi))
    return tuple(out)


def _bool(value: Any, setting: str) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(setting, value, "want true or false")
    return value


def _count(value: Any, setting: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= U32_MAX:
        raise ConfigError(setting, value, f"want an integer 0..{U32_MAX}")
    return value


_VALUE = {
    "classids": _classids,
    "priorities": _priorities,
    "priority_classids": _bool,
    "device_grants": _bool,
    "rules_per_set": _count,
    "entries_per_namespace": _count,
}
