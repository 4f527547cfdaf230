"""Clients the agent must refuse without falling over or half-applying anything: other uids,
garbage, oversized and cut frames, silent connections, 1,000 connections at once, overload.

After each, the agent still serves, and the test cgroups carry exactly what was asked by the
requests it accepted (nothing for the ones it refused)."""

from __future__ import annotations

import fcntl
import os
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from agentlib import (
    AgentProc,
    bundle,
    oci_state,
    raw_connect,
    read_all,
    run_thin,
    running_agent,
    thin_hook,
    wait_for,
)

from pelagos_bpf import bpfsys, net
from pelagos_bpf.agent import AgentError
from pelagos_bpf.agent import protocol as p
from pelagos_bpf.bpfsys import AttachType
from pelagos_bpf.cgroup import Cgroup

pytest_plugins = ["helpers"]
pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parents[1]
NOBODY = ["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups"]
# Debian's own python3 (the venv's interpreter lives under /root, which nobody cannot read),
# importing only the client side of the package.
NOBODY_CLIENT = (
    "import sys; sys.path.insert(0, sys.argv[1]); from pelagos_bpf.agent import Client\n"
    "try:\n    Client(sys.argv[2]).status()\nexcept Exception as e:\n"
    "    print(type(e).__name__, e); sys.exit(3)\n"
)
CLASSID = "io.pelagos-bpf.net.classid"


@pytest.fixture
def agent() -> Iterator[AgentProc]:
    with running_agent() as a:
        yield a


def reply_of(raw: bytes) -> tuple[int, bytes]:
    kind, length = p.parse_header(raw[:12], replies=True)
    assert len(raw) == 12 + length, "exactly one frame, then the agent closed"
    return kind, raw[12:]


def call_error(raw: bytes) -> str:
    kind, payload = reply_of(raw)
    assert kind == p.CALL_REPLY
    doc = p.parse_call_reply(payload)
    assert doc["ok"] is False
    return str(doc["error"]["message"])


def still_serving(a: AgentProc) -> dict:  # type: ignore[type-arg]
    assert a.proc is not None and a.proc.poll() is None, a.log_text()
    return a.client().status()


def test_other_uids_are_refused(agent: AgentProc) -> None:
    # As deployed (dir 0700, socket 0600) the kernel refuses them before the agent sees them.
    r = subprocess.run(
        [*NOBODY, thin_hook(), "create"], input=b"{}", capture_output=True, env=agent.hook_env()
    )
    assert r.returncode == 2 and b"Permission denied" in r.stderr
    # With the file modes opened up, SO_PEERCRED still refuses them, and the agent logs it.
    os.chmod(agent.dir, 0o711)
    os.chmod(agent.sock, 0o666)
    r = subprocess.run(
        [*NOBODY, "/usr/bin/python3", "-c", NOBODY_CLIENT, str(ROOT), str(agent.sock)],
        capture_output=True,
        text=True,
        env={"PYTHONDONTWRITEBYTECODE": "1"},
    )
    assert r.returncode == 3, r.stderr
    assert "AgentError permission denied: the pelagos-bpf agent serves root only" in r.stdout
    r = subprocess.run(
        [*NOBODY, thin_hook(), "create"], input=b"{}", capture_output=True, env=agent.hook_env()
    )
    assert r.returncode == 2 and b"serves root only" in r.stderr
    assert still_serving(agent)["refused"]["uid"] == 2
    assert "refused a client with uid 65534" in agent.log_text()


@pytest.mark.parametrize(
    "frame, reply_kind, message",
    [
        (os.urandom(4) + b"\x00\x01\x00\x02\x00\x00\x00\x10", p.CALL_REPLY, "bad magic"),
        (b"PBA1\x00\x09\x00\x01\x00\x00\x00\x00", p.HOOK_REPLY, "protocol version 9"),
        (b"PBA1\x00\x01\x12\x34\x00\x00\x00\x00", p.CALL_REPLY, "unknown frame kind 0x1234"),
        (p.frame(p.CALL, b"\xff\xfe not json"), p.CALL_REPLY, "not JSON"),
        (p.frame(p.CALL, b'{"op": "exec", "owner": "runtime"}'), p.CALL_REPLY, "op='exec'"),
        (p.frame(p.HOOK, b"sideways\n{}"), p.HOOK_REPLY, "got 'sideways'"),
        (b"PBA1\x00\x01\x00\x02\x00\x10\x00\x01", p.CALL_REPLY, "exceeds 1048576"),
    ],
    ids=["garbage", "version", "kind", "payload", "op", "stage", "oversize"],
)
def test_bad_frames_get_one_error_reply(
    agent: AgentProc, frame: bytes, reply_kind: int, message: str
) -> None:
    s = raw_connect(agent.sock)
    s.sendall(frame)
    kind, payload = reply_of(read_all(s))
    s.close()
    assert kind == reply_kind
    if kind == p.HOOK_REPLY:
        code, text = p.parse_hook_reply(payload)
        assert code == 2 and message in text
    else:
        assert message in p.parse_call_reply(payload)["error"]["message"]
    assert still_serving(agent)["refused"]["frame"] == 1


def test_oversized_payload_is_never_read(agent: AgentProc) -> None:
    """The agent answers after the header; it does not wait for (or buffer) 16 MiB."""
    s = raw_connect(agent.sock)
    s.sendall(p.HEADER.pack(p.MAGIC, p.VERSION, p.CALL, 16 << 20))
    assert "exceeds" in call_error(read_all(s))
    s.close()


def test_cut_and_silent_clients_are_dropped(agent: AgentProc) -> None:
    """A frame cut mid-way, and a client that sends nothing, cost nobody else anything."""
    cut = raw_connect(agent.sock)
    cut.sendall(p.frame(p.CALL, p.call_payload("status", "runtime", {}))[:20])
    cut.shutdown(socket.SHUT_WR)
    silent = raw_connect(agent.sock)
    assert still_serving(agent)["connections"] >= 2  # both are open, others are served
    assert read_all(cut) == b""
    t0 = time.monotonic()
    assert read_all(silent) == b""  # dropped at the frame deadline
    assert time.monotonic() - t0 < 60
    refused = still_serving(agent)["refused"]
    assert refused["cut"] == 1 and refused["deadline"] == 1


def test_a_thousand_connections_at_once(agent: AgentProc) -> None:
    """1,000 silent connections: all held within the fd limit, all dropped at the deadline,
    while a real client is served; then 1,000 requests at once: each gets a whole reply (a
    result or a clear "overloaded"), none hangs."""
    socks = []
    for _ in range(1000):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(120)
        s.connect(str(agent.sock))
        socks.append(s)
    assert "cgroups_held" in still_serving(agent)
    for s in socks:
        assert read_all(s) == b""
        s.close()
    assert still_serving(agent)["refused"]["deadline"] >= 1000

    req = p.frame(p.CALL, p.call_payload("status", "runtime", {}))

    def one(_: int) -> str:
        with raw_connect(agent.sock) as s:
            s.sendall(req)
            _kind, payload = reply_of(read_all(s))
        doc = p.parse_call_reply(payload)
        return "ok" if doc["ok"] else doc["error"]["message"]

    with ThreadPoolExecutor(200) as pool:
        answers = list(pool.map(one, range(1000)))
    assert answers.count("ok") >= 1
    assert all(a == "ok" or a.startswith("agent overloaded") for a in answers), set(answers)
    assert still_serving(agent)["requests"]["status"]["failed"] == 0


def attached(path: Path) -> list[int]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return [
            i
            for t in (AttachType.CGROUP_INET_EGRESS, AttachType.CGROUP_DEVICE)
            for i in bpfsys.prog_query(fd, t)
        ]
    finally:
        os.close(fd)


def test_overload_refuses_whole_requests(
    make_cgroup: Callable[[str], Cgroup],
    spawn: Callable[..., subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    """One worker, stuck on a cgroup another writer holds locked; three creates wait; the
    fifth is refused at once (status requests run on a pool of their own meanwhile); the ones
    that waited past --queue-wait are refused when their turn comes. The refused containers
    get nothing; the served ones get all they asked for."""
    cgs, states = [], []
    for i in range(6):
        cg = make_cgroup(f"o{i}")
        proc = spawn("sleep", "600")
        (cg.path / "cgroup.procs").write_text(str(proc.pid))
        b = bundle(
            tmp_path / f"b{i}", {CLASSID: f"1:{i + 1}", "io.pelagos-bpf.devices": "deny c 1:5"}
        )
        cgs.append(cg)
        states.append(oci_state(f"o{i}", proc.pid, b))
    args = ("--processes", "1", "--workers", "1", "--max-pending", "4", "--queue-wait", "2")
    args += ("--lock-timeout", "300")
    with running_agent(*args) as a:
        env = a.hook_env()
        pool = ThreadPoolExecutor(4)
        fd = os.open(cgs[0].path, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            first = pool.submit(run_thin, states[0], env, "create")
            wait_for(lambda: a.client().status()["in_flight"] == 1, "create 0 in flight")
            queued = [pool.submit(run_thin, states[i], env, "create") for i in (1, 2, 3)]
            # 0 (stuck) and 1-3 (queued): 4 = --max-pending
            wait_for(lambda: a.client().status()["in_flight"] == 4, "creates 1-3 queued")
            refused = run_thin(states[4], env, "create")
            t0 = time.monotonic()
            wait_for(lambda: time.monotonic() - t0 > 2.5, "the queue wait to pass", 30)
        finally:
            os.close(fd)  # releases the lock: create 0 proceeds
            pool.shutdown(wait=False)
        results = [first.result(300), *(q.result(300) for q in queued)]
        assert refused.returncode == 2 and "agent overloaded" in refused.stderr
        assert results[0].returncode == 0, results[0].stderr
        for r in results[1:]:  # they waited > 2 s for the stuck worker
            assert r.returncode == 2 and "waited" in r.stderr and "nothing was done" in r.stderr
        assert still_serving(a)["refused"]["overload"] == 4
        late = run_thin(states[5], env, "create")  # the worker is free again
        assert late.returncode == 0, late.stderr
    assert net.read_state(cgs[0]).classid == 0x10001
    assert net.read_state(cgs[5]).classid == 0x10006
    for cg in cgs[1:5]:
        assert attached(cg.path) == []
        assert not net.read_state(cg).attached


def test_bad_clients_leave_the_agent_useful(
    agent: AgentProc,
    make_cgroup: Callable[[str], Cgroup],
    spawn: Callable[..., subprocess.Popen[bytes]],
    tmp_path: Path,
) -> None:
    """After a burst of every bad client above, a real container is still served."""
    for frame in (b"\x00" * 12, b"PBA1\x00\x01\x00\x01\x7f\xff\xff\xff", b"PBA1"):
        s = raw_connect(agent.sock)
        s.sendall(frame)
        s.shutdown(socket.SHUT_WR)
        read_all(s)
        s.close()
    with pytest.raises(AgentError, match="op='nope'"):
        agent.client().call("nope")
    cg = make_cgroup("after")
    proc = spawn("sleep", "600")
    (cg.path / "cgroup.procs").write_text(str(proc.pid))
    b = bundle(tmp_path / "b", {CLASSID: "1:10"})
    r = run_thin(oci_state("after", proc.pid, b), agent.hook_env(), "create")
    assert r.returncode == 0, r.stderr
    assert net.read_state(cg).classid == 0x10010
