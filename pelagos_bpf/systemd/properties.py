"""CgroupConfig -> the unit properties systemd carries, and the file writes it cannot (pure).

Why properties and not files: systemd owns the settings of its units' cgroups and rewrites them
from its own unit state at every realize (daemon-reload, set-property). Measured on systemd 252
(tests/test_systemd_driver.py): after `daemon-reload` a delegated scope's io.weight,
memory.high, memory.oom.group, cpu.idle, cpu.weight, cpu.max and pids.max written as files are
back at systemd's values; what systemd carries as properties holds. Files systemd does not
manage (hugetlb.*, rdma.max, misc.*, cpu.max.burst) hold.

The mapping is runc's genV2ResourcesProperties (opencontainers/cgroups systemd/v2.go, common.go):
MemoryMax, MemoryLow, MemorySwapMax, CPUWeight (0 = idle, 252+), CPUQuotaPerSecUSec rounded up
to 10 ms + CPUQuotaPeriodUSec, TasksMax, AllowedCPUs, AllowedMemoryNodes, and its `unified`
conversions (MemoryHigh, MemoryMin, OOMPolicy). Beyond runc, because files would not survive a
reload: memory_high -> MemoryHigh, memory_oom_group -> OOMPolicy (scopes 251+), and io: IOWeight,
IODeviceWeight, IO{Read,Write}{Bandwidth,IOPS}Max with the device as "/dev/block/MAJ:MIN", a
path systemd parses without needing the node (240+, lookup_block_device). Each property is
checked against the systemd version that introduced it; older ones fall back to files, and
every setting's route says which, and whether daemon-reload keeps it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from .. import controllers, convert
from ..config import CgroupConfig
from ..controllers import Write
from ..errors import ConfigError
from .dbus import Property

INFINITY = 2**64 - 1  # systemd's CGROUP_LIMIT_MAX / USEC_INFINITY: "max"
USEC_PER_SEC = 1_000_000
QUOTA_STEP = 10_000  # systemd stores CPUQuota as a percentage: 10 ms of CPU per second

# The systemd version that introduced each property (NEWS, and the source for the scope cases).
SINCE: dict[str, int] = {
    "CPUQuotaPerSecUSec": 213,
    "TasksMax": 227,
    "IOWeight": 230,
    "IODeviceWeight": 230,
    "IOReadBandwidthMax": 230,
    "IOWriteBandwidthMax": 230,
    "IOReadIOPSMax": 230,
    "IOWriteIOPSMax": 230,
    "MemoryMax": 231,
    "MemoryLow": 231,
    "MemoryHigh": 231,
    "MemorySwapMax": 232,
    "CPUWeight": 232,
    "MemoryMin": 240,
    "CPUQuotaPeriodUSec": 242,
    "AllowedCPUs": 244,
    "AllowedMemoryNodes": 244,
    "BPFProgram": 249,
    "OOMPolicy": 251,  # on scopes (services had it since 243)
}
CPU_IDLE_SINCE = 252  # CPUWeight=0 means "idle" (runc's cpuIdleSupportedVersion)
IO_DEVNUM_PATH_SINCE = 240  # "/dev/block/MAJ:MIN" parsed without the node (systemd PR #11268)

# cgroup files systemd rewrites from its unit state at every realize, per version it started.
_MANAGED: tuple[tuple[str, int], ...] = (
    ("memory.min", 240),
    ("memory.low", 231),
    ("memory.high", 231),
    ("memory.max", 231),
    ("memory.swap.max", 232),
    ("memory.oom.group", 243),
    ("cpu.weight", 232),
    ("cpu.max", 232),
    ("cpu.idle", CPU_IDLE_SINCE),
    ("cpuset.cpus", 244),
    ("cpuset.mems", 244),
    ("io.weight", 230),
    ("io.bfq.weight", 230),
    ("io.max", 230),
    ("pids.max", 227),
)


def managed_by_systemd(filename: str, version: int) -> bool:
    """True when systemd `version` rewrites `filename` in its units' cgroups (so a value
    written there as a file is lost at the next daemon-reload or set-property)."""
    return any(filename == f and version >= v for f, v in _MANAGED)


@dataclass(frozen=True)
class Route:
    """Which path one setting took: "systemd" (a property) or "file" (written in the scope),
    what exactly, and whether it holds across daemon-reload."""

    setting: str
    via: str
    what: str
    reload_safe: bool


@dataclass
class Plan:
    """properties for StartTransientUnit/SetUnitProperties, files to write in the delegated
    scope after it (controllers.Write, in order), and one route per setting."""

    version: int
    properties: list[Property] = field(default_factory=list)
    files: list[Write] = field(default_factory=list)
    routes: list[Route] = field(default_factory=list)

    def unsafe(self) -> list[Route]:
        """Settings written as files that systemd rewrites: lost at the next daemon-reload."""
        return [r for r in self.routes if not r.reload_safe]


def has(version: int, prop: str) -> bool:
    return version >= SINCE[prop]


def cpuset_bits(text: str, setting: str) -> bytes:
    """ "0-2,5" -> the byte mask systemd takes for AllowedCPUs (byte i bit j = CPU 8i+j), as
    runc's RangeToBits; ConfigError naming `setting` if malformed or empty."""
    mask = 0
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        lo, sep, hi = part.partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()):
            raise ConfigError(setting, text, f"{part!r} is not N or N-M")
        first, last = int(lo), int(hi) if sep else int(lo)
        if first > last:
            raise ConfigError(setting, text, f"range {part!r} runs backwards")
        mask |= ((1 << (last - first + 1)) - 1) << first
    if mask == 0:
        raise ConfigError(setting, text, "names no CPU or memory node")
    return mask.to_bytes((mask.bit_length() + 7) // 8, "little")


def quota_per_sec(quota: int, period: int) -> int:
    """CPUQuotaPerSecUSec for cpu.max "quota period": INFINITY for no limit, else rounded up
    to a multiple of 10 ms (systemd keeps a percentage; runc rounds up the same way)."""
    if quota <= 0:
        return INFINITY
    per_sec = quota * USEC_PER_SEC // period
    return -(-per_sec // QUOTA_STEP) * QUOTA_STEP


def _limit(value: int) -> int:
    return INFINITY if value < 0 else value


def _devpath(major: int, minor: int) -> str:
    return f"/dev/block/{major}:{minor}"


class _Builder:
    def __init__(self, version: int) -> None:
        self.plan = Plan(version)
        self.props: dict[str, Property] = {}  # later wins: `unified` overrides typed settings
        self.carried: set[str] = set()  # settings whose file writes systemd makes unneeded

    def prop(self, setting: str, name: str, sig: str, value: object, what: str = "") -> bool:
        if not has(self.plan.version, name):
            return False
        self.props[name] = Property(name, sig, value)
        shown = what or f"{name}={value}"
        self.plan.routes.append(Route(setting, "systemd", shown, True))
        self.carried.add(setting)
        return True

    def route_files(self, writes: Iterable[Write], why: dict[str, str]) -> None:
        v = self.plan.version
        for w in writes:
            if w.setting in self.carried:
                continue
            self.plan.files.append(w)
            files = [f for f, _ in w.files()]
            safe = not any(managed_by_systemd(f, v) for f in files)
            reason = why.get(w.setting) or (
                "systemd does not manage this file" if safe else "no systemd property for it"
            )
            shown = " or ".join(files)
            if not any(r.setting == w.setting and r.via == "file" for r in self.plan.routes):
                self.plan.routes.append(Route(w.setting, "file", f"{shown} ({reason})", safe))


def plan(cfg: CgroupConfig, version: int) -> Plan:
    """Properties and file fallbacks for cfg on systemd `version` (pure; cfg validated)."""
    b = _Builder(version)
    why: dict[str, str] = {}
    _memory(cfg, b, why)
    _cpu(cfg, b, why)
    _tasks_cpuset(cfg, b, why)
    _io(cfg, b, why)
    _unified(cfg, b, why)
    b.plan.properties = list(b.props.values())
    b.route_files(controllers.plan(cfg), why)
    return b.plan


def _too_old(prop: str, version: int) -> str:
    return f"systemd {version} lacks {prop}= (since {SINCE[prop]})"


def _memory(cfg: CgroupConfig, b: _Builder, why: dict[str, str]) -> None:
    v = b.plan.version
    for setting, value, name in (
        ("memory_limit", cfg.memory_limit, "MemoryMax"),
        ("memory_reservation", cfg.memory_reservation, "MemoryLow"),
        ("memory_high", cfg.memory_high, "MemoryHigh"),
    ):
        if value is not None and not b.prop(setting, name, "t", _limit(value)):
            why[setting] = _too_old(name, v)
    if cfg.memory_swap is not None:
        swap = convert.swap_to_v2(cfg.memory_swap, cfg.memory_limit)
        if not b.prop("memory_swap", "MemorySwapMax", "t", _limit(swap)):
            why["memory_swap"] = _too_old("MemorySwapMax", v)
    if cfg.memory_oom_group is not None:
        policy = "kill" if cfg.memory_oom_group else "continue"
        if not b.prop("memory_oom_group", "OOMPolicy", "s", policy):
            why["memory_oom_group"] = _too_old("OOMPolicy", v)


def _cpu(cfg: CgroupConfig, b: _Builder, why: dict[str, str]) -> None:
    v = b.plan.version
    idle = cfg.cpu_idle == 1 and v >= CPU_IDLE_SINCE
    if idle:
        b.prop("cpu_idle", "CPUWeight", "t", 0, "CPUWeight=idle")
    elif cfg.cpu_idle == 1:
        why["cpu_idle"] = f"systemd {v} has no CPUWeight=idle (since {CPU_IDLE_SINCE})"
    elif cfg.cpu_idle == 0 and v >= CPU_IDLE_SINCE:  # systemd writes cpu.idle 0 itself
        b.plan.routes.append(
            Route("cpu_idle", "systemd", "cpu.idle 0 (CPUWeight is not idle)", True)
        )
        b.carried.add("cpu_idle")
    if cfg.cpu_shares:
        weight = convert.shares_to_weight(cfg.cpu_shares)
        if idle:  # as runc: systemd has one CPUWeight, and idle takes it
            reason = "superseded by cpu_idle=1 (CPUWeight=idle; the kernel ignores an idle weight)"
            b.plan.routes.append(Route("cpu_shares", "systemd", reason, True))
            b.carried.add("cpu_shares")
        elif not b.prop("cpu_shares", "CPUWeight", "t", weight):
            why["cpu_shares"] = _too_old("CPUWeight", v)
    if cfg.cpu_quota is not None:
        _quota(cfg.cpu_quota, "cpu_quota", b, why)


def _quota(quota_period: tuple[int, int], setting: str, b: _Builder, why: dict[str, str]) -> None:
    """runc's addCPUQuota. systemd's cpu.max is exact only when the quota is a whole number of
    10 ms per second and the period is carried; otherwise the exact cpu.max is also written as
    a file (as runc does), which daemon-reload turns back into systemd's value."""
    v = b.plan.version
    quota, period = quota_period
    if not has(v, "CPUQuotaPerSecUSec"):
        why[setting] = _too_old("CPUQuotaPerSecUSec", v)
        return
    per_sec = quota_per_sec(quota, period)
    exact = per_sec == INFINITY or per_sec * period == quota * USEC_PER_SEC
    has_period = has(v, "CPUQuotaPeriodUSec")
    if has_period:
        b.props["CPUQuotaPeriodUSec"] = Property("CPUQuotaPeriodUSec", "t", period)
    b.props["CPUQuotaPerSecUSec"] = Property("CPUQuotaPerSecUSec", "t", per_sec)
    if exact and (has_period or period == convert.DEFAULT_CFS_PERIOD):
        shown = "max" if per_sec == INFINITY else f"{per_sec} us/s"
        b.plan.routes.append(
            Route(
                setting, "systemd", f"CPUQuotaPerSecUSec={shown} CPUQuotaPeriodUSec={period}", True
            )
        )
        b.carried.add(setting)
        return
    held = per_sec * period // USEC_PER_SEC if has_period else per_sec // 10
    why[setting] = (
        f"systemd holds cpu.max {held} {period if has_period else convert.DEFAULT_CFS_PERIOD}"
        " (CPUQuota rounded up to 10 ms/s"
        + ("" if has_period else f"; {_too_old('CPUQuotaPeriodUSec', v)}")
        + "); the exact value is written and lost at daemon-reload"
    )


def _tasks_cpuset(cfg: CgroupConfig, b: _Builder, why: dict[str, str]) -> None:
    v = b.plan.version
    if cfg.pids_limit is not None:
        if cfg.pids_limit == 0:  # systemd refuses TasksMax=0; runc maps only > 0 and -1
            why["pids_limit"] = "systemd refuses TasksMax=0"
        elif not b.prop("pids_limit", "TasksMax", "t", _limit(cfg.pids_limit)):
            why["pids_limit"] = _too_old("TasksMax", v)
    for setting, text, name in (
        ("cpuset_cpus", cfg.cpuset_cpus, "AllowedCPUs"),
        ("cpuset_mems", cfg.cpuset_mems, "AllowedMemoryNodes"),
    ):
        if text is None:
            continue
        bits = cpuset_bits(text, setting)
        if not b.prop(setting, name, "ay", bits, f"{name}={text.strip()}"):
            why[setting] = _too_old(name, v)


_IO_PROPS = {
    "blkio_throttle_read_bps": "IOReadBandwidthMax",
    "blkio_throttle_write_bps": "IOWriteBandwidthMax",
    "blkio_throttle_read_iops": "IOReadIOPSMax",
    "blkio_throttle_write_iops": "IOWriteIOPSMax",
}


def _io(cfg: CgroupConfig, b: _Builder, why: dict[str, str]) -> None:
    v = b.plan.version
    if cfg.blkio_weight:  # 0 means unset (moby writes it), as controllers.io
        weight = convert.blkio_weight_to_io_weight(cfg.blkio_weight)
        if not b.prop("blkio_weight", "IOWeight", "t", weight):
            why["blkio_weight"] = _too_old("IOWeight", v)
    devices_ok = v >= IO_DEVNUM_PATH_SINCE
    no_devpath = f"systemd {v} needs a device node path for IO*= (MAJ:MIN paths since 240)"
    if cfg.blkio_weight_device:
        entries = [
            (_devpath(ma, mi), convert.blkio_weight_to_io_weight(w))
            for ma, mi, w in cfg.blkio_weight_device
        ]
        for i in range(len(cfg.blkio_weight_device)):
            setting = f"blkio_weight_device[{i}]"
            if not devices_ok:
                why[setting] = no_devpath
            elif not b.prop(setting, "IODeviceWeight", "a(st)", entries):
                why[setting] = _too_old("IODeviceWeight", v)
    lists = {
        "blkio_throttle_read_bps": cfg.blkio_throttle_read_bps,
        "blkio_throttle_write_bps": cfg.blkio_throttle_write_bps,
        "blkio_throttle_read_iops": cfg.blkio_throttle_read_iops,
        "blkio_throttle_write_iops": cfg.blkio_throttle_write_iops,
    }
    carried_lists = set()
    for setting, items in lists.items():
        if not items:
            continue
        name = _IO_PROPS[setting]
        # the last rate of a device listed twice wins, as io_max_lines
        entries = list({(ma, mi): (_devpath(ma, mi), rate) for ma, mi, rate in items}.values())
        if not devices_ok:
            why[setting] = no_devpath
        elif b.prop(setting, name, "a(st)", entries):
            carried_lists.add(setting)
        else:
            why[setting] = _too_old(name, v)
    # io.max writes are per device and name the lists joined by "+": carried if all were
    for _dev, _line, settings in convert.io_max_lines(*lists.values()):
        joined = "+".join(settings)
        if set(settings) <= carried_lists:
            b.carried.add(joined)
        else:
            why[joined] = "; ".join(why[s] for s in settings if s in why)


def _unified_num(key: str, value: str) -> int:
    v = value.strip()
    if v == "max":
        return INFINITY
    if not v.isdigit():
        raise ConfigError(f"unified[{key!r}]", value, "not a number or 'max'")
    return int(v)


_UNIFIED_MEMORY = {
    "memory.high": "MemoryHigh",
    "memory.low": "MemoryLow",
    "memory.min": "MemoryMin",
    "memory.max": "MemoryMax",
    "memory.swap.max": "MemorySwapMax",
}


def _unified(cfg: CgroupConfig, b: _Builder, why: dict[str, str]) -> None:
    """runc's unifiedResToSystemdProps; values are parsed strictly (ConfigError naming the key),
    since systemd, not the kernel, would be the one to read them."""
    v = b.plan.version
    for key, value in cfg.unified.items():
        setting = f"unified[{key!r}]"
        text = value.strip()
        name: str | None = None
        if key in _UNIFIED_MEMORY:
            name = _UNIFIED_MEMORY[key]
            ok = b.prop(setting, name, "t", _unified_num(key, text))
        elif key == "pids.max":
            name = "TasksMax"
            num = _unified_num(key, text)
            ok = num != 0 and b.prop(setting, name, "t", num)
        elif key == "cpu.weight":
            name = "CPUWeight"
            num = _unified_num(key, text)
            ok = 1 <= num <= convert.WEIGHT_MAX and b.prop(setting, name, "t", num)
        elif key == "cpu.idle" and text == "1" and v >= CPU_IDLE_SINCE:
            ok = b.prop(setting, "CPUWeight", "t", 0, "CPUWeight=idle")
        elif key == "cpu.max":
            parts = text.split()
            if len(parts) not in (1, 2) or not all(p.isdigit() for p in parts[1:]):
                raise ConfigError(setting, value, "cpu.max is 'QUOTA [PERIOD]' or 'max [PERIOD]'")
            quota = -1 if parts[0] == "max" else _unified_num(key, parts[0])
            period = int(parts[1]) if len(parts) == 2 else convert.DEFAULT_CFS_PERIOD
            _quota((quota, period), setting, b, why)
            continue
        elif key in ("cpuset.cpus", "cpuset.mems"):
            name = "AllowedCPUs" if key == "cpuset.cpus" else "AllowedMemoryNodes"
            ok = b.prop(setting, name, "ay", cpuset_bits(text, setting), f"{name}={text}")
        elif key == "memory.oom.group" and text in ("0", "1"):
            name = "OOMPolicy"
            ok = b.prop(setting, name, "s", "kill" if text == "1" else "continue")
        else:
            continue  # a file systemd has no property for: route_files says which
        if not ok and name is not None:
            why[setting] = _too_old(name, v) if not has(v, name) else "value systemd refuses"
