"""A real `pelagos-bpf agent` for tests: a subprocess on a socket in a private tmp dir, with its
own hook state dir, started and stopped on real conditions (systemd's READY=1 datagram, the
process's exit), never on sleeps. Plus the thin hook runner and small socket helpers."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from pelagos_bpf.agent import Client
from pelagos_bpf.agent.cli import hook_binary
from pelagos_bpf.cgroup import Cgroup

READY_TIMEOUT = 120.0  # generous: a TCG guest starts Python in ~1 s, the agent in a few
AGENT = [sys.executable, "-m", "pelagos_bpf.cli", "agent"]
PASSED_ENV = ("PELAGOS_BPF_BYTECODE", "PELAGOS_BPF_PIN_DIR", "PELAGOS_BPF_RULES_MAX")
# The admin policy these tests' agents serve hooks under: their containers ask for classids,
# priorities and device grants by annotation, which the built-in default refuses.
OPEN_POLICY = (
    '[default]\nclassids = ["*"]\npriorities = ["0-65535"]\ndevice_grants = true\n'
    "rules_per_set = 4096\n"
)


def open_policy(d: Path) -> Path:
    """OPEN_POLICY as d/policy.toml (root's, 0644: the policy's trust checks pass)."""
    policy = d / "policy.toml"
    if not policy.exists():
        policy.write_text(OPEN_POLICY)
        policy.chmod(0o644)
    return policy


@contextlib.contextmanager
def short_tmp(prefix: str = "pba-") -> Iterator[Path]:
    """A private (0700) dir under /tmp with a short path (a unix socket path has 107 bytes)."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


class AgentProc:
    """One agent process: `start()` returns once it told "systemd" READY=1."""

    def __init__(
        self,
        d: Path,
        *args: str,
        env: dict[str, str] | None = None,
        launcher: tuple[str, ...] = (),
        pass_fds: tuple[int, ...] = (),
    ) -> None:
        self.dir = d
        self.launcher = launcher  # argv before the agent's (e.g. a shell setting LISTEN_PID)
        self.pass_fds = pass_fds
        self.sock = d / "agent.sock"
        self.state = d / "state"
        self.log = d / "agent.log"
        self.args = list(args)
        policy = open_policy(d)
        self.env = {
            **os.environ,
            "PELAGOS_BPF_AGENT_SOCKET": str(self.sock),
            "PELAGOS_BPF_HOOK_STATE": str(self.state),
            "PELAGOS_BPF_POLICY": str(policy),
            **(env or {}),
        }
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProc:
        notify_path = self.dir / "notify"
        with contextlib.suppress(FileNotFoundError):
            notify_path.unlink()
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        notify.bind(str(notify_path))
        self.notify = notify  # kept: the agent says STOPPING=1 on SIGTERM
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.launcher, *AGENT, *self.args],
                env={**self.env, "NOTIFY_SOCKET": str(notify_path)},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                pass_fds=self.pass_fds,
            )
        try:
            deadline = time.monotonic() + READY_TIMEOUT
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError(f"agent exited {self.proc.returncode}: {self.log_text()}")
                if time.monotonic() > deadline:
                    raise AssertionError(f"agent not ready in {READY_TIMEOUT} s: {self.log_text()}")
                notify.settimeout(0.5)
                try:
                    msg = notify.recv(4096).decode()
                except TimeoutError:
                    continue
                if "READY=1" in msg.split("\n"):
                    return self
        except BaseException:
            notify.close()
            raise

    def notifications(self) -> list[str]:
        """The datagrams the agent sent to NOTIFY_SOCKET since READY=1."""
        out = []
        self.notify.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:
                out.append(self.notify.recv(4096).decode())
        return out

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def stop(self, timeout: float = 120.0) -> int:
        """SIGTERM and wait: the agent drains and exits (its status)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def wait(self, timeout: float = 120.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    def client(self, **kw: Any) -> Client:
        return Client(str(self.sock), **kw)

    def hook_env(self, **extra: str) -> dict[str, str]:
        """What a runtime gives a hook: only the hook entry's env (no PATH)."""
        env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        env["PELAGOS_BPF_AGENT_SOCKET"] = str(self.sock)
        env["PELAGOS_BPF_HOOK_STATE"] = str(self.state)
        env["PELAGOS_BPF_POLICY"] = str(open_policy(self.dir))  # for the in-process fallback
        return {**env, **extra}


@contextlib.contextmanager
def running_agent(*args: str, env: dict[str, str] | None = None) -> Iterator[AgentProc]:
    with short_tmp() as d:
        a = AgentProc(d, *args, env=env).start()
        try:
            yield a
        finally:
            if a.proc is not None and a.proc.poll() is None:
                a.stop()


def thin_hook() -> str:
    p = hook_binary()
    if not os.access(p, os.X_OK):
        pytest.fail(f"{p} was not built: run scripts/bootstrap (pip install -e builds it)")
    return str(p)


def oci_state(cid: str, pid: int | None, bundle: Path, status: str = "creating") -> bytes:
    return json.dumps(
        {"ociVersion": "1.0.2", "id": cid, "status": status, "pid": pid, "bundle": str(bundle)}
    ).encode()


def bundle(d: Path, annotations: dict[str, str]) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    cfg = {"ociVersion": "1.0.2", "annotations": annotations, "linux": {}}
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def run_thin(
    state: bytes, env: dict[str, str], *args: str, timeout: float = 120.0
) -> subprocess.CompletedProcess[str]:
    r = subprocess.run(
        [thin_hook(), *args], input=state, capture_output=True, env=env, timeout=timeout
    )
    return subprocess.CompletedProcess(
        r.args, r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")
    )


def raw_connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    s.connect(str(path))
    return s


def read_all(s: socket.socket) -> bytes:
    """Everything until the peer closes (the agent closes after its one reply)."""
    out = b""
    while chunk := s.recv(1 << 16):
        out += chunk
    return out


def wait_for(cond: Any, what: str, timeout: float = 60.0) -> Any:
    """Poll a real condition (cond() truthy) with a generous deadline."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Ctr:
    """A 'container': a test cgroup with a process in it and a bundle asking for `ann`."""

    def __init__(
        self, cg: Cgroup, pid: int, bundle_dir: Path, ann: dict[str, str] | None = None
    ) -> None:
        self.cg, self.pid, self.bundle = cg, pid, bundle_dir
        self.ann = ann or {}
        self.id = f"{cg.path.name}-ctr"

    def create(self) -> bytes:
        return oci_state(self.id, self.pid, self.bundle)

    def stop(self) -> bytes:
        return oci_state(self.id, None, self.bundle, "stopped")


def create_all(ctrs: list[Ctr], env: dict[str, str]) -> None:
    """Every container's create through the thin hook at once (a thread each, as a node
    starting many): each exits 0, and each cgroup carries the classid its annotation asked."""
    from pelagos_bpf import net
    from pelagos_bpf.ocihook.request import A_CLASSID, parse_classid

    with ThreadPoolExecutor(len(ctrs)) as pool:
        got = list(pool.map(lambda c: run_thin(c.create(), env, "create"), ctrs))
    assert [r.returncode for r in got] == [0] * len(ctrs), [r.stderr for r in got if r.returncode]
    for c in ctrs:
        want = parse_classid(c.ann[A_CLASSID])
        assert net.read_state(c.cg).classid == want, c.id
