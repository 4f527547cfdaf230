"""cpuset controller: cpuset.cpus and cpuset.mems (syntax checked by validate.py first)."""

from __future__ import annotations

from ..config import CgroupConfig
from .base import Unsupported, Write

CONTROLLER = "cpuset"


def plan(cfg: CgroupConfig) -> list[Write]:
    out = []
    if cfg.cpuset_cpus is not None:
        out.append(Write("cpuset_cpus", CONTROLLER, "cpuset.cpus", cfg.cpuset_cpus.strip()))
    if cfg.cpuset_mems is not None:
        out.append(Write("cpuset_mems", CONTROLLER, "cpuset.mems", cfg.cpuset_mems.strip()))
    return out


def unsupported(cfg: CgroupConfig) -> list[Unsupported]:
    return []
