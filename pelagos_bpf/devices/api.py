"""The device feature's public calls on any `CgroupRef` (see the package docstring)."""

from __future__ import annotations

from collections.abc import Sequence

from ..cgref import CgroupRef
from . import program
from .program import DeviceState
from .rules import CgroupDeviceRule


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
