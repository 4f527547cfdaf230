"""net_classid / net_priorities with real packets through HTB, in private netns (root)."""

from __future__ import annotations

import errno

import netlab as lab
import pytest
from net_helpers import C10, C20, C30, pid_in, send, topology

from pelagos_bpf import bpfsys, net
from pelagos_bpf.errors import BpfError
from pelagos_bpf.net import tc
from pelagos_bpf.net.layout import EGRESS, INGRESS, PRIO_KEY
from pelagos_bpf.net.program import FEATURE

pytestmark = [pytest.mark.root, pytest.mark.net]
N = 20


def attached_ids(cg) -> tuple[list[int], list[int]]:
    fd = cg.open_fd()
    try:
        return bpfsys.prog_query(fd, EGRESS), bpfsys.prog_query(fd, INGRESS)
    finally:
        bpfsys.close(fd)


def prio_entries(cg_id: int) -> list[bytes]:
    fd = FEATURE.loaded().maps["net_prios"]
    return [k for k in bpfsys.map_keys(fd, PRIO_KEY.size) if PRIO_KEY.unpack(k)[0] == cg_id]


def test_classid_via_priority(make_cgroup) -> None:
    cg = make_cgroup("cls")
    with topology() as t:
        net.attach_net(cg, net.resolve_net(C10, [], None))
        try:
            assert send(t, "va", N, cg) == {C10: N}
            assert send(t, "va", 5) == {C20: 5}  # sender outside the cgroup: default class
        finally:
            net.detach_net(cg)
        assert send(t, "va", 3, cg) == {C20: 3}  # detached: no longer classified


def test_classid_via_mark_needs_the_mark_filter(make_cgroup) -> None:
    cg = make_cgroup("mark")
    with topology() as t:
        net.attach_net(cg, net.resolve_net(C30, [], None, carrier="mark"))
        try:
            # The label is in skb->mark, not skb->priority: HTB alone does not see it...
            assert send(t, "va", 4, cg) == {C20: 4}
            tc.add_mark_filter(t.ipr_a, t.links["va"])
            # ...a mark filter (cls_bpf, the bare-fw equivalent) does.
            assert send(t, "va", N, cg) == {C30: N}
            assert send(t, "va", 5) == {C20: 5}
        finally:
            net.detach_net(cg)


def test_descendants_inherit_and_the_nearest_cgroup_wins(make_cgroup) -> None:
    parent = make_cgroup("p")
    child = make_cgroup("p/c")
    with topology() as t:
        net.attach_net(parent, net.resolve_net(C10, [], None))
        try:
            assert send(t, "va", N, child) == {C10: N}  # inherited from the parent
            net.attach_net(child, net.resolve_net(C30, [], None))
            assert send(t, "va", N, child) == {C30: N}  # child's own classid wins
            assert send(t, "va", 5, parent) == {C10: 5}
            stats = net.read_net_stats(parent)
            # The parent counts its whole subtree (descendants run its program too).
            assert stats["egress_packets"] == N + N + 5
            assert net.read_net_stats(child)["egress_packets"] == N
        finally:
            net.detach_net(child)
            net.detach_net(parent)


def test_update_net_is_a_map_write(make_cgroup) -> None:
    cg = make_cgroup("upd")
    with topology() as t:
        net.attach_net(cg, net.resolve_net(C10, [], None))
        try:
            ids = attached_ids(cg)
            assert send(t, "va", N, cg) == {C10: N}
            net.update_net(cg, net.resolve_net(C30, [], None))
            assert attached_ids(cg) == ids  # same programs: no reload, no re-attach
            assert send(t, "va", N, cg) == {C30: N}
            net.update_net(cg, net.resolve_net(None, [], None))
            assert send(t, "va", 5, cg) == {C20: 5}
        finally:
            net.detach_net(cg)


def test_priorities_per_interface_and_live_update(make_cgroup) -> None:
    cg = make_cgroup("prio")
    with topology(("va", "vc")) as t:
        prios = [("va", C10), ("vc", C30)]
        with pid_in(t.path_a) as pid:
            net.attach_net(cg, net.resolve_net(None, prios, pid))
        try:
            assert send(t, "va", N, cg) == {C10: N}
            assert send(t, "vc", N, cg) == {C30: N}
            with pid_in(t.path_a) as pid:
                net.update_net(cg, net.resolve_net(None, [("va", C30)], pid))
            assert send(t, "va", N, cg) == {C30: N}
            assert send(t, "vc", 5, cg) == {C20: 5}  # dropped from the map: unclassified
            assert len(prio_entries(cg.id)) == 1
        finally:
            net.detach_net(cg)
        assert prio_entries(cg.id) == []


def test_app_so_priority_is_kept(make_cgroup) -> None:
    cg = make_cgroup("keep")
    with topology() as t:
        with pid_in(t.path_a) as pid:  # mark carrier (auto)
            net.attach_net(cg, net.resolve_net(C10, [("va", C10)], pid))
        try:
            assert send(t, "va", N, cg) == {C10: N}
            assert send(t, "va", N, cg, priority=C30) == {C30: N}  # app's value survives
        finally:
            net.detach_net(cg)


def test_priority_carrier_replaces_plain_so_priority_but_not_a_classid(make_cgroup) -> None:
    cg = make_cgroup("repl")
    with topology() as t:
        net.attach_net(cg, net.resolve_net(C10, [], None))
        try:
            assert send(t, "va", N, cg, priority=6) == {C10: N}  # TC_PRIO_INTERACTIVE replaced
            assert send(t, "va", N, cg, priority=C30) == {C30: N}  # an explicit class is kept
        finally:
            net.detach_net(cg)


def test_container_like_process_eth0_resolved_in_its_netns(cg_root) -> None:
    from pelagos_bpf import CgroupConfig, setup_cgroup, teardown_cgroup

    with topology(("eth0",), a_dummies=3) as t:
        # The "container": a process living in netns a, not yet in any cgroup of ours.
        worker = lab.spawn(lab.UdpSender(t.peers["eth0"], N, 100), netns_path=t.path_a)
        try:
            plan = net.resolve_net(None, [("eth0", C10)], worker.pid)
            assert plan.priorities == (("eth0", t.links["eth0"], C10),)
            cfg = CgroupConfig(net_priorities=[("eth0", C10)], path="ctr")
            cg = setup_cgroup(cfg, worker.pid, root=cg_root)
            try:
                before = t.counters("eth0")
                assert worker.go().split()[0] == str(N)
                after = t.counters("eth0")
                assert after[C10][1] - before[C10][1] == N
                assert after[C20][1] == before[C20][1]
            finally:
                teardown_cgroup(cg)
        finally:
            worker.kill()


def test_setup_cgroup_classid_and_unknown_interface(cg_root) -> None:
    from pelagos_bpf import CgroupConfig, ConfigError, setup_cgroup, teardown_cgroup

    with topology() as t:
        worker = lab.spawn(lab.UdpSender(t.peers["va"], N, 100), netns_path=t.path_a)
        try:
            bad = CgroupConfig(net_classid=C10, net_priorities=[("nope0", 1)], path="bad")
            with pytest.raises(ConfigError) as e:
                setup_cgroup(bad, worker.pid, root=cg_root)
            assert e.value.setting == "net_priorities[0]"
            assert not (cg_root / "bad").exists()  # rejected before anything was created

            cg = setup_cgroup(CgroupConfig(net_classid=C30, path="ok"), worker.pid, root=cg_root)
            try:
                before = t.counters("va")
                worker.go()
                after = t.counters("va")
                assert after[C30][1] - before[C30][1] == N
            finally:
                teardown_cgroup(cg)
        finally:
            worker.kill()


def test_attach_twice_is_an_update(make_cgroup) -> None:
    """The contract every feature shares: attach on a cgroup that has ours updates it."""
    cg = make_cgroup("twice")
    net.attach_net(cg, net.resolve_net(C10, [], None))
    try:
        ids = attached_ids(cg)
        net.attach_net(cg, net.resolve_net(C30, [], None))
        assert attached_ids(cg) == ids  # no second program
        assert net.read_config(cg).classid == C30
    finally:
        net.detach_net(cg)


def test_failed_attach_leaves_nothing(make_cgroup, monkeypatch) -> None:
    cg = make_cgroup("fail")
    FEATURE.loaded()
    real_attach = bpfsys.prog_attach

    def failing_attach(prog_fd, target_fd, attach_type, *a, **kw):
        if attach_type == INGRESS:  # the last step: egress + map entries are already there
            raise BpfError(errno.EPERM, "BPF_PROG_ATTACH", "injected")
        return real_attach(prog_fd, target_fd, attach_type, *a, **kw)

    monkeypatch.setattr(bpfsys, "prog_attach", failing_attach)
    with pytest.raises(BpfError, match="injected"):
        net.attach_net(cg, net.resolve_net(C10, [("lo", C30)], None))
    assert attached_ids(cg) == ([], [])
    assert prio_entries(cg.id) == []


def test_detach_is_idempotent(make_cgroup) -> None:
    cg = make_cgroup("idem")
    net.detach_net(cg)  # never attached
    net.attach_net(cg, net.resolve_net(C10, [("lo", C30)], None))
    net.detach_net(cg)
    net.detach_net(cg)
    assert attached_ids(cg) == ([], [])
    assert net.read_net_stats(cg) == {}
    assert net.read_config(cg) is None
    cg.path.rmdir()
    net.detach_net(cg)  # cgroup gone


def test_reattach_starts_counting_from_zero(make_cgroup) -> None:
    cg = make_cgroup("re")
    with topology() as t:
        net.attach_net(cg, net.resolve_net(C10, [], None))
        send(t, "va", 5, cg)
        assert net.read_net_stats(cg)["egress_packets"] == 5
        net.detach_net(cg)
        # The kernel keeps the cgroup's storage until the cgroup dies; attach resets it.
        net.attach_net(cg, net.resolve_net(C30, [], None))
        try:
            assert net.read_net_stats(cg)["egress_packets"] == 0
            assert send(t, "va", 3, cg) == {C30: 3}
            assert net.read_net_stats(cg)["egress_packets"] == 3
        finally:
            net.detach_net(cg)


def test_another_process_finds_detaches_and_reads(make_cgroup) -> None:
    import subprocess
    import sys

    cg = make_cgroup("other")
    net.attach_net(cg, net.resolve_net(C10, [("lo", C30)], None))
    code = (
        "import json, sys\n"
        "from pelagos_bpf.cgroup import Cgroup\n"
        "from pelagos_bpf import net\n"
        "cg = Cgroup.open(sys.argv[1])\n"
        "plan = net.read_config(cg)\n"
        "print(json.dumps([plan.classid, plan.carrier, len(plan.priorities), "
        "sorted(net.read_net_stats(cg))]))\n"
        "net.detach_net(cg)\n"
        "from pelagos_bpf.net import program\n"
        "assert program.FEATURE.loaded_if_any() is None  # never loaded its own programs\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(cg.path)], capture_output=True, text=True, check=True
    )
    classid, carrier, nprios, keys = __import__("json").loads(out.stdout)
    assert (classid, carrier, nprios) == (C10, "mark", 1)
    assert keys == ["egress_bytes", "egress_packets", "ingress_bytes", "ingress_packets"]
    assert attached_ids(cg) == ([], [])
    assert prio_entries(cg.id) == []


def test_classid_via_mark_with_a_bare_fw_filter(make_cgroup) -> None:
    from pyroute2.netlink.exceptions import NetlinkError

    cg = make_cgroup("fw")
    with topology() as t:
        try:
            tc.add_fw_filter(t.ipr_a, t.links["va"])
        except NetlinkError as e:
            if e.code == errno.ENOENT:
                pytest.skip("kernel has no cls_fw (CONFIG_NET_CLS_FW); add_mark_filter covers it")
            raise
        net.attach_net(cg, net.resolve_net(C30, [], None, carrier="mark"))
        try:
            assert send(t, "va", N, cg) == {C30: N}
        finally:
            net.detach_net(cg)
