"""Helpers for the net tests: a two-netns topology with HTB, senders, counters, bpf objects.

Everything lives in netns named with a unique prefix (tests/netlab.py) and is removed when
the context exits, even on failure.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import netlab as lab
import pytest

from pelagos_bpf.cgroup import Cgroup
from pelagos_bpf.net import tc

PAYLOAD = 100
IP4_LEN = PAYLOAD + 8 + 20  # UDP + IPv4 headers: what the cgroup counters see
IP6_LEN = PAYLOAD + 8 + 40
L2_LEN = IP4_LEN + 14  # what HTB counts on a veth (Ethernet header added)
C10, C20, C30 = 0x10010, 0x10020, 0x10030  # 1:20 is the HTB default class


def require_root() -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root")


@dataclass
class Topo:
    """ns `a` (senders, HTB on its veths) and ns `b` (receivers), joined by veth pairs."""

    lab: lab.NetLab
    a: str
    b: str
    links: dict[str, int]  # ifname in `a` -> ifindex
    peers: dict[str, str]  # ifname in `a` -> destination address in `b`

    @property
    def ipr_a(self) -> Any:
        return self.lab.ipr(self.a)

    @property
    def path_a(self) -> str:
        return str(lab.NETNS_DIR / self.a)

    @property
    def path_b(self) -> str:
        return str(lab.NETNS_DIR / self.b)

    def counters(self, ifname: str) -> dict[int, tuple[int, int]]:
        return tc.class_counters(self.ipr_a, self.links[ifname])

    def capture(self, ifname: str = "va") -> lab.Child:
        """A Capture of `ifname`'s outgoing frames in ns a, started: `.result()` when done."""
        child = lab.spawn(Capture(ifname), netns_path=self.path_a)
        child.start()
        return child

    def tcp_classes(
        self, sink: TcpSink, sender: TcpSend, cgroup: str, ifname: str = "va", settle: bool = False
    ) -> dict[int, int]:
        """Class deltas on `ifname` of one TCP connection: `sink` listening in `b`, `sender`
        connecting from `a` inside `cgroup`; both must report the same byte count.

        `settle`: then wait until the counters have stood still for 0.3 s (at most 5 s), for a
        segment the kernel sends in softirq after both sides returned (the ACK of a FIN that
        reaches a timewait socket)."""
        server = lab.spawn(sink, netns_path=self.path_b)
        try:
            server.start()
            before = self.counters(ifname)
            sent = lab.spawn(sender, netns_path=self.path_a, cgroup=cgroup).go()
            assert sent == str(sender.size)
            assert server.result() == sent
            last = self.counters(ifname)
            still_since, deadline = time.monotonic(), time.monotonic() + 5
            while settle and time.monotonic() - still_since < 0.3 and time.monotonic() < deadline:
                time.sleep(0.05)
                now = self.counters(ifname)
                if now != last:
                    last, still_since = now, time.monotonic()
            return delta(before, last)
        finally:
            server.kill()


@contextmanager
def topology(
    ifnames: tuple[str, ...] = ("va",), *, ipv6: bool = False, a_dummies: int = 0
) -> Iterator[Topo]:
    """ns a -- veth(s) -- ns b; HTB 1: with classes 1:10, 1:20 (default), 1:30 on each a-side."""
    require_root()
    with lab.NetLab() as nl:
        a = nl.ns("a", ipv6=ipv6)
        b = nl.ns("b", ipv6=ipv6)
        for i in range(a_dummies):  # push later ifindexes up, away from the host's numbering
            nl.ipr(a).link("add", ifname=f"pad{i}", kind="veth", peer={"ifname": f"padp{i}"})
        links, peers = {}, {}
        for n, name in enumerate(ifnames, start=1):
            if ipv6:
                addr_a, addr_b, plen = f"fd77:{n}::1", f"fd77:{n}::2", 64
            else:
                addr_a, addr_b, plen = f"10.77.{n}.1", f"10.77.{n}.2", 24
            ia, _ = nl.veth(a, name, addr_a, b, f"p{name}"[:15], addr_b, plen)
            tc.install_htb(nl.ipr(a), ia, minors=(0x10, 0x20, 0x30))
            links[name], peers[name] = ia, addr_b
        yield Topo(nl, a, b, links, peers)


def delta(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> dict[int, int]:
    """Packets per leaf class that changed between two snapshots (the 1:1 parent omitted)."""
    out = {}
    for cid, (_, pkts) in after.items():
        d = pkts - before.get(cid, (0, 0))[1]
        if d and cid & 0xFFFF != 1:
            out[cid] = d
    return out


def byte_delta(before: dict[int, tuple[int, int]], after: dict[int, tuple[int, int]]) -> dict:
    return {
        cid: b - before.get(cid, (0, 0))[0]
        for cid, (b, _) in after.items()
        if b != before.get(cid, (0, 0))[0] and cid & 0xFFFF != 1
    }


def send(
    topo: Topo, ifname: str, count: int, cg: Cgroup | None = None, **kw: Any
) -> dict[int, int]:
    """Send `count` datagrams out of `ifname` from a fresh child (in cg if given); class deltas."""
    before = topo.counters(ifname)
    child = lab.spawn(
        lab.UdpSender(topo.peers[ifname], count, PAYLOAD, **kw),
        netns_path=topo.path_a,
        cgroup=cg.path if cg is not None else None,
    )
    sent = int(child.go().split()[0])
    assert sent == count
    return delta(before, topo.counters(ifname))


def our_bpf_objects() -> tuple[int, int]:
    """(programs using this process's net maps, BPF fds this process holds).

    Scoped to this process's own objects: other suites load programs concurrently, so
    system-wide counts would move under the test.
    """
    from pelagos_bpf import bpfsys
    from pelagos_bpf.net.program import FEATURE

    mine = {bpfsys.map_info(fd).id for fd in FEATURE.loaded().maps.values()}
    n_progs = 0
    for prog_id in bpfsys.prog_ids():
        try:
            fd = bpfsys.prog_get_fd_by_id(prog_id)
        except OSError:
            continue
        try:
            n_progs += bool(mine & set(bpfsys.prog_info(fd).map_ids))
        finally:
            os.close(fd)
    n_fds = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            n_fds += os.readlink(f"/proc/self/fd/{fd}").startswith("anon_inode:bpf")
        except OSError:
            continue
    return n_progs, n_fds


@contextmanager
def pid_in(netns_path: str) -> Iterator[int]:
    """The pid of a child of ours living in netns_path for the duration of the block."""
    child = lab.spawn(lab.Idle(), netns_path=netns_path)
    try:
        yield child.pid
    finally:
        child.kill()


class Capture(lab.Worker):
    """Outgoing frames on `ifname` (AF_PACKET, in the netns it is spawned in), summarised one
    per line: for a failing class count, which segments left (a RST from the kernel's control
    socket, a retransmission...). run() returns once no frame came for `idle` seconds after
    the first one (at most `limit` seconds)."""

    def __init__(self, ifname: str, idle: float = 1.0, limit: float = 20.0) -> None:
        self.ifname, self.idle, self.limit = ifname, idle, limit

    def prepare(self) -> None:
        import socket

        self.s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self.s.bind((self.ifname, 0))
        self.s.settimeout(0.1)

    def run(self) -> str:
        import socket
        import struct

        lines: list[str] = []
        t0 = time.monotonic()
        last = None
        while time.monotonic() - t0 < self.limit:
            if last is not None and time.monotonic() - last > self.idle:
                break
            try:
                frame, addr = self.s.recvfrom(65536)
            except TimeoutError:
                continue
            if addr[2] != socket.PACKET_OUTGOING:
                continue
            last = time.monotonic()
            at = f"{(last - t0) * 1e3:8.1f} ms"
            etype = struct.unpack("!H", frame[12:14])[0]
            ip = frame[14:]
            if etype != 0x0800 or len(ip) < 20:
                lines.append(f"{at} ethertype {etype:#06x} len {len(frame)}")
                continue
            ihl, proto = (ip[0] & 0xF) * 4, ip[9]
            if proto != 6:
                lines.append(f"{at} IPv4 proto {proto} len {len(frame)}")
                continue
            tcp = ip[ihl:]
            sport, dport, seq, ack = struct.unpack("!HHII", tcp[:12])
            flags = "".join(f for bit, f in enumerate("FSRPAU") if tcp[13] >> bit & 1)
            data = struct.unpack("!H", ip[2:4])[0] - ihl - (tcp[12] >> 4) * 4
            lines.append(f"{at} TCP {sport}>{dport} [{flags}] seq {seq} ack {ack} data {data}")
        return "\n".join(lines)


class TcpSink(lab.Worker):
    """Listens in prepare(); run() accepts one connection and returns the bytes read.

    By default it reads to EOF (so the peer's FIN, its last segment, has passed the qdisc when
    it returns). With `expect` it reads that many bytes and closes first: the peer then sends
    its last ACK from its own socket, not from a timewait socket (see TcpSend.wait_eof).
    `linger`: seconds to wait after EOF before closing, so that a peer which closed first is
    a FIN_WAIT2 timewait socket when this side's FIN reaches it.
    """

    def __init__(
        self, bind: str, port: int = 9998, expect: int | None = None, linger: float = 0.0
    ) -> None:
        self.bind, self.port, self.expect, self.linger = bind, port, expect, linger

    def prepare(self) -> None:
        import socket

        self.s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.s.bind((self.bind, self.port))
        self.s.listen(1)
        self.s.settimeout(20)

    def run(self) -> str:
        conn, _ = self.s.accept()
        total = 0
        with conn:
            while self.expect is None or total < self.expect:
                if not (data := conn.recv(1 << 16)):
                    break
                total += len(data)
            time.sleep(self.linger)
        return str(total)


class TcpSend(lab.Worker):
    """Connects, sends `size` bytes in `chunks` writes (TCP_NODELAY: a segment each at least),
    closes; returns the bytes sent.

    `wait_eof`: close only after the peer closed (pair with TcpSink(expect=size)). Otherwise
    this side closes first and the connection's last ACK may leave from a FIN_WAIT2 timewait
    socket, which the kernel sends through its control socket without the socket's priority
    (measured on 6.18 with a plain SO_PRIORITY too): a packet no cgroup hook classifies.

    `priority`: SO_PRIORITY set before connecting (root), for comparisons with the kernel's own
    handling of a socket priority.
    """

    def __init__(
        self,
        dst: str,
        size: int,
        port: int = 9998,
        chunks: int = 1,
        *,
        wait_eof: bool = False,
        priority: int | None = None,
    ) -> None:
        self.dst, self.size, self.port, self.chunks = dst, size, port, chunks
        self.wait_eof, self.priority = wait_eof, priority

    def run(self) -> str:
        import socket

        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(20)
            if self.priority is not None:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY, self.priority)
            s.connect((self.dst, self.port))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            part = self.size // self.chunks
            for _ in range(self.chunks):
                s.sendall(b"t" * part)
            if self.wait_eof and s.recv(1) != b"":
                raise RuntimeError("the peer sent data instead of closing")
        return str(part * self.chunks)
