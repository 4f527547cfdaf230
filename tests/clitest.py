"""Run the INSTALLED `pelagos-bpf` console script as a person would (a subprocess), as root or
as nobody (setpriv), and check what it leaves behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

EXE = Path(sys.executable).with_name("pelagos-bpf")
NOBODY = ("setpriv", "--reuid=65534", "--regid=65534", "--clear-groups")
HAVE_SETPRIV = shutil.which("setpriv") is not None


def cli(
    *args: str, as_nobody: bool = False, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    argv = [*(NOBODY if as_nobody else ()), str(EXE), *args]
    full_env = {k: v for k, v in os.environ.items() if k != "PELAGOS_BPF_DEBUG"}
    full_env.update(env or {})
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout, check=False, env=full_env
    )


STOP_SIGNALS = (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP)


def as_from_a_terminal() -> None:
    """preexec_fn: what a terminal's shell gives a job it starts: default dispositions for the
    stop signals, nothing blocked. The suite may itself run as a background job of a
    non-interactive shell (`pytest &` in a script, CI), which ignores SIGINT and SIGQUIT; an
    ignored signal is inherited through exec, and sh cannot even trap it, so a command would
    never see the signals the signal tests send."""
    for sig in STOP_SIGNALS:
        signal.signal(sig, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_SETMASK, set())


def start(*args: str, ignored: tuple[signal.Signals, ...] = ()) -> subprocess.Popen[str]:
    """`pelagos-bpf ARGS` in the background (stdout/stderr captured), as from a terminal,
    or with the `ignored` signals ignored (as nohup does SIGHUP)."""
    env = {k: v for k, v in os.environ.items() if k != "PELAGOS_BPF_DEBUG"}

    def preexec() -> None:
        as_from_a_terminal()
        for sig in ignored:
            signal.signal(sig, signal.SIG_IGN)

    return subprocess.Popen(
        [str(EXE), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=preexec,
    )


def wait_until(cond: Callable[[], object], timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def comm(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except (FileNotFoundError, ProcessLookupError):
        return None


def procs(path: Path) -> list[int]:
    with contextlib.suppress(FileNotFoundError):
        return [int(x) for x in (path / "cgroup.procs").read_text().split()]
    return []


def command_pid(path: Path, name: str, timeout: float = 15.0) -> int:
    """The pid of the command `name` once it runs (exec'd) inside the cgroup at path."""
    found: list[int] = []

    def ready() -> bool:
        found[:] = [p for p in procs(path) if comm(p) == name]
        return bool(found)

    wait_until(ready, timeout, f"{name} running in {path}")
    return found[0]


def prog_exists(prog_id: int) -> bool:
    from pelagos_bpf import bpfsys
    from pelagos_bpf.errors import BpfError

    try:
        fd = bpfsys.prog_get_fd_by_id(prog_id)
    except BpfError:
        return False
    os.close(fd)
    return True


def attached_ids(path: Path, attach_type: int) -> list[int]:
    """Ids of every program attached at the cgroup for attach_type (PROG_QUERY, nothing else)."""
    from pelagos_bpf import bpfsys

    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return list(bpfsys.prog_query(fd, attach_type))
    finally:
        os.close(fd)


def no_traceback(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    assert "[Errno" not in stderr, stderr
