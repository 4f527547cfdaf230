"""Interface names resolve in the netns of the given pid, without moving the caller (root)."""

from __future__ import annotations

import os
from pathlib import Path

import netlab as lab
import pytest
from net_helpers import pid_in, topology

from pelagos_bpf import net
from pelagos_bpf.errors import ConfigError
from pelagos_bpf.net import resolve

pytestmark = [pytest.mark.root]


def test_own_netns_table_matches_the_socket_module() -> None:
    # An independent source: sysfs, not the if_nameindex() call interface_table itself uses.
    net = Path("/sys/class/net")
    expect = {d.name: int((d / "ifindex").read_text()) for d in net.iterdir()}
    assert resolve.interface_table(None) == expect
    assert resolve.interface_table(os.getpid()) == expect


def test_resolves_in_the_pids_netns_and_stays_in_ours() -> None:
    ours = resolve.netns_inode(None)
    with topology(("eth0",), a_dummies=2) as t, pid_in(t.path_a) as pid:
        table = resolve.interface_table(pid)
        assert table["eth0"] == t.links["eth0"]
        assert set(table) == {"lo", "eth0", "pad0", "padp0", "pad1", "padp1"}
        plan = net.resolve_net(0x10010, [("eth0", 7), ("lo", 3)], pid)
        assert plan.priorities == (("eth0", t.links["eth0"], 7), ("lo", 1, 3))
        assert plan.netns_inode == os.stat(lab.NETNS_DIR / t.a).st_ino
        # The lookup ran in a helper thread: neither this thread nor the process moved.
        assert resolve.netns_inode(None) == ours
        assert os.stat("/proc/self/ns/net").st_ino == ours


def test_unknown_name_in_that_netns_is_a_config_error() -> None:
    with topology(("eth0",)) as t, pid_in(t.path_a) as pid:
        with pytest.raises(ConfigError) as e:
            net.resolve_net(None, [("eth0", 1), ("va", 2)], pid)
        assert e.value.setting == "net_priorities[1]"
        assert f"pid {pid}" in e.value.reason


def test_missing_process_is_a_config_error() -> None:
    child = lab.spawn(lab.Idle())
    child.go()  # exited and reaped: its pid is free
    with pytest.raises(ConfigError) as e:
        net.resolve_net(None, [("lo", 1)], child.pid)
    assert e.value.setting == "net_priorities"


def test_no_priorities_needs_no_netns_lookup() -> None:
    plan = net.resolve_net(0x10010, [], 2**22 + 12345)  # no such pid: never looked at
    assert plan.classid == 0x10010 and plan.priorities == ()
