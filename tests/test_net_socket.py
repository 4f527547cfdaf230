"""Carrier "socket": the classid set once on the socket at creation, real packets through HTB.

No per-packet program: the tests check the class counters of HTB in a netns of their own, the
programs attached at each hook, and the socket priority an app reads back (root).
"""

from __future__ import annotations

import errno
import os
import socket
import time
from dataclasses import dataclass

import netlab as lab
import pytest
from net_helpers import (
    C10,
    C20,
    C30,
    PAYLOAD,
    TcpSend,
    TcpSink,
    delta,
    our_bpf_objects,
    send,
    topology,
)

from pelagos_bpf import bpfsys, net
from pelagos_bpf.errors import BpfError, ConfigError
from pelagos_bpf.layers import STORAGE_KEY
from pelagos_bpf.net import layout as lay
from pelagos_bpf.net.program import FEATURE, NOT_ACCOUNTED

pytestmark = [pytest.mark.root, pytest.mark.net]
N = 20
HOOKS = (lay.EGRESS, lay.INGRESS, lay.SOCK_CREATE, lay.SETSOCKOPT)
NOBODY = 65534


def attached(cg) -> dict[int, list[int]]:
    """Program ids at each of the four hooks the net feature uses."""
    fd = cg.open_fd()
    try:
        return {at: bpfsys.prog_query(fd, at) for at in HOOKS}
    finally:
        bpfsys.close(fd)


def hooks_in_use(cg) -> set[int]:
    return {at for at, ids in attached(cg).items() if ids}


def socket_plan(classid: int | None) -> net.NetPlan:
    return net.resolve_net(classid, [], None, carrier="socket")


@dataclass
class SockOpt(lab.Worker):
    """Optionally drops root (setuid nobody: no capabilities), sets SO_PRIORITY on a fresh
    socket, sends `count` datagrams -> "<errno of setsockopt or 0> <SO_PRIORITY read back>"."""

    dst: str
    count: int
    priority: int
    unprivileged: bool = False

    def run(self) -> str:
        if self.unprivileged:
            os.setgid(NOBODY)
            os.setuid(NOBODY)
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        err = 0
        try:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY, self.priority)
        except OSError as e:
            err = e.errno or -1
        got = s.getsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY)
        for _ in range(self.count):
            s.sendto(b"x" * PAYLOAD, (self.dst, 9999))
        s.close()
        return f"{err} {got}"


@dataclass
class EarlySocket(lab.Worker):
    """Creates its socket in prepare() (before the test changes the cgroup's settings) and
    sends from it in run(), optionally after a plain SO_PRIORITY -> "<SO_PRIORITY read back>"."""

    dst: str
    count: int
    priority: int | None = None
    _sock: socket.socket | None = None

    def prepare(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)

    def run(self) -> str:
        assert self._sock is not None
        if self.priority is not None:
            self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY, self.priority)
        for _ in range(self.count):
            self._sock.sendto(b"x" * PAYLOAD, (self.dst, 9999))
        got = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY)
        self._sock.close()
        return str(got)


def test_udp_and_tcp_sockets_created_in_the_cgroup_are_classified(make_cgroup) -> None:
    cg = make_cgroup("sock")
    with topology() as t:
        net.attach_net(cg, socket_plan(C10))
        try:
            # No per-packet program at all: only the socket hooks are in use.
            assert hooks_in_use(cg) == {lay.SOCK_CREATE, lay.SETSOCKOPT}
            assert send(t, "va", N, cg) == {C10: N}
            assert send(t, "va", 5) == {C20: 5}  # a sender outside the cgroup: default class

            # The server closes first, so every segment of the connection leaves from the
            # client's own socket (see TcpSend.wait_eof for the timewait ACK no hook sees).
            cap = t.capture("va")  # what left, should a segment miss 1:10 (a rare flake)
            d = t.tcp_classes(
                TcpSink(t.peers["va"], expect=5000),
                TcpSend(t.peers["va"], 5000, chunks=5, wait_eof=True),
                cg.path,
            )
            segments = cap.result()
            # SYN, 5 data segments, FIN (ACKs may ride on them): every segment of the client
            # in 1:10.
            assert d.get(C10, 0) >= 7, f"{d}; segments that left va:\n{segments}"
            assert C20 not in d, f"{d}; segments that left va:\n{segments}"
        finally:
            net.detach_net(cg)
        assert hooks_in_use(cg) == set()
        assert send(t, "va", 3, cg) == {C20: 3}  # detached: new sockets are not classified


def _tcp_classes(t, cg, priority: int | None) -> dict[int, int]:
    """Class deltas of one TCP connection from a client in `cg` that closes first, the server
    closing 1.5 s later: the client's last ACK leaves from a FIN_WAIT2 timewait socket."""
    return t.tcp_classes(
        TcpSink(t.peers["va"], linger=1.5),
        TcpSend(t.peers["va"], 5000, chunks=5, priority=priority),
        cg.path,
        settle=True,
    )


def test_timewait_ack_is_classified_as_the_kernel_does_for_a_plain_so_priority(
    make_cgroup,
) -> None:
    """What the carrier cannot reach, the kernel does not give a socket priority either: the
    classes of a client-closes-first connection equal those of a socket with SO_PRIORITY set
    to the classid before connect, with no program at all (docs: the timewait ACK)."""
    cg = make_cgroup("tw")
    with topology() as t:
        plain = _tcp_classes(t, cg, C10)
        net.attach_net(cg, socket_plan(C10))
        try:
            carried = _tcp_classes(t, cg, None)
        finally:
            net.detach_net(cg)
    assert carried == plain
    assert carried.get(C10, 0) >= 7  # SYN, 5 data segments, FIN
    assert carried.get(C20, 0) <= 1  # at most the timewait ACK


def test_ipv6_sockets_are_classified(make_cgroup) -> None:
    cg = make_cgroup("six")
    with topology(ipv6=True) as t:
        net.attach_net(cg, socket_plan(C30))
        try:
            d = send(t, "va", N, cg)
            assert d.get(C30) == N  # (IPv6 on: MLD/ND of the netns may add default-class noise)
        finally:
            net.detach_net(cg)


def test_nearest_cgroup_wins_and_descendants_inherit(make_cgroup) -> None:
    parent = make_cgroup("p")
    child = make_cgroup("p/c")
    with topology() as t:
        net.attach_net(parent, socket_plan(C10))
        try:
            assert send(t, "va", N, child) == {C10: N}  # inherited from the parent
            net.attach_net(child, socket_plan(C30))
            assert send(t, "va", N, child) == {C30: N}  # the child's own classid wins
            assert send(t, "va", 5, parent) == {C10: 5}
            # A child with a packet carrier under a socket-carrier parent: the child's egress
            # program replaces only a plain priority, the parent's classid is a class: kept...
            net.update_net(child, net.resolve_net(C30, [], None), carrier="priority")
            assert send(t, "va", N, child) == {C10: N}
        finally:
            net.detach_net(child)
            net.detach_net(parent)
        # ...and the other way round: a socket-carrier child under a packet-carrier parent.
        net.attach_net(parent, net.resolve_net(C10, [], None))
        net.attach_net(child, socket_plan(C30))
        try:
            assert send(t, "va", N, child) == {C30: N}
            assert send(t, "va", 5, parent) == {C10: 5}
        finally:
            net.detach_net(child)
            net.detach_net(parent)


def test_so_priority_guard(make_cgroup) -> None:
    cg = make_cgroup("guard")
    with topology() as t:
        net.attach_net(cg, socket_plan(C10))
        try:
            dst = t.peers["va"]

            def probe(priority: int, unprivileged: bool = False) -> tuple[str, dict[int, int]]:
                before = t.counters("va")
                w = SockOpt(dst, N, priority, unprivileged)
                out = lab.spawn(w, netns_path=t.path_a, cgroup=cg.path).go()
                return out, delta(before, t.counters("va"))

            # A plain value (TC_PRIO_INTERACTIVE) does not move the socket out of its class.
            assert probe(6) == (f"0 {C10}", {C10: N})
            # An app without CAP_NET_ADMIN: the call still succeeds (the kernel's handler is
            # bypassed; rewriting the value to the classid would have failed with EPERM)...
            assert probe(6, unprivileged=True) == (f"0 {C10}", {C10: N})
            # ...while a classid-valued SO_PRIORITY is the kernel's to check: EPERM for it,
            assert probe(C30, unprivileged=True) == (f"{errno.EPERM} {C10}", {C10: N})
            # and kept when the app may set it (as the "priority" carrier keeps it).
            assert probe(C30) == (f"0 {C30}", {C30: N})
        finally:
            net.detach_net(cg)
        # Without our programs, the plain value is the socket's (HTB: no such class, default).
        before = t.counters("va")
        w = SockOpt(t.peers["va"], 3, 6)
        assert lab.spawn(w, netns_path=t.path_a, cgroup=cg.path).go() == "0 6"
        assert delta(before, t.counters("va")) == {C20: 3}


def test_classid_update_reaches_new_sockets_not_existing_ones(make_cgroup) -> None:
    cg = make_cgroup("upd")
    with topology() as t:
        dst = t.peers["va"]
        early = lab.spawn(EarlySocket(dst, N), netns_path=t.path_a, cgroup=cg.path)
        unclassified = lab.spawn(EarlySocket(dst, N, 6), netns_path=t.path_a, cgroup=cg.path)
        try:
            net.attach_net(cg, socket_plan(C10))
            old = lab.spawn(EarlySocket(dst, N), netns_path=t.path_a, cgroup=cg.path)
            try:
                ids = attached(cg)
                net.update_net(cg, socket_plan(C30))
                assert attached(cg) == ids  # a map write: same programs, no re-attach
                assert net.read_config(cg).classid == C30
                assert send(t, "va", N, cg) == {C30: N}  # a new socket: the new classid
                before = t.counters("va")
                assert old.go() == str(C10)  # created before the update: keeps its class
                assert delta(before, t.counters("va")) == {C10: N}
            finally:
                old.kill()
            # Created before anything was attached: never classified; its plain SO_PRIORITY is
            # the app's (the guard acts only on sockets that carry a class).
            before = t.counters("va")
            assert early.go() == "0"
            assert unclassified.go() == "6"
            assert delta(before, t.counters("va")) == {C20: 2 * N}
            net.update_net(cg, socket_plan(None))  # classid removed: new sockets unclassified
            assert send(t, "va", 5, cg) == {C20: 5}
        finally:
            early.kill()
            unclassified.kill()
            net.detach_net(cg)


def test_socket_carrier_with_priorities_is_a_config_error(make_cgroup, cg_root) -> None:
    from pelagos_bpf import CgroupConfig, setup_cgroup, update_cgroup

    with pytest.raises(ConfigError) as e:
        net.resolve_net(C10, [("lo", 1)], None, carrier="socket")
    assert e.value.setting == "net_carrier"
    assert "egress interface" in str(e.value)
    cfg = CgroupConfig(net_classid=C10, net_priorities=[("lo", 1)], net_carrier="socket", path="x")
    with pytest.raises(ConfigError) as e:
        setup_cgroup(cfg, None, root=cg_root)
    assert e.value.setting == "net_carrier"
    assert not (cg_root / "x").exists()  # rejected before anything was created

    # A live socket-carrier cgroup: an update adding priorities (carrier kept) is refused and
    # changes nothing.
    cg = setup_cgroup(
        CgroupConfig(net_classid=C10, net_carrier="socket", path="y"), None, root=cg_root
    )
    try:
        ids = attached(cg)
        with pytest.raises(ConfigError) as e:
            update_cgroup(cg, CgroupConfig(net_priorities=[("lo", 1)]))
        assert e.value.setting == "net_carrier"
        assert attached(cg) == ids
        assert net.read_config(cg) == net.NetPlan(classid=C10, carrier="socket")
    finally:
        net.detach_net(cg)


def test_switching_carriers_by_update(make_cgroup) -> None:
    from pelagos_bpf import CgroupConfig, update_cgroup

    cg = make_cgroup("switch")
    with topology() as t:
        net.attach_net(cg, net.resolve_net(C10, [("lo", 7)], None, carrier="mark"))
        try:
            assert hooks_in_use(cg) == {lay.EGRESS, lay.INGRESS}
            # packet -> socket (the priorities go: the socket carrier has none)
            net.update_net(
                cg, socket_plan(C10), frozenset({"classid", "priorities"}), carrier="socket"
            )
            assert hooks_in_use(cg) == {lay.SOCK_CREATE, lay.SETSOCKOPT}  # nothing stale
            assert net.read_config(cg) == net.NetPlan(classid=C10, carrier="socket")
            assert net.read_net_stats(cg) == NOT_ACCOUNTED
            assert send(t, "va", N, cg) == {C10: N}
            st = net.read_state(cg)
            assert (st.carrier, st.classid, st.trusted, len(st.program_ids)) == (
                "socket",
                C10,
                True,
                2,
            )
            # socket -> priority through update_cgroup (classid kept: the update names none)
            update_cgroup(cg, CgroupConfig(net_carrier="priority"))
            assert hooks_in_use(cg) == {lay.EGRESS, lay.INGRESS}
            assert net.read_config(cg).carrier == "priority"
            assert net.read_config(cg).classid == C10
            assert send(t, "va", N, cg) == {C10: N}
            assert net.read_net_stats(cg)["egress_packets"] == N  # counting from zero again
            # and back to socket with a new classid
            update_cgroup(cg, CgroupConfig(net_classid=C30, net_carrier="socket"))
            assert hooks_in_use(cg) == {lay.SOCK_CREATE, lay.SETSOCKOPT}
            assert send(t, "va", N, cg) == {C30: N}
        finally:
            net.detach_net(cg)
        assert hooks_in_use(cg) == set()


def test_failed_attach_leaves_nothing_and_a_failed_switch_keeps_the_old(
    make_cgroup, monkeypatch
) -> None:
    cg = make_cgroup("fail")
    FEATURE.loaded()
    real_attach = bpfsys.prog_attach

    def failing_attach(prog_fd, target_fd, attach_type, *a, **kw):
        if attach_type == lay.SETSOCKOPT:  # the last step: sock_create + its config are there
            raise BpfError(errno.EPERM, "BPF_PROG_ATTACH", "injected")
        return real_attach(prog_fd, target_fd, attach_type, *a, **kw)

    monkeypatch.setattr(bpfsys, "prog_attach", failing_attach)
    with pytest.raises(BpfError, match="injected"):
        net.attach_net(cg, socket_plan(C10))
    assert hooks_in_use(cg) == set()
    monkeypatch.setattr(bpfsys, "prog_attach", real_attach)

    with topology() as t:
        net.attach_net(cg, net.resolve_net(C10, [("lo", 7)], None, carrier="mark"))
        try:
            monkeypatch.setattr(bpfsys, "prog_attach", failing_attach)
            with pytest.raises(BpfError, match="injected"):
                net.update_net(cg, socket_plan(C30), carrier="socket")
            monkeypatch.setattr(bpfsys, "prog_attach", real_attach)
            assert hooks_in_use(cg) == {lay.EGRESS, lay.INGRESS}
            plan = net.read_config(cg)
            assert (plan.classid, plan.carrier, len(plan.priorities)) == (C10, "mark", 1)
            from pelagos_bpf.net import tc

            tc.add_mark_filter(t.ipr_a, t.links["va"])
            assert send(t, "va", N, cg) == {C10: N}  # the old carrier still classifies
        finally:
            net.detach_net(cg)


def _half_switched(cg) -> None:
    """What a process killed during a packet -> socket switch leaves: both carriers' programs
    (the same pinned or shared objects a later call loads) attached at once."""
    loaded = FEATURE.loaded()
    fd = cg.open_fd()
    try:
        for spec in lay.SOCKET_PROGS:
            FEATURE.attach(loaded.progs[spec.func], fd, spec, "net")
    finally:
        bpfsys.close(fd)
    assert hooks_in_use(cg) == set(HOOKS)


@pytest.mark.parametrize("to_socket", [True, False])
def test_a_switch_killed_half_way_is_completed_by_the_next_update(
    make_cgroup, to_socket: bool
) -> None:
    """The next update attaches only what is missing (the same program again would be EEXIST)
    and detaches what its carrier does not use."""
    cg = make_cgroup("half")
    with topology() as t:
        net.attach_net(cg, net.resolve_net(C10, [], None, carrier="priority"))
        try:
            _half_switched(cg)
            if to_socket:
                net.update_net(cg, socket_plan(C30), carrier="socket")
                assert hooks_in_use(cg) == {lay.SOCK_CREATE, lay.SETSOCKOPT}
                assert net.read_config(cg) == net.NetPlan(classid=C30, carrier="socket")
            else:  # the carrier in force (packet) stays; the update names the classid only
                net.update_net(cg, net.resolve_net(C30, [], None), frozenset({"classid"}))
                assert hooks_in_use(cg) == {lay.EGRESS, lay.INGRESS}
                assert net.read_config(cg).carrier == "priority"
            assert send(t, "va", N, cg) == {C30: N}
        finally:
            net.detach_net(cg)
        assert hooks_in_use(cg) == set()


def test_detach_is_idempotent(make_cgroup) -> None:
    cg = make_cgroup("idem")
    net.attach_net(cg, socket_plan(C10))
    net.detach_net(cg)
    net.detach_net(cg)
    assert hooks_in_use(cg) == set()
    assert net.read_config(cg) is None
    assert net.read_net_stats(cg) == {}
    assert not net.read_state(cg).attached
    cg.path.rmdir()
    net.detach_net(cg)  # cgroup gone


def test_setup_teardown_cycles_do_not_leak(cg_root) -> None:
    from pelagos_bpf import CgroupConfig, setup_cgroup, teardown_cgroup

    sh = FEATURE.loaded()
    base_objects = our_bpf_objects()
    base_fds = len(os.listdir("/proc/self/fd"))
    for i in range(50):
        cfg = CgroupConfig(net_classid=C10, net_carrier="socket", path=f"s{i}")
        cg = setup_cgroup(cfg, None, root=cg_root)
        if i == 0:  # config storage for the two socket hooks, none for the packet hooks
            keys = set(bpfsys.map_keys(sh.maps["net_cfg"], STORAGE_KEY.size))
            assert {STORAGE_KEY.pack(cg.id, at) for at in (lay.SOCK_CREATE, lay.SETSOCKOPT)} <= keys
            assert STORAGE_KEY.pack(cg.id, lay.EGRESS) not in keys
        teardown_cgroup(cg)
        assert not cg.path.exists()
    assert our_bpf_objects() == base_objects
    assert len(os.listdir("/proc/self/fd")) == base_fds
    # Cgroup storage is freed with the cgroup, asynchronously after rmdir: wait (bounded).
    deadline = time.monotonic() + 30
    left: list[bytes] = []
    while time.monotonic() < deadline:
        left = bpfsys.map_keys(sh.maps["net_cfg"], STORAGE_KEY.size)
        if not left:
            break
        time.sleep(0.05)
    assert left == []


@dataclass
class TosSender(lab.Worker):
    """Sets IP_TOS on a fresh socket, sends -> "<SO_PRIORITY read back>"."""

    dst: str
    count: int
    tos: int

    def run(self) -> str:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.setsockopt(socket.IPPROTO_IP, socket.IP_TOS, self.tos)
        for _ in range(self.count):
            s.sendto(b"x" * PAYLOAD, (self.dst, 9999))
        got = s.getsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY)
        s.close()
        return str(got)


def test_ip_tos_moves_an_ipv4_socket_out_of_its_class(make_cgroup) -> None:
    """The documented gap of the socket carrier: IPv4's IP_TOS makes the kernel reset the
    socket's priority (rt_tos2priority: 0x10, low delay -> 6); the guard keeps the app's TOS
    (DSCP on the wire) rather than the class. The packet carriers rewrite every packet."""
    cg = make_cgroup("tos")
    with topology() as t:
        net.attach_net(cg, socket_plan(C10))
        try:
            before = t.counters("va")
            w = TosSender(t.peers["va"], N, 0x10)
            assert lab.spawn(w, netns_path=t.path_a, cgroup=cg.path).go() == "6"
            assert delta(before, t.counters("va")) == {C20: N}
            net.update_net(cg, net.resolve_net(C10, [], None), carrier="priority")
            before = t.counters("va")
            assert lab.spawn(w, netns_path=t.path_a, cgroup=cg.path).go() == "6"
            assert delta(before, t.counters("va")) == {C10: N}
        finally:
            net.detach_net(cg)
