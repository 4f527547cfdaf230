"""Which files a config writes, with which values, in which order (pure planning)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pelagos_bpf import controllers
from pelagos_bpf.cgroup import SetupReport, _apply_writes
from pelagos_bpf.config import CgroupConfig
from pelagos_bpf.controllers import Write, hugetlb
from pelagos_bpf.errors import ConfigError, UnsupportedSetting


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


# ---------------------------------------------------------------- runtime-spec v1.3 knobs


def test_memory_high_and_oom_group_typed() -> None:
    cfg = CgroupConfig(memory_limit=1 << 30, memory_high=512 << 20, memory_oom_group=True)
    assert files(cfg) == [
        ("memory.max", str(1 << 30)),
        ("memory.high", str(512 << 20)),
        ("memory.oom.group", "1"),
    ]
    assert files(CgroupConfig(memory_high=-1, memory_oom_group=False)) == [
        ("memory.high", "max"),
        ("memory.oom.group", "0"),
    ]


def test_cpu_burst_wraps_cpu_max_and_idle() -> None:
    """burst 0 -> cpu.max -> burst: valid from any old (quota, burst) state, as the kernel
    refuses burst > quota in either file."""
    cfg = CgroupConfig(cpu_quota=(50000, 100000), cpu_burst=20000, cpu_idle=1)
    assert files(cfg) == [
        ("cpu.max.burst", "0"),
        ("cpu.max", "50000 100000"),
        ("cpu.max.burst", "20000"),
        ("cpu.idle", "1"),
    ]
    assert files(CgroupConfig(cpu_burst=0)) == [("cpu.max.burst", "0")]


def test_weight_device_bfq_raw_else_io_weight_converted() -> None:
    ws = controllers.plan(CgroupConfig(blkio_weight_device=[(8, 0, 500), (8, 16, 10)]))
    assert [(w.setting, w.filename, w.value, w.fallback) for w in ws] == [
        ("blkio_weight_device[0]", "io.bfq.weight", "8:0 500", ("io.weight", "8:0 4950")),
        ("blkio_weight_device[1]", "io.bfq.weight", "8:16 10", ("io.weight", "8:16 1")),
    ]


def test_hugetlb_max_and_rsvd_with_fallback() -> None:
    ws = controllers.plan(CgroupConfig(hugepage_limits=[("2MB", 4 << 20), ("1GB", -1)]))
    assert [(w.filename, w.value, w.fallback) for w in ws] == [
        ("hugetlb.2MB.max", str(4 << 20), None),
        ("hugetlb.2MB.rsvd.max", str(4 << 20), ("hugetlb.2MB.max", str(4 << 20))),
        ("hugetlb.1GB.max", "max", None),
        ("hugetlb.1GB.rsvd.max", "max", ("hugetlb.1GB.max", "max")),
    ]


def test_hugetlb_absent_page_size_is_named(tmp_path: Path, monkeypatch) -> None:
    (tmp_path / "hugepages-2048kB").mkdir()
    (tmp_path / "hugepages-1048576kB").mkdir()
    monkeypatch.setattr(hugetlb, "HUGEPAGES_DIR", str(tmp_path))
    assert hugetlb.page_sizes() == [2 << 20, 1 << 30]
    cfg = CgroupConfig(hugepage_limits=[("2MB", 1), ("64KB", 1), ("1GB", 1)])
    (u,) = controllers.unsupported(cfg)
    assert u.setting == "hugepage_limits[1]"
    assert "64KB" in u.reason
    assert "has: 2MB, 1GB" in u.reason


def test_rdma_one_line_per_device() -> None:
    cfg = CgroupConfig(rdma_limits={"mlx5_1": (3, 10000), "mlx4_0": (None, 1000)})
    assert files(cfg) == [
        ("rdma.max", "mlx5_1 hca_handle=3 hca_object=10000"),
        ("rdma.max", "mlx4_0 hca_object=1000"),
    ]


def test_unified_after_typed_one_write_per_line() -> None:
    """runc writes unified last, so "cpu.weight" here beats the converted cpu_shares."""
    cfg = CgroupConfig(
        cpu_shares=1024,
        unified={"cpu.weight": "7", "io.max": "259:0 rbps=2097152\n253:0 wiops=120\n"},
    )
    ws = controllers.plan(cfg)
    assert [(w.filename, w.value) for w in ws] == [
        ("cpu.weight", "100"),
        ("cpu.weight", "7"),
        ("io.max", "259:0 rbps=2097152"),
        ("io.max", "253:0 wiops=120"),
    ]
    assert controllers.needed_controllers(ws) == ["cpu", "io"]
    assert ws[1].setting == "unified['cpu.weight']"


def test_check_before_update_refuses_limit_below_usage(tmp_path: Path) -> None:
    (tmp_path / "memory.current").write_text("104857600\n")
    low = CgroupConfig(memory_limit=50 << 20, memory_check_before_update=True)
    with pytest.raises(ConfigError) as e:
        controllers.preflight(tmp_path, low)
    assert e.value.setting == "memory_limit"
    assert "104857600" in e.value.reason
    controllers.preflight(
        tmp_path, CgroupConfig(memory_limit=200 << 20, memory_check_before_update=True)
    )
    controllers.preflight(tmp_path, CgroupConfig(memory_limit=50 << 20))  # check not asked
    controllers.preflight(tmp_path, CgroupConfig(memory_limit=-1, memory_check_before_update=True))
