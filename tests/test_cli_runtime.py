"""`update` on a live cgroup, and what a non-root operator sees (through setpriv as nobody):
inspect shows the files and marks the BPF part "needs root"; run and compile say what they need."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from cgtest import rel
from clitest import HAVE_SETPRIV, cli, no_traceback

from pelagos_bpf import CgroupConfig, CgroupDeviceRule, setup_cgroup, teardown_cgroup

pytestmark = pytest.mark.root
nobody = pytest.mark.skipif(not HAVE_SETPRIV, reason="needs setpriv (util-linux)")


@pytest.fixture
def devcg(cg_root: Path):  # type: ignore[no-untyped-def]
    rules = [CgroupDeviceRule.parse(t) for t in ("deny a *:* rwm", "allow c 1:3 rw")]
    cg = setup_cgroup(CgroupConfig(device_rules=rules, path=rel(cg_root, "dev")), None)
    yield cg
    teardown_cgroup(cg)


def _rules(path: Path) -> list[str]:
    r = cli("inspect", "--json", str(path))
    assert r.returncode == 0, r.stderr
    return [x["rule"] for x in json.loads(r.stdout)["devices"]["owners"]["runtime"]["rules"]]


def test_update_replaces_the_device_rules(devcg) -> None:  # type: ignore[no-untyped-def]
    assert _rules(devcg.path) == ["deny a *:* rwm", "allow c 1:3 rw"]
    r = cli("update", str(devcg.path), "--device", "deny a *:* rwm", "--device", "allow c 1:5")
    assert r.returncode == 0, r.stderr
    assert r.stdout == "applied: --device\n"
    assert _rules(devcg.path) == ["deny a *:* rwm", "allow c 1:5 rwm"]
    r = cli("update", "--json", str(devcg.path), "--device", "allow c 1:3 r")
    assert json.loads(r.stdout)["applied"] == ["device_rules"]
    assert _rules(devcg.path) == ["allow c 1:3 r"]


def test_update_refuses_what_the_host_cannot_apply(devcg) -> None:  # type: ignore[no-untyped-def]
    controllers = (devcg.path / "cgroup.controllers").read_text().split()
    if "pids" in controllers:
        pytest.skip("pids available here: nothing to refuse")
    r = cli("update", str(devcg.path), "--pids", "10")
    assert r.returncode == 125
    assert r.stderr.startswith("pelagos-bpf update: --pids: the pids controller is not available")
    r = cli("update", str(Path(devcg.path).parent / "nope"), "--pids", "10")
    assert r.returncode == 125 and "not a cgroup" in r.stderr


@nobody
def test_nonroot_inspect_shows_files_and_marks_bpf_needs_root(devcg) -> None:  # type: ignore[no-untyped-def]
    r = cli("inspect", str(devcg.path), as_nobody=True)
    assert r.returncode == 0, r.stderr
    no_traceback(r.stderr)
    assert f"cgroup:      {devcg.path} (id {devcg.id})" in r.stdout
    assert "devices:     needs root" in r.stdout and "net:         needs root" in r.stdout
    assert "cpu:    usage" in r.stdout
    r = cli("inspect", "--json", str(devcg.path), as_nobody=True)
    doc = json.loads(r.stdout)
    assert doc["devices"] == {"error": "needs root (CAP_BPF and CAP_SYS_ADMIN for bpf(2))"}
    assert doc["stats"]["device_denials"] is None and doc["stats"]["cpu_usage_ns"] >= 0
    assert doc["id"] == devcg.id and doc["freezer"] == "thawed"
    assert "error" not in cli("inspect", "--json", str(devcg.path)).stdout  # root sees it all


@nobody
def test_nonroot_run_and_compile_say_what_they_need(cg_root: Path, tmp_path: Path) -> None:
    r = cli("run", "--path", rel(cg_root, "x"), "--", "true", as_nobody=True)
    assert r.returncode == 125
    assert r.stderr.strip().endswith(
        "Permission denied: needs root (or a delegated subtree with --root)"
    )
    no_traceback(r.stderr)
    open_dir = Path(tempfile.mkdtemp(prefix="pelagos-clitest-"))  # world-writable, reachable
    try:
        os.chmod(open_dir, 0o777)
        r = cli("compile", "--out", str(open_dir), as_nobody=True)
        assert r.returncode == 125 and "compiling needs root" in r.stderr
        no_traceback(r.stderr)
        assert list(open_dir.iterdir()) == []
    finally:
        shutil.rmtree(open_dir)
