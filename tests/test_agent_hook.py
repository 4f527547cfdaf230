"""The thin hook (hook/pelagos-bpf-hook.c) on each of its paths: the agent answers; no agent
(fallback to the in-process hook, or `required`); an agent that accepts and then closes, or
never answers; bad input. Servers that misbehave are played by this test in a thread."""

from __future__ import annotations

import json
import os
import select
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from agentlib import bundle, oci_state, open_policy, run_thin, running_agent, short_tmp, thin_hook

from pelagos_bpf import net
from pelagos_bpf.agent import protocol as p
from pelagos_bpf.cgroup import Cgroup

pytest_plugins = ["helpers"]

CLASSID = {"io.pelagos-bpf.net.classid": "1:10"}
STATE = b'{"ociVersion": "1.0.2", "id": "x", "status": "creating", "pid": 1, "bundle": "/nope"}'


def env(sock: Path, **extra: str) -> dict[str, str]:
    base = {
        k: os.environ[k] for k in ("PELAGOS_BPF_BYTECODE", "PELAGOS_BPF_PIN_DIR") if k in os.environ
    }
    return {**base, "PELAGOS_BPF_AGENT_SOCKET": str(sock), **extra}


class FakeAgent:
    """A listening socket whose one connection is handled by `behave(conn, request)`."""

    def __init__(self, path: Path, behave: Callable[[socket.socket, bytes], None]) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(str(path))
        self.sock.listen(1)
        self.request = b""
        self.done = threading.Event()

        def serve() -> None:
            conn, _ = self.sock.accept()
            with conn:
                head = _recv(conn, 12)
                self.request = head + _recv(conn, int.from_bytes(head[8:], "big"))
                behave(conn, self.request)
            self.done.set()

        threading.Thread(target=serve, daemon=True).start()

    def close(self) -> None:
        self.sock.close()


def _recv(conn: socket.socket, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = conn.recv(n - len(buf))
        assert chunk, "the hook closed early"
        buf += chunk
    return buf


@pytest.fixture
def sockdir() -> Iterator[Path]:
    with short_tmp() as d:
        yield d


def test_forwards_and_exits_with_the_agents_answer(sockdir: Path) -> None:
    def reply(conn: socket.socket, req: bytes) -> None:
        conn.sendall(p.hook_reply(7, "pelagos-bpf oci-hook [x]: warning: something"))

    fake = FakeAgent(sockdir / "a.sock", reply)
    try:
        r = run_thin(STATE, env(sockdir / "a.sock"), "create")
    finally:
        fake.close()
    assert r.returncode == 7
    assert r.stderr == "pelagos-bpf oci-hook [x]: warning: something\n"
    kind, length = p.parse_header(fake.request[:12])
    assert (kind, length) == (p.HOOK, len(fake.request) - 12)
    assert p.parse_request(kind, fake.request[12:]).state == STATE


def test_default_stage_is_auto(sockdir: Path) -> None:
    fake = FakeAgent(sockdir / "a.sock", lambda c, r: c.sendall(p.hook_reply(0, "")))
    try:
        r = run_thin(STATE, env(sockdir / "a.sock"))
    finally:
        fake.close()
    assert r.returncode == 0 and r.stderr == ""
    assert p.parse_request(p.HOOK, fake.request[12:]).stage == "auto"


def test_killed_with_the_request_unread_exits_2_clearly(sockdir: Path) -> None:
    """An agent that dies before reading the request: a unix socket closed with unread data
    resets its peer (ECONNRESET, not EOF). The hook says what happened, as for a close."""
    from pelagos_bpf.agent import AgentError, Client

    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(str(sockdir / "a.sock"))
    srv.listen(2)

    def serve() -> None:
        for _ in range(2):  # the thin hook, then the Python client
            conn, _ = srv.accept()
            select.select([conn], [], [], 30)  # the request is in, unread
            conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        r = run_thin(STATE, env(sockdir / "a.sock"), "create")
        with pytest.raises(AgentError, match=r"closed the connection before replying \(reset"):
            Client(str(sockdir / "a.sock")).status()
    finally:
        t.join(30)
        srv.close()
    assert r.returncode == 2
    assert "closed the connection before its reply (reset" in r.stderr, r.stderr


def test_accepted_then_closed_exits_2(sockdir: Path) -> None:
    fake = FakeAgent(sockdir / "a.sock", lambda conn, req: None)  # closes without a reply
    try:
        r = run_thin(STATE, env(sockdir / "a.sock"), "create")
    finally:
        fake.close()
    assert r.returncode == 2
    assert "closed the connection before its reply" in r.stderr


def test_never_answers_exits_2_at_the_deadline(sockdir: Path) -> None:
    released = threading.Event()
    fake = FakeAgent(sockdir / "a.sock", lambda conn, req: released.wait(300))
    try:
        r = run_thin(STATE, env(sockdir / "a.sock", PELAGOS_BPF_AGENT_TIMEOUT="0.5"), "create")
    finally:
        released.set()
        fake.close()
    assert r.returncode == 2
    assert "no reply from the agent" in r.stderr and "within 500 ms" in r.stderr


def test_malformed_reply_exits_2(sockdir: Path) -> None:
    fake = FakeAgent(sockdir / "a.sock", lambda c, r: c.sendall(b"HTTP/1.1 200 OK\r\n\r\n"))
    try:
        r = run_thin(STATE, env(sockdir / "a.sock"), "create")
    finally:
        fake.close()
    assert r.returncode == 2 and "cannot read" in r.stderr


def test_call_reply_refusal_is_printed(sockdir: Path) -> None:
    """What the agent sends before it knows the kind (a refused uid, too many connections)."""
    err = p.call_error(p.error_doc("AgentError", "permission denied: root only"))
    fake = FakeAgent(sockdir / "a.sock", lambda c, r: c.sendall(err))
    try:
        r = run_thin(STATE, env(sockdir / "a.sock"), "create")
    finally:
        fake.close()
    assert r.returncode == 2 and "permission denied: root only" in r.stderr


def test_no_agent_required_fails(sockdir: Path) -> None:
    r = run_thin(STATE, env(sockdir / "none.sock", PELAGOS_BPF_AGENT="required"), "create")
    assert r.returncode == 2
    assert "no agent at" in r.stderr and "PELAGOS_BPF_AGENT=required" in r.stderr


def test_no_agent_listening_falls_back_with_the_same_stdin(sockdir: Path) -> None:
    """A socket file nobody listens on (a killed agent's) is "no agent" too: ECONNREFUSED.
    The fallback gets the stage as its argument and the very bytes read from stdin."""
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(str(sockdir / "a.sock"))
    dead.close()
    out = sockdir / "got"
    fake_cli = sockdir / "pelagos-bpf"
    fake_cli.write_text(f'#!/bin/sh\necho "$0 $*" > {out}.args\ncat > {out}.stdin\nexit 3\n')
    fake_cli.chmod(0o755)
    state = STATE + b" " * 70_000  # more than a pipe buffer: a memfd carries it
    r = run_thin(
        state, env(sockdir / "a.sock", PELAGOS_BPF_HOOK_FALLBACK=str(fake_cli)), "poststop"
    )
    assert r.returncode == 3, r.stderr
    assert (sockdir / "got.args").read_text().split()[1:] == ["oci-hook", "poststop"]
    assert (sockdir / "got.stdin").read_bytes() == state


@pytest.mark.root
def test_no_agent_falls_back_to_the_in_process_hook(
    tmp_path: Path,
    make_cgroup: Callable[[str], Cgroup],
    spawn: Callable[..., subprocess.Popen[bytes]],
) -> None:
    """Found relative to the binary (this checkout's .venv), it attaches for real."""
    cg = make_cgroup("fb")
    proc = spawn("sleep", "600")
    (cg.path / "cgroup.procs").write_text(str(proc.pid))
    b = bundle(tmp_path / "b", CLASSID)
    with short_tmp() as d:
        e = env(
            d / "none.sock",
            PELAGOS_BPF_HOOK_STATE=str(d / "state"),
            PELAGOS_BPF_POLICY=str(open_policy(d)),
        )
        r = run_thin(oci_state("fb", proc.pid, b), e, "create")
        assert r.returncode == 0, r.stderr
        st = net.read_state(cg)
        assert st.attached and st.classid == 0x10010
        assert json.loads((d / "state" / "fb.json").read_text())["cgroup_id"] == cg.id
        r = run_thin(oci_state("fb", None, b, "stopped"), e)
        assert r.returncode == 0, r.stderr
    assert not net.read_state(cg).attached


@pytest.mark.root
def test_the_fallback_and_the_agent_share_records(
    tmp_path: Path,
    make_cgroup: Callable[[str], Cgroup],
    spawn: Callable[..., subprocess.Popen[bytes]],
) -> None:
    """Created in-process while the agent was down, cleaned up by the agent once it is up."""
    cg = make_cgroup("mix")
    proc = spawn("sleep", "600")
    (cg.path / "cgroup.procs").write_text(str(proc.pid))
    b = bundle(tmp_path / "b", CLASSID)
    with short_tmp() as d:
        e = env(
            d / "agent.sock",
            PELAGOS_BPF_HOOK_STATE=str(d / "state"),
            PELAGOS_BPF_POLICY=str(open_policy(d)),
        )
        assert run_thin(oci_state("mix", proc.pid, b), e, "create").returncode == 0
    with running_agent() as a:
        e = a.hook_env()
        assert run_thin(oci_state("mix", proc.pid, b), e, "create").returncode == 0
        held = {h["path"]: h["container"] for h in a.client().inspect()["cgroups"]}
        assert held[str(cg.path)] == "mix"
        assert run_thin(oci_state("mix", None, b, "stopped"), e).returncode == 0
    assert not net.read_state(cg).attached


@pytest.mark.parametrize(
    "args, extra, message",
    [
        (["prestart"], {}, "usage:"),
        (["create", "x"], {}, "usage:"),
        ([], {"PELAGOS_BPF_AGENT": "maybe"}, "PELAGOS_BPF_AGENT=maybe: want auto or required"),
        ([], {"PELAGOS_BPF_AGENT_TIMEOUT": "soon"}, "PELAGOS_BPF_AGENT_TIMEOUT=soon"),
        ([], {"PELAGOS_BPF_AGENT_TIMEOUT": "0"}, "PELAGOS_BPF_AGENT_TIMEOUT=0"),
        ([], {"PELAGOS_BPF_AGENT_SOCKET": "/" + "x" * 200}, "longer than 107 bytes"),
    ],
    ids=["stage", "extra-arg", "mode", "timeout-word", "timeout-zero", "long-path"],
)
def test_bad_invocations(
    sockdir: Path, args: list[str], extra: dict[str, str], message: str
) -> None:
    r = run_thin(STATE, env(sockdir / "none.sock", **extra), *args)
    assert r.returncode == 2
    assert message in r.stderr


def test_state_over_1_mib_is_refused(sockdir: Path) -> None:
    r = run_thin(b"{" + b" " * (1 << 20), env(sockdir / "none.sock"), "create")
    assert r.returncode == 2 and "exceeds" in r.stderr


def test_hook_path_prints_the_shipped_binary() -> None:
    r = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "pelagos-bpf"), "hook-path"],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == thin_hook()
    st = os.stat(r.stdout.strip())
    assert st.st_mode & stat.S_IXUSR
    head = Path(r.stdout.strip()).read_bytes()[:20]
    assert head.startswith(b"\x7fELF")
    file_out = subprocess.run(["file", "-b", thin_hook()], capture_output=True, text=True)
    if file_out.returncode == 0:
        assert "statically linked" in file_out.stdout


def test_hook_path_is_what_hooks_d_would_use() -> None:
    """The shipped hooks.d entry runs the thin hook, found by `pelagos-bpf hook-path`."""
    spec = json.loads(
        (Path(__file__).resolve().parents[1] / "contrib/hooks.d/pelagos-bpf.json").read_text()
    )
    assert spec["hook"]["path"].endswith("/pelagos-bpf-hook")
    assert spec["hook"]["args"] == ["pelagos-bpf-hook"]


def test_client_sees_the_same_paths(sockdir: Path) -> None:
    """pelagos_bpf.agent.Client on the same failures: no agent, closed early, timeout."""
    from pelagos_bpf.agent import AgentError, Client

    with pytest.raises(AgentError, match="no agent at"):
        Client(str(sockdir / "none.sock")).status()
    fake = FakeAgent(sockdir / "a.sock", lambda conn, req: None)
    try:
        with pytest.raises(AgentError, match="closed the connection before replying"):
            Client(str(sockdir / "a.sock")).status()
    finally:
        fake.close()
    os.unlink(sockdir / "a.sock")
    released = threading.Event()
    fake = FakeAgent(sockdir / "a.sock", lambda conn, req: released.wait(300))
    try:
        with pytest.raises(AgentError, match=r"no reply within 0\.3 s"):
            Client(str(sockdir / "a.sock"), timeout=0.3).status()
    finally:
        released.set()
        fake.close()
