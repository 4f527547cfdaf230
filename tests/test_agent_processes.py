"""The agent serving from several processes (--processes): they share the load and one set of
counters, a stuck one leaves the node served, SIGHUP reaches all, and none outlives the agent.

Each test starts its own agent with an explicit --processes (so the test means the same on a
machine of any size) and acts only on cgroups under its `cg_root`.
"""

from __future__ import annotations

import fcntl
import os
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

import pytest
from agentlib import AgentProc, Ctr, create_all, run_thin, running_agent, short_tmp, wait_for

from pelagos_bpf import net

pytest_plugins = ["helpers", "agent_fixtures"]

CLASSID = "io.pelagos-bpf.net.classid"
pytestmark = pytest.mark.root

MakeCtr = Callable[[str, dict[str, str]], Ctr]


def serving(a: AgentProc) -> list[dict[str, int]]:
    return a.client().status()["processes"]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_processes_share_the_load_and_the_counters(make_ctr: MakeCtr) -> None:
    """40 creates at once: each process serves some; status adds every process's counts."""
    ctrs = [make_ctr(f"s{i}", {CLASSID: f"1:{i + 1:x}"}) for i in range(40)]
    with running_agent("--processes", "2", "--workers", "1") as a:
        procs = serving(a)
        assert len(procs) == 2 and procs[0]["pid"] == a.pid
        assert len({p["pid"] for p in procs}) == 2
        env = a.hook_env()
        create_all(ctrs, env)
        st = a.client().status()
        assert st["requests"]["hook_create"]["count"] == 40
        served = [p["requests"] for p in st["processes"]]
        assert all(n > 0 for n in served), served  # both took creates (and a status or two)
        assert sum(served) >= 40
        for c in ctrs:
            assert run_thin(c.stop(), env, "poststop").returncode == 0
        assert a.client().status()["requests"]["hook_poststop"]["count"] == 40


def test_a_process_stuck_on_a_lock_leaves_the_node_served(
    make_ctr: MakeCtr,
) -> None:
    """One worker per process; one create waits on its cgroup's lock (held as another writer
    would): the creates after it, one by one, are all served by the other process meanwhile."""
    stuck = make_ctr("stuck", {CLASSID: "1:1"})
    others = [make_ctr(f"free{i}", {CLASSID: f"1:{i + 2:x}"}) for i in range(8)]
    with running_agent("--processes", "2", "--workers", "1", "--lock-timeout", "300") as a:
        env = a.hook_env()
        fd = os.open(stuck.cg.path, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            with ThreadPoolExecutor(1) as pool:
                first = pool.submit(run_thin, stuck.create(), env, "create")
                wait_for(lambda: a.client().status()["in_flight"] == 1, "the create to wait")
                for c in others:
                    r = run_thin(c.create(), env, "create")
                    assert r.returncode == 0, r.stderr
                    assert net.read_state(c.cg).classid == 0x10000 + others.index(c) + 2
                assert not first.done()  # still waiting on the lock
                fcntl.flock(fd, fcntl.LOCK_UN)
                assert first.result(120).returncode == 0
        finally:
            os.close(fd)
        assert net.read_state(stuck.cg).classid == 0x10001


def test_sighup_reaches_every_process(make_ctr: MakeCtr) -> None:
    """After the policy file changes and SIGHUP, no process serves the old policy: 12 creates
    at once (spread over both processes) are all refused by the new one."""
    ctrs = [make_ctr(f"h{i}", {CLASSID: "1:10"}) for i in range(12)]
    with running_agent("--processes", "2", "--workers", "1") as a:
        policy = a.dir / "policy.toml"
        policy.write_text('[default]\nclassids = ["2:1"]\n')
        assert a.proc is not None
        a.proc.send_signal(signal.SIGHUP)
        # loaded once before the fork, then once in each process
        wait_for(lambda: a.log_text().count("policy loaded") == 3, "both to reload")
        env = a.hook_env()
        with ThreadPoolExecutor(12) as pool:
            got = list(pool.map(lambda c: run_thin(c.create(), env, "create"), ctrs))
        assert all(r.returncode == 2 and "policy" in r.stderr for r in got), [r.stderr for r in got]
        assert all(net.read_state(c.cg).classid == 0 for c in ctrs)
        assert all(p["requests"] > 0 for p in serving(a))


def test_a_dead_process_stops_the_agent_whole() -> None:
    """A serving process that dies unasked stops the agent with exit 1 (its supervisor then
    restarts it whole), and nothing keeps the socket: a new agent starts at once."""
    with short_tmp() as d:
        a = AgentProc(d, "--processes", "3").start()
        pids = [p["pid"] for p in serving(a)]
        assert len(pids) == 3
        os.kill(pids[2], signal.SIGKILL)
        assert a.wait(60) == 1
        assert f"serving process {pids[2]} exited (killed by SIGKILL)" in a.log_text()
        wait_for(lambda: not alive(pids[1]), "the other process to stop")
        assert not a.sock.exists()
        a.start()
        try:
            assert len(serving(a)) == 3
        finally:
            assert a.stop() == 0


def test_sigkill_of_the_main_process_takes_the_others() -> None:
    """PR_SET_PDEATHSIG: no serving process outlives a SIGKILLed agent, so none keeps its
    socket, and a restart right away replaces the stale socket file."""
    with short_tmp() as d:
        a = AgentProc(d, "--processes", "2").start()
        pids = [p["pid"] for p in serving(a)]
        a.kill()
        t0 = time.monotonic()
        wait_for(lambda: not any(alive(p) for p in pids[1:]), "the others to die", 10)
        assert time.monotonic() - t0 < 10
        a.start()
        try:
            assert "removed the stale socket" in a.log_text()
            assert a.client().status()["pid"] == a.pid
        finally:
            assert a.stop() == 0
