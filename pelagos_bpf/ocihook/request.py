"""What a container asks the hook for: OCI state + config.json + annotations -> a Request.

Pure (no I/O), so every accepted and refused input is unit-tested. Why annotations at all:
podman and CRI-O users (and Kubernetes pods) can set annotations but not
`linux.resources.network`, and runc drops that field on cgroup v2 anyway.

Annotations (all optional; keys are case-sensitive):
- `io.pelagos-bpf.net.classid`: "1:10" (hex MAJ:MIN, as tc) or an integer; overrides
  `linux.resources.network.classID`.
- `io.pelagos-bpf.net.priorities`: "eth0=5,eth1=2" (";" also separates); overrides
  `linux.resources.network.priorities`.
- `io.pelagos-bpf.devices`: extra rules "allow|deny KIND MAJ:MIN [ACCESS]" separated by ";" or
  ",", enforced by our program beside the runtime's own (both must allow).
- `io.pelagos-bpf.devices.audit`: "true" attaches our device program (mirroring the runtime's
  rules) only to count denials, even without extra rules.
- `io.pelagos-bpf.best-effort`: "true" turns every failure into a warning (exit 0).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import CgroupConfig
from ..devices.rules import CgroupDeviceRule
from ..errors import ConfigError

PREFIX = "io.pelagos-bpf."
A_CLASSID = PREFIX + "net.classid"
A_PRIOS = PREFIX + "net.priorities"
A_DEVICES = PREFIX + "devices"
A_AUDIT = PREFIX + "devices.audit"
A_BEST_EFFORT = PREFIX + "best-effort"
KNOWN = (A_CLASSID, A_PRIOS, A_DEVICES, A_AUDIT, A_BEST_EFFORT)

CREATE_STATUSES = ("creating", "created", "running")
"""OCI state `status` values seen at createRuntime/createContainer/prestart (runc: creating)."""
STOP_STATUSES = ("stopped",)

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


class HookError(Exception):
    """The hook cannot do what the container asked: printed on stderr, exit status 2."""


@dataclass(frozen=True)
class State:
    """The OCI state the runtime writes on the hook's stdin (runtime-spec `state`)."""

    id: str
    status: str
    pid: int | None
    bundle: str
    annotations: dict[str, str]


@dataclass
class Request:
    """What to attach for one container (empty: nothing asked, the hook does nothing)."""

    classid: int | None = None
    priorities: list[tuple[str, int]] = field(default_factory=list)
    extra_device_rules: list[CgroupDeviceRule] = field(default_factory=list)
    runtime_device_rules: list[CgroupDeviceRule] = field(default_factory=list)
    audit: bool = False
    best_effort: bool = False
    warnings: list[str] = field(default_factory=list)

    @property
    def wants_net(self) -> bool:
        return bool(self.classid) or bool(self.priorities)

    @property
    def wants_devices(self) -> bool:
        return self.audit or bool(self.extra_device_rules)

    @property
    def empty(self) -> bool:
        return not (self.wants_net or self.wants_devices)

    def device_rules(self) -> list[CgroupDeviceRule]:
        """Our program's rules: the runtime's (so its denials are counted too), then ours."""
        return [*self.runtime_device_rules, *self.extra_device_rules]


def parse_state(data: Any) -> State:
    """Check the parts of the OCI state the hook uses; HookError names a bad field."""
    if not isinstance(data, Mapping):
        raise HookError("state on stdin: want a JSON object (the OCI runtime state)")
    cid = data.get("id")
    if not isinstance(cid, str) or not cid:
        raise HookError(f"state.id={cid!r}: want a non-empty string")
    status = data.get("status")
    if not isinstance(status, str):
        raise HookError(f"state.status={status!r}: want a string")
    pid = data.get("pid")
    if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int) or pid < 0):
        raise HookError(f"state.pid={pid!r}: want a process id")
    bundle = data.get("bundle")
    if not isinstance(bundle, str) or not bundle:
        raise HookError(f"state.bundle={bundle!r}: want the bundle directory")
    ann = data.get("annotations") or {}
    if not isinstance(ann, Mapping) or not all(isinstance(v, str) for v in ann.values()):
        raise HookError("state.annotations: want an object of strings")
    return State(cid, status, pid or None, bundle, dict(ann))


def stage_of(state: State, stage: str) -> str:
    """'create' or 'poststop': the one given, or read from state.status when 'auto'."""
    if stage != "auto":
        return stage
    if state.status in CREATE_STATUSES:
        return "create"
    if state.status in STOP_STATUSES:
        return "poststop"
    raise HookError(
        f"state.status={state.status!r}: cannot tell the hook stage; pass 'create' or 'poststop'"
    )


def parse_classid(text: str) -> int:
    """ "1:10" (hex, as tc and HTB handles) or "65552"/"0x10010" -> the u32 classid."""
    s = text.strip()
    try:
        if ":" in s:
            major, minor = s.split(":", 1)
            return (int(major, 16) << 16) | int(minor, 16)
        return int(s, 0)
    except ValueError:
        raise ConfigError(
            A_CLASSID, text, "want MAJ:MIN in hex (e.g. 1:10) or an integer"
        ) from None


def _items(text: str) -> list[str]:
    return [p.strip() for p in re.split(r"[;,]", text) if p.strip()]


def parse_priorities(text: str) -> list[tuple[str, int]]:
    """ "eth0=5,eth1=2" -> [("eth0", 5), ("eth1", 2)]."""
    out = []
    for item in _items(text):
        name, sep, prio = item.partition("=")
        if not sep or not name.strip() or not prio.strip().isdigit():
            raise ConfigError(A_PRIOS, text, f"bad item {item!r}: want IFNAME=PRIO[,IFNAME=PRIO]")
        out.append((name.strip(), int(prio)))
    if not out:
        raise ConfigError(A_PRIOS, text, "empty: want IFNAME=PRIO[,IFNAME=PRIO]")
    return out


def parse_device_rules(text: str) -> list[CgroupDeviceRule]:
    """ "deny c 1:3 rw; allow c 240:* " -> rules; ACCESS defaults to rwm."""
    from ..devices.rules import parse_rule

    rules = []
    for item in _items(text):
        words = item.split()
        if len(words) == 3:
            words.append("rwm")
        try:
            rules.append(parse_rule(" ".join(words)))
        except ConfigError as e:
            raise ConfigError(A_DEVICES, item, e.reason) from None
    if not rules:
        raise ConfigError(A_DEVICES, text, "empty: want 'allow|deny KIND MAJ:MIN [ACCESS]'")
    return rules


def _flag(key: str, text: str) -> bool:
    v = text.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ConfigError(key, text, "want true or false")


def runtime_device_rules(linux: Mapping[str, Any]) -> list[CgroupDeviceRule]:
    """The rules runc and crun enforce: config rules, then each `linux.devices` node, then the
    default allowlist (both runtimes append the last two). Mirrored so our audit counts the
    runtime's denials; where the mirror allows more the runtime still denies (AND)."""
    from ..devices import DEFAULT_DEVICE_RULES

    resources = linux.get("resources") or {}
    cfg = CgroupConfig.from_oci({"devices": resources.get("devices") or []})
    nodes = []
    for i, d in enumerate(linux.get("devices") or []):
        try:
            nodes.append(CgroupDeviceRule(True, d["type"], int(d["major"]), int(d["minor"])))
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"linux.devices[{i}]", d, "needs type, major, minor") from None
    allowlist = [r for r in DEFAULT_DEVICE_RULES if r.allow]
    return [*cfg.device_rules, *(n for n in nodes if n.kind in ("b", "c")), *allowlist]


def build_request(annotations: Mapping[str, str], config: Mapping[str, Any]) -> Request:
    """Annotations override `linux.resources.network`; ConfigError names the first bad value."""
    req = Request()
    for key in sorted(annotations):
        if key.startswith(PREFIX) and key not in KNOWN:
            req.warnings.append(f"annotation {key} is not one of {', '.join(KNOWN)}: ignored")
    linux = config.get("linux") or {}
    if not isinstance(linux, Mapping):
        raise ConfigError("linux", linux, "must be a JSON object")
    network = (linux.get("resources") or {}).get("network")
    if network is not None:
        cfg = CgroupConfig.from_oci({"network": network})
        req.classid, req.priorities = cfg.net_classid, list(cfg.net_priorities)
    if A_CLASSID in annotations:
        classid = parse_classid(annotations[A_CLASSID])
        if req.classid not in (None, classid):
            req.warnings.append(
                f"{A_CLASSID} {classid:#x} overrides linux.resources.network.classID "
                f"{req.classid:#x}"
            )
        req.classid = classid
    if A_PRIOS in annotations:
        req.priorities = parse_priorities(annotations[A_PRIOS])
    if A_DEVICES in annotations:
        req.extra_device_rules = parse_device_rules(annotations[A_DEVICES])
    req.audit = _flag(A_AUDIT, annotations.get(A_AUDIT, ""))
    req.best_effort = _flag(A_BEST_EFFORT, annotations.get(A_BEST_EFFORT, ""))
    if req.wants_devices:
        req.runtime_device_rules = runtime_device_rules(linux)
    if req.classid is not None or req.priorities:  # net loads the BPF runtime: only if asked
        from ..net.plan import validate_net

        validate_net(req.classid, req.priorities)
    return req
