"""Device rules on cgroup v2: one generic BPF_CGROUP_DEVICE program, rules in maps.

Public contract (docs/DEVICES.md): validation, the reference evaluator, and attach / update /
detach / read_state on any `CgroupRef` (`.path`, `.id`, `.open_fd()`). Attach on a cgroup that
already has ours is an update; update replaces the rule set atomically; detach is idempotent.

The names below load on first use (PEP 562): `config` imports the rule type from `rules`, and
neither it nor the OCI hook's input parsing may pay for the BPF runtime (`program`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import lazy

if TYPE_CHECKING:
    from .api import (
        attach_devices,
        detach_devices,
        read_device_denials,
        read_state,
        update_devices,
    )
    from .program import DeviceState
    from .rules import DEFAULT_DEVICE_RULES, device_allowed, parse_rule, validate_device_rules

_LAZY = {
    "attach_devices": "api",
    "detach_devices": "api",
    "read_device_denials": "api",
    "read_state": "api",
    "update_devices": "api",
    "DeviceState": "program",
    "DEFAULT_DEVICE_RULES": "rules",
    "device_allowed": "rules",
    "parse_rule": "rules",
    "validate_device_rules": "rules",
}

__all__ = [
    "DEFAULT_DEVICE_RULES",
    "DeviceState",
    "attach_devices",
    "detach_devices",
    "device_allowed",
    "parse_rule",
    "read_device_denials",
    "read_state",
    "update_devices",
    "validate_device_rules",
]


def __getattr__(name: str) -> Any:
    return lazy.load(__name__, globals(), _LAZY, name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
