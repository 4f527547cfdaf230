"""Pure semantics of net_classid / net_priorities / carrier (no root, no kernel)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pelagos_bpf.errors import ConfigError
from pelagos_bpf.net import NetPlan, build_plan, choose_carrier, validate_net
from pelagos_bpf.net.plan import F_MARK, F_PRIOS
from pelagos_bpf.net.tc import classid_str

IFACES = {"lo": 1, "eth0": 7, "wlan0": 9}


@pytest.mark.parametrize("classid", [None, 0, 0x00010010, 0x00010001, 0xFFFE_FFFF, 0x12345678])
def test_valid_classids(classid: int | None) -> None:
    validate_net(classid, [])


@pytest.mark.parametrize(
    ("classid", "why"),
    [
        (-1, "u32"),
        (1 << 32, "u32"),
        (True, "integer"),
        ("1:10", "integer"),
        (0x0000_0010, "major 0x0"),
        (0xFFFF_0010, "major 0xffff"),
        (0x0001_0000, "minor 0"),
    ],
)
def test_invalid_classids_name_the_field(classid: object, why: str) -> None:
    with pytest.raises(ConfigError) as e:
        validate_net(classid, [])
    assert e.value.setting == "net_classid"
    assert why in e.value.reason


@given(major=st.integers(1, 0xFFFE), minor=st.integers(1, 0xFFFF))
def test_every_real_class_is_accepted(major: int, minor: int) -> None:
    plan = build_plan(major << 16 | minor, [], "auto", {})
    assert plan.classid == major << 16 | minor
    assert plan.carrier == "priority"


@pytest.mark.parametrize(
    ("prios", "setting", "why"),
    [
        ("eth0", "net_priorities", "list"),
        ([("eth0",)], "net_priorities[0]", "pair"),
        ([("eth0", 1), ("eth0/x", 2)], "net_priorities[1]", "valid interface name"),
        ([("", 1)], "net_priorities[0]", "1..15"),
        ([("a" * 16, 1)], "net_priorities[0]", "1..15"),
        ([("eth0", -1)], "net_priorities[0]", "u32"),
        ([("eth0", 1 << 32)], "net_priorities[0]", "u32"),
        ([("eth0", 1), ("lo", 2), ("eth0", 3)], "net_priorities[2]", "net_priorities[0]"),
    ],
)
def test_invalid_priorities_name_the_entry(prios: object, setting: str, why: str) -> None:
    with pytest.raises(ConfigError) as e:
        validate_net(None, prios)
    assert e.value.setting == setting
    assert why in e.value.reason


def test_carrier_choice() -> None:
    assert choose_carrier("auto", False) == "priority"
    assert choose_carrier("auto", True) == "mark"
    assert choose_carrier("mark", False) == "mark"
    assert choose_carrier("priority", False) == "priority"


def test_priority_carrier_with_priorities_is_refused() -> None:
    with pytest.raises(ConfigError) as e:
        validate_net(0x10010, [("eth0", 5)], "priority")
    assert e.value.setting == "net_carrier"


def test_unknown_carrier_is_refused() -> None:
    with pytest.raises(ConfigError) as e:
        validate_net(0x10010, [], "tc_classid")
    assert e.value.setting == "net_carrier"


def test_build_plan_resolves_names_and_sets_flags() -> None:
    plan = build_plan(0x10010, [("eth0", 3), ("wlan0", 0x10020)], "auto", IFACES, netns_inode=42)
    assert plan.priorities == (("eth0", 7, 3), ("wlan0", 9, 0x10020))
    assert plan.carrier == "mark"
    assert plan.flags == F_MARK | F_PRIOS
    assert plan.prio_by_ifindex() == {7: 3, 9: 0x10020}
    assert plan.netns_inode == 42
    assert not plan.empty


def test_build_plan_unknown_interface_names_the_entry_and_the_netns() -> None:
    with pytest.raises(ConfigError) as e:
        build_plan(None, [("eth0", 1), ("eth1", 2)], "auto", IFACES, "the netns of pid 7")
    assert e.value.setting == "net_priorities[1]"
    assert "eth1" in e.value.reason and "pid 7" in e.value.reason
    assert "eth0" in e.value.reason  # lists what exists, to make the typo obvious


def test_empty_plan() -> None:
    plan = build_plan(None, [], "auto", {})
    assert plan.empty and plan.flags == 0 and plan == NetPlan()


def test_classid_str() -> None:
    assert classid_str(0x00010010) == "1:10"
    assert classid_str(0xABCD_0001) == "abcd:1"


def test_socket_carrier_rules() -> None:
    from pelagos_bpf.net.plan import F_SOCKET, carried_in

    assert choose_carrier("socket", False) == "socket"  # never picked by "auto"
    assert choose_carrier("auto", False) == "priority"
    plan = build_plan(0x10010, None, "socket", {})
    assert (plan.carrier, plan.flags) == ("socket", F_SOCKET)
    validate_net(None, [], "socket")  # nothing to classify: allowed, as with the others
    with pytest.raises(ConfigError) as e:
        validate_net(0x10010, [("eth0", 1)], "socket")
    assert e.value.setting == "net_carrier"
    assert "egress interface" in str(e.value)
    assert carried_in("socket").startswith("sk->sk_priority")
    assert carried_in("mark") == "skb->mark"
