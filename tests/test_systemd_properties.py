"""The systemd driver's pure parts: unit names, the property mapping per systemd version, the
D-Bus layer's errors without a bus. The driver itself runs against systemd 252 in the
`--init systemd` guest (tests/test_systemd_driver.py)."""

from __future__ import annotations

import builtins
from pathlib import Path
from typing import Any

import pytest

from pelagos_bpf import controllers, convert
from pelagos_bpf.config import CgroupConfig
from pelagos_bpf.errors import ConfigError
from pelagos_bpf.systemd import dbus, driver, names, properties
from pelagos_bpf.systemd.properties import INFINITY, cpuset_bits, plan, quota_per_sec


def props(p: properties.Plan) -> dict[str, Any]:
    return {x.name: x.value for x in p.properties}


def routes(p: properties.Plan) -> dict[str, properties.Route]:
    return {r.setting: r for r in p.routes}


# ---------------------------------------------------------------- names


def test_unit_names_follow_systemds_rules() -> None:
    assert names.parse("system.slice:pelagos:t1").unit == "pelagos-t1.scope"
    assert names.parse("system.slice:pelagos:a_b.c\\x2d").unit == "pelagos-a_b.c\\x2d.scope"
    for bad in ("system.slice:pelagos:t 1", "system.slice:pelagos:t@1", "system.slice:pé:x"):
        with pytest.raises(ConfigError, match="unit names use only") as e:
            names.parse(bad)
        assert e.value.setting == "path"
    with pytest.raises(ConfigError, match="255 bytes"):
        names.parse("system.slice:p:" + "x" * 250)
    for bad_slice in ("a--b.slice:p:x", "-a.slice:p:x", "a b.slice:p:x", "system:p:x"):
        with pytest.raises(ConfigError) as e:
            names.parse(bad_slice)
        assert e.value.setting == "path"


def test_driver_refuses_before_any_bus_call() -> None:
    """Bad input is a ConfigError from pure checks: these run on a host without systemd."""
    with pytest.raises(ConfigError, match="slice: the driver creates scopes only"):
        driver.ScopeSpec.from_path("system.slice::my.slice")
    spec = driver.ScopeSpec.from_path("system.slice:pelagos:t1")
    assert (spec.unit, spec.cgroup_path) == ("pelagos-t1.scope", "system.slice/pelagos-t1.scope")
    with pytest.raises(ConfigError, match="no PIDs") as e:
        driver.start_scope(spec, None)
    assert e.value.setting == "pid"
    with pytest.raises(ConfigError, match="not a BPFProgram= type"):
        driver.start_scope(spec, 1, bpf_programs=[("xdp", "/sys/fs/bpf/x")])
    with pytest.raises(ConfigError, match="absolute"):
        driver.start_scope(spec, 1, bpf_programs=[("device", "/sys/fs/bpf/../x")])
    with pytest.raises(ConfigError, match="not a pinned BPF program") as e:
        driver.start_scope(spec, 1, bpf_programs=[("device", "/nonexistent/pin")])
    assert e.value.setting == "bpf_programs"
    with pytest.raises(ConfigError, match="unit names use only"):
        driver.start_scope(driver.ScopeSpec("system.slice", "bad name.scope"), 1)


# ---------------------------------------------------------------- runc's conversions


def test_cpuset_bits_as_runc_range_to_bits() -> None:
    """Vectors of runc's TestRangeToBits (byte i bit j = CPU 8i+j, as systemd reads it)."""
    assert cpuset_bits("0", "c") == b"\x01"
    assert cpuset_bits("1,3-5", "c") == bytes([0b0011_1010])
    assert cpuset_bits("0-7", "c") == b"\xff"
    assert cpuset_bits("8", "c") == b"\x00\x01"
    assert cpuset_bits("0-9,", "c") == b"\xff\x03"
    assert cpuset_bits(" 2 , 4 ", "c") == bytes([0b10100])
    for bad in ("", ",", "3-1", "a", "1-", "-1"):
        with pytest.raises(ConfigError) as e:
            cpuset_bits(bad, "cpuset_cpus")
        assert e.value.setting == "cpuset_cpus"


def test_quota_rounds_up_to_10ms_as_runc() -> None:
    assert quota_per_sec(50_000, 100_000) == 500_000
    assert quota_per_sec(12_345, 100_000) == 130_000  # 123.45 ms/s -> 130 ms/s
    assert quota_per_sec(1, 1_000_000) == 10_000
    assert quota_per_sec(-1, 100_000) == INFINITY
    assert quota_per_sec(0, 100_000) == INFINITY


# ---------------------------------------------------------------- the plan on systemd 252

FULL = CgroupConfig(
    memory_limit=64 << 20,
    memory_reservation=16 << 20,
    memory_high=48 << 20,
    memory_swap=96 << 20,
    memory_oom_group=True,
    cpu_shares=2048,
    cpu_quota=(50_000, 100_000),
    cpu_burst=10_000,
    cpuset_cpus="0-1",
    cpuset_mems="0",
    pids_limit=77,
    blkio_weight=500,
    blkio_weight_device=[(7, 0, 200)],
    blkio_throttle_read_bps=[(7, 0, 1 << 20)],
    blkio_throttle_write_iops=[(7, 0, 100)],
    hugepage_limits=[("2MB", 4 << 20)],
    rdma_limits={"mlx5_0": (10, None)},
)


def test_plan_on_252_carries_what_runc_does_and_io() -> None:
    p = plan(FULL, 252)
    assert props(p) == {
        "MemoryMax": 64 << 20,
        "MemoryLow": 16 << 20,
        "MemoryHigh": 48 << 20,
        "MemorySwapMax": 32 << 20,  # OCI swap is memory+swap
        "OOMPolicy": "kill",
        "CPUWeight": convert.shares_to_weight(2048),
        "CPUQuotaPeriodUSec": 100_000,
        "CPUQuotaPerSecUSec": 500_000,
        "TasksMax": 77,
        "AllowedCPUs": b"\x03",
        "AllowedMemoryNodes": b"\x01",
        "IOWeight": 4950,  # blkio_weight_to_io_weight(500)
        "IODeviceWeight": [("/dev/block/7:0", 1920)],
        "IOReadBandwidthMax": [("/dev/block/7:0", 1 << 20)],
        "IOWriteIOPSMax": [("/dev/block/7:0", 100)],
    }
    # files: only what systemd does not manage, all of it reload-safe
    assert [(w.setting, w.filename) for w in p.files] == [
        ("cpu_burst", "cpu.max.burst"),
        ("cpu_burst", "cpu.max.burst"),
        ("hugepage_limits[0]", "hugetlb.2MB.max"),
        ("hugepage_limits[0]", "hugetlb.2MB.rsvd.max"),
        ("rdma_limits['mlx5_0']", "rdma.max"),
    ]
    assert p.unsafe() == []
    r = routes(p)
    assert r["memory_limit"].via == "systemd" and r["hugepage_limits[0]"].via == "file"
    # every setting the cgroupfs path would write has a route, and each says one path
    written = {s for w in controllers.plan(FULL) for s in w.setting.split("+")}  # io.max lines
    assert written <= set(r)
    assert len(r) == len(p.routes)


def test_cpu_idle_and_weight_share_one_property() -> None:
    p = plan(CgroupConfig(cpu_idle=1, cpu_shares=1024), 252)
    assert props(p) == {"CPUWeight": 0}
    r = routes(p)
    assert r["cpu_idle"].what == "CPUWeight=idle" and "superseded" in r["cpu_shares"].what
    p = plan(CgroupConfig(cpu_idle=0), 252)
    assert props(p) == {} and p.files == [] and routes(p)["cpu_idle"].via == "systemd"
    p = plan(CgroupConfig(cpu_idle=1), 251)  # systemd before 252 leaves cpu.idle alone
    assert props(p) == {} and [w.filename for w in p.files] == ["cpu.idle"]
    assert routes(p)["cpu_idle"].reload_safe


def test_inexact_quota_is_also_written_and_flagged() -> None:
    p = plan(CgroupConfig(cpu_quota=(12_345, 100_000)), 252)
    assert props(p)["CPUQuotaPerSecUSec"] == 130_000
    assert [(w.filename, w.value) for w in p.files] == [("cpu.max", "12345 100000")]
    (bad,) = p.unsafe()
    assert bad.setting == "cpu_quota" and "13000 100000" in bad.what
    assert "lost at daemon-reload" in bad.what


@pytest.mark.parametrize(
    ("version", "expect_props", "expect_files"),
    [
        (244, {"AllowedCPUs", "CPUQuotaPeriodUSec", "TasksMax", "IOWeight"}, set()),
        (243, {"CPUQuotaPeriodUSec", "TasksMax", "IOWeight"}, {"cpuset.cpus"}),
        (241, {"CPUQuotaPerSecUSec", "TasksMax"}, {"cpuset.cpus", "cpu.max"}),
        (239, {"TasksMax", "IOWeight"}, {"cpuset.cpus", "io.max"}),
        (229, {"TasksMax"}, {"cpuset.cpus", "io.weight", "memory.max", "io.max"}),
    ],
)
def test_older_systemd_falls_back_to_files(
    version: int, expect_props: set[str], expect_files: set[str]
) -> None:
    cfg = CgroupConfig(
        memory_limit=1 << 30,
        cpu_quota=(25_000, 50_000),
        cpuset_cpus="0",
        pids_limit=10,
        blkio_weight=100,
        blkio_throttle_read_bps=[(7, 0, 1000)],
    )
    p = plan(cfg, version)
    assert expect_props <= set(props(p))
    files = {f for w in p.files for f, _ in w.files()}
    assert expect_files <= files
    for r in p.routes:
        if r.via == "file":
            assert r.reload_safe == (not properties.managed_by_systemd(r.what.split()[0], version))
    if version < 240:
        assert "MAJ:MIN paths since 240" in routes(p)["blkio_throttle_read_bps"].what


def test_pids_zero_is_a_file_systemd_would_refuse() -> None:
    p = plan(CgroupConfig(pids_limit=0), 252)
    assert props(p) == {} and [(w.filename, w.value) for w in p.files] == [("pids.max", "0")]
    assert "TasksMax=0" in p.unsafe()[0].what
    assert props(plan(CgroupConfig(pids_limit=-1), 252)) == {"TasksMax": INFINITY}


def test_unified_as_runc_with_strict_values() -> None:
    cfg = CgroupConfig(
        memory_limit=1 << 30,
        unified={
            "memory.max": "max",  # raw overrides typed, as on the cgroupfs path
            "memory.min": "4096",
            "pids.max": "12",
            "cpu.max": "max 50000",
            "cpuset.mems": "0",
            "memory.oom.group": "1",
            "misc.max": "res_a 1",
            "io.weight": "default 200",
        },
    )
    p = plan(cfg, 252)
    assert props(p) == {
        "MemoryMax": INFINITY,
        "MemoryMin": 4096,
        "TasksMax": 12,
        "CPUQuotaPeriodUSec": 50_000,
        "CPUQuotaPerSecUSec": INFINITY,
        "AllowedMemoryNodes": b"\x01",
        "OOMPolicy": "kill",
    }
    assert [w.filename for w in p.files] == ["misc.max", "io.weight"]
    r = routes(p)
    assert r["unified['misc.max']"].reload_safe
    assert not r["unified['io.weight']"].reload_safe  # systemd writes io.weight itself
    with pytest.raises(ConfigError) as e:
        plan(CgroupConfig(unified={"memory.high": "1G"}), 252)
    assert e.value.setting == "unified['memory.high']"


# ---------------------------------------------------------------- D-Bus without systemd


def test_version_strings() -> None:
    assert dbus.parse_version("252.38-1~deb12u1") == 252
    assert dbus.parse_version('"v245.4-1.fc32"') == 245
    with pytest.raises(dbus.SystemdError):
        dbus.parse_version("unknown")


def test_no_bus_names_the_driver(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("DBUS_SYSTEM_BUS_ADDRESS", f"unix:path={tmp_path}/none")
    monkeypatch.setattr(dbus, "PRIVATE_SOCKET", str(tmp_path / "private"))
    with pytest.raises(dbus.SystemdUnavailable) as e:
        dbus.Manager.connect(timeout=1)
    msg = str(e.value)
    assert msg.startswith("systemd cgroup driver: cannot reach systemd over D-Bus")
    assert "system bus" in msg


def test_no_jeepney_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    real = builtins.__import__

    def no_jeepney(name: str, *a: Any, **kw: Any) -> Any:
        if name.startswith("jeepney"):
            raise ImportError(name)
        return real(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_jeepney)
    with pytest.raises(dbus.SystemdUnavailable, match=r"pelagos-bpf\[systemd\]"):
        dbus.Manager.connect()
