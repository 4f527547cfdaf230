"""What a pod asks the NRI plugin for, read from its annotations: pure, no I/O.

The keys are the OCI hook's (ocihook/request.py: `io.pelagos-bpf.net.classid`,
`io.pelagos-bpf.net.priorities`, `io.pelagos-bpf.devices`, `io.pelagos-bpf.devices.audit`,
`io.pelagos-bpf.best-effort`), parsed by the hook's own strict, bounded parsers. They are read
from the POD's annotations (PodSandbox.annotations: what a pod author writes in
metadata.annotations), never from the container's (CRI container annotations are kubelet's).

Per container, in NRI's convention (containerd/nri plugins/device-injector, v0.8.0
`getAnnotation`: `<key>/container.<name>`, then `<key>/pod`, then `<key>`): the first of
- `<key>/container.<name>`: this container only; an empty value means "none for this container"
  (a sidecar can opt out of the pod's classid);
- `<key>/pod` or `<key>`: every container of the pod. Upstream silently prefers `/pod` when both
  are set; here both set is refused (which one was meant cannot be told).
Other `io.pelagos-bpf.*` keys are reported as warnings and ignored, as by the hook.

What an `allow` rule becomes (grants.py places its node): a grant names one device (`c`/`b`,
exact MAJ:MIN) and goes into the container adjustment's `linux.devices`, for which NRI adds
an allow rule of its own, always `rw` (plus `m` for block) whatever the file mode (nri v0.8.0
pkg/api/device.go AccessString; `linux.resources.devices` of an adjustment is ignored by
AdjustResources). A grant of less than that (`allow c 240:1 r`) is narrowed by our own
program: our set denies the bits the runtime's rule grants beyond it (own_rules).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..devices.rules import CgroupDeviceRule, validate_device_rules
from ..errors import ConfigError
from ..ocihook import request as hookreq
from ..policy import NAMESPACE, Claim

KNOWN = hookreq.KNOWN
PREFIX = hookreq.PREFIX
POD = "/pod"
CONTAINER = "/container."
GRANTED_BY_RUNTIME = {"c": "rw", "b": "rwm"}
"""The access NRI's allow rule for an adjustment's device node grants (AccessString)."""


@dataclass(frozen=True)
class Ask:
    """What one container asks for, checked (empty: nothing; the plugin does nothing).

    `sources` maps each hook key to the annotation it came from (the per-container key, the
    `/pod` key or the key itself), so every message names what the pod author wrote."""

    classid: int | None = None
    priorities: tuple[tuple[str, int], ...] = ()
    rules: tuple[CgroupDeviceRule, ...] = ()
    audit: bool = False
    best_effort: bool = False
    claim: Claim | None = None
    sources: Mapping[str, str] = dataclasses.field(default_factory=dict)
    warnings: tuple[str, ...] = ()

    @property
    def grants(self) -> tuple[CgroupDeviceRule, ...]:
        return tuple(r for r in self.rules if r.allow)

    @property
    def wants_net(self) -> bool:
        return bool(self.classid) or bool(self.priorities)

    @property
    def wants_program(self) -> bool:
        """Does our device program go on the cgroup? For a deny, an audit, or a grant of
        less than the runtime's rule for its node allows (a full grant is the runtime's rule)."""
        return self.audit or any(not r.allow or narrowed(r) for r in self.rules)

    @property
    def empty(self) -> bool:
        return not (self.wants_net or self.rules or self.audit)

    def source(self, key: str) -> str:
        return self.sources.get(key, key)


def effective_annotations(
    pod_annotations: Mapping[str, str], container: str
) -> tuple[dict[str, str], dict[str, str], list[str]]:
    """(the hook keys that apply to `container` -> value, hook key -> the annotation it came
    from, warnings). ConfigError when `<key>` and `<key>/pod` are both set."""
    values: dict[str, str] = {}
    sources: dict[str, str] = {}
    for key in KNOWN:
        mine = f"{key}{CONTAINER}{container}"
        if mine in pod_annotations:
            if pod_annotations[mine] != "":
                values[key], sources[key] = pod_annotations[mine], mine
            continue
        pod_key = key + POD
        if pod_key in pod_annotations and key in pod_annotations:
            raise ConfigError(
                pod_key, pod_annotations[pod_key], f"{key} is set too: keep one of the two"
            )
        for k in (pod_key, key):
            if k in pod_annotations:
                values[key], sources[key] = pod_annotations[k], k
    warnings = [
        f"annotation {k} is not one of {', '.join(KNOWN)} (optionally with {POD} or "
        f"{CONTAINER}NAME): ignored"
        for k in sorted(pod_annotations)
        if k.startswith(PREFIX) and not _known_form(k)
    ]
    return values, sources, warnings


def _known_form(key: str) -> bool:
    """`<key>`, `<key>/pod` or `<key>/container.<name>` of a hook key."""
    base, slash, rest = key.partition("/")
    if base not in KNOWN:
        return False
    suffix = "/" + rest
    return not slash or suffix == POD or (suffix.startswith(CONTAINER) and suffix != CONTAINER)


def parse(pod_annotations: Mapping[str, str], container: str) -> Ask:
    """The container's Ask; ConfigError naming the annotation (as written) for a bad value."""
    hookreq.check_sizes(pod_annotations)
    values, sources, warnings = effective_annotations(pod_annotations, container)
    if not values:
        return Ask(warnings=tuple(warnings))
    try:
        req = hookreq.build_request(values, {})
    except ConfigError as e:
        raise ConfigError(sources.get(e.setting, e.setting), e.value, e.reason) from None
    rules = tuple(req.extra_device_rules)
    for i, rule in enumerate(rules):
        if rule.allow and (rule.kind not in GRANTED_BY_RUNTIME or -1 in (rule.major, rule.minor)):
            raise ConfigError(
                sources[hookreq.A_DEVICES],
                str(rule),
                f"rule {i}: a grant names one device node ('allow c 10:229 rw'): type c or b "
                "and an exact MAJ:MIN (the runtime's rule for a node allows that node only)",
            )
    claim = req.claim
    if claim is not None:
        claim = dataclasses.replace(
            claim,
            classid_setting=sources.get(hookreq.A_CLASSID, hookreq.A_CLASSID),
            priorities_setting=sources.get(hookreq.A_PRIOS, hookreq.A_PRIOS),
            devices_setting=sources.get(hookreq.A_DEVICES, hookreq.A_DEVICES),
        )
    return Ask(
        classid=req.classid,
        priorities=tuple(req.priorities),
        rules=rules,
        audit=req.audit,
        best_effort=req.best_effort,
        claim=claim,
        sources=sources,
        warnings=tuple(warnings + req.warnings),
    )


def namespace_of(pod_namespace: str) -> str | None:
    """PodSandbox.namespace as the policy's namespace (None: a pod without one, e.g. a CRI
    client that is not kubelet); ConfigError for anything Kubernetes would not accept."""
    if pod_namespace == "":
        return None
    if not NAMESPACE.fullmatch(pod_namespace):
        raise ConfigError("PodSandbox.namespace", pod_namespace, "not a Kubernetes namespace name")
    return pod_namespace


def narrowed(rule: CgroupDeviceRule) -> str:
    """The bits the runtime's rule for a grant's node allows beyond the grant ("" for none)."""
    extra = GRANTED_BY_RUNTIME.get(rule.kind, "")
    return "".join(b for b in extra if b not in rule.access)


def own_rules(rules: Sequence[CgroupDeviceRule]) -> list[CgroupDeviceRule]:
    """Our set's own part (after the mirror of the runtime's): the annotation's rules in their
    order, each grant followed by a deny of what the runtime's rule grants beyond it. Read
    last-match per bit, "allow c 240:1 r" then gives r and denies w on c 240:1, and a later
    rule of the annotation still decides its own bits."""
    out: list[CgroupDeviceRule] = []
    for r in rules:
        out.append(r)
        extra = narrowed(r) if r.allow else ""
        if extra:
            out.append(CgroupDeviceRule(False, r.kind, r.major, r.minor, extra))
    validate_device_rules(out)
    return out


# ---------------------------------------------------------------- the container's cgroup


def cgroup_dir(cgroups_path: str, root: Path) -> Path:
    """The container's cgroup directory from `linux.cgroups_path`, as runc reads it: an
    absolute path below the cgroup2 root (the cgroupfs driver), or the systemd driver's
    `slice:prefix:name` expanded with systemd's slice nesting (systemd/names.py), e.g.
    kubepods-besteffort-pod<uid>.slice:cri-containerd:<id> ->
    kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<uid>.slice/
    cri-containerd-<id>.scope. A relative path (runc would place it below its own cgroup) is
    refused: the plugin does not run where runc does."""
    from ..systemd import names

    setting = "linux.cgroups_path"
    if names.is_systemd_form(cgroups_path):
        try:
            rel = names.parse(cgroups_path).cgroup_path
        except ConfigError as e:
            raise ConfigError(setting, cgroups_path, e.reason) from None
    elif cgroups_path.startswith("/"):
        parts = [p for p in cgroups_path.split("/") if p not in ("", ".")]
        if ".." in parts:
            raise ConfigError(setting, cgroups_path, "'..' in a cgroup path")
        rel = "/".join(parts)
    else:
        raise ConfigError(
            setting,
            cgroups_path,
            "want an absolute path (cgroupfs driver) or slice:prefix:name (systemd driver)",
        )
    if not rel:
        raise ConfigError(setting, cgroups_path, "names the cgroup root, not a container's")
    return root / rel


# ---------------------------------------------------------------- the runtime's device rules


DeviceKey = tuple[
    tuple[tuple[str, int, int], ...],
    tuple[tuple[bool, str, int | None, int | None, str], ...],
]
"""A container's device nodes (type, major, minor) and rules (allow, type, major, minor,
access; None: a wildcard), hashable: the mirror is computed once per distinct key."""


def device_key(linux: Any) -> DeviceKey:
    """The DeviceKey of an NRI LinuxContainer (linux.devices, linux.resources.devices): what the
    runtime turns into its own device program."""
    nodes = tuple((d.type, d.major, d.minor) for d in linux.devices)
    rules = tuple(
        (
            d.allow,
            d.type,
            d.major.value if d.HasField("major") else None,
            d.minor.value if d.HasField("minor") else None,
            d.access,
        )
        for d in linux.resources.devices
    )
    return nodes, rules


def oci_linux_of(key: DeviceKey) -> dict[str, Any]:
    """The `linux` section of the OCI spec for the mirror (ocihook/mirror.py) from a DeviceKey."""
    nodes, rules = key
    out_rules = []
    for allow, kind, major, minor, access in rules:
        rule: dict[str, Any] = {"allow": allow, "access": access}
        if kind:
            rule["type"] = kind
        if major is not None:
            rule["major"] = major
        if minor is not None:
            rule["minor"] = minor
        out_rules.append(rule)
    devices = [{"type": t, "major": ma, "minor": mi} for t, ma, mi in nodes]
    return {"devices": devices, "resources": {"devices": out_rules}}
