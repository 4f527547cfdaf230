"""How stats and setup reports are printed (text) and serialised (JSON, `"schema": 1`).

JSON rule: a counter of a controller the cgroup does not have is null, never 0, so a script
can tell "nothing used" from "not measured" (e.g. memory on a hybrid host, bound to v1).
"""

from __future__ import annotations

from typing import Any

from .. import convert
from ..cgroup import SetupReport
from ..stats import ResourceStats
from .common import flag_for

SCHEMA = 1

# ResourceStats field prefix -> the controller whose files it comes from (cpu usage_* and PSI
# exist without any controller).
_NEEDS = (
    ("memory_", "memory"),
    ("pids_", "pids"),
    ("io_", "io"),
    ("cpu_nr_", "cpu"),
    ("cpu_throttled", "cpu"),
)


def stats_json(s: ResourceStats) -> dict[str, Any]:
    """to_dict() with absent controllers' counters as None."""
    out = s.to_dict()
    for key in out:
        ctrl = next((c for prefix, c in _NEEDS if key.startswith(prefix)), None)
        if ctrl is not None and ctrl not in s.controllers:
            out[key] = None
    return out


def report_json(report: SetupReport, rule_offset: int = 0) -> dict[str, Any]:
    return {
        "applied": list(report.applied),
        "skipped": [
            {"setting": s, "flag": flag_for(s, rule_offset), "reason": r} for s, r in report.skipped
        ],
        "written": [{"file": f, "value": v} for f, v in report.written],
    }


def report_lines(report: SetupReport, rule_offset: int = 0) -> list[str]:
    lines = []
    if report.applied:
        lines.append("applied: " + ", ".join(flag_for(s, rule_offset) for s in report.applied))
    lines += [f"skipped: {flag_for(s, rule_offset)}: {r}" for s, r in report.skipped]
    return lines


def _controller_line(s: ResourceStats, ctrl: str, line: str) -> str:
    """The line, or a note that its counters are absent (not zero) in this cgroup."""
    if ctrl in s.controllers:
        return line
    return f"{line.split(':')[0]}:{' ' * (7 - len(ctrl))}n/a (no {ctrl} controller in this cgroup)"


def format_stats(s: ResourceStats) -> list[str]:
    """Human-readable lines for a stats snapshot."""
    fs = convert.format_size
    lines = [
        _controller_line(
            s,
            "memory",
            f"memory: current {fs(s.memory_current_bytes)}, peak {fs(s.memory_peak_bytes)}, "
            f"oom {s.memory_oom}, oom_kill {s.memory_oom_kill}",
        ),
        # cpu.stat usage exists without the cpu controller; throttling needs it.
        f"cpu:    usage {s.cpu_usage_ns / 1e6:.3f} ms (user {s.cpu_user_ns / 1e6:.3f} ms, "
        f"system {s.cpu_system_ns / 1e6:.3f} ms)"
        + (
            f", throttled {s.cpu_nr_throttled} of {s.cpu_nr_periods} periods "
            f"({s.cpu_throttled_ns / 1e6:.3f} ms)"
            if "cpu" in s.controllers
            else ""
        ),
        _controller_line(
            s, "pids", f"pids:   current {s.pids_current}, fork refusals {s.pids_events_max}"
        ),
        _controller_line(
            s, "io", f"io:     read {fs(s.io_read_bytes)}, written {fs(s.io_write_bytes)}"
        ),
    ]
    some = [k for k in sorted(s.pressure) if k.endswith(".avg10")]
    if some:
        lines.append("psi:    " + ", ".join(f"{k} {s.pressure[k]:.2f}%" for k in some))
    if s.device_denials:
        lines.append(
            "device denials: " + ", ".join(f"{k} x{v}" for k, v in s.device_denials.items())
        )
    if s.net:
        lines.append("net:    " + ", ".join(f"{k} {v}" for k, v in s.net.items()))
    return lines
