"""`pelagos-bpf agent` on the host's cgroup2, through the thin hook and `Client`: real programs
attached to real test cgroups, real device opens, a real Prometheus scrape.

Each test starts its own agent (a subprocess on a socket in a private tmp dir, its own hook
state) and acts only on cgroups under its `cg_root`.
"""

from __future__ import annotations

import fcntl
import http.client
import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from agentlib import (
    AgentProc,
    Ctr,
    create_all,
    raw_connect,
    run_thin,
    running_agent,
    short_tmp,
    thin_hook,
    wait_for,
)
from device_helpers import probe
from prometheus_client.parser import text_string_to_metric_families

from pelagos_bpf import DEFAULT_DEVICE_RULES, CgroupConfig, CgroupDeviceRule, bpfsys, net
from pelagos_bpf.agent import AgentError, Client
from pelagos_bpf.bpfsys import AttachType
from pelagos_bpf.cgroup import Cgroup
from pelagos_bpf.errors import ConfigError

pytest_plugins = ["helpers", "agent_fixtures"]
pytestmark = pytest.mark.root

CLASSID = "io.pelagos-bpf.net.classid"
DEVICES = "io.pelagos-bpf.devices"
ZERO_R, NULL_R = ("c", 1, 5, "r"), ("c", 1, 3, "r")
ATTACH_TYPES = (
    AttachType.CGROUP_INET_EGRESS,
    AttachType.CGROUP_INET_INGRESS,
    AttachType.CGROUP_DEVICE,
)


def attached(path: Path) -> list[int]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return [i for t in ATTACH_TYPES for i in bpfsys.prog_query(fd, t)]
    finally:
        os.close(fd)


@pytest.fixture
def agent() -> Iterator[AgentProc]:
    with running_agent() as a:
        yield a


def scrape_unix(path: Path) -> tuple[int, str]:
    """GET /metrics over HTTP on a unix socket, as a local scraper would."""
    s = raw_connect(path)
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: agent\r\n\r\n")
    resp = http.client.HTTPResponse(s)
    resp.begin()
    body = resp.read().decode()
    s.close()
    return resp.status, body


def families(text: str) -> dict[str, list]:  # type: ignore[type-arg]
    return {f.name: f.samples for f in text_string_to_metric_families(text)}


def test_hook_create_and_poststop_through_the_agent(make_ctr: Callable[..., Ctr]) -> None:
    """Classid attached, an extra device rule denies a real open, the audit counts it, status
    and the scraped metrics name the container, poststop removes everything."""
    with short_tmp() as d, running_agent("--metrics-listen", f"unix:{d}/metrics.sock") as a:
        c = make_ctr("ctr", {CLASSID: "1:10", DEVICES: "deny c 1:5 r"})
        r = run_thin(c.create(), a.hook_env(), "create")
        assert r.returncode == 0, r.stderr + a.log_text()
        st = net.read_state(c.cg)
        assert st.attached and st.classid == 0x10010
        assert probe(c.cg.path, [ZERO_R, NULL_R]) == [False, True]
        assert (a.state / f"{c.id}.json").exists()

        status = a.client().status()
        assert status["requests"]["hook_create"]["count"] == 1
        assert status["requests"]["hook_create"]["p50_ms"] is not None
        mine = [h for h in a.client().inspect()["cgroups"] if h["path"] == str(c.cg.path)]
        assert mine == [
            {
                "id": c.cg.id,
                "path": str(c.cg.path),
                "container": c.id,
                "features": ["devices", "net"],
            }
        ]
        code, text = scrape_unix(d / "metrics.sock")
        assert code == 200
        fam = families(text)
        denied = [s for s in fam["pelagos_bpf_device_denials"] if s.labels["container"] == c.id]
        assert [(s.labels["device"], s.labels["access"], s.value) for s in denied] == [
            ("c 1:5", "r", 1.0)
        ]
        sent = {
            s.labels["direction"]
            for s in fam["pelagos_bpf_net_packets"]
            if s.labels["cgroup"] == str(c.cg.path)
        }
        assert sent == {"egress", "ingress"}
        reqs = {
            (s.labels["op"], s.labels["result"]): s.value for s in fam["pelagos_bpf_agent_requests"]
        }
        assert reqs[("hook_create", "ok")] == 1
        assert any(
            s.labels["map"] == "dev_rules" and s.value > 0 for s in fam["pelagos_bpf_map_entries"]
        )
        assert a.client().metrics().startswith("# HELP")

        r = run_thin(c.stop(), a.hook_env())  # stage "auto": from the state's status
        assert r.returncode == 0, r.stderr
        assert attached(c.cg.path) == []
        assert not (a.state / f"{c.id}.json").exists()
        assert probe(c.cg.path, [ZERO_R]) == [True]
        after = a.client().status()
        assert after["requests"]["hook_poststop"]["count"] == 1
        assert str(c.cg.path) not in {h["path"] for h in a.client().inspect()["cgroups"]}
        assert a.stop() == 0
        assert "refusing new connections" in a.log_text()
        assert any("STOPPING=1" in m for m in a.notifications())


def test_metrics_over_loopback_tcp() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with running_agent("--metrics-listen", f"127.0.0.1:{port}"):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        fam = families(resp.read().decode())
        assert resp.status == 200 and fam["pelagos_bpf_agent_uptime_seconds"][0].value >= 0
        conn.request("GET", "/other")
        assert conn.getresponse().status == 404


def test_bad_annotation_is_the_hooks_error(make_ctr: Callable[..., Ctr], agent: AgentProc) -> None:
    c = make_ctr("bad", {CLASSID: "one:ten"})
    r = run_thin(c.create(), agent.hook_env(), "create")
    assert r.returncode == 2
    assert f"pelagos-bpf oci-hook [{c.id}]: error: io.pelagos-bpf.net.classid='one:ten'" in r.stderr
    assert attached(c.cg.path) == []
    assert agent.client().status()["requests"]["hook_create"]["failed"] == 1


def test_client_setup_update_teardown(
    cg_root: Path, spawn: Callable[..., subprocess.Popen[bytes]], agent: AgentProc
) -> None:
    """The library's calls, served by the agent: same effects, same errors."""
    client = agent.client()
    p = spawn("sleep", "600")
    rel = f"{cg_root.name}/sub/app"  # cg_root is a child of the cgroup2 root
    cfg = CgroupConfig(
        path=rel,
        net_classid=0x10020,
        device_rules=[*DEFAULT_DEVICE_RULES, CgroupDeviceRule(False, "c", 1, 5, "r")],
    )
    cg = client.setup(cfg, p.pid)
    assert cg.path == cg_root / "sub" / "app" and cg.created == [cg_root / "sub", cg.path]
    assert "net_classid" in cg.report["applied"] and "device_rules" in cg.report["applied"]
    assert (cg.path / "cgroup.procs").read_text().split() == [str(p.pid)]
    assert probe(cg.path, [ZERO_R, NULL_R]) == [False, True]

    report = client.update(cg, CgroupConfig(net_classid=0x10030))
    assert report["applied"] == ["net_classid"]
    doc = client.inspect(cg.path)
    assert doc["net"]["classid_tc"] == "1:30"
    rules = doc["devices"]["owners"]["runtime"]["rules"]
    assert [r["rule"] for r in rules][-1] == "deny c 1:5 r"  # kept
    assert doc["container"] is None

    with pytest.raises(ConfigError) as e:
        client.update(cg, CgroupConfig(net_classid=0x10000))  # minor 0: refused, nothing done
    assert e.value.setting == "net_classid"
    assert net.read_state(Cgroup.open(cg.path)).classid == 0x10030
    with pytest.raises(ConfigError, match="not a cgroup directory"):
        client.inspect("/etc")

    client.teardown(cg)
    assert not (cg_root / "sub").exists()
    with pytest.raises(ConfigError, match=r"config\.memroy"):
        client.call("setup", config={"memroy": 1}, pid=p.pid)
    with pytest.raises(ConfigError, match=r"args\.pid"):
        client.call("setup", config={"path": rel}, pid="1")
    assert not (cg_root / "sub").exists()


def test_sigkill_and_restart_lose_nothing(make_ctr: Callable[..., Ctr]) -> None:
    """While the agent is down the kernel keeps enforcing; a new agent reads back every
    container from the maps, PROG_QUERY and the records, and serves their poststop."""
    with short_tmp() as d:
        a = AgentProc(d).start()
        ctrs = [
            make_ctr(f"k{i}", {CLASSID: f"1:{10 + i}", DEVICES: "deny c 1:5 r"}) for i in range(3)
        ]
        try:
            for c in ctrs:
                assert run_thin(c.create(), a.hook_env(), "create").returncode == 0
            a.kill()
            for i, c in enumerate(ctrs):  # enforcement never depended on the agent
                assert net.read_state(c.cg).classid == 0x10010 + i
                assert probe(c.cg.path, [ZERO_R]) == [False]
            a.start()  # the same socket: the stale file is replaced
            assert "removed the stale socket" in a.log_text()
            held = {h["path"]: h for h in a.client().inspect()["cgroups"]}
            for c in ctrs:
                assert held[str(c.cg.path)]["container"] == c.id
                assert a.client().inspect(c.cg.path)["container"] == c.id
            assert a.client().status()["cgroups_held"] >= 3
            for c in ctrs:
                assert run_thin(c.stop(), a.hook_env(), "poststop").returncode == 0
                assert attached(c.cg.path) == []
            assert not list(a.state.glob("*.json"))
        finally:
            a.stop()


def test_sigterm_drains_in_flight_and_refuses_new(make_ctr: Callable[..., Ctr]) -> None:
    """A create waiting on its cgroup's lock when SIGTERM comes is still served; a client
    arriving after it finds no agent (the thin hook then falls back in-process)."""
    c = make_ctr("drain", {CLASSID: "1:10"})
    with running_agent("--lock-timeout", "300") as a:
        fd = os.open(c.cg.path, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX)  # as another writer would
        try:
            hook = subprocess.Popen(
                [thin_hook(), "create"],
                stdin=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=a.hook_env(),
            )
            assert hook.stdin is not None
            hook.stdin.write(c.create())
            hook.stdin.close()
            wait_for(lambda: a.client().status()["in_flight"] == 1, "the create to be in flight")
            assert a.proc is not None
            a.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: not a.sock.exists(), "the agent to stop listening")
            with pytest.raises(AgentError, match="no agent"):
                a.client().status()
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
        assert hook.wait(120) == 0, hook.stderr.read() if hook.stderr else ""
        assert a.wait() == 0
        assert re.search(r"draining \d+ connection", a.log_text())  # the create (+ a status)
    assert net.read_state(c.cg).classid == 0x10010


def test_lock_wait_has_a_deadline(make_ctr: Callable[..., Ctr]) -> None:
    c = make_ctr("locked", {CLASSID: "1:10"})
    with running_agent("--lock-timeout", "0.5") as a:
        fd = os.open(c.cg.path, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            r = run_thin(c.create(), a.hook_env(), "create")
        finally:
            os.close(fd)
    assert r.returncode == 2
    assert "lock not acquired within 0.5 s" in r.stderr
    assert attached(c.cg.path) == []


def test_fifty_parallel_creates(make_ctr: Callable[..., Ctr], agent: AgentProc) -> None:
    ctrs = [
        make_ctr(f"p{i}", {CLASSID: f"1:{i + 1:x}", DEVICES: "deny c 1:5 r"}) for i in range(50)
    ]
    env = agent.hook_env()
    create_all(ctrs, env)
    assert probe(ctrs[17].cg.path, [ZERO_R, NULL_R]) == [False, True]
    assert agent.client().status()["requests"]["hook_create"]["count"] == 50
    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(lambda c: run_thin(c.stop(), env, "poststop"), ctrs))
    assert [r.returncode for r in results] == [0] * 50
    assert all(attached(c.cg.path) == [] for c in ctrs)
    assert not list(agent.state.glob("*.json"))


def test_socket_activation() -> None:
    """systemd's socket (fd 3, LISTEN_PID/LISTEN_FDS) is served and left in place at exit."""
    with short_tmp() as d:
        path = d / "activated.sock"
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        listener.listen(16)
        # As systemd: the socket as fd 3, LISTEN_PID the pid that execs the agent.
        launcher = (
            sys.executable,
            "-c",
            "import os, sys; os.dup2(int(sys.argv[1]), 3); "
            "os.environ['LISTEN_PID'] = str(os.getpid()); os.execv(sys.argv[2], sys.argv[2:])",
            str(listener.fileno()),
        )
        a = AgentProc(
            d,
            env={"LISTEN_FDS": "1", "PELAGOS_BPF_AGENT_SOCKET": str(d / "unused.sock")},
            launcher=launcher,
            pass_fds=(listener.fileno(),),
        ).start()
        try:
            st = Client(str(path)).status()
            assert st["socket"] == str(path) and st["pid"] == a.pid
            assert not (d / "unused.sock").exists()
        finally:
            assert a.stop() == 0
        listener.close()
        assert path.exists()  # systemd's, not the agent's to remove


def test_refuses_to_start_next_to_another_agent_or_in_an_unsafe_dir(agent: AgentProc) -> None:
    def start(sock: Path) -> subprocess.CompletedProcess[str]:
        env = {**agent.env, "PELAGOS_BPF_AGENT_SOCKET": str(sock)}
        return subprocess.run(
            [sys.executable, "-m", "pelagos_bpf.cli", "agent", "--gc-interval", "0"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )

    r = start(agent.sock)
    assert r.returncode == 125 and f"another agent is listening on {agent.sock}" in r.stderr
    unsafe = agent.dir / "unsafe"
    unsafe.mkdir(mode=0o777)
    os.chmod(unsafe, 0o777)
    r = start(unsafe / "a.sock")
    assert r.returncode == 125 and "must be root's and writable by root only" in r.stderr
    (agent.dir / "file").write_text("")
    r = start(agent.dir / "file")
    assert r.returncode == 125 and "exists and is not a socket" in r.stderr
    assert agent.client().status()["pid"] == agent.pid  # the first one is untouched


def test_pinned_programs_are_shared_across_restarts_and_the_fallback(
    make_ctr: Callable[..., Ctr],
) -> None:
    """With a pin dir, a restarted agent fetches the programs it pinned (same ids), and the
    thin hook's in-process fallback attaches those same programs."""
    with short_tmp() as d:
        bpffs = d / "bpffs"
        bpffs.mkdir()
        subprocess.run(["mount", "-t", "bpf", "-o", "mode=700", "bpf", str(bpffs)], check=True)
        try:
            pins = bpffs / "pins"
            pins.mkdir(mode=0o700)
            a = AgentProc(d, env={"PELAGOS_BPF_PIN_DIR": str(pins)}).start()
            ids = {p["id"] for p in a.client().status()["programs"]}
            a.kill()
            a.start()
            assert {p["id"] for p in a.client().status()["programs"]} == ids
            c = make_ctr("pin", {CLASSID: "1:10"})
            env = a.hook_env(PELAGOS_BPF_PIN_DIR=str(pins))
            assert run_thin(c.create(), env, "create").returncode == 0
            assert set(attached(c.cg.path)) <= ids
            assert a.stop() == 0
            f = make_ctr("pinfb", {CLASSID: "1:20"})  # no agent now: the fallback
            r = run_thin(f.create(), env, "create")
            assert r.returncode == 0, r.stderr
            assert set(attached(f.cg.path)) <= ids and attached(f.cg.path)
            for x in (c, f):
                assert run_thin(x.stop(), env, "poststop").returncode == 0
        finally:
            subprocess.run(["umount", str(bpffs)], check=True)
