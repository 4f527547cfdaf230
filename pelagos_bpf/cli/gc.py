"""`pelagos-bpf gc [--prefix PATH]`: reclaim what removed cgroups and crashed setups left.

Map entries keyed by a cgroup that no longer exists are deleted, and so are rule sets of live
cgroups that no program can read any more (stale generations a killed update left); with
--prefix, empty cgroups this library created under PATH (never one it only attached to) are
torn down. Pins of ours this release would not fetch are removed, except those a systemd
unit's BPFProgram= names; failed systemd scopes of ours are reset.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

from .. import gc
from .common import EXIT_CODES_HELP, EXIT_OK, EXIT_TOOL, cgroup_dir
from .output import SCHEMA


def cmd_gc(args: argparse.Namespace) -> int:
    prefix = cgroup_dir(args.prefix, args.root) if args.prefix else None
    report = gc.collect(prefix)
    if args.json:
        doc = {"schema": SCHEMA, **dataclasses.asdict(report)}
        print(json.dumps({**doc, "total_entries": report.total_entries}))
    else:
        print(report)
    return EXIT_TOOL if report.errors else EXIT_OK


def register(sub: Any) -> None:
    p = sub.add_parser(
        "gc",
        help="remove BPF state of cgroups that are gone, and abandoned cgroups under a prefix",
        description="Delete the map entries (device rules, denial counters, net priorities) "
        "of cgroups that no longer exist, and the stale rule-set generations of live ones (each "
        "keeps its current and previous set; a cgroup being written is skipped). With --prefix, "
        "first tear down the empty cgroups under PATH that pelagos_bpf created (its creation "
        "mark; never one it only attached to). Unpins programs of ours that this release would "
        "not fetch, keeping any pin a systemd unit's BPFProgram= names; resets failed systemd "
        "scopes of ours. Runs by itself when a map is full; the agent runs it periodically. "
        "`pelagos-bpf -v gc` logs each decision and its reason.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--prefix", metavar="PATH", help="cgroup dir (or path below --root) to sweep")
    p.add_argument("--root", help="cgroup2 root PATH is relative to (default: discovered)")
    p.add_argument("--json", action="store_true", help="one JSON document")
    p.set_defaults(func=cmd_gc)
