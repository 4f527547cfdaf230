"""update_cgroup changes exactly what the update names (issue 9): read back from the maps."""

from __future__ import annotations

from pathlib import Path

import pytest

from pelagos_bpf import (
    CgroupConfig,
    ConfigError,
    net,
    setup_cgroup,
    teardown_cgroup,
    update_cgroup,
)
from pelagos_bpf.cgroup import Cgroup

pytestmark = [pytest.mark.root]
C10, C20 = 0x10010, 0x10020
LO = 1  # ifindex of lo in our netns


def state(cg: Cgroup) -> tuple[int, str | None, tuple[tuple[int, str | None, int], ...]]:
    s = net.read_state(cg)
    return s.classid, s.carrier, s.priorities


def setup(cg_root: Path, name: str, carrier: str | None = None, **kw) -> Cgroup:
    return setup_cgroup(
        CgroupConfig(path=f"{cg_root.name}/{name}", **kw), None, net_carrier=carrier
    )


# (setup kwargs, setup carrier, update kwargs, expected (classid, carrier, priorities))
CASES = {
    "priorities only keeps classid and mark carrier": (
        {"net_classid": C10},
        "mark",
        {"net_priorities": [("lo", 7)]},
        (C10, "mark", ((LO, "lo", 7),)),
    ),
    "classid only keeps priorities and carrier": (
        {"net_classid": C10, "net_priorities": [("lo", 7)]},
        None,
        {"net_classid": C20},
        (C20, "mark", ((LO, "lo", 7),)),
    ),
    "classid only keeps the priority carrier": (
        {"net_classid": C10},
        None,
        {"net_classid": C20},
        (C20, "priority", ()),
    ),
    "priorities only keeps priorities-only setup": (
        {"net_priorities": [("lo", 7)]},
        None,
        {"net_priorities": [("lo", 9)]},
        (0, "mark", ((LO, "lo", 9),)),
    ),
    "classid added to a priorities-only cgroup keeps the priorities": (
        {"net_priorities": [("lo", 7)]},
        None,
        {"net_classid": C20},
        (C20, "mark", ((LO, "lo", 7),)),
    ),
    "both named: both change": (
        {"net_classid": C10, "net_priorities": [("lo", 7)]},
        None,
        {"net_classid": C20, "net_priorities": [("lo", 9)]},
        (C20, "mark", ((LO, "lo", 9),)),
    ),
    "first net settings on a cgroup without net": (
        {},
        None,
        {"net_classid": C20},
        (C20, "priority", ()),
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_update_changes_exactly_what_it_names(cg_root: Path, case: str) -> None:
    setup_kw, carrier, update_kw, want = CASES[case]
    cg = setup(cg_root, "u", carrier, **setup_kw)
    try:
        update_cgroup(cg, CgroupConfig(**update_kw))
        assert state(cg) == want
        assert net.read_state(cg).trusted  # our bytecode, by tag
    finally:
        teardown_cgroup(cg)


def test_priorities_on_a_priority_carrier_are_refused_and_change_nothing(cg_root: Path) -> None:
    """The classid rides in skb->priority: priorities cannot share it unless the update names
    the mark carrier. Refused before any write."""
    cg = setup(cg_root, "refuse", None, net_classid=C10)
    try:
        before = state(cg)
        with pytest.raises(ConfigError) as e:
            update_cgroup(cg, CgroupConfig(net_priorities=[("lo", 7)]))
        assert e.value.setting == "net_carrier"
        assert state(cg) == before == (C10, "priority", ())
        # naming the carrier makes it possible, and keeps the classid
        net.update_net(
            cg, net.resolve_net(None, [("lo", 7)], None), frozenset({"priorities"}), "mark"
        )
        assert state(cg) == (C10, "mark", ((LO, "lo", 7),))
    finally:
        teardown_cgroup(cg)


def test_carrier_only_update_keeps_classid_and_priorities(cg_root: Path) -> None:
    cg = setup(cg_root, "carrier", "mark", net_classid=C10)
    try:
        net.update_net(cg, net.NetPlan(), frozenset(), "priority")
        assert state(cg) == (C10, "priority", ())
    finally:
        teardown_cgroup(cg)
