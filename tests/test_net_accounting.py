"""Per-cgroup IP accounting (egress/ingress bytes and packets) with real packets (root)."""

from __future__ import annotations

import netlab as lab
import pytest
from net_helpers import IP4_LEN, IP6_LEN, PAYLOAD, TcpSend, TcpSink, send, topology

from pelagos_bpf import net

pytestmark = [pytest.mark.root, pytest.mark.net]
N = 50


@pytest.mark.parametrize(("ipv6", "ip_len"), [(False, IP4_LEN), (True, IP6_LEN)])
def test_counters_match_the_bytes_sent_and_received(make_cgroup, ipv6: bool, ip_len: int) -> None:
    cg = make_cgroup("acct")
    with topology(ipv6=ipv6) as t:
        net.attach_net(cg, net.resolve_net(None, [], None))
        try:
            assert net.read_net_stats(cg) == {
                "egress_bytes": 0,
                "egress_packets": 0,
                "ingress_bytes": 0,
                "ingress_packets": 0,
            }
            bind = t.peers["va"]
            rx = lab.spawn(lab.UdpReceiver(bind, N), netns_path=t.path_b, cgroup=cg.path)
            try:
                rx.start()
                send(t, "va", N, cg)  # the sender is in the cgroup too
                got, got_bytes = map(int, rx.result().split())
            finally:
                rx.kill()
            assert got_bytes == got * PAYLOAD
            send(t, "va", 7)  # outside the cgroup: not counted
            stats = net.read_net_stats(cg)
            # Counters see IP packets: payload + UDP header + IP header (no link layer).
            assert stats["egress_packets"] == N
            assert stats["egress_bytes"] == N * ip_len
            assert stats["ingress_packets"] == got
            assert stats["ingress_bytes"] == got * ip_len
            assert got == N  # a veth in a quiet netns drops nothing
        finally:
            net.detach_net(cg)


def test_read_stats_includes_net(make_cgroup) -> None:
    from pelagos_bpf import read_stats

    cg = make_cgroup("rs")
    with topology() as t:
        net.attach_net(cg, net.resolve_net(None, [], None))
        try:
            send(t, "va", 3, cg)
            s = read_stats(cg)
            assert s.net["egress_packets"] == 3
            assert s.net["egress_bytes"] == 3 * IP4_LEN
        finally:
            net.detach_net(cg)


def test_tcp_gso_packets_are_counted_as_segments(make_cgroup) -> None:
    size = 1 << 20
    cg = make_cgroup("tcp")
    with topology() as t:
        net.attach_net(cg, net.resolve_net(None, [], None))
        try:
            t.tcp_classes(TcpSink(t.peers["va"]), TcpSend(t.peers["va"], size), cg.path)
            st = net.read_net_stats(cg)
            mss = 1500 - 20 - 20  # upper bound (timestamps make it 1448)
            # A 1 MiB send leaves as GSO skbs of up to 64 KiB; counting skbs would give ~20.
            assert st["egress_packets"] >= size // mss
            # Bytes are IP-level with the headers of a GSO skb counted once.
            assert size <= st["egress_bytes"] <= size + 100 * st["egress_packets"]
            assert st["ingress_packets"] > 0  # the ACKs coming back to the cgroup's socket
        finally:
            net.detach_net(cg)
