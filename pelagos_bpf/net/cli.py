"""`pelagos-bpf net-demo`: watch a cgroup's packets land in an HTB class, then clean up.

Builds two netns joined by a veth pair, puts HTB (1:10, 1:20 default, 1:30) on the sender side,
creates a classified cgroup with setup_cgroup, sends UDP from a process inside it and from one
outside, and prints the class counters before/after plus the cgroup's accounting counters.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from ..cgroup import setup_cgroup, teardown_cgroup
from ..config import CgroupConfig
from . import lab, tc
from .program import read_net_stats

CLASSES = (0x10, 0x20, 0x30)


def _table(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> list[str]:
    lines = [f"  {'class':<8}{'bytes before':>14}{'bytes after':>14}{'packets +':>11}"]
    for cid in sorted(after):
        if cid & 0xFFFF == 1:
            continue  # the 1:1 parent only sums its children
        b0, p0 = before.get(cid, (0, 0))
        b1, p1 = after[cid]
        mark = "  (default)" if cid & 0xFFFF == 0x20 else ""
        lines.append(f"  {tc.classid_str(cid):<8}{b0:>14}{b1:>14}{p1 - p0:>11}{mark}")
    return lines


def _send(nl: lab.NetLab, ns: str, count: int, cgroup: Any = None) -> None:
    child = lab.spawn(
        lab.UdpSender("10.77.0.2", count, 100),
        netns_path=lab.NETNS_DIR / ns,
        cgroup=cgroup,
    )
    child.go()


def cmd_net_demo(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("net-demo needs root (it creates network namespaces and a cgroup)")
        return 2
    with lab.NetLab() as nl:
        a, b = nl.ns("a"), nl.ns("b")
        ia, _ = nl.veth(a, "va", "10.77.0.1", b, "vb", "10.77.0.2")
        ipr = nl.ipr(a)
        tc.install_htb(ipr, ia, minors=CLASSES)
        if args.carrier == "mark":
            tc.add_mark_filter(ipr, ia)
        print(f"netns {a} --veth va/vb-- {b}; HTB 1: on va, classes 1:10 1:20 (default) 1:30")
        cfg = CgroupConfig(net_classid=args.classid, path=f"pelagos-net-demo-{os.getpid()}")
        cg = setup_cgroup(cfg, None, net_carrier=args.carrier)
        try:
            print(
                f"cgroup {cg.path}: net_classid {tc.classid_str(args.classid)} "
                f"carried in skb->{args.carrier}"
            )
            before = tc.class_counters(ipr, ia)
            _send(nl, a, args.count, cg.path)
            mid = tc.class_counters(ipr, ia)
            print(f"\n{args.count} UDP datagrams from a process INSIDE the cgroup:")
            print("\n".join(_table(before, mid)))
            _send(nl, a, args.count)
            after = tc.class_counters(ipr, ia)
            print(f"\n{args.count} UDP datagrams from a process OUTSIDE the cgroup:")
            print("\n".join(_table(mid, after)))
            stats = read_net_stats(cg)
            print("\ncgroup accounting: " + ", ".join(f"{k} {v}" for k, v in stats.items()))
        finally:
            teardown_cgroup(cg)
    print("cleaned up: cgroup removed, programs detached, netns deleted")
    return 0


def register(sub: Any) -> None:
    from ..cli import parse_classid

    p = sub.add_parser("net-demo", help="show net_classid classifying real packets into HTB")
    p.add_argument("--classid", type=parse_classid, default=0x10010, help="default 1:10")
    p.add_argument("--carrier", choices=("priority", "mark"), default="priority")
    p.add_argument("--count", type=int, default=20)
    p.set_defaults(func=cmd_net_demo)
