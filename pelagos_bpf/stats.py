"""ResourceStats and read_stats: usage counters of a cgroup, 0 where a file is missing.

Why 0 and not an error: the seed documents it (controllers not enabled -> 0), and a runtime
polling stats must not fail because e.g. the memory controller lives on v1 on this host.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .cgroup import Cgroup


@dataclass
class ResourceStats:
    """The seed's three fields first, then what cgroup v2 adds."""

    memory_current_bytes: int = 0
    cpu_usage_ns: int = 0
    pids_current: int = 0
    memory_peak_bytes: int = 0
    memory_oom: int = 0
    memory_oom_kill: int = 0
    cpu_user_ns: int = 0
    cpu_system_ns: int = 0
    cpu_nr_periods: int = 0
    cpu_nr_throttled: int = 0
    cpu_throttled_ns: int = 0
    io_read_bytes: int = 0
    io_write_bytes: int = 0
    pids_events_max: int = 0
    # PSI: "cpu.some.avg10" -> percent, "memory.full.total" -> microseconds, ...
    pressure: dict[str, float] = field(default_factory=dict)
    device_denials: dict[str, int] = field(default_factory=dict)
    net: dict[str, int] = field(default_factory=dict)
    # The cgroup's `cgroup.controllers`: which counters above are real and which are 0 only
    # because the controller is absent (e.g. bound to cgroup v1 on a hybrid host).
    controllers: list[str] = field(default_factory=list)
    # Counter files this kernel lacks although their controller is on (memory.peak before
    # 5.19): their fields above are 0 for that reason, not measured.
    unavailable: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except OSError:  # missing file (controller off), or cgroup gone meanwhile
        return ""


def _int(path: Path) -> int:
    t = _text(path).strip()
    return int(t) if t.isdigit() else 0


def parse_flat_keyed(text: str) -> dict[str, int]:
    """ "key value" lines (cpu.stat, memory.events, pids.events) -> dict; bad lines ignored."""
    out = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].lstrip("-").isdigit():
            out[parts[0]] = int(parts[1])
    return out


def parse_io_stat(text: str) -> tuple[int, int]:
    """io.stat "MAJ:MIN rbytes=.. wbytes=.. ..." lines -> (read bytes, written bytes) summed."""
    rbytes = wbytes = 0
    for line in text.splitlines():
        for kv in line.split()[1:]:
            key, _, val = kv.partition("=")
            if key == "rbytes" and val.isdigit():
                rbytes += int(val)
            elif key == "wbytes" and val.isdigit():
                wbytes += int(val)
    return rbytes, wbytes


def parse_pressure(resource: str, text: str) -> dict[str, float]:
    """PSI "some avg10=.. avg60=.. avg300=.. total=.." -> {"cpu.some.avg10": .., ...}."""
    out = {}
    for line in text.splitlines():
        kind, *pairs = line.split() or [""]
        for kv in pairs:
            key, _, val = kv.partition("=")
            try:
                out[f"{resource}.{kind}.{key}"] = float(val)
            except ValueError:
                continue
    return out


def read_stats(cg: Cgroup) -> ResourceStats:
    """Read usage counters of cg; never raises for a missing controller file."""
    p = cg.path
    s = ResourceStats()
    s.controllers = _text(p / "cgroup.controllers").split()
    s.memory_current_bytes = _int(p / "memory.current")
    s.memory_peak_bytes = _int(p / "memory.peak")
    if "memory" in s.controllers and not (p / "memory.peak").exists():
        s.unavailable.append("memory.peak")
    events = parse_flat_keyed(_text(p / "memory.events"))
    s.memory_oom = events.get("oom", 0)
    s.memory_oom_kill = events.get("oom_kill", 0)
    cpu = parse_flat_keyed(_text(p / "cpu.stat"))
    s.cpu_usage_ns = cpu.get("usage_usec", 0) * 1000
    s.cpu_user_ns = cpu.get("user_usec", 0) * 1000
    s.cpu_system_ns = cpu.get("system_usec", 0) * 1000
    s.cpu_nr_periods = cpu.get("nr_periods", 0)
    s.cpu_nr_throttled = cpu.get("nr_throttled", 0)
    s.cpu_throttled_ns = cpu.get("throttled_usec", 0) * 1000
    s.pids_current = _int(p / "pids.current")
    s.pids_events_max = parse_flat_keyed(_text(p / "pids.events")).get("max", 0)
    s.io_read_bytes, s.io_write_bytes = parse_io_stat(_text(p / "io.stat"))
    for res in ("cpu", "memory", "io"):
        s.pressure.update(parse_pressure(res, _text(p / f"{res}.pressure")))
    if not (p / "cgroup.procs").exists():  # not (or no longer) a cgroup: no BPF to ask
        return s
    from . import devices, net  # lazy: keeps `import pelagos_bpf` light

    s.device_denials = dict(devices.read_device_denials(cg))
    s.net = dict(net.read_net_stats(cg))
    return s
