"""`pelagos-bpf` as an operator meets it: the installed script in a subprocess. Exit codes,
stderr wording (flags, not Python fields; no tracebacks), JSON documents, --version, -v.
The flag parsers and the error translation are pure and tested directly."""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from cgtest import rel, root_controllers, subdirs
from clitest import attached_ids, cli, no_traceback

from pelagos_bpf import CgroupDeviceRule, ConfigError, UnsupportedSettings
from pelagos_bpf.bpfsys import AttachType
from pelagos_bpf.cli import COMMANDS, build_parser
from pelagos_bpf.cli.common import describe, flag_for
from pelagos_bpf.cli.flags import (
    config_from_args,
    parse_classid,
    parse_cpu_quota,
    parse_device_rule,
    parse_net_prio,
    parse_throttle,
)
from pelagos_bpf.cli.output import format_stats, stats_json
from pelagos_bpf.cli.show import LIMIT_FILES
from pelagos_bpf.stats import ResourceStats

# ---------------------------------------------------------------- pure


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
        ("allow q 1:3 r", parse_device_rule),
        ("allow c 1:3 rx", parse_device_rule),
        ("1:zz", parse_classid),
        ("eth0", parse_net_prio),
        ("a/b", parse_cpu_quota),
        ("8:0", parse_throttle),
    ]:
        with pytest.raises(argparse.ArgumentTypeError):
            fn(bad)


@pytest.mark.parametrize(
    "text", ["allow c 1:3", "deny a *:* rwm", "allow b 8:* m", "deny c *:5 rw", "allow c 1:3 wr"]
)
def test_one_rule_grammar_everywhere(text: str) -> None:
    """run --device, devices check --rule and the library parse the same text the same way,
    and str(rule) parses back to the same rule."""
    rule = CgroupDeviceRule.parse(text)
    assert parse_device_rule(text) == rule
    assert CgroupDeviceRule.parse(str(rule)) == rule
    assert len(str(rule).split()) == 4
    with pytest.raises(ConfigError):
        CgroupDeviceRule.parse(text.replace(":", "-"))


def test_run_flags_build_the_config() -> None:
    argv = [
        "run",
        *("--memory", "256M", "--memory-swap", "512M", "--cpu-quota", "50000/100000"),
        *("--pids", "64", "--device", "deny a *:* rwm", "--device", "allow c 1:3 rw"),
        *("--net-prio", "eth0=5", "--read-bps", "8:0=1M", "--path", "x/y", "--", "echo", "hi"),
    ]
    args = build_parser(argv).parse_args(argv)
    c = config_from_args(args)
    assert (c.memory_limit, c.memory_swap, c.pids_limit) == (256 << 20, 512 << 20, 64)
    assert c.cpu_quota == (50000, 100000)
    assert [str(r) for r in c.device_rules] == ["deny a *:* rwm", "allow c 1:3 rw"]
    assert c.net_priorities == [("eth0", 5)]
    assert c.blkio_throttle_read_bps == [(8, 0, 1 << 20)]
    assert c.path == "x/y"
    assert args.cmd == ["--", "echo", "hi"]


def test_errors_name_flags_not_fields() -> None:
    assert flag_for("memory_limit") == "--memory"
    assert flag_for("cpu_quota.quota") == "--cpu-quota"
    assert flag_for("device_rules[2].kind") == "--device #3 (kind)"
    assert flag_for("device_rules[14].access", rule_offset=13) == "--device #2 (access)"
    assert flag_for("device_rules[0]", rule_offset=13) == "--device (from --default-devices)"
    assert flag_for("blkio_throttle_read_bps+blkio_throttle_write_bps") == "--read-bps/--write-bps"
    assert flag_for("linux.resources.memory.kernel") == "linux.resources.memory.kernel"
    msg = describe(ConfigError("memory_limit", 0, "0 would leave...; use None (unset) or -1"))
    assert msg.startswith("--memory 0:") and "None" not in msg and "omit --memory" in msg
    msg = describe(
        UnsupportedSettings([("pids_limit", "no pids controller")]), best_effort_hint=True
    )
    assert msg.splitlines() == ["--pids: no pids controller", msg.splitlines()[1]]
    assert "--best-effort" in msg.splitlines()[1]
    assert describe(FileExistsError(17, "File exists", "/x")) == "/x: File exists"


def test_stats_lines_and_json_say_when_a_controller_is_absent() -> None:
    absent = ResourceStats(memory_current_bytes=0, pids_current=3, controllers=["cpu"])
    lines = format_stats(absent)
    assert "memory: n/a (no memory controller in this cgroup)" in lines
    assert any(line.startswith("cpu:") and "throttled" in line for line in lines)
    present = format_stats(ResourceStats(memory_current_bytes=2048, controllers=["memory"]))
    assert any(line.startswith("memory: current 2") for line in present)
    assert not any("throttled" in line for line in present)
    doc = stats_json(absent)
    assert doc["memory_current_bytes"] is None and doc["pids_current"] is None
    assert doc["io_read_bytes"] is None and doc["cpu_nr_periods"] == 0
    assert stats_json(ResourceStats(pids_current=3, controllers=["pids"]))["pids_current"] == 3


def test_every_command_is_listed_and_help_imports_none_of_them() -> None:
    code = (
        "import sys; from pelagos_bpf.cli import COMMANDS, main\n"
        "try: main(['--help'])\nexcept SystemExit: pass\n"
        "print(sorted(m for m, _ in COMMANDS.values() if m in sys.modules))\n"
        "print('bcc' in sys.modules, 'pyroute2' in sys.modules)\n"
        "print('importlib.metadata' in sys.modules)"
    )
    out = subprocess.run(
        [str(Path(os.sys.executable)), "-c", code], capture_output=True, text=True, check=True
    ).stdout.splitlines()
    assert out[-3] == "[]" and out[-2] == "False False"
    # --version is looked up only when asked (importlib.metadata: ~45 ms of every hook exec)
    assert out[-1] == "False"
    r = cli("--help")
    assert r.returncode == 0
    for name in COMMANDS:
        assert f"    {name}" in r.stdout
    assert "125" in r.stdout and "126" in r.stdout and "127" in r.stdout


# ---------------------------------------------------------------- the script, no root needed


def test_version() -> None:
    import pelagos_bpf

    r = cli("--version")
    assert r.returncode == 0
    assert r.stdout.split() == ["pelagos-bpf", version("pelagos-bpf")]
    assert pelagos_bpf.__version__ == version("pelagos-bpf")


def test_usage_errors_exit_125_not_2() -> None:
    for argv in (["run", "--memory", "lots", "--", "true"], ["nope"], ["inspect"]):
        r = cli(*argv)
        assert r.returncode == 125, (argv, r.stderr)
        no_traceback(r.stderr)
    assert "not a size" in cli("run", "--memory", "lots", "--", "true").stderr
    r = cli("run", "--memory", "0", "--", "true")
    assert r.returncode == 125
    assert "--memory 0: 0 would leave no memory" in r.stderr and "omit --memory" in r.stderr
    r = cli("run", "--cpu-shares", "1", "--", "true")
    assert r.returncode == 125 and "--cpu-shares 1: must be in 2..262144" in r.stderr
    r = cli("run", "--device", "allow q 1:3", "--", "true")
    assert r.returncode == 125 and "bad rule 'allow q 1:3'" in r.stderr


def test_devices_check_errors_are_not_denials(tmp_path: Path) -> None:
    r = cli("devices", "check", "/nonexistent", "c", "1:3", "rw")
    assert r.returncode == 125
    assert r.stderr.strip() == (
        "pelagos-bpf devices: not a cgroup: /nonexistent (no such directory)"
    )
    r = cli("devices", "check", str(tmp_path), "c", "1:3", "rw")
    assert r.returncode == 125 and "not a cgroup" in r.stderr
    no_traceback(r.stderr)
    r = cli("devices", "check", "--rule", "allow c 1:3", "c", "1:3", "rw")
    assert r.returncode == 0 and "allowed" in r.stdout
    r = cli("devices", "check", "--rule", "deny c 1:3", "c", "1:3", "w")
    assert r.returncode == 1 and "DENIED" in r.stdout
    r = cli("devices", "check", "--defaults", "a", "1:3", "r")
    assert r.returncode == 125 and "KIND 'a'" in r.stderr


def test_debug_shows_the_traceback() -> None:
    assert "Traceback" not in cli("inspect", "/nonexistent").stderr
    assert "Traceback" in cli("--debug", "inspect", "/nonexistent").stderr
    assert "Traceback" in cli("inspect", "/nonexistent", env={"PELAGOS_BPF_DEBUG": "1"}).stderr


# ---------------------------------------------------------------- the script, for real (root)


@pytest.mark.root
def test_run_passes_the_exit_code_through(cg_root: Path) -> None:
    r = cli("run", "--path", rel(cg_root, "run"), "--", "sh", "-c", "echo inside; exit 3")
    assert r.returncode == 3, r.stderr
    assert r.stdout == "inside\n"
    assert "exit:   3" in r.stderr and "cpu:    usage" in r.stderr
    r = cli("run", "--path", rel(cg_root, "k"), "--", "sh", "-c", "kill -KILL $$")
    assert r.returncode == 128 + 9 and "killed by signal 9" in r.stderr
    assert subdirs(cg_root) == []


@pytest.mark.root
def test_run_cannot_execute_126_not_found_127(cg_root: Path, tmp_path: Path) -> None:
    r = cli("run", "--path", rel(cg_root, "nx"), "--", "/nonexistent/cmd")
    assert r.returncode == 127
    assert r.stderr.strip() == "pelagos-bpf run: /nonexistent/cmd: command not found"
    noexec = tmp_path / "script"
    noexec.write_text("#!/bin/sh\n")
    r = cli("run", "--path", rel(cg_root, "nx"), "--", str(noexec))
    assert r.returncode == 126 and "cannot execute: Permission denied" in r.stderr
    assert subdirs(cg_root) == []


@pytest.mark.root
def test_run_json_is_one_document_with_report_and_stats(cg_root: Path) -> None:
    path = rel(cg_root, "j")
    r = cli("run", "--json", "--device", "deny c 1:7 w", "--path", path, "--", "true")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    doc = json.loads(r.stdout)  # the whole stdout is one document
    assert doc["schema"] == 1
    assert doc["exit"] == 0 and doc["status"] == {"code": 0, "signal": None}
    assert doc["path"].endswith(path) and doc["stopped_by"] is None
    assert doc["report"]["applied"] == ["device_rules"]
    assert doc["report"]["skipped"] == []
    assert doc["stats"]["cpu_usage_ns"] > 0
    for key in ("memory_current_bytes", "pids_current", "io_read_bytes"):
        ctrl = key.split("_")[0]
        assert (doc["stats"][key] is None) == (ctrl not in doc["stats"]["controllers"])
    r = cli("run", "--json", "--path", path, "--", "cat", "/proc/self/cgroup")
    lines = r.stdout.splitlines()
    assert f"0::/{path}" in lines[:-1]
    assert json.loads(lines[-1])["exit"] == 0
    assert subdirs(cg_root) == []


@pytest.mark.root
def test_run_quiet_prints_only_the_commands_output(cg_root: Path) -> None:
    r = cli("run", "-q", "--path", rel(cg_root, "q"), "--", "echo", "hi")
    assert (r.returncode, r.stdout, r.stderr) == (0, "hi\n", "")


@pytest.mark.root
@pytest.mark.skipif("pids" in root_controllers(), reason="pids available: no error here")
def test_run_refuses_unavailable_setting_names_flag_and_best_effort(cg_root: Path) -> None:
    marker = cg_root.parent / f".marker-{os.getpid()}"
    r = cli("run", "--pids", "64", "--path", rel(cg_root, "no"), "--", "touch", str(marker))
    assert r.returncode == 125
    assert "pelagos-bpf run: --pids: the pids controller is not available" in r.stderr
    assert "use --best-effort" in r.stderr and "pids_limit" not in r.stderr
    assert not marker.exists()
    r = cli("run", "--json", "--best-effort", "--pids", "64", "--path", rel(cg_root, "be"), "--")
    assert r.returncode == 125 and "give a command" in r.stderr
    r = cli("run", "--json", "--best-effort", "--pids", "64", "--path", rel(cg_root, "be"), "true")
    doc = json.loads(r.stdout)
    assert [s["flag"] for s in doc["report"]["skipped"]] == ["--pids"]
    assert "not available" in doc["report"]["skipped"][0]["reason"]
    assert subdirs(cg_root) == []


@pytest.mark.root
def test_run_existing_path_is_one_line(cg_root: Path) -> None:
    (cg_root / "taken").mkdir()
    r = cli("run", "--path", rel(cg_root, "taken"), "--", "true")
    assert r.returncode == 125
    assert r.stderr.count("\n") == 1 and "already exists" in r.stderr
    no_traceback(r.stderr)


@pytest.mark.root
def test_inspect_json_shows_limits_rules_and_net_in_force(cg_root: Path) -> None:
    from pelagos_bpf import CgroupConfig, setup_cgroup, teardown_cgroup

    rules = ["deny a *:* rwm", "allow c 1:3 rw", "allow c 136:* rwm", "deny b 8:* m"]
    cfg = CgroupConfig(
        device_rules=[CgroupDeviceRule.parse(t) for t in rules],
        net_classid=0x10010,
        net_priorities=[("lo", 5)],
        path=rel(cg_root, "insp"),
    )
    cg = setup_cgroup(cfg, None)
    try:
        r = cli("inspect", rel(cg_root, "insp"), "--json")
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        assert doc["schema"] == 1 and doc["path"] == str(cg.path) and doc["id"] == cg.id
        assert set(doc["limits"]) == set(LIMIT_FILES)
        for name, value in doc["limits"].items():
            has = (cg.path / name).exists()
            assert (value is None) == (not has), name
        ids = attached_ids(cg.path, AttachType.CGROUP_DEVICE)
        assert [p["id"] for p in doc["devices"]["programs"]] == ids
        assert [r["rule"] for r in doc["devices"]["owners"]["runtime"]["rules"]] == rules
        assert doc["net"]["classid"] == 0x10010 and doc["net"]["classid_tc"] == "1:10"
        assert doc["net"]["carrier"] == "mark"  # auto: priorities take skb->priority
        lo = socket.if_nametoindex("lo")
        assert doc["net"]["priorities"] == [{"ifindex": lo, "ifname": "lo", "priority": 5}]
        assert {p["attach"] for p in doc["net"]["programs"]} == {"egress", "ingress"}
        assert doc["freezer"] == "thawed"
        text = cli("inspect", str(cg.path)).stdout
        assert "  #3    deny b 8:* m" in text and "classid 1:10 carried in skb->mark" in text
        assert f"  ifindex {lo:<6} {'lo':<15} priority 5" in text
    finally:
        teardown_cgroup(cg)
    r = cli("inspect", str(cg_root / "nope"))
    assert r.returncode == 125 and "not a cgroup" in r.stderr


@pytest.mark.root
def test_verbose_logs_the_library(cg_root: Path) -> None:
    (cg_root / "v").mkdir()
    r = cli("-v", "freeze", str(cg_root / "v"))
    assert r.returncode == 0 and "pelagos_bpf.freezer" in r.stderr
    assert cli("thaw", str(cg_root / "v")).stderr == ""


def test_version_falls_back_to_pyproject_in_a_source_tree(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.metadata as md
    import tomllib

    import pelagos_bpf

    def missing(name: str) -> str:
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "version", missing)
    pyproject = Path(pelagos_bpf.__file__).resolve().parent.parent / "pyproject.toml"
    want = tomllib.loads(pyproject.read_text())["project"]["version"]
    assert pelagos_bpf.__version__ == f"{want}+source"


def test_a_command_whose_module_is_missing_fails_only_when_used() -> None:
    """A command whose module is not installed fails with one line when used, and only then."""
    code = (
        "import sys; from pelagos_bpf import cli; "
        "cli.COMMANDS['ghost'] = ('pelagos_bpf.no_such_module', 'a missing command'); "
        "sys.exit(cli.main(sys.argv[1:]))"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, "ghost"], capture_output=True, text=True, check=False
    )
    assert r.returncode == 125, r.stderr
    assert r.stderr.strip() == (
        "pelagos-bpf ghost: not available in this installation "
        "(pelagos_bpf.no_such_module is missing)"
    )
    ok = subprocess.run(
        [sys.executable, "-c", code, "devices", "defaults"], capture_output=True, check=False
    )
    assert ok.returncode == 0
