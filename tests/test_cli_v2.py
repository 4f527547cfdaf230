"""Runtime verbs with a visible effect: `freeze` stops a busy process (its cpu usage stops
growing) and `thaw` resumes it; `events` delivers an OOM kill as it happens, and `run` reports
it. The freezer is core cgroup v2 (it runs on the hybrid host too); OOM needs the memory
controller (a pure-v2 guest: `python -m tests.vm.run --kernel 6.12 -- tests/test_cli_v2.py`)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from cgtest import rel, root_controllers
from clitest import cli, start, wait_until

from pelagos_bpf import CgroupConfig, events, freezer, setup_cgroup, teardown_cgroup

pytestmark = pytest.mark.root
pytest_plugins = ["helpers"]
needs_memory = pytest.mark.skipif(
    "memory" not in root_controllers(), reason="no memory controller in cgroup2 here"
)

BUSY = "while :; do :; done"
# nice: under TCG on a loaded host the loop would otherwise starve the CLI we time out on.
SPIN = ("nice", "-n", "19", "sh", "-c")


def _usage_usec(path: Path) -> int:
    stat = dict(line.split() for line in (path / "cpu.stat").read_text().splitlines())
    return int(stat["usage_usec"])


def _grows(path: Path, seconds: float = 0.5) -> int:
    before = _usage_usec(path)
    time.sleep(seconds)
    return _usage_usec(path) - before


def _runs(path: Path) -> None:
    """The loop gets cpu again (when depends on the machine's load: wait, don't sample)."""
    before = _usage_usec(path)
    wait_until(lambda: _usage_usec(path) > before, 120, f"cpu use in {path}")


def test_freeze_stops_a_busy_process_and_thaw_resumes_it(
    cg_root: Path, spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    d = cg_root / "fz"
    d.mkdir()
    busy = spawn(*SPIN, f"echo $$ > {d}/cgroup.procs; exec sh -c '{BUSY}'")
    wait_until(lambda: _usage_usec(d) > 0, 120, "busy loop running in the cgroup")
    _runs(d)
    r = cli("freeze", str(d), timeout=300)
    assert (r.returncode, r.stdout) == (0, f"{d}: frozen\n"), r.stderr
    assert "frozen 1" in (d / "cgroup.events").read_text()
    assert _grows(d) == 0  # not one microsecond while frozen
    assert busy.poll() is None  # frozen, not dead
    r = cli("thaw", str(d), timeout=300)
    assert (r.returncode, r.stdout) == (0, f"{d}: thawed\n"), r.stderr
    _runs(d)


def test_freeze_library_waits_for_the_kernel_and_reports_state(
    cg_root: Path, spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    d = cg_root / "fzlib"
    d.mkdir()
    spawn(*SPIN, f"echo $$ > {d}/cgroup.procs; exec sh -c '{BUSY}'")
    wait_until(lambda: _usage_usec(d) > 0, 120, "busy loop")
    assert freezer.state(d) == "thawed"
    freezer.freeze(d, timeout=10)
    assert freezer.state(d) == "frozen"  # freeze() returned only once the kernel settled
    freezer.thaw(d)
    assert freezer.state(d) == "thawed"


def test_events_prints_json_lines_as_the_cgroup_changes(cg_root: Path) -> None:
    d = cg_root / "ev"
    d.mkdir()
    proc = start("events", str(d))
    assert proc.stdout is not None
    first = json.loads(proc.stdout.readline())
    assert first["schema"] == 1 and first["path"] == str(d)
    assert first["cgroup"] == {"populated": 0, "frozen": 0}
    assert (first["memory"] is None) == (not (d / "memory.events").exists())
    freezer.freeze(d)
    assert json.loads(proc.stdout.readline())["cgroup"]["frozen"] == 1
    freezer.thaw(d)
    assert json.loads(proc.stdout.readline())["cgroup"]["frozen"] == 0
    d.rmdir()  # the stream ends with the cgroup
    out, err = proc.communicate(timeout=60)
    assert (proc.returncode, out) == (0, ""), err
    r = cli("freeze", str(d), timeout=300)
    assert r.returncode == 125 and "not a cgroup" in r.stderr


def _oom_cgroup(cg_root: Path, name: str) -> object:
    return setup_cgroup(CgroupConfig(memory_limit=32 << 20, path=rel(cg_root, name)), None)


ALLOC = "import sys; x = b'a' * (256 << 20)"


@pytest.mark.v2_controllers
@needs_memory
def test_events_delivers_the_oom_kill(cg_root: Path) -> None:
    cg = _oom_cgroup(cg_root, "oom")
    try:
        watcher = start("events", "--until-oom", "--timeout", "120", str(cg.path))
        assert watcher.stdout is not None
        before = json.loads(watcher.stdout.readline())["memory"]
        assert before["oom_kill"] == 0
        hog = subprocess.run(
            ["sh", "-c", f'echo $$ > {cg.path}/cgroup.procs; exec {sys.executable} -c "{ALLOC}"'],
            capture_output=True,
            timeout=120,
            check=False,
        )
        assert hog.returncode == -9  # the OOM killer's SIGKILL
        out, err = watcher.communicate(timeout=60)
        assert watcher.returncode == 0, err
        last = json.loads(out.splitlines()[-1])
        assert last["new"].get("oom_kill", 0) >= 1 and last["memory"]["oom_kill"] >= 1
        assert events.read_memory_events(cg)["oom_kill"] == last["memory"]["oom_kill"]
    finally:
        teardown_cgroup(cg)


@pytest.mark.v2_controllers
@needs_memory
def test_wait_oom_sleeps_until_the_kill(cg_root: Path) -> None:
    cg = _oom_cgroup(cg_root, "oomlib")
    try:
        assert events.wait_oom(cg, timeout=0.3) is None  # nothing happened: times out
        hog = subprocess.Popen(
            [
                "sh",
                "-c",
                f'sleep 1; echo $$ > {cg.path}/cgroup.procs; exec {sys.executable} -c "{ALLOC}"',
            ]
        )
        ev = events.wait_oom(cg, timeout=120)
        assert ev is not None and ev.oom_kill >= 1 and ev.new.get("oom_kill", 0) >= 1
        assert hog.wait(timeout=60) == -9
    finally:
        teardown_cgroup(cg)


@pytest.mark.v2_controllers
@needs_memory
def test_run_reports_the_oom_kill(cg_root: Path) -> None:
    r = cli(
        "run",
        "--json",
        "--memory",
        "32M",
        "--path",
        rel(cg_root, "runoom"),
        "--",
        sys.executable,
        "-c",
        ALLOC,
    )
    assert r.returncode == 128 + 9, r.stderr
    doc = json.loads(r.stdout)
    assert doc["status"] == {"code": None, "signal": 9}
    assert doc["stats"]["memory_oom_kill"] >= 1 and doc["report"]["applied"] == ["memory_limit"]
