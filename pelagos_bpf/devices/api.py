"""The device feature's public calls on any `CgroupRef` (see the package docstring).

`owner` says which role's rule set a call acts on (pelagos_bpf.owners): the runtime (a library
caller, the default), the OCI hook or the NRI plugin. Each owner's set is AND-ed with the
others'; a call never touches another owner's.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..cgref import CgroupRef
from ..owners import RUNTIME, Owner
from . import program
from .program import DeviceState
from .rules import CgroupDeviceRule


def attach_devices(
    cg: CgroupRef, rules: Sequence[CgroupDeviceRule], *, owner: Owner = RUNTIME
) -> None:
    """Enforce `rules` as `owner`'s set on the cgroup (an update if its program is there; []
    detaches it). Leaves nothing behind on failure."""
    program.apply(cg, rules, owner=owner)


def update_devices(
    cg: CgroupRef, rules: Sequence[CgroupDeviceRule], *, owner: Owner = RUNTIME
) -> None:
    """Atomically replace `owner`'s rules ([] detaches); the same call as attach_devices."""
    program.apply(cg, rules, owner=owner)


def detach_devices(cg: CgroupRef, *, owner: Owner = RUNTIME) -> None:
    """Detach `owner`'s program and delete its entries (the runtime's also takes programs of
    older layouts). Idempotent; other owners' sets stay."""
    program.detach(cg, owner=owner)


def read_device_denials(cg: CgroupRef) -> dict[str, int]:
    """Denied accesses counted since attach, e.g. {"c 240:1 rw": 3}."""
    return program.denials(cg)


def read_state(cg: CgroupRef) -> DeviceState:
    """Every owner's program, rule set and denials in force on the cgroup."""
    return program.read_state(cg)
