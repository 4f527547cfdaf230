"""ResourceStats and read_stats: usage counters of a cgroup, 0 where a file is missing.

Why 0 and not an error: a controller that is not enabled reads as 0 (documented), and a runtime
polling stats must not fail because e.g. the memory controller lives on v1 on this host.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from .cgroup import Cgroup
from .cgroupfs import read_at


@dataclass
class ResourceStats:
    """The three historical fields first, then what cgroup v2 adds."""

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


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _open_dir(path: str | os.PathLike[str]) -> int | None:
    try:
        return os.open(path, _DIR_FLAGS)
    except OSError:  # gone meanwhile, or not a directory: every counter stays 0
        return None


def _read(dfd: int, name: str) -> str:
    """A cgroupfs file relative to the cgroup's dir fd; "" when it cannot be read (missing
    controller, removed cgroup): a stats poll reports what it can."""
    try:
        return read_at(dfd, name)
    except OSError:
        return ""


def _int(text: str) -> int:
    t = text.strip()
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


def _files_stats(dfd: int) -> ResourceStats:
    """The counters kept in the cgroup's own files."""
    s = ResourceStats()
    s.controllers = _read(dfd, "cgroup.controllers").split()
    s.memory_current_bytes = _int(_read(dfd, "memory.current"))
    peak = _read(dfd, "memory.peak")
    s.memory_peak_bytes = _int(peak)
    if "memory" in s.controllers and not peak:  # memory.peak: 5.19+
        s.unavailable.append("memory.peak")
    events = parse_flat_keyed(_read(dfd, "memory.events"))
    s.memory_oom = events.get("oom", 0)
    s.memory_oom_kill = events.get("oom_kill", 0)
    cpu = parse_flat_keyed(_read(dfd, "cpu.stat"))
    s.cpu_usage_ns = cpu.get("usage_usec", 0) * 1000
    s.cpu_user_ns = cpu.get("user_usec", 0) * 1000
    s.cpu_system_ns = cpu.get("system_usec", 0) * 1000
    s.cpu_nr_periods = cpu.get("nr_periods", 0)
    s.cpu_nr_throttled = cpu.get("nr_throttled", 0)
    s.cpu_throttled_ns = cpu.get("throttled_usec", 0) * 1000
    s.pids_current = _int(_read(dfd, "pids.current"))
    s.pids_events_max = parse_flat_keyed(_read(dfd, "pids.events")).get("max", 0)
    s.io_read_bytes, s.io_write_bytes = parse_io_stat(_read(dfd, "io.stat"))
    for res in ("cpu", "memory", "io"):
        s.pressure.update(parse_pressure(res, _read(dfd, f"{res}.pressure")))
    return s


def _is_cgroup(dfd: int) -> bool:
    try:
        os.stat("cgroup.procs", dir_fd=dfd)
    except OSError:
        return False
    return True


def read_stats(cg: Cgroup, *, bpf: bool = True) -> ResourceStats:
    """Read usage counters of cg; never raises for a missing controller file.

    bpf=False leaves out the BPF counters (device denials, net bytes): what a non-root
    reader can still see."""
    dfd = _open_dir(cg.path)
    if dfd is None:
        return ResourceStats()
    try:
        s = _files_stats(dfd)
        if not bpf or not _is_cgroup(dfd):  # not (or no longer) a cgroup: no BPF to ask
            return s
    finally:
        os.close(dfd)
    from . import devices, net  # lazy: keeps `import pelagos_bpf` light

    s.device_denials = dict(devices.read_device_denials(cg))
    s.net = dict(net.read_net_stats(cg))
    return s


def read_stats_many(cgs: Sequence[Cgroup]) -> list[ResourceStats]:
    """read_stats for many cgroups in one call (a node agent's poll), in the order given.

    Shares the BPF work: each program found attached is opened once, and the shared denial map
    walked once, for all the cgroups it serves, instead of once per cgroup (a walk of the whole
    map each time). Gives the same values as read_stats on each.
    """
    out: list[ResourceStats] = []
    live: list[tuple[int, int, Cgroup]] = []  # (index in out, dir fd, cgroup) for BPF
    try:
        for cg in cgs:
            dfd = _open_dir(cg.path)
            if dfd is None:
                out.append(ResourceStats())
                continue
            out.append(_files_stats(dfd))
            if _is_cgroup(dfd):
                live.append((len(out) - 1, dfd, cg))
            else:
                os.close(dfd)
        if live:
            _bpf_stats_many(live, out)
    finally:
        for _, dfd, _cg in live:
            os.close(dfd)
    return out


def _bpf_stats_many(live: list[tuple[int, int, Cgroup]], out: list[ResourceStats]) -> None:
    """Device denials and net counters of many cgroups; the shared denial map is walked once."""
    from . import devices, net  # lazy: keeps `import pelagos_bpf` light

    cgs = [cg for _, _, cg in live]
    for (i, _, cg), denied in zip(live, devices.program.denials_many(cgs), strict=True):
        out[i].device_denials = denied
        out[i].net = dict(net.read_net_stats(cg))
