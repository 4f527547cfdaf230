"""Per-controller planning: which cgroup v2 files a config writes, in the order to write them.

Each module (memory, cpu, cpuset, pids, io) has `plan(cfg) -> list[Write]` and
`unsupported(cfg) -> list[Unsupported]`; this package concatenates them. Pure: no file access.
"""

from __future__ import annotations

from ..config import CgroupConfig
from . import cpu, cpuset, io, memory, pids
from .base import Unsupported, Write

MODULES = (memory, cpu, cpuset, pids, io)

__all__ = ["MODULES", "Unsupported", "Write", "needed_controllers", "plan", "unsupported"]


def plan(cfg: CgroupConfig) -> list[Write]:
    """All controller-file writes for cfg, in application order."""
    return [w for mod in MODULES for w in mod.plan(cfg)]


def unsupported(cfg: CgroupConfig) -> list[Unsupported]:
    """Valid settings that cgroup v2 cannot express at all (e.g. memory_swappiness)."""
    return [u for mod in MODULES for u in mod.unsupported(cfg)]


def needed_controllers(writes: list[Write]) -> list[str]:
    """Controllers the writes need, first-use order, no duplicates."""
    return list(dict.fromkeys(w.controller for w in writes))
