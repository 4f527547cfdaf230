"""Which files a config writes, with which values, in which order (pure planning)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pelagos_bpf import controllers
from pelagos_bpf.cgroup import SetupReport, _apply_writes
from pelagos_bpf.config import CgroupConfig
from pelagos_bpf.controllers import Write
from pelagos_bpf.errors import UnsupportedSetting


def files(cfg: CgroupConfig) -> list[tuple[str, str]]:
    return [(w.filename, w.value) for w in controllers.plan(cfg)]


def test_empty_config_writes_nothing_and_needs_nothing() -> None:
    assert controllers.plan(CgroupConfig()) == []
    assert controllers.needed_controllers([]) == []
    assert controllers.unsupported(CgroupConfig()) == []


def test_memory_swap_before_max_then_low() -> None:
    cfg = CgroupConfig(memory_limit=256 << 20, memory_swap=512 << 20, memory_reservation=1 << 20)
    assert files(cfg) == [
        ("memory.swap.max", str(256 << 20)),
        ("memory.max", str(256 << 20)),
        ("memory.low", str(1 << 20)),
    ]
    assert [w.setting for w in controllers.plan(cfg)] == [
        "memory_swap",
        "memory_limit",
        "memory_reservation",
    ]


def test_memory_unlimited_and_swap_disabled() -> None:
    assert files(CgroupConfig(memory_limit=-1, memory_swap=-1)) == [
        ("memory.swap.max", "max"),
        ("memory.max", "max"),
    ]
    assert files(CgroupConfig(memory_limit=100 << 20, memory_swap=100 << 20)) == [
        ("memory.swap.max", "0"),
        ("memory.max", str(100 << 20)),
    ]


def test_swappiness_is_unsupported_with_reason() -> None:
    (u,) = controllers.unsupported(CgroupConfig(memory_swappiness=10))
    assert u.setting == "memory_swappiness"
    assert "v1 only" in u.reason
    assert controllers.plan(CgroupConfig(memory_swappiness=10)) == []


def test_cpu_weight_and_max() -> None:
    cfg = CgroupConfig(cpu_shares=512, cpu_quota=(50000, 100000))
    assert files(cfg) == [("cpu.weight", "59"), ("cpu.max", "50000 100000")]
    assert files(CgroupConfig(cpu_quota=(-1, 250000))) == [("cpu.max", "max 250000")]


def test_cpuset_pids() -> None:
    cfg = CgroupConfig(cpuset_cpus="0-1", cpuset_mems="0", pids_limit=64)
    assert files(cfg) == [("cpuset.cpus", "0-1"), ("cpuset.mems", "0"), ("pids.max", "64")]
    assert files(CgroupConfig(pids_limit=-1)) == [("pids.max", "max")]


def test_io_weight_prefers_bfq_with_converted_fallback() -> None:
    (w,) = controllers.plan(CgroupConfig(blkio_weight=500))
    assert (w.filename, w.value, w.fallback) == ("io.bfq.weight", "500", ("io.weight", "4950"))


def test_io_max_one_write_per_device() -> None:
    cfg = CgroupConfig(
        blkio_throttle_read_bps=[(8, 0, 100)],
        blkio_throttle_write_iops=[(8, 0, 7), (7, 3, 9)],
    )
    ws = controllers.plan(cfg)
    assert [(w.filename, w.value) for w in ws] == [
        ("io.max", "8:0 rbps=100 wiops=7"),
        ("io.max", "7:3 wiops=9"),
    ]
    assert ws[0].setting == "blkio_throttle_read_bps+blkio_throttle_write_iops"


def test_needed_controllers_in_first_use_order() -> None:
    cfg = CgroupConfig(
        pids_limit=5, memory_limit=1 << 30, cpu_shares=2, blkio_weight=10, cpuset_cpus="0"
    )
    ws = controllers.plan(cfg)
    assert controllers.needed_controllers(ws) == ["memory", "cpu", "cpuset", "pids", "io"]
    assert {w.controller for w in ws} == {"memory", "cpu", "cpuset", "pids", "io"}


# Formatting of the apply step on a plain directory laid out like cgroupfs (no kernel).


def test_apply_uses_fallback_when_preferred_file_is_missing(tmp_path: Path) -> None:
    (tmp_path / "io.weight").write_text("default 100\n")
    report = SetupReport()
    _apply_writes(tmp_path, controllers.plan(CgroupConfig(blkio_weight=1000)), True, report)
    assert (tmp_path / "io.weight").read_text() == "10000"
    assert report.applied == ["blkio_weight"]
    assert report.written == [("io.weight", "10000")]


def test_apply_prefers_bfq_when_present(tmp_path: Path) -> None:
    (tmp_path / "io.weight").write_text("default 100\n")
    (tmp_path / "io.bfq.weight").write_text("default 100\n")
    _apply_writes(tmp_path, controllers.plan(CgroupConfig(blkio_weight=10)), True, SetupReport())
    assert (tmp_path / "io.bfq.weight").read_text() == "10"
    assert (tmp_path / "io.weight").read_text() == "default 100\n"


def test_apply_missing_file_strict_raises_best_effort_skips(tmp_path: Path) -> None:
    writes = [Write("memory_swap", "memory", "memory.swap.max", "0")]
    with pytest.raises(UnsupportedSetting) as e:
        _apply_writes(tmp_path, writes, True, SetupReport())
    assert e.value.setting == "memory_swap"
    assert "memory.swap.max does not exist" in e.value.reason
    report = SetupReport()
    _apply_writes(tmp_path, writes, False, report)
    assert report.applied == []
    assert report.skipped[0][0] == "memory_swap"
