"""Runtime verbs on a live cgroup: `update`, `freeze`, `thaw`, `events`."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

from .. import events, freezer
from ..cgroup import Cgroup, update_cgroup
from .common import EXIT_CODES_HELP, cgroup_dir
from .flags import add_config_flags, config_from_args, default_rule_count
from .output import SCHEMA, report_json, report_lines


def cmd_update(args: argparse.Namespace) -> int:
    cg = Cgroup.open(cgroup_dir(args.path, args.root))
    report = update_cgroup(cg, config_from_args(args))
    offset = default_rule_count(args)
    if args.json:
        print(json.dumps({"schema": SCHEMA, "path": str(cg.path), **report_json(report, offset)}))
    else:
        print("\n".join(report_lines(report, offset)) or "nothing to update: give some flags")
    return 0


def cmd_freeze(args: argparse.Namespace) -> int:
    p = cgroup_dir(args.path, args.root)
    (freezer.freeze if args.command == "freeze" else freezer.thaw)(p, args.timeout)
    print(f"{p}: {freezer.state(p)}")
    return 0


def cmd_events(args: argparse.Namespace) -> int:
    """One JSON line per change until the cgroup is removed (or --timeout, or a signal)."""
    p = cgroup_dir(args.path, args.root)
    for ev in events.watch(p, args.timeout):
        line = {"schema": SCHEMA, "time": round(time.time(), 3), "path": str(p), **ev.to_dict()}
        print(json.dumps(line), flush=True)
        if args.until_oom and ev.new.get(events.OOM_KILL):
            return 0
    return 0


def _path_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="absolute cgroup dir, or a path under the root")
    p.add_argument("--root", help="cgroup2 root for relative paths")


def register(sub: Any) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    u = sub.add_parser(
        "update",
        help="change a live cgroup's settings (only what the flags name)",
        description="Apply the resource flags to a live cgroup with update_cgroup (strict: a "
        "setting this host cannot apply is refused before anything is written).",
        epilog=EXIT_CODES_HELP,
        formatter_class=fmt,
    )
    _path_args(u)
    add_config_flags(u)
    u.add_argument("--json", action="store_true", help="print the report as JSON (schema 1)")
    u.set_defaults(func=cmd_update)
    for verb, text in (
        ("freeze", "stop every process of a cgroup; returns once all are frozen"),
        ("thaw", "let a frozen cgroup's processes run again"),
    ):
        f = sub.add_parser(
            verb, help=text, description=text, epilog=EXIT_CODES_HELP, formatter_class=fmt
        )
        _path_args(f)
        f.add_argument(
            "--timeout",
            type=float,
            default=freezer.FREEZE_TIMEOUT,
            metavar="SECONDS",
            help=f"give up (and thaw again) after this long (default {freezer.FREEZE_TIMEOUT:g})",
        )
        f.set_defaults(func=cmd_freeze)
    e = sub.add_parser(
        "events",
        help="print a cgroup's events (populated, frozen, memory/OOM counts) as JSON lines",
        description="One JSON line now, then one per change of cgroup.events or memory.events "
        "(inotify: no polling), until the cgroup is removed. memory is null without the "
        "memory controller; 'new' holds how much each memory counter grew.",
        epilog=EXIT_CODES_HELP,
        formatter_class=fmt,
    )
    _path_args(e)
    e.add_argument("--timeout", type=float, metavar="SECONDS", help="stop after this long")
    e.add_argument(
        "--until-oom", action="store_true", help="exit after the first OOM kill (oom_kill grows)"
    )
    e.set_defaults(func=cmd_events)
