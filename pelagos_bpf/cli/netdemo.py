"""`pelagos-bpf net-demo`: watch a cgroup's packets land in an HTB class, then clean up.

Builds two netns joined by a veth pair (static neighbours, IPv6 off: the class counters see
only our datagrams), puts HTB (1:10, 1:20 default, 1:30) on the sender side, creates a
classified cgroup with setup_cgroup, sends UDP from a process inside it and from one outside,
and prints the class counters before/after plus the cgroup's accounting counters.

The topology here is the demo's own, deliberately minimal; the test rig with workers,
receivers and IPv6 lives in tests/netlab.py and is not shipped.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
from collections.abc import Iterator
from typing import Any

from ..cgroup import setup_cgroup, teardown_cgroup
from ..config import CgroupConfig
from ..net import tc
from ..net.plan import carried_in
from ..net.program import read_net_stats
from ..net.resolve import _setns, run_in_netns

CLASSES = (0x10, 0x20, 0x30)
NETNS_DIR = "/var/run/netns"
SENDER, RECEIVER = "10.77.0.1", "10.77.0.2"


@contextlib.contextmanager
def _topology() -> Iterator[tuple[str, Any, int]]:
    """netns A --veth va/vb-- netns B; yields (A's name, IPRoute in A, va's ifindex)."""
    from pyroute2 import IPRoute, netns

    a, b = (f"pgdemo{os.getpid()}-{t}" for t in "ab")
    made: list[str] = []
    iprs: list[Any] = []
    try:
        for name in (a, b):
            netns.create(name)
            made.append(name)
            fd = os.open(f"{NETNS_DIR}/{name}", os.O_RDONLY | os.O_CLOEXEC)
            try:
                run_in_netns(fd, _ipv6_off)
            finally:
                os.close(fd)
        ia_r, ib_r = IPRoute(netns=a), IPRoute(netns=b)
        iprs += [ia_r, ib_r]
        ia_r.link("add", ifname="va", kind="veth", peer={"ifname": "vb", "net_ns_fd": b})
        ends = []
        for ipr, ifname, addr in ((ia_r, "va", SENDER), (ib_r, "vb", RECEIVER)):
            idx = ipr.link_lookup(ifname=ifname)[0]
            ipr.addr("add", index=idx, address=addr, prefixlen=24)
            ipr.link("set", index=idx, state="up")
            ends.append((ipr, idx, addr, ipr.get_links(idx)[0].get_attr("IFLA_ADDRESS")))
        for (ipr, idx, _, _), (_, _, peer, mac) in zip(ends, ends[::-1], strict=True):
            ipr.neigh("add", dst=peer, lladdr=mac, ifindex=idx, state=0x80)  # NUD_PERMANENT
        yield a, ia_r, ends[0][1]
    finally:
        for ipr in iprs:
            ipr.close()
        for name in made:
            netns.remove(name)


def _ipv6_off() -> None:
    for scope in ("all", "default"):
        with open(f"/proc/sys/net/ipv6/conf/{scope}/disable_ipv6", "w") as f:
            f.write("1")


def _send(ns: str, count: int, cgroup: os.PathLike[str] | None = None) -> None:
    """Send `count` datagrams from a child that joined `cgroup` before making its socket."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            if cgroup is not None:
                with open(os.path.join(cgroup, "cgroup.procs"), "w") as f:
                    f.write(str(os.getpid()))
            fd = os.open(f"{NETNS_DIR}/{ns}", os.O_RDONLY)
            _setns(fd)
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                for _ in range(count):
                    with contextlib.suppress(ConnectionRefusedError):
                        s.sendto(b"x" * 100, (RECEIVER, 9999))
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError("net-demo: the sender failed")


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


def cmd_net_demo(args: argparse.Namespace) -> int:
    from .common import NEEDS_ROOT, CliError

    if os.geteuid() != 0:
        raise CliError(f"net-demo {NEEDS_ROOT}: it creates network namespaces and a cgroup")
    with _topology() as (a, ipr, ia):
        tc.install_htb(ipr, ia, minors=CLASSES)
        if args.carrier == "mark":
            tc.add_mark_filter(ipr, ia)
        print(f"netns {a} --veth va/vb-- peer; HTB 1: on va, classes 1:10 1:20 (default) 1:30")
        cfg = CgroupConfig(net_classid=args.classid, path=f"pelagos-net-demo-{os.getpid()}")
        cg = setup_cgroup(cfg, None, net_carrier=args.carrier)
        try:
            print(
                f"cgroup {cg.path}: net_classid {tc.classid_str(args.classid)} "
                f"carried in {carried_in(args.carrier)}"
            )
            before = tc.class_counters(ipr, ia)
            _send(a, args.count, cg.path)
            mid = tc.class_counters(ipr, ia)
            print(f"\n{args.count} UDP datagrams from a process INSIDE the cgroup:")
            print("\n".join(_table(before, mid)))
            _send(a, args.count)
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
    from .flags import parse_classid

    p = sub.add_parser("net-demo", help="show net_classid classifying real packets into HTB")
    p.add_argument("--classid", type=parse_classid, default=0x10010, help="default 1:10")
    p.add_argument("--carrier", choices=("priority", "mark", "socket"), default="priority")
    p.add_argument("--count", type=int, default=20)
    p.set_defaults(func=cmd_net_demo)
