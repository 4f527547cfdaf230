"""cpu controller: cpu.weight (from shares, log formula), cpu.max, cpu.max.burst, cpu.idle.

Why burst is written around cpu.max: the kernel refuses any state where burst > quota, in
either file. With both set, writing burst 0, then cpu.max, then the burst passes from any old
state to the (validated) new one; runc retries the writes in the other order instead.
"""

from __future__ import annotations

from .. import convert
from ..config import CgroupConfig
from .base import Unsupported, Write

CONTROLLER = "cpu"


def plan(cfg: CgroupConfig) -> list[Write]:
    out = []
    if cfg.cpu_shares is not None:
        weight = convert.shares_to_weight(cfg.cpu_shares)
        out.append(Write("cpu_shares", CONTROLLER, "cpu.weight", str(weight)))
    burst = (
        None
        if cfg.cpu_burst is None
        else Write("cpu_burst", CONTROLLER, "cpu.max.burst", str(cfg.cpu_burst))
    )
    if cfg.cpu_quota is not None:
        if burst is not None:
            out.append(Write("cpu_burst", CONTROLLER, "cpu.max.burst", "0"))
        quota, period = cfg.cpu_quota
        out.append(Write("cpu_quota", CONTROLLER, "cpu.max", convert.cpu_max(quota, period)))
    if burst is not None:
        out.append(burst)
    if cfg.cpu_idle is not None:
        out.append(Write("cpu_idle", CONTROLLER, "cpu.idle", str(cfg.cpu_idle)))
    return out


def unsupported(cfg: CgroupConfig) -> list[Unsupported]:
    return []
