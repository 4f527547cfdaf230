"""io controller: io.bfq.weight (raw blkio weight) else io.weight (converted), and io.max.

Why the fallback is decided at apply time: io.bfq.weight only exists when BFQ is available,
which is a property of the new cgroup's directory, not of the config.
"""

from __future__ import annotations

from .. import convert
from ..config import CgroupConfig
from .base import Unsupported, Write

CONTROLLER = "io"


def plan(cfg: CgroupConfig) -> list[Write]:
    out = []
    if cfg.blkio_weight is not None:
        w = cfg.blkio_weight
        io_weight = str(convert.blkio_weight_to_io_weight(w))
        out.append(
            Write("blkio_weight", CONTROLLER, "io.bfq.weight", str(w), ("io.weight", io_weight))
        )
    lines = convert.io_max_lines(
        cfg.blkio_throttle_read_bps,
        cfg.blkio_throttle_write_bps,
        cfg.blkio_throttle_read_iops,
        cfg.blkio_throttle_write_iops,
    )
    for _dev, line, settings in lines:
        out.append(Write("+".join(settings), CONTROLLER, "io.max", line))
    return out


def unsupported(cfg: CgroupConfig) -> list[Unsupported]:
    return []
