"""memory controller: memory.swap.max, memory.max, memory.high, memory.low, memory.oom.group.

Why swap first: lowering memory.max below current usage while swap.max is still low can OOM;
runc writes swap.max before memory.max and we follow it.

`memory_check_before_update` (OCI memory.checkBeforeUpdate): cgroup v1 refused a limit below
current usage, v2 invokes the OOM killer instead. `preflight` restores the v1 behaviour on
update (as runc's fs2 does): it reads memory.current and refuses, before any write, a new
memory.max below it. A new cgroup has no usage yet, so setup needs no check.
"""

from __future__ import annotations

from pathlib import Path

from .. import convert
from ..config import CgroupConfig
from ..errors import ConfigError
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
    if cfg.memory_high is not None:
        high = convert.limit_str(cfg.memory_high)
        out.append(Write("memory_high", CONTROLLER, "memory.high", high))
    if cfg.memory_reservation is not None:
        low = convert.limit_str(cfg.memory_reservation)
        out.append(Write("memory_reservation", CONTROLLER, "memory.low", low))
    if cfg.memory_oom_group is not None:
        group = str(int(cfg.memory_oom_group))
        out.append(Write("memory_oom_group", CONTROLLER, "memory.oom.group", group))
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


def preflight(cgroup_dir: Path, cfg: CgroupConfig) -> None:
    """Update-time check of memory_check_before_update; raises ConfigError, writes nothing."""
    if not cfg.memory_check_before_update or cfg.memory_limit in (None, -1):
        return
    try:
        current = int((cgroup_dir / "memory.current").read_text())
    except (OSError, ValueError):
        return  # no memory controller here: the write itself reports that
    if cfg.memory_limit < current:
        raise ConfigError(
            "memory_limit",
            cfg.memory_limit,
            f"below current usage {current} (memory_check_before_update is set)",
        )
