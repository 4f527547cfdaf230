"""memory controller: memory.swap.max, memory.max, memory.low (runc's order: swap first).

Why swap first: lowering memory.max below current usage while swap.max is still low can OOM;
runc writes swap.max before memory.max and we follow it.
"""

from __future__ import annotations

from .. import convert
from ..config import CgroupConfig
from .base import Unsupported, Write

CONTROLLER = "memory"


def plan(cfg: CgroupConfig) -> list[Write]:
    out = []
    if cfg.memory_swap is not None:
        swap = convert.swap_to_v2(cfg.memory_swap, cfg.memory_limit)
        out.append(Write("memory_swap", CONTROLLER, "memory.swap.max", convert.limit_str(swap)))
    if cfg.memory_limit is not None:
        out.append(
            Write("memory_limit", CONTROLLER, "memory.max", convert.limit_str(cfg.memory_limit))
        )
    if cfg.memory_reservation is not None:
        low = convert.limit_str(cfg.memory_reservation)
        out.append(Write("memory_reservation", CONTROLLER, "memory.low", low))
    return out


def unsupported(cfg: CgroupConfig) -> list[Unsupported]:
    if cfg.memory_swappiness is None:
        return []
    return [
        Unsupported(
            "memory_swappiness",
            "cgroup v2 has no per-cgroup swappiness file (memory.swappiness is v1 only)",
        )
    ]
