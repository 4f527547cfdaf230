"""Per-controller planning: which cgroup v2 files a config writes, in the order to write them.

Each module (memory, cpu, cpuset, pids, io, hugetlb, rdma, unified) has
`plan(cfg) -> list[Write]` and `unsupported(cfg) -> list[Unsupported]`; this package
concatenates them. `plan` is pure; `unsupported` may read sysfs (hugetlb page sizes);
`preflight` reads the live cgroup before an update writes anything.
"""

from __future__ import annotations

from pathlib import Path

from ..config import CgroupConfig
from . import cpu, cpuset, hugetlb, io, memory, pids, rdma, unified
from .base import Unsupported, Write

MODULES = (memory, cpu, cpuset, pids, io, hugetlb, rdma, unified)  # unified last, as runc

__all__ = [
    "MODULES",
    "Unsupported",
    "Write",
    "named_settings",
    "needed_controllers",
    "plan",
    "preflight",
    "unsupported",
]


def plan(cfg: CgroupConfig) -> list[Write]:
    """All controller-file writes for cfg, in application order."""
    return [w for mod in MODULES for w in mod.plan(cfg)]


def unsupported(cfg: CgroupConfig) -> list[Unsupported]:
    """Valid settings that cgroup v2 cannot express at all (e.g. memory_swappiness)."""
    return [u for mod in MODULES for u in mod.unsupported(cfg)]


def named_settings(cfg: CgroupConfig) -> list[str]:
    """The controller settings cfg names (what it would write, or refuse as v2-less)."""
    out = [w.setting for w in plan(cfg)] + [u.setting for u in unsupported(cfg)]
    return list(dict.fromkeys(s.split("[")[0] for s in out))


def needed_controllers(writes: list[Write]) -> list[str]:
    """Controllers the writes need, first-use order, no duplicates."""
    return list(dict.fromkeys(w.controller for w in writes))


def preflight(cgroup_dir: Path, cfg: CgroupConfig) -> None:
    """Checks against the live cgroup before an update writes (memory_check_before_update)."""
    memory.preflight(cgroup_dir, cfg)
