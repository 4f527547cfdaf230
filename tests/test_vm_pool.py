"""The guest pool (tests/vm/pool.py): N jobs at once, results and output per job, and a stop
(early exit or SIGTERM) that ends every running guest's processes. Fake jobs, no QEMU."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from clitest import comm, wait_until

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from tests.vm import pool, qemu  # noqa: E402


def test_default_jobs_is_one_per_core_up_to_two(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(pool.JOBS_ENV, raising=False)
    assert pool.default_jobs(cpus=1) == 1
    assert pool.default_jobs(cpus=2) == 2
    assert pool.default_jobs(cpus=16) == 2
    monkeypatch.setenv(pool.JOBS_ENV, "3")
    assert pool.default_jobs(cpus=1) == 3
    monkeypatch.setenv(pool.JOBS_ENV, "0")
    assert pool.default_jobs() == 1
    monkeypatch.setenv(pool.JOBS_ENV, "two")
    with pytest.raises(ValueError, match="PELAGOS_MATRIX_JOBS must be a number"):
        pool.default_jobs()


def test_at_most_n_jobs_run_and_each_result_and_line_stays_with_its_job() -> None:
    lock = threading.Lock()
    active, peak = [0], [0]
    release = threading.Event()
    both_running = threading.Event()

    def job(n: int) -> pool.Job:
        def run(log: pool.Log) -> int:
            with lock:
                active[0] += 1
                peak[0] = max(peak[0], active[0])
                if active[0] == 2:
                    both_running.set()
            log(f"started {n}")
            release.wait(60)
            with lock:
                active[0] -= 1
            if n == 3:
                raise qemu.BootError("kernel 3 failed to launch")
            return n * 10

        return run

    shown: list[str] = []
    with pool.GuestPool(2) as guests:
        for n in range(4):
            guests.submit(f"k{n}", job(n), label=f"kernel {n}")
        assert both_running.wait(60)
        release.set()
        assert guests.wait("k1", shown.append) == 10
        with pytest.raises(qemu.BootError, match="kernel 3"):
            guests.wait("k3", shown.append)
        finished = dict(guests.as_completed(shown.append))
        assert {k: f.result() for k, f in finished.items() if k != "k3"} == {
            "k0": 0,
            "k1": 10,
            "k2": 20,
        }
    assert peak[0] == 2
    assert sorted(shown) == [f"[kernel {n}] started {n}" for n in range(4)]


def test_leaving_early_stops_running_jobs_and_starts_no_other() -> None:
    started = threading.Event()
    stopped: list[str] = []

    def guest(log: pool.Log) -> None:  # what qemu.boot does: poll until STOP, then clean up
        started.set()
        qemu.STOP.wait(60)
        stopped.append("cleaned up")
        raise qemu.BootError("stopped")

    never: list[str] = []
    with pytest.raises(RuntimeError, match="a test failed"), pool.GuestPool(1) as guests:
        guests.submit("running", guest)
        guests.submit("queued", lambda log: never.append("ran"))
        assert started.wait(60)
        raise RuntimeError("a test failed")
    assert stopped == ["cleaned up"] and never == []
    assert not qemu.STOP.is_set()  # a later pool boots again


def _gone(pid: int) -> bool:
    """Exited: no such process, or a zombie its new parent has not reaped yet."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return True
    return stat.rsplit(")", 1)[1].split()[0] in ("Z", "X")


_SIGTERM_SCRIPT = """
import sys, subprocess
from pathlib import Path
sys.path.insert(0, {root!r})
from tests.vm import pool, qemu

def guest(log):  # a guest's processes, started and stopped as qemu.boot does
    proc = qemu._spawn(["sleep", "300"], Path({log!r}))
    try:
        Path({pidfile!r}).write_text(str(proc.pid))
        while proc.poll() is None:
            if qemu.STOP.wait(0.2):
                raise qemu.BootError("stopped")
    finally:
        qemu._stop(proc)

with pool.GuestPool(2) as guests:
    guests.submit("a", guest)
    for key, fut in guests.as_completed(print):
        fut.result()
"""


def test_sigterm_stops_the_guests_processes_and_the_runner(tmp_path: Path) -> None:
    pidfile = tmp_path / "pid"
    script = _SIGTERM_SCRIPT.format(
        root=str(_ROOT), log=str(tmp_path / "log"), pidfile=str(pidfile)
    )
    runner = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: pidfile.exists() and pidfile.read_text(), 60, "the guest's process")
        child = int(pidfile.read_text())
        assert comm(child) == "sleep"
        runner.send_signal(signal.SIGTERM)
        _out, err = runner.communicate(timeout=60)
    finally:
        if runner.poll() is None:
            runner.kill()
            runner.wait()
    assert runner.returncode == 1
    assert "terminated by signal 15" in err
    wait_until(lambda: _gone(child), 30, "the guest's process to be gone")


def test_a_dying_runner_takes_its_guests_processes_along(tmp_path: Path) -> None:
    """SIGKILL leaves no cleanup to run: PR_SET_PDEATHSIG (qemu._spawn) ends the children."""
    pidfile = tmp_path / "pid"
    script = _SIGTERM_SCRIPT.format(
        root=str(_ROOT), log=str(tmp_path / "log"), pidfile=str(pidfile)
    )
    runner = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)])
    try:
        wait_until(lambda: pidfile.exists() and pidfile.read_text(), 60, "the guest's process")
        child = int(pidfile.read_text())
        os.kill(runner.pid, signal.SIGKILL)
    finally:
        runner.wait(60)
    wait_until(lambda: _gone(child), 30, "the guest's process to be gone")
