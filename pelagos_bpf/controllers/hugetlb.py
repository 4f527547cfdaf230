"""hugetlb controller: hugetlb.<size>.max and, where the kernel has it, hugetlb.<size>.rsvd.max.

Why both: runtime-spec v1.3 asks for reservation limits where supported (no SIGBUS at fault
time) and fault limits otherwise; runc writes both. The rsvd write falls back to rewriting
.max (an idempotent write) on kernels before 5.7, so no new Write kind is needed.
Which page sizes exist is read from /sys/kernel/mm/hugepages at plan time (read-only), so an
absent size is named before anything is created.
"""

from __future__ import annotations

import os

from .. import convert
from ..config import CgroupConfig
from .base import Unsupported, Write

CONTROLLER = "hugetlb"
HUGEPAGES_DIR = "/sys/kernel/mm/hugepages"  # a module constant so tests can point elsewhere


def page_sizes(directory: str | None = None) -> list[int]:
    """Huge page sizes (bytes) this kernel offers: hugepages-<N>kB entries."""
    try:
        names = os.listdir(directory or HUGEPAGES_DIR)
    except OSError:
        return []
    sizes = []
    for n in names:
        if n.startswith("hugepages-") and n.endswith("kB") and n[10:-2].isdigit():
            sizes.append(int(n[10:-2]) << 10)
    return sorted(sizes)


def plan(cfg: CgroupConfig) -> list[Write]:
    out = []
    for i, (size, limit) in enumerate(cfg.hugepage_limits):
        name = convert.hugetlb_name(convert.hugepage_size(size))
        value = convert.limit_str(limit)
        setting = f"hugepage_limits[{i}]"
        out.append(Write(setting, CONTROLLER, f"hugetlb.{name}.max", value))
        rsvd = Write(
            setting, CONTROLLER, f"hugetlb.{name}.rsvd.max", value, (f"hugetlb.{name}.max", value)
        )
        out.append(rsvd)
    return out


def unsupported(cfg: CgroupConfig) -> list[Unsupported]:
    if not cfg.hugepage_limits:
        return []
    offered = page_sizes()
    have = ", ".join(convert.hugetlb_name(s) for s in offered) or "none"
    out = []
    for i, (size, _limit) in enumerate(cfg.hugepage_limits):
        if convert.hugepage_size(size) not in offered:
            out.append(
                Unsupported(
                    f"hugepage_limits[{i}]",
                    f"page size {size} is not offered by this kernel ({HUGEPAGES_DIR} has: {have})",
                )
            )
    return out
