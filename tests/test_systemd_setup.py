"""The systemd driver's wiring, where no systemd runs: routes planned, refusals before the bus,
gc's pin and unit rules, the CLI's flags and inspect's lines. The real thing (systemd 252 as
PID 1) is tests/test_systemd_library.py in the `--init systemd` guest."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from clitest import cli

from pelagos_bpf import gc, pins, systemd
from pelagos_bpf.cgroup import setup_cgroup
from pelagos_bpf.config import CgroupConfig, CgroupDeviceRule
from pelagos_bpf.errors import ConfigError
from pelagos_bpf.net.plan import build_plan
from pelagos_bpf.systemd import driver, lifecycle, programs, units
from pelagos_bpf.systemd.dbus import Manager, SystemdUnavailable

SCOPE = "system.slice:pelagos:web-1"
DEV_PIN = "/sys/fs/bpf/pelagos-bpf/pelagos_drt_v3_0123456789abcdef"
NET_PINS = [("egress", "/p/pelagos_net_eg_x"), ("ingress", "/p/pelagos_net_in_x")]


@pytest.fixture
def no_systemd(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(systemd, "SYSTEMD_RUN_DIR", tmp_path / "absent")


@pytest.fixture
def fake_pins(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pins on, with the entries systemd would get (no bpffs needed to plan)."""
    monkeypatch.setattr(programs, "why_not_systemd", lambda v: None if v >= 249 else "old")
    monkeypatch.setattr(programs, "device_entry", lambda: ("device", DEV_PIN))
    monkeypatch.setattr(programs, "net_entries", lambda carrier: list(NET_PINS))


def cgroup_root(tmp_path: Path, controllers: str = "cpu memory pids hugetlb") -> Path:
    (tmp_path / "cgroup.controllers").write_text(controllers + "\n")
    return tmp_path


# ---------------------------------------------------------------- setup refuses before the bus


def test_setup_without_systemd_names_the_driver(no_systemd: None) -> None:
    with pytest.raises(SystemdUnavailable) as e:
        setup_cgroup(CgroupConfig(path=SCOPE, memory_limit=1 << 26), os.getpid())
    assert str(e.value).startswith("systemd cgroup driver: systemd is not PID 1 here")


def test_setup_refuses_no_pid_and_a_root_before_the_bus(no_systemd: None) -> None:
    with pytest.raises(ConfigError) as e:
        setup_cgroup(CgroupConfig(path=SCOPE), None)
    assert e.value.setting == "pid" and "Scope has no PIDs" in e.value.reason
    with pytest.raises(ConfigError) as e:
        setup_cgroup(CgroupConfig(path=SCOPE), os.getpid(), root="/sys/fs/cgroup")
    assert e.value.setting == "root"
    with pytest.raises(ConfigError) as e:  # a slice, not a scope
        setup_cgroup(CgroupConfig(path="system.slice::x.slice"), os.getpid())
    assert e.value.setting == "path"


def test_scope_description_carries_the_mark() -> None:
    spec = driver.ScopeSpec.from_path(SCOPE)
    assert spec.description == f"{driver.MARK} {SCOPE}"
    assert driver.ScopeSpec.from_path(SCOPE, "web").description == f"{driver.MARK} {SCOPE}: web"


# ---------------------------------------------------------------- routes


def test_routes_systemd_file_and_programs(tmp_path: Path, fake_pins: None) -> None:
    cfg = CgroupConfig(
        memory_limit=1 << 26,
        cpu_burst=1000,
        hugepage_limits=[("2MB", 1 << 22)],
        device_rules=[CgroupDeviceRule(False)],
        net_classid=0x10010,
    )
    sp = lifecycle.plan_scope(cfg, 252, cgroup_root(tmp_path), build_plan(0x10010, [], "auto", {}))
    via = {r.setting: r.via for r in sp.routes}
    assert via == {
        "memory_limit": "systemd",
        "cpu_burst": "file",
        "hugepage_limits[0]": "file",
        "device_rules": "systemd",
        "net_classid": "systemd",
    }
    assert sp.programs == [("device", DEV_PIN), *NET_PINS]
    what = {r.setting: r.what for r in sp.routes}
    assert what["device_rules"] == f"BPFProgram=device:{DEV_PIN}"
    assert what["net_classid"] == "BPFProgram=" + ",".join(f"{k}:{p}" for k, p in NET_PINS)
    assert [w.filename for w in sp.writes] == [
        "cpu.max.burst",
        "hugetlb.2MB.max",
        "hugetlb.2MB.rsvd.max",
    ]
    assert sp.problems == [] and sp.unsafe == []


def test_routes_without_bpfprogram_attach_in_the_scope(tmp_path: Path, fake_pins: None) -> None:
    cfg = CgroupConfig(device_rules=[CgroupDeviceRule(False)])
    sp = lifecycle.plan_scope(cfg, 248, cgroup_root(tmp_path), None)
    assert sp.programs == []
    assert [(r.setting, r.via) for r in sp.routes] == [("device_rules", "scope")]


def test_pins_off_means_in_the_scope(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(pins.PIN_ENV, "")
    why = programs.why_not_systemd(252)
    assert why is not None and "pins are off" in why
    assert programs.why_not_systemd(248) == "systemd 248 lacks BPFProgram= (since 249)"


def test_unsafe_and_missing_controllers(tmp_path: Path, fake_pins: None) -> None:
    cfg = CgroupConfig(cpu_quota=(33_333, 100_000), hugepage_limits=[("2MB", 1 << 22)])
    sp = lifecycle.plan_scope(cfg, 252, cgroup_root(tmp_path, "cpu memory"), None)
    assert [s for s, _ in sp.unsafe] == ["cpu_quota"]
    assert "daemon-reload" in sp.unsafe[0][1] and "cpu.max 34000 100000" in sp.unsafe[0][1]
    assert [s for s, _ in sp.problems] == ["hugepage_limits[0]"]
    assert "hugepage_limits[0]" not in {r.setting for r in sp.routes}


def test_update_routes_follow_what_systemd_holds(tmp_path: Path, fake_pins: None) -> None:
    cfg = CgroupConfig(device_rules=[CgroupDeviceRule(False)], net_classid=0x10020)
    held = (("device", DEV_PIN),)
    sp = lifecycle.plan_scope(cfg, 252, cgroup_root(tmp_path), None, held)
    assert sp.programs == []  # fixed at start
    assert [(r.setting, r.via) for r in sp.routes] == [
        ("device_rules", "systemd"),
        ("net_classid", "scope"),
    ]


def _scope(*kinds: str) -> driver.Scope:
    spec = driver.ScopeSpec.from_path(SCOPE)
    return driver.Scope(spec, Path("/x"), 1, 252, tuple((k, f"/p/{k}") for k in kinds))


def test_carrier_must_keep_the_programs_systemd_holds() -> None:
    packet = _scope("device", "egress", "ingress")
    for ok in (None, "auto", "mark", "priority"):
        lifecycle.check_carrier(packet, ok)
    with pytest.raises(ConfigError) as e:
        lifecycle.check_carrier(packet, "socket")
    assert e.value.setting == "net_carrier" and "read-only" in e.value.reason
    with pytest.raises(ConfigError):
        lifecycle.check_carrier(_scope("sock_create", "setsockopt"), "mark")
    lifecycle.check_carrier(_scope("device"), "socket")  # systemd holds no net program


def test_burst_is_lowered_before_a_smaller_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu.max.burst").write_text("50000\n")
    sp = lifecycle.plan_scope(CgroupConfig(cpu_quota=(20_000, 100_000)), 252, tmp_path, None)
    with pytest.raises(ConfigError) as e:
        lifecycle.burst_before_quota(tmp_path, CgroupConfig(cpu_quota=(20_000, 100_000)), sp)
    assert e.value.setting == "cpu_quota" and "50000" in e.value.reason
    cfg = CgroupConfig(cpu_quota=(20_000, 100_000), cpu_burst=1000)
    assert lifecycle.burst_before_quota(tmp_path, cfg, sp)
    (tmp_path / "cpu.max.burst").write_text("100\n")
    assert not lifecycle.burst_before_quota(tmp_path, cfg, sp)


# ---------------------------------------------------------------- gc


class _FakeManager:
    def __init__(self, units_: list[tuple[str, str]]) -> None:
        self.units = units_
        self.reset: list[str] = []

    def call(self, method: str, sig: str, body: tuple[Any, ...], **_: Any) -> tuple[Any, ...]:
        assert (method, body) == ("ListUnitsFiltered", (["failed"],))
        return (
            [(n, d, "loaded", "failed", "failed", "", "/u", 0, "", "/") for n, d in self.units],
        )

    def reset_failed_unit(self, unit: str) -> None:
        self.reset.append(unit)

    def __enter__(self) -> _FakeManager:
        return self

    def __exit__(self, *a: object) -> None:
        return None


def test_failed_scopes_of_ours_are_told_by_the_mark() -> None:
    fake = _FakeManager(
        [
            ("pelagos-a-1.scope", f"{driver.MARK} system.slice:pelagos:a-1"),
            ("docker-b.scope", "libcontainer container b"),
            ("pelagos-c.service", f"{driver.MARK} x"),  # not a scope
            ("pelagos-d.scope", "pelagos-bpf containers are great"),  # no mark
        ]
    )
    assert units.reset_failed_ours(manager=fake) == ["pelagos-a-1.scope"]  # type: ignore[arg-type]
    assert fake.reset == ["pelagos-a-1.scope"]


def _stale_pins(d: Path) -> list[Path]:
    from pelagos_bpf.devices import layout as lay

    names = [f"{lay.PROG_NAMES[o]}_0123456789abcdef" for o in ("runtime", "hook")]
    for n in names:
        (d / n).write_text("")  # gc unlinks by name: plain files stand in for pins here
    (d / "somebody_else").write_text("")
    return [d / n for n in names]


def test_gc_without_systemd_removes_stale_pins(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, no_systemd: None
) -> None:
    monkeypatch.setenv(pins.PIN_ENV, str(tmp_path))
    stale = _stale_pins(tmp_path)
    report = gc.GcReport()
    units_ = gc._Units(report)
    units_.reset_failed()
    gc._remove_stale_pins(report, units_)
    assert report.pins_removed == sorted(map(str, stale)) and report.notes == []
    assert os.listdir(tmp_path) == ["somebody_else"]


def test_gc_keeps_referenced_pins_and_removes_none_without_dbus(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pin_dir = tmp_path / "pins"
    pin_dir.mkdir()
    (tmp_path / "run").mkdir()
    monkeypatch.setattr(systemd, "SYSTEMD_RUN_DIR", tmp_path / "run")  # systemd is PID 1
    monkeypatch.setenv(pins.PIN_ENV, str(pin_dir))
    old, unused = _stale_pins(pin_dir)

    def unreachable(*_a: object, **_k: object) -> Manager:
        raise SystemdUnavailable("no bus here")

    monkeypatch.setattr(Manager, "connect", unreachable)
    report = gc.GcReport()
    units_ = gc._Units(report)
    units_.reset_failed()
    gc._remove_stale_pins(report, units_)
    assert report.pins_removed == [] and old.exists() and unused.exists()
    assert report.notes[0].startswith("failed scopes not collected: systemd cgroup driver")
    assert "no pin removed" in report.notes[1] and "no bus here" in report.notes[1]
    assert "note: no pin removed" in str(report)

    monkeypatch.setattr(driver, "referenced_pins", lambda: {str(old): ["pelagos-x.scope"]})
    report = gc.GcReport()
    gc._remove_stale_pins(report, gc._Units(report))
    assert report.pins_kept == {str(old): ["pelagos-x.scope"]}
    assert report.pins_removed == [str(unused)] and old.exists()
    assert f"stale pin kept: {old} (in BPFProgram= of pelagos-x.scope)" in str(report)


# ---------------------------------------------------------------- units, inspect, CLI


def test_unit_of_cgroup_and_values() -> None:
    root = Path("/sys/fs/cgroup")
    assert units.unit_of_cgroup(root / "system.slice/a.scope", root) == (
        "a.scope",
        "/system.slice/a.scope",
    )
    assert units.unit_of_cgroup(root / "system.slice/a.scope/init", root) == (
        "a.scope",
        "/system.slice/a.scope",
    )
    assert units.unit_of_cgroup(root / "mine/c1", root) is None
    assert units.mask_to_list(b"\x2f\x01") == "0-3,5,8"
    assert units.show_value(2**64 - 1) == "infinity"
    assert units.show_value([("/dev/block/7:0", 1048576)]) == "/dev/block/7:0 1048576"


def test_inspect_lines() -> None:
    from pelagos_bpf.cli.show import _systemd_lines

    sd = {
        "unit": "pelagos-t1.scope",
        "inside": False,
        "active": "active (running)",
        "slice": "system.slice",
        "delegate": True,
        "properties": {"MemoryMax": "67108864"},
        "files": {"MemoryMax": "memory.max"},
        "programs": [
            {"kind": "device", "pin": DEV_PIN, "pin_present": True, "attached": True},
            {"kind": "egress", "pin": "/gone", "pin_present": False, "attached": True},
        ],
    }
    lines = _systemd_lines(sd)
    assert lines[0] == (
        "systemd:     unit pelagos-t1.scope, active (running), slice system.slice, Delegate=yes"
    )
    assert "    MemoryMax=67108864 (memory.max)" in lines
    assert f"    BPFProgram=device:{DEV_PIN} attached" in lines
    assert "its pin is GONE" in lines[-1]
    assert _systemd_lines(None) == []
    assert _systemd_lines({"error": "no bus"}) == ["systemd:     no bus"]


def test_cli_run_systemd_flags() -> None:
    r = cli("run", "--slice", "a--b.slice", "--", "true")
    assert r.returncode == 125 and "--slice a--b.slice" in r.stderr, r.stderr
    r = cli("run", "--systemd", "--path", "x", "--", "true")
    assert r.returncode == 125 and "--path with --systemd" in r.stderr
    if not systemd.SYSTEMD_RUN_DIR.is_dir():
        r = cli("run", "--systemd", "--memory", "64M", "--", "true")
        assert r.returncode == 125 and "systemd cgroup driver" in r.stderr, r.stderr
