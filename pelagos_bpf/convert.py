"""Pure unit conversions from cgroup v1 / OCI units to cgroup v2 file values.

Why pure: these are the semantics runtimes disagree on; unit tests pin them with the vectors
runc/crun/youki use (docs/OCI.md names each peer and version) without needing a kernel.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence

from .errors import ConfigError

Throttle = tuple[int, int, int]

SHARES_MIN = 2
SHARES_MAX = 262_144
WEIGHT_MIN = 1
WEIGHT_MAX = 10_000
BLKIO_WEIGHT_MIN = 10
BLKIO_WEIGHT_MAX = 1000
DEFAULT_CFS_PERIOD = 100_000


def shares_to_weight(shares: int) -> int:
    """cpu shares -> cpu.weight with the 2025 log formula (runc, crun, youki); 0 means unset.

    w = ceil(10^((l^2 + 125 l)/612 - 7/34)), l = log2(shares). Maps 2 -> 1, 1024 -> 100,
    262144 -> 10000. A result within 1e-9 of an integer is that integer: float error would
    otherwise turn the exact 100 of 1024 shares into ceil(100.00000000000001) = 101.
    """
    if shares == 0:
        return 0
    if shares <= SHARES_MIN:
        return WEIGHT_MIN
    if shares >= SHARES_MAX:
        return WEIGHT_MAX
    lg = math.log2(shares)
    value = 10 ** ((lg * lg + 125 * lg) / 612 - 7 / 34)
    nearest = round(value)
    if abs(value - nearest) < 1e-9:
        return int(nearest)
    return math.ceil(value)


def blkio_weight_to_io_weight(weight: int) -> int:
    """blkio weight (10..1000) -> io.weight (1..10000): 1 + (w - 10) * 9999 // 990 (runc).

    0 stays 0 ("unset"), as runc's ConvertBlkIOToIOWeightValue: moby writes weight 0 into every
    container, and the formula would otherwise give -100.
    """
    if weight == 0:
        return 0
    return 1 + (weight - BLKIO_WEIGHT_MIN) * 9999 // (BLKIO_WEIGHT_MAX - BLKIO_WEIGHT_MIN)


def swap_to_v2(swap: int, memory: int | None) -> int:
    """OCI memory+swap -> memory.swap.max (swap only), as runc's ConvertMemorySwapToCgroupV2Value.

    Returns -1 for "max". `memory` None (unset) behaves as runc's 0. Errors name memory_swap.
    """
    mem = 0 if memory is None else memory
    if mem == -1 and swap == 0:
        return -1
    if swap in (-1, 0):
        return swap
    if mem == -1:
        return swap
    if mem == 0:
        raise ConfigError("memory_swap", swap, "unable to set swap limit without memory limit")
    if mem < 0:
        raise ConfigError("memory_swap", swap, f"invalid memory limit {mem} for swap")
    if swap < mem:
        raise ConfigError(
            "memory_swap",
            swap,
            f"must be >= memory_limit ({mem}): OCI swap is memory+swap",
        )
    return swap - mem


def limit_str(value: int) -> str:
    """-1 -> "max" (no limit), else the number, as v2 *.max files spell it."""
    return "max" if value == -1 else str(value)


def cpu_max(quota: int, period: int = DEFAULT_CFS_PERIOD) -> str:
    """cpu.max content: "QUOTA PERIOD"; a quota <= 0 -> "max" (runc fs2, crun, youki)."""
    q = "max" if quota <= 0 else str(quota)
    return f"{q} {period}"


def pids_max(limit: int) -> str:
    """pids.max content: negative -> "max"; 0 is a real limit (runtime-spec v1.3, runc 1.4)."""
    return "max" if limit < 0 else str(limit)


_PAGE_RE = re.compile(r"^([1-9][0-9]*)([KMG])B$")


def hugepage_size(text: str) -> int:
    """OCI pageSize ("64KB", "2MB", "1GB"; base 1024) -> bytes; ValueError if malformed."""
    m = _PAGE_RE.match(text) if isinstance(text, str) else None
    if not m:
        raise ValueError(f"page size {text!r} is not <number>KB|MB|GB (e.g. 2MB)")
    return int(m.group(1)) << {"K": 10, "M": 20, "G": 30}[m.group(2)]


def hugetlb_name(size: int) -> str:
    """Bytes -> the kernel's hugetlb file infix (mm/hugetlb_cgroup.c mem_fmt): 2MB, 1GB, 64KB."""
    for shift, unit in ((30, "GB"), (20, "MB"), (10, "KB")):
        if size >= 1 << shift and size % (1 << shift) == 0:
            return f"{size >> shift}{unit}"
    return f"{size}B"


IO_MAX_KEYS = (
    ("blkio_throttle_read_bps", "rbps"),
    ("blkio_throttle_write_bps", "wbps"),
    ("blkio_throttle_read_iops", "riops"),
    ("blkio_throttle_write_iops", "wiops"),
)


def io_max_lines(
    read_bps: Sequence[Throttle] = (),
    write_bps: Sequence[Throttle] = (),
    read_iops: Sequence[Throttle] = (),
    write_iops: Sequence[Throttle] = (),
) -> list[tuple[tuple[int, int], str, list[str]]]:
    """Group the four throttle lists per device into io.max lines.

    Returns ((major, minor), "MAJ:MIN rbps=.. wbps=..", [settings that contributed]) in order
    of first appearance; one line per device because the kernel parses one device per write.
    A device listed twice in one list keeps its last rate (as the kernel would after two
    writes; runc's update.bats requires such a config to run).
    """
    lists: Iterable[tuple[str, str, Sequence[Throttle]]] = zip(
        (s for s, _ in IO_MAX_KEYS),
        (k for _, k in IO_MAX_KEYS),
        (read_bps, write_bps, read_iops, write_iops),
        strict=True,
    )
    devices: dict[tuple[int, int], dict[str, tuple[str, int]]] = {}
    for setting, key, items in lists:
        for major, minor, rate in items:
            devices.setdefault((major, minor), {})[key] = (setting, rate)
    out = []
    for (major, minor), parts in devices.items():
        kv = " ".join(f"{key}={rate}" for key, (_, rate) in parts.items())
        settings = list(dict.fromkeys(s for s, _ in parts.values()))
        out.append(((major, minor), f"{major}:{minor} {kv}", settings))
    return out


_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtpe]?)(i?b?)\s*$", re.IGNORECASE | re.ASCII)
_UNITS = "kmgtpe"


def parse_size(text: str | int) -> int:
    """Parse "256M", "1G", "512k", "1.5g" or "4096" to bytes (binary units as docker); -1 stays."""
    if isinstance(text, int):
        return text
    s = text.strip()
    if s in ("-1", "max"):
        return -1
    m = _SIZE_RE.match(s)
    if not m:
        raise ValueError(f"not a size: {text!r} (use e.g. 256M, 1G, 512k or bytes)")
    num, unit, _suffix = m.groups()
    mult = 1024 ** (_UNITS.index(unit.lower()) + 1) if unit else 1
    value = float(num) * mult if "." in num else int(num) * mult
    return int(value)


def format_size(n: int) -> str:
    """Bytes -> short human text ("256.0 MiB", "512 B"); -1 -> "max"."""
    if n == -1:
        return "max"
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024:
            return f"{value:.1f} {unit}"
    return f"{value:.1f} EiB"
