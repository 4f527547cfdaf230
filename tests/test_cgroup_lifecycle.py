"""setup_cgroup / teardown_cgroup on this machine's real cgroup2 mount (root).

Everything lives under the per-test `cg_root` (conftest), so nothing leaks even on failure.
"""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
from cgtest import procs_of, rel, root_controllers, subdirs

import pelagos_bpf.cgroup as cgmod
from pelagos_bpf import (
    Cgroup,
    CgroupConfig,
    CgroupDeviceRule,
    ResourceStats,
    read_stats,
    setup_cgroup,
    teardown_cgroup,
)
from pelagos_bpf.errors import CgroupError, ConfigError, UnsupportedSetting, UnsupportedSettings

pytestmark = pytest.mark.root
pytest_plugins = ["helpers"]


def test_create_and_teardown_without_process(cg_root: Path) -> None:
    cg = setup_cgroup(CgroupConfig(path=rel(cg_root, "empty")), None)
    assert cg.path == cg_root / "empty"
    assert cg.path.is_dir()
    assert cg.id == os.stat(cg.path).st_ino
    assert cg.created == [cg.path]
    assert cg.report.applied == [] and cg.report.skipped == []
    assert procs_of(cg.path) == []
    teardown_cgroup(cg)
    assert not cg.path.exists()
    assert cg.torn_down


def test_process_is_inside_and_killed_at_teardown(cg_root: Path, spawn) -> None:
    p = spawn()
    cg = setup_cgroup(CgroupConfig(path=rel(cg_root, "live")), p.pid)
    assert procs_of(cg.path) == [p.pid]
    assert f"0::/{cg.path.relative_to(cg.root)}" in Path(f"/proc/{p.pid}/cgroup").read_text()
    teardown_cgroup(cg)
    assert p.wait(timeout=10) == -9
    assert not cg.path.exists()


def test_default_name_is_pelagos_pid(cg_root: Path, spawn) -> None:
    p = spawn()
    cg = setup_cgroup(CgroupConfig(), p.pid, root=cg_root)
    assert cg.path == cg_root / f"pelagos-{p.pid}"
    assert cg.root == cg_root
    teardown_cgroup(cg)
    assert not cg.path.exists()


def test_nested_path_creates_and_removes_parents(cg_root: Path, spawn) -> None:
    (cg_root / "keep").mkdir()  # an existing ancestor is not ours to remove
    p = spawn()
    cg = setup_cgroup(CgroupConfig(path="/" + rel(cg_root, "keep", "a", "b")), p.pid)
    assert cg.created == [cg_root / "keep" / "a", cg_root / "keep" / "a" / "b"]
    assert procs_of(cg.path) == [p.pid]
    teardown_cgroup(cg)
    assert subdirs(cg_root) == [cg_root / "keep"]


def test_teardown_removes_subcgroups_the_container_made(cg_root: Path, spawn) -> None:
    p, q = spawn(), spawn()
    cg = setup_cgroup(CgroupConfig(path=rel(cg_root, "parent")), p.pid)
    child = cg.path / "inner" / "deeper"
    child.mkdir(parents=True)
    (child / "cgroup.procs").write_text(str(q.pid))
    teardown_cgroup(cg)
    assert p.wait(timeout=10) == -9 and q.wait(timeout=10) == -9
    assert subdirs(cg_root) == []


def test_teardown_is_idempotent(cg_root: Path, spawn) -> None:
    cg = setup_cgroup(CgroupConfig(path=rel(cg_root, "twice")), spawn().pid)
    teardown_cgroup(cg)
    teardown_cgroup(cg)  # no-op
    again = Cgroup(cg.path, cg.id, cg.root)  # a fresh handle to a vanished dir: also a no-op
    teardown_cgroup(again)
    assert not cg.path.exists()


def test_context_manager_tears_down_even_on_error(cg_root: Path, spawn) -> None:
    p = spawn()
    with pytest.raises(RuntimeError, match="boom"):  # noqa: SIM117
        with setup_cgroup(CgroupConfig(path=rel(cg_root, "ctx")), p.pid) as cg:
            assert procs_of(cg.path) == [p.pid]
            raise RuntimeError("boom")
    assert not (cg_root / "ctx").exists()
    assert p.wait(timeout=10) == -9


def test_sigkill_fallback_without_cgroup_kill(
    cg_root: Path, spawn, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cgmod, "KILL_FILE", "cgroup.kill-absent")
    p, q = spawn(), spawn()
    cg = setup_cgroup(CgroupConfig(path=rel(cg_root, "fallback")), p.pid)
    (cg.path / "sub").mkdir()
    (cg.path / "sub" / "cgroup.procs").write_text(str(q.pid))
    teardown_cgroup(cg)
    assert p.wait(timeout=10) == -9 and q.wait(timeout=10) == -9
    assert not cg.path.exists()


def test_opened_handle_tears_down_just_that_cgroup(cg_root: Path, spawn) -> None:
    (cg_root / "x" / "y").mkdir(parents=True)
    p = spawn()
    (cg_root / "x" / "y" / "cgroup.procs").write_text(str(p.pid))
    cg = Cgroup.open(cg_root / "x" / "y")
    teardown_cgroup(cg)
    assert p.wait(timeout=10) == -9
    assert subdirs(cg_root) == [cg_root / "x"]


def test_rollback_after_failure_following_mkdir(
    cg_root: Path, spawn, monkeypatch: pytest.MonkeyPatch
) -> None:
    def fail(*a: object, **k: object) -> None:
        raise CgroupError(errno.EIO, "forced failure after mkdir")

    monkeypatch.setattr(cgmod, "_apply_writes", fail)
    p = spawn()
    with pytest.raises(CgroupError, match="forced failure"):
        setup_cgroup(CgroupConfig(path=rel(cg_root, "r", "s", "t")), p.pid)
    assert subdirs(cg_root) == []
    assert p.poll() is None  # the process was never touched


def test_rollback_when_the_pid_cannot_be_moved(cg_root: Path) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()  # a reaped pid: the kernel refuses it with ESRCH
    with pytest.raises(CgroupError) as e:
        setup_cgroup(CgroupConfig(path=rel(cg_root, "a", "b")), gone.pid)
    assert e.value.errno == errno.ESRCH
    assert "pid" in str(e.value)
    assert subdirs(cg_root) == []


def test_existing_target_is_refused_and_left_alone(cg_root: Path) -> None:
    (cg_root / "taken").mkdir()
    with pytest.raises(CgroupError) as e:
        setup_cgroup(CgroupConfig(path=rel(cg_root, "taken")), None)
    assert e.value.errno == errno.EEXIST
    assert (cg_root / "taken").is_dir()


def test_invalid_config_creates_nothing(cg_root: Path, spawn) -> None:
    with pytest.raises(ConfigError) as e:
        setup_cgroup(CgroupConfig(cpu_shares=1, path=rel(cg_root, "bad")), spawn().pid)
    assert e.value.setting == "cpu_shares"
    assert subdirs(cg_root) == []


needs_missing_pids = pytest.mark.skipif(
    "pids" in root_controllers(), reason="pids is available here (pure v2): no error to see"
)


@needs_missing_pids
def test_pids_limit_on_this_host_is_a_clear_error(cg_root: Path, spawn) -> None:
    with pytest.raises(UnsupportedSetting) as e:
        setup_cgroup(CgroupConfig(pids_limit=64, path=rel(cg_root, "p")), spawn().pid)
    assert e.value.setting == "pids_limit"
    assert "not available" in e.value.reason
    assert "cgroup.controllers" in e.value.reason
    assert subdirs(cg_root) == []


@needs_missing_pids
def test_all_problems_are_listed_together(cg_root: Path) -> None:
    cfg = CgroupConfig(
        memory_swappiness=10,
        memory_limit=1 << 30,
        pids_limit=5,
        cpu_quota=(50000, 100000),
        path=rel(cg_root, "many"),
    )
    with pytest.raises(UnsupportedSettings) as e:
        setup_cgroup(cfg, None)
    settings = [s for s, _ in e.value.problems]
    assert settings == ["memory_swappiness", "memory_limit", "cpu_quota", "pids_limit"]
    assert "bound to cgroup v1" in dict(e.value.problems)["memory_limit"]
    assert all(s in str(e.value) for s in settings)
    assert subdirs(cg_root) == []


@needs_missing_pids
def test_best_effort_records_skips_and_still_creates(cg_root: Path, spawn) -> None:
    p = spawn()
    cfg = CgroupConfig(pids_limit=64, memory_swappiness=1, path=rel(cg_root, "be"))
    cg = setup_cgroup(cfg, p.pid, strict=False)
    try:
        assert [s for s, _ in cg.report.skipped] == ["memory_swappiness", "pids_limit"]
        assert "not available" in dict(cg.report.skipped)["pids_limit"]
        assert cg.report.applied == []
        assert procs_of(cg.path) == [p.pid]
        assert not (cg.path / "pids.max").exists()
    finally:
        teardown_cgroup(cg)
    assert subdirs(cg_root) == []


# Setup drives the BPF features (their own tests cover the semantics).


def _open_in_child(cfg: CgroupConfig, device: str) -> tuple[bool, ResourceStats]:
    """Start sh, put it in a cgroup for cfg, let it open `device`; return (opened, cg stats)."""
    p = subprocess.Popen(
        ["sh", "-c", f"read go; exec 3<{device}"], stdin=subprocess.PIPE, stderr=subprocess.DEVNULL
    )
    cg = setup_cgroup(cfg, p.pid)
    try:
        p.communicate(b"go\n", timeout=10)
        return p.returncode == 0, read_stats(cg)
    finally:
        teardown_cgroup(cg)


def test_setup_attaches_device_rules(cg_root: Path) -> None:
    from pelagos_bpf.devices import device_allowed

    rules = [CgroupDeviceRule(False, "c", 1, 3, "rwm")]
    cfg = CgroupConfig(device_rules=rules, path=rel(cg_root, "dev"))
    opened, stats = _open_in_child(cfg, "/dev/null")
    assert opened is device_allowed(rules, "c", 1, 3, "r") is False
    assert stats.device_denials == {"c 1:3 r": 1}
    allowed, _ = _open_in_child(CgroupConfig(path=rel(cg_root, "dev2")), "/dev/null")
    assert allowed
    assert subdirs(cg_root) == []


def test_rollback_detaches_features(cg_root: Path, spawn, monkeypatch: pytest.MonkeyPatch) -> None:
    import pelagos_bpf.devices as devices
    import pelagos_bpf.net as net

    calls: list[str] = []
    real_dev, real_net = devices.detach_devices, net.detach_net

    def spy_dev(cg: Cgroup) -> None:
        calls.append("devices")
        real_dev(cg)

    def spy_net(cg: Cgroup) -> None:
        calls.append("net")
        real_net(cg)

    monkeypatch.setattr(devices, "detach_devices", spy_dev)
    monkeypatch.setattr(net, "detach_net", spy_net)
    gone = subprocess.Popen(["true"])
    gone.wait()
    cfg = CgroupConfig(
        device_rules=[CgroupDeviceRule(False, "c", 1, 3, "rwm")],
        net_classid=0x10010,
        path=rel(cg_root, "rb"),
    )
    with pytest.raises(CgroupError) as e:
        setup_cgroup(cfg, gone.pid)  # fails at the last step, after both attaches
    assert e.value.errno == errno.ESRCH
    assert calls == ["net", "devices"]
    assert subdirs(cg_root) == []


def test_update_replaces_device_rules_and_refuses_unavailable(cg_root: Path) -> None:
    from pelagos_bpf import update_cgroup

    deny = [CgroupDeviceRule(False, "c", 1, 3, "rwm")]
    cg = setup_cgroup(CgroupConfig(device_rules=deny, path=rel(cg_root, "up")), None)
    try:
        report = update_cgroup(cg, CgroupConfig(device_rules=[CgroupDeviceRule(True)]))
        assert report.applied == ["device_rules"]
        p = subprocess.Popen(["sh", "-c", "read go; exec 3</dev/null"], stdin=subprocess.PIPE)
        (cg.path / "cgroup.procs").write_text(str(p.pid))
        p.communicate(b"go\n", timeout=10)
        assert p.returncode == 0
        # On every host: refused when the cgroup has no pids controller, written when it has.
        if "pids" in (cg.path / "cgroup.controllers").read_text().split():
            assert update_cgroup(cg, CgroupConfig(pids_limit=5)).applied == ["pids_limit"]
            assert (cg.path / "pids.max").read_text().strip() == "5"
        else:
            with pytest.raises(UnsupportedSettings) as e:
                update_cgroup(cg, CgroupConfig(pids_limit=5))
            assert e.value.problems[0][0] == "pids_limit"
    finally:
        teardown_cgroup(cg)
    assert subdirs(cg_root) == []
