"""pids controller: pids.max (-1 -> "max")."""

from __future__ import annotations

from .. import convert
from ..config import CgroupConfig
from .base import Unsupported, Write

CONTROLLER = "pids"


def plan(cfg: CgroupConfig) -> list[Write]:
    if cfg.pids_limit is None:
        return []
    return [Write("pids_limit", CONTROLLER, "pids.max", convert.pids_max(cfg.pids_limit))]


def unsupported(cfg: CgroupConfig) -> list[Unsupported]:
    return []
