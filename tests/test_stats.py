"""read_stats: parsers on sample texts, and live values on the real cgroup2 mount."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cgtest import rel
from device_helpers import probe

from pelagos_bpf import Cgroup, CgroupConfig, read_stats, setup_cgroup, teardown_cgroup
from pelagos_bpf.config import CgroupDeviceRule as R
from pelagos_bpf.devices import DEFAULT_DEVICE_RULES
from pelagos_bpf.stats import (
    ResourceStats,
    parse_flat_keyed,
    parse_io_stat,
    parse_pressure,
    read_stats_many,
)


def test_parse_flat_keyed() -> None:
    text = "usage_usec 1200\nuser_usec 1000\nnr_throttled 3\nbogus\nx y z\n"
    assert parse_flat_keyed(text) == {"usage_usec": 1200, "user_usec": 1000, "nr_throttled": 3}


def test_parse_io_stat_sums_devices() -> None:
    text = (
        "8:0 rbytes=1000 wbytes=20 rios=1 wios=2 dbytes=0 dios=0\n"
        "253:1 rbytes=5 wbytes=7 rios=1 wios=1 dbytes=0 dios=0\n"
    )
    assert parse_io_stat(text) == (1005, 27)
    assert parse_io_stat("") == (0, 0)


def test_parse_pressure() -> None:
    text = (
        "some avg10=1.09 avg60=1.20 avg300=0.91 total=8583031\n"
        "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n\n"
    )
    p = parse_pressure("cpu", text)
    assert p["cpu.some.avg10"] == 1.09
    assert p["cpu.some.total"] == 8583031
    assert p["cpu.full.avg300"] == 0.0
    assert len(p) == 8


def test_missing_files_give_zero(tmp_path: Path) -> None:
    s = read_stats(Cgroup(tmp_path, 0, tmp_path.parent))
    assert s.memory_current_bytes == s.cpu_usage_ns == s.pids_current == 0
    assert s.pressure == {}
    assert s.to_dict()["memory_oom_kill"] == 0
    assert s.device_denials == {} and s.net == {}


def test_seed_fields_come_first() -> None:
    names = list(ResourceStats().to_dict())
    assert names[:3] == ["memory_current_bytes", "cpu_usage_ns", "pids_current"]


@pytest.mark.root
def test_live_cpu_usage_and_pressure(cg_root: Path) -> None:
    busy = subprocess.Popen(
        ["sh", "-c", "read go; i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done"],
        stdin=subprocess.PIPE,
    )
    cg = setup_cgroup(CgroupConfig(path=rel(cg_root, "busy")), busy.pid)
    try:
        before = read_stats(cg)
        busy.communicate(b"go\n", timeout=60)
        after = read_stats(cg)
        assert after.cpu_usage_ns > before.cpu_usage_ns
        assert after.cpu_usage_ns >= after.cpu_user_ns > 0
        assert "cpu.some.avg10" in after.pressure and "io.full.total" in after.pressure
        # A counter is real exactly when the cgroup has its controller, else 0 (hybrid host).
        assert (before.memory_current_bytes > 0) == ("memory" in before.controllers)
        assert before.pids_current == (1 if "pids" in before.controllers else 0)
    finally:
        teardown_cgroup(cg)


def test_many_of_missing_dirs_gives_zeros(tmp_path: Path) -> None:
    gone = Cgroup(tmp_path / "gone", 0, tmp_path)
    plain = Cgroup(tmp_path, 0, tmp_path.parent)  # a directory, but not a cgroup
    assert read_stats_many([gone, plain]) == [ResourceStats(), ResourceStats()]
    assert read_stats_many([]) == []


@pytest.mark.root
def test_read_stats_many_matches_read_stats(cg_root: Path) -> None:
    """Denials differ per cgroup; the shared walk must hand each cgroup its own, in order."""
    deny = [*DEFAULT_DEVICE_RULES, R(False, "c", 240, -1, "rwm")]
    cgs = [
        setup_cgroup(CgroupConfig(path=rel(cg_root, f"c{i}"), device_rules=deny), None)
        for i in range(3)
    ]
    plain = setup_cgroup(CgroupConfig(path=rel(cg_root, "plain")), None)
    try:
        for i, cg in enumerate(cgs):  # cgroup i gets i+1 denied opens of c 240:i
            assert probe(cg.path, [("c", 240, i, "r")] * (i + 1)) == [False] * (i + 1)
        order = [cgs[2], plain, cgs[0], cgs[1], cgs[0]]
        many = read_stats_many(order)
        assert [s.device_denials for s in many] == [
            {"c 240:2 r": 3},
            {},
            {"c 240:0 r": 1},
            {"c 240:1 r": 2},
            {"c 240:0 r": 1},
        ]
        one = [read_stats(cg) for cg in order]
        assert [s.device_denials for s in many] == [s.device_denials for s in one]
        assert [s.controllers for s in many] == [s.controllers for s in one]
    finally:
        for cg in (*cgs, plain):
            teardown_cgroup(cg)


@pytest.mark.root
@pytest.mark.net
def test_read_stats_many_counts_net_per_cgroup(make_cgroup) -> None:
    from net_helpers import IP4_LEN, send, topology

    from pelagos_bpf import net

    a, b, c = make_cgroup("a"), make_cgroup("b"), make_cgroup("c")
    with topology() as t:
        for cg in (a, b):
            net.attach_net(cg, net.resolve_net(None, [], None))
        try:
            send(t, "va", 3, a)
            send(t, "va", 5, b)
            many = read_stats_many([b, c, a])
            assert [s.net.get("egress_packets") for s in many] == [5, None, 3]
            assert many[0].net["egress_bytes"] == 5 * IP4_LEN
            assert [s.net for s in many] == [read_stats(cg).net for cg in (b, c, a)]
        finally:
            for cg in (a, b):
                net.detach_net(cg)
