"""read_stats: parsers on sample texts, and live values on the real cgroup2 mount."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from cgtest import rel, root_controllers

from pelagos_bpf import Cgroup, CgroupConfig, read_stats, setup_cgroup, teardown_cgroup
from pelagos_bpf.stats import ResourceStats, parse_flat_keyed, parse_io_stat, parse_pressure


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
        assert after.cpu_usage_ns % 1000 == 0  # usage_usec scaled to ns, as the seed does
        assert "cpu.some.avg10" in after.pressure and "io.full.total" in after.pressure
        if "memory" not in root_controllers():
            assert after.memory_current_bytes == 0  # no memory.current on this host: 0
        if "pids" not in root_controllers():
            assert after.pids_current == 0
        assert isinstance(after.device_denials, dict) and isinstance(after.net, dict)
    finally:
        teardown_cgroup(cg)
