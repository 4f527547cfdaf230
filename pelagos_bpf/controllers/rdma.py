"""rdma controller: rdma.max, one "DEVICE hca_handle=N hca_object=M" line per device."""

from __future__ import annotations

from ..config import CgroupConfig
from .base import Unsupported, Write

CONTROLLER = "rdma"


def plan(cfg: CgroupConfig) -> list[Write]:
    out = []
    for dev, (handles, objects) in cfg.rdma_limits.items():
        parts = [dev]
        if handles is not None:
            parts.append(f"hca_handle={handles}")
        if objects is not None:
            parts.append(f"hca_object={objects}")
        out.append(Write(f"rdma_limits[{dev!r}]", CONTROLLER, "rdma.max", " ".join(parts)))
    return out


def unsupported(cfg: CgroupConfig) -> list[Unsupported]:
    return []
