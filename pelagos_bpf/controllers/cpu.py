"""cpu controller: cpu.weight (from shares, log formula) and cpu.max ("QUOTA PERIOD")."""

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
    if cfg.cpu_quota is not None:
        quota, period = cfg.cpu_quota
        out.append(Write("cpu_quota", CONTROLLER, "cpu.max", convert.cpu_max(quota, period)))
    return out


def unsupported(cfg: CgroupConfig) -> list[Unsupported]:
    return []
