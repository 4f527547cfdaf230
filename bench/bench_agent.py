"""The agent and the thin hook, side by side in one run, with their component costs (root;
acts only on cgroups this script creates, under pelagos-bench-agent-<pid>).

1. Thin hook exec -> exit with the agent up: create (classid) and poststop of one container,
   alternating; p50 and p99. Components: the agent's own time (its status), the round trip of
   an empty request. Twice, each against an agent of its own: the container alone on the node
   (its attach flips the kernel's static key of the attach type), then beside a resident
   container that holds our programs (a node running containers; every later phase too).
2. 50 parallel creates: 50 client processes each send a hook create at once (released by one
   barrier) and exit as soon as they have the answer, as the thin hook does (os._exit: no
   interpreter teardown competing with the agent); client round trip p50/p99; side by side
   (rounds interleaved) with a second agent serving from one process (--processes 1).
3. `runc run` of busybox `true` (classid by annotation) without a hook and with the thin hook
   served by each of the two agents (createRuntime + poststop), interleaved; with
   --python-hook also the in-process `pelagos-bpf oci-hook`.
4. Agent create measured inside the agent (hook_create p50/p99 from its status): for each
   sequential pass (its own agent), over the parallel creates, and over those plus runc's.
5. Agent memory (PSS, RSS summed over its processes) with 10,000 cgroups held (setup through
   the Client: classid + the default device rules), then after a status, a Prometheus scrape
   (HTTP) and `agent metrics` (JSON over the socket), each with the peak (VmHWM) so far.

The hook records go to a tmpfs (/dev/shm), as /run is on a real node.
Usage: .venv/bin/python bench/bench_agent.py [--runs 200] [--runc-runs 20] [--cgroups 10000]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_hook import CLASSID, hook_entry, runc_bench, use_bench_policy

from pelagos_bpf import DEFAULT_DEVICE_RULES, CgroupConfig
from pelagos_bpf.agent import Client, protocol
from pelagos_bpf.agent.cli import hook_binary
from pelagos_bpf.hierarchy import discover

HOOK = str(hook_binary())
CLI = str(Path(sys.executable).parent / "pelagos-bpf")


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, int(q * len(s) + 0.5) - 1))] * 1e3


@contextmanager
def agent(tmp: Path, state: Path, *args: str) -> Iterator[tuple[subprocess.Popen[bytes], Path]]:
    """An agent on a socket in tmp, started and stopped on real conditions (READY=1, exit)."""
    sock, notify_path = tmp / "agent.sock", tmp / "notify"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(notify_path))
    notify.settimeout(120)
    env = dict(
        os.environ,
        PELAGOS_BPF_AGENT_SOCKET=str(sock),
        PELAGOS_BPF_HOOK_STATE=str(state),
        NOTIFY_SOCKET=str(notify_path),
    )
    log = open(tmp / "agent.log", "wb")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(
        [
            CLI,
            "agent",
            "--gc-interval",
            "0",
            "--max-pending",
            "1024",
            "--metrics-listen",
            f"unix:{tmp}/metrics.sock",
            *args,
        ],
        env=env,
        stderr=log,
    )
    try:
        while b"READY=1" not in notify.recv(4096):
            pass
        yield proc, sock
    finally:
        notify.close()
        proc.send_signal(signal.SIGTERM)
        proc.wait(120)
        log.close()


def _kb(path: str, *keys: str) -> list[int]:
    fields = dict(line.split(":", 1) for line in Path(path).read_text().splitlines())
    return [int(fields[k].split()[0]) for k in keys]


def agent_pids(pid: int) -> list[int]:
    """The agent's main pid and the serving processes it forked."""
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [pid, *map(int, kids)]


def rss_kb(pid: int) -> tuple[int, int, int]:
    """Over the agent's processes: (PSS, RSS, peak RSS) summed, kB. PSS counts the pages
    they share (all but what each wrote since the fork) once: the memory the agent holds.
    RSS counts them in every process."""
    pss = rss = peak = 0
    for p in agent_pids(pid):
        r, hwm = _kb(f"/proc/{p}/status", "VmRSS", "VmHWM")
        pss += _kb(f"/proc/{p}/smaps_rollup", "Pss")[0]
        rss, peak = rss + r, peak + hwm
    return pss, rss, peak


def state(cid: str, pid: int | None, bundle: Path, status: str = "creating") -> bytes:
    return json.dumps(
        {"ociVersion": "1.0.2", "id": cid, "status": status, "pid": pid, "bundle": str(bundle)}
    ).encode()


def hook_env_of(sock: Path) -> dict[str, str]:
    """What a runtime passes the thin hook: the node's settings and the agent's socket."""
    env = {k: v for k, v in os.environ.items() if k.startswith("PELAGOS_BPF_")}
    return {**env, "PELAGOS_BPF_AGENT_SOCKET": str(sock)}


def exec_ms(argv: list[str], stdin: bytes, env: dict[str, str], expect: int = 0) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(argv, input=stdin, capture_output=True, env=env)
    dt = time.perf_counter() - t0
    if r.returncode != expect:
        raise SystemExit(f"{argv}: exit {r.returncode}: {r.stderr.decode()}")
    return dt


class Containers:
    """n test cgroups with a sleeping process each, and a bundle asking for a classid."""

    def __init__(self, root: Path, tmp: Path, n: int, prefix: str = "c") -> None:
        self.root = root
        self.bundle = tmp / "bundle"
        self.bundle.mkdir(exist_ok=True)
        cfg = {"ociVersion": "1.0.2", "annotations": CLASSID, "linux": {}}
        (self.bundle / "config.json").write_text(json.dumps(cfg))
        self.procs = [subprocess.Popen(["sleep", "3600"]) for _ in range(n)]
        self.dirs = []
        for i, p in enumerate(self.procs):
            d = root / f"{prefix}{i}"
            d.mkdir()
            (d / "cgroup.procs").write_text(str(p.pid))
            self.dirs.append(d)

    def close(self) -> None:
        """Idempotent: the processes killed and reaped, the cgroups removed."""
        for p in self.procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for d in self.dirs:
            with contextlib.suppress(FileNotFoundError):
                d.rmdir()


def bench_thin_hook(
    runs: int, sock: Path, ctrs: Containers, hook_env: dict[str, str], where: str
) -> dict[str, Any]:
    pid = ctrs.procs[0].pid
    create, stop = state("one", pid, ctrs.bundle), state("one", None, ctrs.bundle, "stopped")
    times: dict[str, list[float]] = {
        k: [] for k in ("create", "poststop", "exec only", "/bin/true", "empty round trip")
    }
    client = Client(str(sock))
    bad_env = {**hook_env, "PELAGOS_BPF_AGENT": "bench-exec-only"}  # exits before connecting
    for _ in range(runs):
        times["create"].append(exec_ms([HOOK, "create"], create, hook_env))
        times["poststop"].append(exec_ms([HOOK, "poststop"], stop, hook_env))
        times["exec only"].append(exec_ms([HOOK], b"", bad_env, expect=2))
        times["/bin/true"].append(exec_ms(["/bin/true"], b"", hook_env))
        t0 = time.perf_counter()
        client.hook("poststop", state("none", None, ctrs.bundle, "stopped"))
        times["empty round trip"].append(time.perf_counter() - t0)
    st = client.status()["requests"]
    print(f"thin hook exec -> exit, agent up, {runs} runs each, {where} (ms):")
    print(f"{'':60} {'p50':>8} {'p99':>8}")
    for label, key in (
        ("hook create (classid)", "create"),
        ("hook poststop (cgroup alive: detach)", "poststop"),
        ("  component: exec of the static hook (exits at once)", "exec only"),
        ("  component: /bin/true", "/bin/true"),
        ("  component: Python client round trip, nothing to do", "empty round trip"),
    ):
        print(f"  {label:58} {pct(times[key], 0.5):8.2f} {pct(times[key], 0.99):8.2f}")
    for op in ("hook_create", "hook_poststop"):
        r = st[op]
        print(f"  component: {op} inside the agent {'':27} {r['p50_ms']:8.2f} {r['p99_ms']:8.2f}")
    return {k: pct(v, 0.5) for k, v in times.items()} | {"agent": st["hook_create"]["p50_ms"]}


def _one_client(sock: str, payload: bytes, gate: Any, wfd: int) -> None:
    """A client process (as 50 runtimes' hooks are): waits at the gate, sends one hook
    create, reads the reply; writes its round trip (negative: it failed) to the pipe with one
    small write, so reporting costs the agent's CPU nothing (a multiprocessing queue starts a
    feeder thread per process while the others are still being served)."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(60)
    gate.wait()
    t0 = time.perf_counter()
    s.connect(sock)
    s.sendall(protocol.frame(protocol.HOOK, payload))
    raw = b""
    while chunk := s.recv(1 << 16):
        raw += chunk
    dt = time.perf_counter() - t0
    code, _text = protocol.parse_hook_reply(raw[12:])
    os.write(wfd, struct.pack("d", dt if code == 0 else -1.0))
    os._exit(0)  # as a thin hook ends: no interpreter teardown beside the agent's work


def print_agent_create(sock: Path, what: str) -> None:
    st = Client(str(sock)).status()["requests"]
    r = st.get("hook_create", {"count": 0, "p50_ms": 0.0, "p99_ms": 0.0})
    print(
        f"agent create, inside the agent, over {what} ({r['count']}): "
        f"p50 {r['p50_ms']:.3f} ms  p99 {r['p99_ms']:.3f} ms"
    )


def bench_parallel(agents: dict[str, Path], ctrs: Containers, rounds: int) -> None:
    """Each round, for each agent in turn: 50 client processes released together, each sends
    one hook create (its own cgroup); then the 50 poststops. The round trip of every create is
    kept."""
    rtt: dict[str, list[float]] = {label: [] for label in agents}
    for r in range(rounds):
        for label, sock in agents.items():
            rtt[label] += _parallel_round(sock, ctrs, f"{r}{label[0]}")
    n = len(ctrs.procs)
    print(f"{n} parallel creates (one client process each), round trip over {rounds} rounds (ms):")
    for label, xs in rtt.items():
        print(
            f"  {label:40} p50 {pct(xs, 0.5):6.2f}  p99 {pct(xs, 0.99):6.2f}  "
            f"max {max(xs) * 1e3:6.2f}"
        )


def _parallel_round(sock: Path, ctrs: Containers, r: str) -> list[float]:
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    n = len(ctrs.procs)
    gate = ctx.Barrier(n)
    rfd, wfd = os.pipe()
    procs = [
        ctx.Process(
            target=_one_client,
            args=(
                str(sock),
                protocol.hook_payload("create", state(f"par{r}-{i}", pr.pid, ctrs.bundle)),
                gate,
                wfd,
            ),
        )
        for i, pr in enumerate(ctrs.procs)
    ]
    for x in procs:
        x.start()
    os.close(wfd)
    data = b""
    while chunk := os.read(rfd, 8 * n):
        data += chunk
    os.close(rfd)
    for x in procs:
        x.join()
    got = [v for (v,) in struct.iter_unpack("d", data)]
    if len(got) != n or min(got) < 0:
        raise SystemExit(f"parallel creates: {len(got)} of {n} replied, some failed")
    c = Client(str(sock))
    for i in range(n):
        c.hook("poststop", state(f"par{r}-{i}", None, ctrs.bundle, "stopped"))
    return got


def scrape(path: Path) -> str:
    """GET /metrics over the agent's unix-socket HTTP listener (what a local scraper does)."""
    import http.client

    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(120)
    s.connect(str(path))
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: agent\r\n\r\n")
    resp = http.client.HTTPResponse(s)
    resp.begin()
    body = resp.read().decode()
    s.close()
    return body


def bench_rss(proc: subprocess.Popen[bytes], sock: Path, metrics: Path, root: Path, n: int) -> None:
    client = Client(str(sock), timeout=600)
    base = rss_kb(proc.pid)
    rules = list(DEFAULT_DEVICE_RULES)
    made = []
    t0 = time.perf_counter()
    try:
        for i in range(n):
            cfg = CgroupConfig(path=f"{root.name}/h{i}", net_classid=0x10010, device_rules=rules)
            made.append(client.setup(cfg))
        setup_s = time.perf_counter() - t0
        held = rss_kb(proc.pid)
        t1 = time.perf_counter()
        st = client.status()
        status_ms = (time.perf_counter() - t1) * 1e3
        after_status = rss_kb(proc.pid)
        t1 = time.perf_counter()
        text = scrape(metrics)
        scrape_ms = (time.perf_counter() - t1) * 1e3
        time.sleep(1.0)  # the agent trims its heap after the reply is sent
        after_scrape = rss_kb(proc.pid)
        t1 = time.perf_counter()
        client.metrics()
        metrics_ms = (time.perf_counter() - t1) * 1e3
        time.sleep(1.0)
        after = rss_kb(proc.pid)
        print(
            f"agent RSS with {st['cgroups_held']} cgroups held (setup of {n} through the Client: "
            f"{setup_s:.1f} s, {setup_s / n * 1e3:.2f} ms each):"
        )
        rows = (
            ("at start (programs loaded)", base),
            (f"{n} cgroups held", held),
            (f"after a status ({status_ms:.0f} ms)", after_status),
            (
                f"after a Prometheus scrape, HTTP ({scrape_ms:.0f} ms, {len(text) / 1e6:.1f} MB)",
                after_scrape,
            ),
            (f"after `agent metrics` over the socket, JSON ({metrics_ms:.0f} ms)", after),
        )
        print(
            f"  over its {len(agent_pids(proc.pid))} processes:"
            f"{'':38} PSS (RSS summed; peaks summed)"
        )
        for label, (pss, rss, peak) in rows:
            print(
                f"  {label:62} {pss / 1024:6.1f} MB  ({rss / 1024:.1f} MB; "
                f"peak so far {peak / 1024:.1f} MB)"
            )
    finally:
        for cg in made:
            client.teardown(cg)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200)
    ap.add_argument("--runc-runs", type=int, default=20)
    ap.add_argument("--parallel-rounds", type=int, default=10)
    ap.add_argument("--cgroups", type=int, default=10000)
    ap.add_argument("--python-hook", action="store_true", help="also runc + `pelagos-bpf oci-hook`")
    ap.add_argument(
        "--agent-arg", action="append", default=[], help="passed to the agent (repeatable)"
    )
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root")
        return 2
    if not os.access(HOOK, os.X_OK):
        print(f"{HOOK} missing: run scripts/bootstrap")
        return 2
    # A SIGTERM (a CI timeout, `kill`) unwinds like ^C: the cleanups below remove the cgroups,
    # the processes in them and the tmp dirs.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    root = discover().root / f"pelagos-bench-agent-{os.getpid()}"
    root.mkdir()
    shm = Path(tempfile.mkdtemp(prefix="pelagos-bench-agent-", dir="/dev/shm"))
    try:
        with tempfile.TemporaryDirectory(prefix="pba-", dir="/tmp") as d:
            tmp = Path(d)
            use_bench_policy(tmp)
            for sub in ("one", "empty", "seq"):
                (tmp / sub).mkdir(mode=0o700)
            ctrs = Containers(root, tmp, 50)
            resident = Containers(root, tmp, 1, prefix="resident")
            try:
                if args.runs:
                    # The first program of an attach type on the node (and the last one's
                    # detach) flips a kernel static key: text patching, IPIs to every CPU.
                    with agent(tmp / "empty", shm / "state-empty", *args.agent_arg) as (_, s0):
                        env0 = {**hook_env_of(s0), "PELAGOS_BPF_HOOK_STATE": str(shm / "s0")}
                        empty = bench_thin_hook(
                            args.runs, s0, ctrs, env0, "the only container on the node"
                        )
                with (
                    agent(tmp, shm / "state", *args.agent_arg) as (proc, sock),
                    agent(tmp / "one", shm / "state-one", "--processes", "1") as (_, sock_one),
                ):
                    # As on any node running containers, another one holds our programs.
                    res = state("resident", resident.procs[0].pid, resident.bundle)
                    if Client(str(sock)).hook("create", res)[0] != 0:
                        raise SystemExit("the resident container's create failed")
                    n_proc = len(agent_pids(proc.pid))
                    if args.runs:  # an agent of its own: the main one's counters are for 2-3
                        with agent(tmp / "seq", shm / "state-seq", *args.agent_arg) as (_, s1):
                            env1 = {**hook_env_of(s1), "PELAGOS_BPF_HOOK_STATE": str(shm / "s1")}
                            busy = bench_thin_hook(
                                args.runs, s1, ctrs, env1, "beside a running container"
                            )
                        hook_d = empty["create"] - busy["create"]
                        agent_d = empty["agent"] - busy["agent"]
                        print(
                            "  the kernel's static-key switch, paid by the first container of "
                            f"a node (p50 difference): hook create {hook_d:+.2f} ms, "
                            f"inside the agent {agent_d:+.2f} ms"
                        )
                    if args.parallel_rounds:
                        bench_parallel(
                            {
                                f"the agent ({n_proc} processes)": sock,
                                "an agent with --processes 1": sock_one,
                            },
                            ctrs,
                            args.parallel_rounds,
                        )
                        print_agent_create(sock, "the parallel creates (and the resident one)")
                    if args.runc_runs:
                        hooks = {
                            f"thin hook + agent, {n_proc} processes (classid)": hook_entry(
                                shm,
                                HOOK,
                                ["pelagos-bpf-hook"],
                                [f"PELAGOS_BPF_AGENT_SOCKET={sock}"],
                            ),
                            "thin hook + agent, 1 process (classid)": hook_entry(
                                shm,
                                HOOK,
                                ["pelagos-bpf-hook"],
                                [f"PELAGOS_BPF_AGENT_SOCKET={sock_one}"],
                            ),
                        }
                        if args.python_hook:
                            hooks["oci-hook in-process (classid)"] = hook_entry(
                                shm, CLI, ["pelagos-bpf", "oci-hook"]
                            )
                        print("runc, beside a running container:")
                        runc_bench(args.runc_runs, tmp, hooks)
                    print_agent_create(sock, "every create of the parallel and runc phases")
                    Client(str(sock)).hook("poststop", state("resident", None, resident.bundle))
                    resident.close()
                    ctrs.close()
                    if args.cgroups:
                        bench_rss(proc, sock, tmp / "metrics.sock", root, args.cgroups)
            finally:
                for c in (ctrs, resident):
                    c.close()
    finally:
        shutil.rmtree(shm, ignore_errors=True)
        for left in sorted(root.rglob("*"), key=lambda p: -len(p.parts)):
            if left.is_dir():
                left.rmdir()
        root.rmdir()
    return 0


if __name__ == "__main__":
    sys.exit(main())
