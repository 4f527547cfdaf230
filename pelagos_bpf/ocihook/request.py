"""What a container asks the hook for: OCI state + config.json + annotations -> a Request.

Pure (no I/O), so every accepted and refused input is unit-tested. Why annotations at all:
podman and CRI-O users (and Kubernetes pods) can set annotations but not
`linux.resources.network`, and runc drops that field on cgroup v2 anyway.

Annotations (all optional; keys are case-sensitive; values strings of printable ASCII digits
where numbers are meant):
- `io.pelagos-bpf.net.classid`: "1:10" (hex MAJ:MIN, each half a u16, as tc), "0x10010" or a
  decimal integer; overrides `linux.resources.network.classID`.
- `io.pelagos-bpf.net.priorities`: "eth0=5,eth1=2" (";" also separates; decimal u32);
  overrides `linux.resources.network.priorities`.
- `io.pelagos-bpf.devices`: rules "allow|deny KIND MAJ:MIN [ACCESS]" separated by ";" or ",",
  enforced by the hook's own device program beside the runtime's: both must allow, so an
  `allow` here acts only within this set and never overrides another owner's deny.
- `io.pelagos-bpf.devices.audit`: "true" attaches the hook's device program (mirroring the
  runtime's rules, mirror.py) only to count denials, even without rules of its own.
- `io.pelagos-bpf.best-effort`: "true" turns every failure into a warning (exit 0).
Annotation values are pod input: they pass the admin policy (pelagos_bpf.policy) first; the
config.json fields are the runtime's and are not checked against it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..config import CgroupConfig
from ..devices.rules import CgroupDeviceRule, parse_rule
from ..errors import ConfigError
from ..numbers import parse_classid as _parse_classid
from ..numbers import parse_dec

if TYPE_CHECKING:  # imported where used: a container that asks nothing never loads the policy
    from ..policy import Claim

PREFIX = "io.pelagos-bpf."
A_CLASSID = PREFIX + "net.classid"
A_PRIOS = PREFIX + "net.priorities"
A_DEVICES = PREFIX + "devices"
A_AUDIT = PREFIX + "devices.audit"
A_BEST_EFFORT = PREFIX + "best-effort"
KNOWN = (A_CLASSID, A_PRIOS, A_DEVICES, A_AUDIT, A_BEST_EFFORT)
A_NAMESPACE = "io.kubernetes.pod.namespace"
"""CRI-O writes the pod's namespace here, after the pod's own annotations (so a pod cannot set
it); podman and plain runc have none. Only this exact key counts."""

MAX_VALUE = 128 << 10  # one io.pelagos-bpf.* value: ~5,000 rules
MAX_TOTAL = 256 << 10  # all of them: Kubernetes' own cap on a pod's annotations

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
    """What to attach for one container (empty: nothing asked, the hook does nothing).

    `claim` holds what came from annotations (pod input, checked against the policy; None:
    the annotations ask for nothing); `runtime_device_rules` is the mirror of the runtime's
    rules (filled by the caller, which knows the runtime: mirror.py)."""

    classid: int | None = None
    priorities: list[tuple[str, int]] = field(default_factory=list)
    extra_device_rules: list[CgroupDeviceRule] = field(default_factory=list)
    runtime_device_rules: list[CgroupDeviceRule] = field(default_factory=list)
    audit: bool = False
    best_effort: bool = False
    claim: Claim | None = None
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
        """The hook's set: the runtime's (so its denials are counted too), then its own."""
        return [*self.runtime_device_rules, *self.extra_device_rules]


def string_map(value: Any, where: str) -> dict[str, str]:
    """An annotations object: HookError naming `where` and the key for anything else."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise HookError(f"{where}: want an object of strings, not {type(value).__name__}")
    for k, v in value.items():
        if not isinstance(v, str):
            raise HookError(f"{where}[{k!r}]: want a string, not {type(v).__name__}")
    return dict(value)


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
    ann = string_map(data.get("annotations"), "state.annotations")
    return State(cid, status, pid or None, bundle, ann)


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


def pod_namespace(state_ann: Mapping[str, str], config_ann: Mapping[str, str]) -> str | None:
    """The pod's Kubernetes namespace (None: none given). config.json's value counts, written
    by CRI-O after the pod's annotations; a state that disagrees with it is refused, and so is
    a value that is no namespace name (a DNS-1123 label)."""
    ns = config_ann.get(A_NAMESPACE)
    if state_ann.get(A_NAMESPACE, ns) != ns:
        raise HookError(
            f"{A_NAMESPACE}: the OCI state says {state_ann.get(A_NAMESPACE)!r}, config.json "
            f"{ns!r}: refused (the namespace selects the admin policy)"
        )
    if ns is None:
        return None
    from ..policy import NAMESPACE

    if not NAMESPACE.fullmatch(ns):
        raise HookError(f"{A_NAMESPACE}={ns!r}: not a Kubernetes namespace name")
    return ns


def section(parent: Mapping[str, Any], key: str, path: str) -> Mapping[str, Any]:
    """An optional JSON object ({} when absent); ConfigError naming `path` when it is not one
    (a list, even an empty one, is refused: it is not what a runtime wrote)."""
    value = parent.get(key)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(path, value, "must be a JSON object")
    return value


def check_sizes(annotations: Mapping[str, str]) -> None:
    """Bound what the hook parses: each io.pelagos-bpf.* value, and all of them together."""
    total = 0
    for key, value in annotations.items():
        if key.startswith(PREFIX):
            n = len(value.encode(errors="replace"))
            if n > MAX_VALUE:
                raise ConfigError(key, f"{n} bytes", f"more than {MAX_VALUE} bytes")
            total += n
    if total > MAX_TOTAL:
        raise ConfigError(
            PREFIX + "*", f"{total} bytes", f"the annotations together exceed {MAX_TOTAL} bytes"
        )


def parse_classid(text: str) -> int:
    """ "1:10" (hex, as tc and HTB handles, halves u16), "0x10010" or "65552" -> classid."""
    try:
        return _parse_classid(text, A_CLASSID)
    except ConfigError as e:
        why = "want MAJ:MIN in hex (e.g. 1:10), 0xHEX or a decimal integer"
        raise ConfigError(A_CLASSID, text, f"{e.reason}; {why}") from None


def _items(text: str) -> list[str]:
    return [p.strip(" \t") for p in re.split(r"[;,]", text) if p.strip(" \t")]


def parse_priorities(text: str) -> list[tuple[str, int]]:
    """ "eth0=5,eth1=2" -> [("eth0", 5), ("eth1", 2)] (decimal u32, ASCII digits)."""
    out = []
    for item in _items(text):
        name, sep, prio = item.partition("=")
        if not sep or not name.strip(" \t"):
            raise ConfigError(A_PRIOS, text, f"bad item {item!r}: want IFNAME=PRIO[,IFNAME=PRIO]")
        try:
            value = parse_dec(prio.strip(" \t"), A_PRIOS)
        except ConfigError as e:
            raise ConfigError(A_PRIOS, text, f"bad item {item!r}: {e.reason}") from None
        out.append((name.strip(" \t"), value))
    if not out:
        raise ConfigError(A_PRIOS, text, "empty: want IFNAME=PRIO[,IFNAME=PRIO]")
    return out


def parse_device_rules(text: str) -> list[CgroupDeviceRule]:
    """ "deny c 1:3 rw; allow c 240:* " -> rules (the library's one rule grammar,
    devices.rules.parse_rule; ACCESS defaults to rwm)."""
    rules = []
    for item in _items(text):
        try:
            rules.append(parse_rule(item))
        except ConfigError as e:
            raise ConfigError(A_DEVICES, item, e.reason) from None
    if not rules:
        raise ConfigError(A_DEVICES, text, "empty: want 'allow|deny KIND MAJ:MIN [ACCESS]'")
    return rules


def _flag(key: str, text: str) -> bool:
    v = text.strip(" \t").lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ConfigError(key, text, "want true or false")


def build_request(annotations: Mapping[str, str], config: Mapping[str, Any]) -> Request:
    """Annotations override `linux.resources.network`; ConfigError names the first bad value.
    The caller fills `runtime_device_rules` (mirror.py) when `wants_devices`."""
    req = Request()
    for key in sorted(annotations):
        if key.startswith(PREFIX) and key not in KNOWN:
            req.warnings.append(f"annotation {key} is not one of {', '.join(KNOWN)}: ignored")
    check_sizes(annotations)
    linux = section(config, "linux", "linux")
    resources = section(linux, "resources", "linux.resources")
    network = resources.get("network")
    if network is not None:
        cfg = CgroupConfig.from_oci({"network": network})
        req.classid, req.priorities = cfg.net_classid, list(cfg.net_priorities)
    claimed_classid = None
    if A_CLASSID in annotations:
        claimed_classid = parse_classid(annotations[A_CLASSID])
        if req.classid not in (None, claimed_classid):
            req.warnings.append(
                f"{A_CLASSID} {claimed_classid:#x} overrides linux.resources.network.classID "
                f"{req.classid:#x}"
            )
        req.classid = claimed_classid
    claimed_prios: tuple[tuple[str, int], ...] = ()
    if A_PRIOS in annotations:
        req.priorities = parse_priorities(annotations[A_PRIOS])
        claimed_prios = tuple(req.priorities)
    if A_DEVICES in annotations:
        req.extra_device_rules = parse_device_rules(annotations[A_DEVICES])
    req.audit = _flag(A_AUDIT, annotations.get(A_AUDIT, ""))
    req.best_effort = _flag(A_BEST_EFFORT, annotations.get(A_BEST_EFFORT, ""))
    if claimed_classid is not None or claimed_prios or req.extra_device_rules or req.audit:
        from ..policy import Claim

        req.claim = Claim(
            claimed_classid,
            claimed_prios,
            tuple(req.extra_device_rules),
            classid_setting=A_CLASSID,
            priorities_setting=A_PRIOS,
            devices_setting=A_DEVICES,
        )
    if req.classid is not None or req.priorities:  # net loads the BPF runtime: only if asked
        from ..net.plan import validate_net

        validate_net(req.classid, req.priorities)
    return req
