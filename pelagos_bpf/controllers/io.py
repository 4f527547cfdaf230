"""io controller: io.bfq.weight (raw blkio weight) else io.weight (converted), per-device
weights the same way, and io.max.

Why the fallback is decided at apply time: io.bfq.weight only exists when BFQ is available,
which is a property of the new cgroup's directory, not of the config.
"""

from __future__ import annotations

from .. import convert
from ..config import CgroupConfig
from .base import Unsupported, Write

CONTROLLER = "io"


def _weight(setting: str, prefix: str, w: int) -> Write:
    """BFQ takes the blkio scale as is; io.weight (iocost) takes the converted 1..10000."""
    io_weight = f"{prefix}{convert.blkio_weight_to_io_weight(w)}"
    return Write(setting, CONTROLLER, "io.bfq.weight", f"{prefix}{w}", ("io.weight", io_weight))


def plan(cfg: CgroupConfig) -> list[Write]:
    out = []
    if cfg.blkio_weight is not None:
        out.append(_weight("blkio_weight", "", cfg.blkio_weight))
    for i, (major, minor, w) in enumerate(cfg.blkio_weight_device):
        out.append(_weight(f"blkio_weight_device[{i}]", f"{major}:{minor} ", w))
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
