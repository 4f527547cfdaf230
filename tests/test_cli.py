"""`pelagos-bpf run` / `inspect` for real (root), and the flag parsers (pure)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from cgtest import rel, root_controllers, subdirs

from pelagos_bpf import CgroupDeviceRule
from pelagos_bpf.cli import (
    LIMIT_FILES,
    build_parser,
    config_from_args,
    parse_classid,
    parse_cpu_quota,
    parse_device_rule,
    parse_net_prio,
    parse_throttle,
)

EXE = Path(sys.executable).with_name("pelagos-bpf")


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(EXE), *args], capture_output=True, text=True, timeout=60, check=False
    )


def test_flag_parsers() -> None:
    assert parse_device_rule("deny a *:* rwm") == CgroupDeviceRule(False, "a", -1, -1, "rwm")
    assert parse_device_rule("allow c 1:3 rw") == CgroupDeviceRule(True, "c", 1, 3, "rw")
    assert parse_device_rule("allow b 8:*") == CgroupDeviceRule(True, "b", 8, -1, "rwm")
    assert parse_classid("1:10") == 0x10010
    assert parse_classid("65552") == 0x10010
    assert parse_classid("0x10010") == 0x10010
    assert parse_net_prio("eth0=5") == ("eth0", 5)
    assert parse_cpu_quota("50000/100000") == (50000, 100000)
    assert parse_cpu_quota("20000") == (20000, 100000)
    assert parse_cpu_quota("max/50000") == (-1, 50000)
    assert parse_throttle("8:0=1M") == (8, 0, 1 << 20)
    for bad, fn in [
        ("allow", parse_device_rule),
        ("permit c 1:3 r", parse_device_rule),
        ("allow c 13 r", parse_device_rule),
        ("allow c x:3 r", parse_device_rule),
        ("1:zz", parse_classid),
        ("eth0", parse_net_prio),
        ("a/b", parse_cpu_quota),
        ("8:0", parse_throttle),
    ]:
        with pytest.raises(argparse.ArgumentTypeError):
            fn(bad)


def test_run_flags_build_the_config() -> None:
    args = build_parser().parse_args(
        [
            "run",
            "--memory",
            "256M",
            "--memory-swap",
            "512M",
            "--cpu-quota",
            "50000/100000",
            "--pids",
            "64",
            "--device",
            "deny a *:* rwm",
            "--device",
            "allow c 1:3 rw",
            "--net-prio",
            "eth0=5",
            "--read-bps",
            "8:0=1M",
            "--path",
            "x/y",
            "--",
            "echo",
            "hi",
        ]
    )
    c = config_from_args(args)
    assert (c.memory_limit, c.memory_swap, c.pids_limit) == (256 << 20, 512 << 20, 64)
    assert c.cpu_quota == (50000, 100000)
    assert [str(r) for r in c.device_rules] == ["deny a *:* rwm", "allow c 1:3 rw"]
    assert c.net_priorities == [("eth0", 5)]
    assert c.blkio_throttle_read_bps == [(8, 0, 1 << 20)]
    assert c.path == "x/y"
    assert args.cmd == ["--", "echo", "hi"]


@pytest.mark.root
def test_run_true_for_real(cg_root: Path) -> None:
    r = cli("run", "--path", rel(cg_root, "run"), "--", "sh", "-c", "echo inside; exit 3")
    assert r.returncode == 3, r.stderr
    assert r.stdout == "inside\n"
    assert "exit:   3" in r.stderr
    assert "cpu:    usage" in r.stderr
    assert subdirs(cg_root) == []


@pytest.mark.root
def test_run_json_and_process_really_was_inside(cg_root: Path) -> None:
    path = rel(cg_root, "j")
    r = cli("run", "--json", "--path", path, "--", "cat", "/proc/self/cgroup")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert f"0::/{path}" in lines
    data = json.loads(lines[-1])
    assert data["exit"] == 0 and data["path"].endswith(path)
    assert data["stats"]["cpu_usage_ns"] > 0
    assert subdirs(cg_root) == []


@pytest.mark.root
@pytest.mark.skipif("pids" in root_controllers(), reason="pids available: no error here")
def test_run_refuses_unavailable_setting_and_runs_nothing(cg_root: Path) -> None:
    marker = cg_root.parent / f".marker-{os.getpid()}"
    r = cli("run", "--pids", "64", "--path", rel(cg_root, "no"), "--", "touch", str(marker))
    assert r.returncode == 2
    assert "pids_limit" in r.stderr and "not available" in r.stderr
    assert not marker.exists()
    r = cli("run", "--best-effort", "--pids", "64", "--path", rel(cg_root, "be"), "--", "true")
    assert r.returncode == 0
    assert "skipped: pids_limit" in r.stderr
    assert subdirs(cg_root) == []


@pytest.mark.root
def test_run_bad_value_is_a_config_error(cg_root: Path) -> None:
    r = cli("run", "--cpu-shares", "1", "--path", rel(cg_root, "bad"), "--", "true")
    assert r.returncode == 2
    assert "cpu_shares=1" in r.stderr
    r = cli("run", "--memory", "lots", "--", "true")
    assert r.returncode == 2 and "not a size" in r.stderr


@pytest.mark.root
def test_run_missing_command_exits_127(cg_root: Path) -> None:
    r = cli("run", "--path", rel(cg_root, "nx"), "--", "/nonexistent/cmd")
    assert r.returncode == 127
    assert subdirs(cg_root) == []


@pytest.mark.root
def test_inspect_for_real(cg_root: Path) -> None:
    d = cg_root / "insp"
    d.mkdir()
    sleeper = subprocess.Popen(["sleep", "300"])
    try:
        (d / "cgroup.procs").write_text(str(sleeper.pid))
        r = cli("inspect", str(d))
        assert r.returncode == 0, r.stderr
        assert f"cgroup:      {d}" in r.stdout
        assert f"processes:   {sleeper.pid}" in r.stdout
        r = cli("inspect", rel(cg_root, "insp"), "--json")
        data = json.loads(r.stdout)
        assert data["path"] == str(d)
        assert data["procs"] == [sleeper.pid]
        assert data["id"] == os.stat(d).st_ino
        assert set(data["limits"]) <= set(LIMIT_FILES)
        assert "cpu_usage_ns" in data["stats"]
    finally:
        sleeper.kill()
        sleeper.wait()
    assert cli("inspect", str(cg_root / "nope")).returncode == 2


def test_stats_lines_say_when_a_controller_is_absent() -> None:
    from pelagos_bpf.cli import format_stats
    from pelagos_bpf.stats import ResourceStats

    absent = format_stats(ResourceStats(memory_current_bytes=0, controllers=["cpu"]))
    assert "memory: n/a (no memory controller in this cgroup)" in absent
    assert any(line.startswith("cpu:") and "throttled" in line for line in absent)
    present = format_stats(ResourceStats(memory_current_bytes=2048, controllers=["memory"]))
    assert any(line.startswith("memory: current 2") for line in present)
    assert not any("throttled" in line for line in present)
