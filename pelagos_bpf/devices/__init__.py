"""Device rules on cgroup v2: one generic BPF_CGROUP_DEVICE program, rules in maps.

Public contract (docs/DEVICES.md): validation, the reference evaluator, and attach / update /
detach / read_state on any `CgroupRef` (`.path`, `.id`, `.open_fd()`). The contract is the
runtime's (pelagos_bpf/feature.py): attach on a cgroup that already has ours is an update;
update replaces the rule set atomically; detach is idempotent. Importing this package loads
neither bcc nor libbpf; the first attach loads the cached bytecode.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..cgref import CgroupRef
from ..config import CgroupDeviceRule
from . import program
from .program import DeviceState
from .rules import (
    DEFAULT_DEVICE_RULES,
    device_allowed,
    parse_rule,
    validate_device_rules,
)

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


def attach_devices(cg: CgroupRef, rules: Sequence[CgroupDeviceRule]) -> None:
    """Enforce `rules` on the cgroup (an update if ours is there; [] detaches). Leaves nothing
    behind on failure."""
    program.apply(cg, rules)


def update_devices(cg: CgroupRef, rules: Sequence[CgroupDeviceRule]) -> None:
    """Atomically replace the cgroup's rules ([] detaches); the same call as attach_devices."""
    program.apply(cg, rules)


def detach_devices(cg: CgroupRef) -> None:
    """Detach our program (any layout version) and delete this cgroup's entries. Idempotent."""
    program.detach(cg)


def read_device_denials(cg: CgroupRef) -> dict[str, int]:
    """Denied accesses counted since attach, e.g. {"c 240:1 rw": 3}."""
    return program.denials(cg)


def read_state(cg: CgroupRef) -> DeviceState:
    """Program id, tag (and whether it is ours), version, generation, rules in force, denials."""
    return program.read_state(cg)
