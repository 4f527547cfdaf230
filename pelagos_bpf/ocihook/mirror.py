"""The hook's copy of the runtime's device rules (the audit mirror), read as that runtime does.

Why a copy: the hook's device program runs beside the runtime's (the kernel ANDs them) and
counts the denials its own rules decide; carrying the runtime's rules lets it count the
runtime's denials too (`pelagos-bpf devices denials`). The copy must never deny what the
runtime allows, or the hook would break the container. It may allow more: that denial then
goes uncounted (docs/OCI_HOOK.md, Limits).

What the runtimes enforce on cgroup v2 (docs/DEVICE_SEMANTICS.md):
- runc: `linux.resources.devices`, then its default allowlist (libcontainer/specconv
  CreateCgroupConfig), replayed through its cgroup v1 emulator: the copy is that list read with
  `device_semantics="v1"` (devices/v1emulator.to_last_match, exact).
- crun: its default allowlist first, then the OCI rules from last to first; the first rule
  whose type, major and minor match and whose access holds EVERY requested bit decides
  (src/libcrun/cgroup-resources.c, write_devices_resources_v2_internal). Read per bit
  (last-match), a deny holding exactly one of r and w would also deny O_RDWR (rw), which crun
  lets an earlier allow grant (DEVICE_SEMANTICS case D): the copy drops those r/w bits, keeping
  the deny's m. Proof sketch: crun allows a request R only through an allow holding all of R
  with every later matching rule not holding all of R; a later deny not holding all of R but
  sharing a bit with it holds exactly one of r and w (R is r, w, rw or m), and that bit is gone
  from the copy; so for each bit of R the copy's last matching rule is an allow.
Neither runtime adds rules for `linux.devices` nodes (their callers do); the copy allows them
anyway (more is safe), and takes the longer default allowlist of the two (ours:
DEFAULT_DEVICE_RULES, which also has c 5:1 and c 10:200).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from ..devices.rules import (
    DEFAULT_DEVICE_RULES,
    MAJOR_MAX,
    MINOR_MAX,
    CgroupDeviceRule,
    validate_device_rules,
)
from ..errors import ConfigError
from .request import section
from .runtime import Runtime


def _number(setting: str, v: Any, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= hi:
        raise ConfigError(setting, v, f"want an integer 0..{hi}")
    return v


def device_nodes(linux: Mapping[str, Any]) -> list[CgroupDeviceRule]:
    """An allow rule per char/block node of `linux.devices` (ConfigError names a bad one)."""
    nodes = linux.get("devices")
    if nodes is None:
        return []
    if not isinstance(nodes, list):
        raise ConfigError("linux.devices", nodes, "must be a list of device objects")
    out = []
    for i, d in enumerate(nodes):
        setting = f"linux.devices[{i}]"
        if not isinstance(d, Mapping) or not isinstance(d.get("type"), str):
            raise ConfigError(setting, d, "must be an object with type, major and minor")
        if d["type"] in ("b", "c"):
            major = _number(f"{setting}.major", d.get("major"), MAJOR_MAX)
            minor = _number(f"{setting}.minor", d.get("minor"), MINOR_MAX)
            out.append(CgroupDeviceRule(True, d["type"], major, minor))
    return out


def oci_rules(linux: Mapping[str, Any]) -> list[CgroupDeviceRule]:
    """The runtime's list: `linux.resources.devices`, `linux.devices` nodes, the default
    allowlist (in that order, the order both runtimes apply their parts)."""
    from ..config import CgroupConfig

    resources = section(linux, "resources", "linux.resources")
    rules = resources.get("devices")
    cfg = CgroupConfig.from_oci({"devices": [] if rules is None else rules})
    validate_device_rules(cfg.device_rules)
    allowlist = [r for r in DEFAULT_DEVICE_RULES if r.allow]
    return [*cfg.device_rules, *device_nodes(linux), *allowlist]


def crun_copy(rules: list[CgroupDeviceRule]) -> list[CgroupDeviceRule]:
    """Last-match rules that allow at least what crun allows for `rules` (module docstring)."""
    out = []
    for r in rules:
        if not r.allow and ("r" in r.access) != ("w" in r.access):
            if "m" not in r.access:
                continue
            r = replace(r, access="m")
        out.append(r)
    return out


def mirror(linux: Mapping[str, Any], runtime: Runtime | None) -> tuple[list[CgroupDeviceRule], str]:
    """(the copy to install before the hook's own rules, a warning or ""). Unknown runtime or
    a list the copy cannot express: no copy, and the warning says the runtime's denials are
    not counted."""
    rules = oci_rules(linux)
    if runtime is None:
        return [], (
            "the runtime was not recognised (not runc or crun): its device rules are not "
            "mirrored, so its denials are not counted (set PELAGOS_BPF_HOOK_RUNTIME)"
        )
    if runtime == "crun":
        return crun_copy(rules), ""
    from ..devices.v1emulator import to_last_match

    try:
        return to_last_match(rules), ""
    except ConfigError as e:
        return [], (
            f"runc's reading of the device rules has no per-bit equivalent ({e.reason}): "
            "they are not mirrored, so runc's denials are not counted"
        )
