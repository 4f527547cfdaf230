"""`pelagos-bpf inspect`: what is in force on a cgroup (limits, device rules, net) and its stats.

Why it degrades instead of failing: the cgroup files are world-readable, bpf(2) queries need
root. A non-root operator still gets the limits and counters, with the BPF part marked
"needs root" (JSON: {"error": ...}) rather than a refusal of the whole command.

Under systemd, the unit that owns the cgroup is shown with the settings systemd holds for it
(unit properties and BPFProgram= entries): those are what daemon-reload re-applies.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .. import convert, freezer
from ..cgroup import Cgroup
from ..errors import PelagosError
from ..stats import ResourceStats, read_stats
from .common import BPF_NEEDS_ROOT, EXIT_CODES_HELP, cgroup_dir, os_message
from .output import SCHEMA, format_stats, stats_json
from .state import device_state, net_state

LIMIT_FILES = {
    "memory.max": "memory",
    "memory.swap.max": "memory",
    "memory.low": "memory",
    "memory.high": "memory",
    "cpu.weight": "cpu",
    "cpu.max": "cpu",
    "cpuset.cpus": "cpuset",
    "cpuset.mems": "cpuset",
    "cpuset.cpus.effective": "cpuset",
    "pids.max": "pids",
    "io.bfq.weight": "io",
    "io.weight": "io",
    "io.max": "io",
}
"""Limit file -> the controller that provides it."""
_SIZE_FILES = {"memory.max", "memory.swap.max", "memory.low", "memory.high"}


def read_limits(path: Path) -> dict[str, str | None]:
    """Every limit file, stripped; None where the file is absent (controller not enabled)."""
    out: dict[str, str | None] = {}
    for name in LIMIT_FILES:
        try:
            out[name] = (path / name).read_text().strip()
        except OSError:
            out[name] = None
    return out


def _human_limit(name: str, value: str) -> str:
    if name in _SIZE_FILES and value.isdigit():
        return f"{value} ({convert.format_size(int(value))})"
    return value.replace("\n", "; ") or "(empty)"


def _needs_root(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.EPERM, errno.EACCES)


def _bpf_part(read: Callable[[Cgroup], Any], cg: Cgroup) -> Any:
    """The reader's result, or {"error": why} when it cannot be read (non-root; a program of
    another pelagos_bpf version): the rest of the report is still worth showing."""
    try:
        return read(cg)
    except (PelagosError, OSError) as e:
        return {"error": BPF_NEEDS_ROOT if _needs_root(e) else os_message(e)}


def systemd_part(p: Path) -> dict[str, Any] | None:
    """The unit owning the cgroup and what systemd holds for it; None without systemd as PID 1
    or when no unit owns it; {"error": why} when systemd cannot be asked."""
    from ..hierarchy import discover
    from ..systemd import SYSTEMD_RUN_DIR, units

    if not SYSTEMD_RUN_DIR.is_dir():
        return None
    root = discover().root
    if not p.is_relative_to(root):
        return None
    try:
        info = units.unit_info(p, root)
    except (PelagosError, OSError) as e:
        return {"error": os_message(e)}
    return None if info is None else dataclasses.asdict(info)


def _systemd_lines(sd: Any) -> list[str]:
    if sd is None:
        return []
    if "error" in sd:
        return [f"systemd:     {sd['error']}"]
    where = " (this cgroup is in its delegated subtree)" if sd["inside"] else ""
    lines = [
        f"systemd:     unit {sd['unit']}{where}, {sd['active']}, slice {sd['slice'] or '-'}, "
        f"Delegate={'yes' if sd['delegate'] else 'no'}",
        "  held by systemd (re-applied at daemon-reload):",
    ]
    lines += [f"    {k}={v} ({sd['files'][k]})" for k, v in sd["properties"].items()]
    state = {True: "attached", False: "NOT attached", None: "attachment unknown"}
    gone = "; its pin is GONE: systemd detaches the program at the next daemon-reload"
    for prog in sd["programs"]:
        pin = gone if prog["pin_present"] is False else ""
        lines.append(f"    BPFProgram={prog['kind']}:{prog['pin']} {state[prog['attached']]}{pin}")
    return lines


def inspect_doc(p: Path) -> tuple[dict[str, Any], ResourceStats]:
    """Everything `inspect` shows, as the JSON document (schema 1), and the stats read."""
    cg = Cgroup.open(p)
    try:
        stats = read_stats(cg)
        bpf_error = None
    except (PelagosError, OSError) as e:
        if not _needs_root(e):
            raise
        stats, bpf_error = read_stats(cg, bpf=False), BPF_NEEDS_ROOT
    doc: dict[str, Any] = {
        "schema": SCHEMA,
        "path": str(p),
        "id": cg.id,
        "controllers": (p / "cgroup.controllers").read_text().split(),
        "procs": [int(x) for x in (p / "cgroup.procs").read_text().split()],
        "freezer": freezer.state(cg),
        "limits": read_limits(p),
        "devices": _bpf_part(device_state, cg),
        "net": _bpf_part(net_state, cg),
        "systemd": systemd_part(p),
        "stats": stats_json(stats),
    }
    if bpf_error:
        doc["stats"]["device_denials"] = doc["stats"]["net"] = None
    return doc, stats


def _unavailable(label: str, part: Any, absent: str) -> list[str] | None:
    """The line for a feature with nothing attached, or that we may not read; else None."""
    if part is None:
        return [f"{label:<12} {absent}"]
    if "error" in part:
        return [f"{label:<12} {part['error']}"]
    return None


def _device_lines(dev: Any) -> list[str]:
    if short := _unavailable("devices:", dev, "no device program: every device allowed"):
        return short
    lines = ["devices:     every owner's set must allow (last match decides each bit within one)"]
    if dev["legacy_programs"]:
        ids = ", ".join(str(i) for i in dev["legacy_programs"])
        lines.append(f"  an earlier release's program (the runtime's): id {ids}")
    for owner, o in dev["owners"].items():
        trust = "" if o["trusted"] else " NOT the bytecode of this release;"
        head = f"  {owner}: program id {o['program']};{trust}"
        if not o["installed"]:
            lines.append(f"{head} denied: rule set not installed")
            continue
        lines.append(f"{head} generation {o['generation']}:")
        lines += [f"    #{r['index']:<4} {r['rule']}" for r in o["rules"]]
    if dev["denials_not_itemised"]:
        lines.append(f"  denials not itemised (per-cgroup cap): {dev['denials_not_itemised']}")
    return lines


def _net_lines(net: Any) -> list[str]:
    if short := _unavailable("net:", net, "no net program attached"):
        return short
    from ..net.plan import carried_in

    progs = ", ".join(f"{p['attach']} id {p['id']} tag {p['tag']}" for p in net["programs"])
    classid = net["classid_tc"] or "none"
    where = carried_in(net["carrier"])
    lines = [f"net:         classid {classid} carried in {where}; programs {progs}"]
    lines += [
        f"  ifindex {p['ifindex']:<6} {p['ifname'] or '?':<15} priority {p['priority']}"
        for p in net["priorities"]
    ]
    return lines


def cmd_inspect(args: argparse.Namespace) -> int:
    doc, stats = inspect_doc(cgroup_dir(args.path, args.root))
    if args.json:
        print(json.dumps(doc, indent=2))
        return 0
    lines = [
        f"cgroup:      {doc['path']} (id {doc['id']})",
        f"controllers: {' '.join(doc['controllers']) or '(none)'}",
        f"processes:   {' '.join(map(str, doc['procs'])) or '(none)'}",
        f"freezer:     {doc['freezer']}",
        "limits:",
    ]
    present = {k: v for k, v in doc["limits"].items() if v is not None}
    lines += [f"  {name:22} {_human_limit(name, value)}" for name, value in present.items()]
    if not present:
        lines[-1] = "limits:      (no controller files)"
    lines += _systemd_lines(doc["systemd"])
    lines += _device_lines(doc["devices"]) + _net_lines(doc["net"])
    lines.append("stats:")
    lines += ["  " + line for line in format_stats(stats)]
    if doc["stats"]["device_denials"] is None:
        lines.append(f"  bpf counters: {BPF_NEEDS_ROOT}")
    print("\n".join(lines))
    return 0


def register(sub: Any) -> None:
    i = sub.add_parser(
        "inspect",
        help="show what is in force on a cgroup (limits, device rules, net) and its stats",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    i.add_argument("path", help="absolute cgroup dir, or a path under the root")
    i.add_argument("--root", help="cgroup2 root for relative paths")
    i.add_argument(
        "--json", action="store_true", help="one JSON document (schema 1; absent = null)"
    )
    i.set_defaults(func=cmd_inspect)
