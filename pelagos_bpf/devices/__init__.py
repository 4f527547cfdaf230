"""Device rules on cgroup v2: one generic BPF_CGROUP_DEVICE program, rules in maps.

Public contract (docs/ARCHITECTURE.md): validation, the reference evaluator, and
attach/update/detach/audit on a `Cgroup` handle (`.path`, `.id`). Importing this package loads
neither bcc nor libbpf; the first attach loads the cached bytecode.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from ..config import CgroupDeviceRule
from .rules import (
    DEFAULT_DEVICE_RULES,
    device_allowed,
    parse_rule,
    validate_device_rules,
)

__all__ = [
    "DEFAULT_DEVICE_RULES",
    "attach_devices",
    "detach_devices",
    "device_allowed",
    "parse_rule",
    "read_device_denials",
    "update_devices",
    "validate_device_rules",
]


class _CgroupLike(Protocol):
    @property
    def path(self) -> object: ...
    @property
    def id(self) -> int: ...


def _path(cg: _CgroupLike):  # type: ignore[no-untyped-def]
    from pathlib import Path

    return Path(cg.path)  # type: ignore[arg-type]


def attach_devices(cg: _CgroupLike, rules: Sequence[CgroupDeviceRule]) -> None:
    """Enforce `rules` on the cgroup (empty: no program). Leaves nothing behind on failure."""
    from . import program

    program.apply(_path(cg), cg.id, rules)


def update_devices(cg: _CgroupLike, rules: Sequence[CgroupDeviceRule]) -> None:
    """Atomically replace the cgroup's rules (no new program); [] detaches; hot-plug = update."""
    from . import program

    program.apply(_path(cg), cg.id, rules)


def detach_devices(cg: _CgroupLike) -> None:
    """Detach our program and delete this cgroup's rule and denial entries. Idempotent."""
    from . import program

    program.detach(_path(cg), cg.id)


def read_device_denials(cg: _CgroupLike) -> dict[str, int]:
    """Denied accesses counted since attach, e.g. {"c 240:1 rw": 3}."""
    from . import program

    return program.denials(_path(cg), cg.id)
