"""`pelagos-bpf run` is safe to stop: a signal reaches the command, `run` exits 128+N, and
nothing is left: not the cgroup, not the device program, not the command's process."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cgtest import rel
from clitest import attached_ids, comm, command_pid, no_traceback, prog_exists, start, wait_until

from pelagos_bpf.bpfsys import AttachType

pytestmark = pytest.mark.root


def _gone(path: Path, pid: int, prog_ids: list[int]) -> None:
    """The cgroup dir, the command's process and our device program are all gone."""
    assert not path.exists()
    wait_until(lambda: comm(pid) is None, 10, f"pid {pid} to exit")
    # The program is freed once its last attachment (released with the cgroup) and fd are.
    wait_until(lambda: not any(map(prog_exists, prog_ids)), 15, "device program freed")


def _running(
    cg_root: Path, name: str, *cmd: str, flags: tuple[str, ...] = ()
) -> tuple[subprocess.Popen[str], Path, int, list[int]]:
    path = cg_root / name
    proc = start(
        "run", *flags, "--device", "deny c 1:7 w", "--path", rel(cg_root, name), "--", *cmd
    )
    pid = command_pid(path, Path(cmd[0]).name)
    ids = attached_ids(path, AttachType.CGROUP_DEVICE)
    assert len(ids) == 1
    return proc, path, pid, ids


def _trapping(tmp_path: Path, trap: str) -> str:
    """A shell loop that sets `trap`, then says so (a signal before that would kill it)."""
    return f"trap {trap}; touch {tmp_path}/ready; while :; do sleep 0.05; done"


def _ready(tmp_path: Path) -> None:
    wait_until((tmp_path / "ready").exists, what="the command's trap to be set")


def _finish(proc: subprocess.Popen[str], timeout: float = 30) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_signal_is_forwarded_and_run_exits_128_plus_n(cg_root: Path, sig: signal.Signals) -> None:
    proc, path, pid, ids = _running(cg_root, f"s{int(sig)}", "sleep", "300")
    proc.send_signal(sig)
    code, _out, err = _finish(proc)
    assert code == 128 + sig, err
    assert f"stopped by {sig.name}" in err
    no_traceback(err)
    _gone(path, pid, ids)


def test_command_sees_the_forwarded_signal(cg_root: Path, tmp_path: Path) -> None:
    """The command's own handler runs (graceful stop), then run exits 128+15."""
    seen = tmp_path / "seen"
    script = _trapping(tmp_path, f"'echo TERM > {seen}; exit 0' TERM")
    proc, path, pid, ids = _running(cg_root, "trap", "sh", "-c", script, flags=("--json",))
    _ready(tmp_path)
    proc.send_signal(signal.SIGTERM)
    code, out, err = _finish(proc)
    assert code == 143, err
    assert seen.read_text() == "TERM\n"
    doc = json.loads(out)
    assert doc["stopped_by"] == "SIGTERM" and doc["killed"] is False
    assert doc["status"] == {"code": 0, "signal": None} and doc["exit"] == 143
    _gone(path, pid, ids)


def test_command_ignoring_the_signal_is_killed_after_stop_timeout(
    cg_root: Path, tmp_path: Path
) -> None:
    flags = ("--json", "--stop-timeout", "1")
    script = _trapping(tmp_path, "'' TERM")
    proc, path, pid, ids = _running(cg_root, "ign", "sh", "-c", script, flags=flags)
    _ready(tmp_path)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code, out, err = _finish(proc)
    waited = time.monotonic() - t0
    assert code == 143, err
    assert "still running 1s after SIGTERM: killing" in err
    doc = json.loads(out)
    assert doc["killed"] is True and doc["status"]["signal"] == signal.SIGKILL
    assert waited >= 1.0  # it was given the grace period
    _gone(path, pid, ids)


def test_second_signal_kills_at_once(cg_root: Path, tmp_path: Path) -> None:
    seen = tmp_path / "seen"
    flags = ("--json", "--stop-timeout", "120")
    # The command records the forwarded SIGTERM (and ignores it): then `run` has taken the
    # first signal, and the second is really a second one (two signals pending at once would
    # be taken lowest number first, SIGINT before SIGTERM).
    script = _trapping(tmp_path, f"'echo TERM >> {seen}' TERM; trap '' INT")
    proc, path, pid, ids = _running(cg_root, "twice", "sh", "-c", script, flags=flags)
    _ready(tmp_path)
    proc.send_signal(signal.SIGTERM)
    wait_until(seen.exists, 60, "the command to get the forwarded SIGTERM")
    assert proc.poll() is None  # the first signal only asked
    proc.send_signal(signal.SIGINT)
    code, out, err = _finish(proc, timeout=20)  # far below the 120 s grace period
    assert code == 143, err  # 128 + the FIRST signal
    assert json.loads(out)["killed"] is True
    no_traceback(err)
    _gone(path, pid, ids)


def test_a_signal_ignored_at_start_stays_ignored(cg_root: Path) -> None:
    """`nohup pelagos-bpf run -- job`: a hangup must not stop the job. (Blocking an ignored
    signal, as run blocks the stop signals, would queue it instead of dropping it.) The
    SIGTERM sent after it is what stops run: had SIGHUP been queued, run would have taken it
    first, whichever arrived first (the lower number is taken first)."""
    path = cg_root / "nohup"
    proc = start(
        "run", "--json", "--path", rel(cg_root, "nohup"), "--", "sleep", "300",
        ignored=(signal.SIGHUP,),
    )  # fmt: skip
    pid = command_pid(path, "sleep")
    proc.send_signal(signal.SIGHUP)
    proc.send_signal(signal.SIGTERM)
    code, out, err = _finish(proc)
    assert code == 143, err
    doc = json.loads(out)
    assert doc["stopped_by"] == "SIGTERM" and doc["killed"] is False
    assert doc["status"] == {"code": None, "signal": signal.SIGTERM}
    _gone(path, pid, [])


def test_children_of_the_command_are_removed_too(cg_root: Path) -> None:
    """The command exits on SIGTERM but leaves a background child: teardown kills it."""
    proc, path, _pid, ids = _running(cg_root, "bg", "sh", "-c", "sleep 300 & wait")
    sleeper = command_pid(path, "sleep")
    proc.send_signal(signal.SIGTERM)
    code, _out, err = _finish(proc)
    assert code == 143, err
    _gone(path, sleeper, ids)


def test_ctrl_c_at_a_terminal_stops_run_cleanly(cg_root: Path, tmp_path: Path) -> None:
    """Ctrl-C at a real terminal (a pty): the line discipline signals the whole foreground
    group; the command sees SIGINT and ends, `run` tears down and exits 130.
    (Whether run also forwards it cannot be seen here: a second SIGINT pending at once merges
    with the first.) The command exits from its trap, so run never needs --stop-timeout."""
    import os
    import pty

    from clitest import EXE, as_from_a_terminal

    seen = tmp_path / "seen"
    script = _trapping(tmp_path, f"'echo INT >> {seen}; exit 0' INT")
    argv = [str(EXE), "run", "--stop-timeout", "120", "--path", rel(cg_root, "tty"), "--"]
    pid, master = pty.fork()
    if pid == 0:  # a session of its own, the pty as controlling terminal, foreground group
        # (with SIGINT ignored, as in a background job of a script, the command would never
        # see the Ctrl-C: run would kill it after --stop-timeout, exit 130, no record)
        as_from_a_terminal()
        os.execv(str(EXE), [*argv, "sh", "-c", script])
    try:
        _ready(tmp_path)
        os.write(master, b"\x03")  # Ctrl-C: the line discipline signals the group
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 128 + signal.SIGINT
        assert seen.read_text() == "INT\n"
        assert not (cg_root / "tty").exists()
    finally:
        os.close(master)
