"""Real runc, crun and podman containers through `$(pelagos-bpf hook-path)` served by
`pelagos-bpf agent`: what test_runtimes.py proves for the in-process hook, plus the agent's
failures (SIGKILL mid-create, restart, down), load and soak.

Needs a pure cgroup v2 host: `python -m tests.vm.run --kernel 6.12 --
tests/test_agent_runtimes.py` (the 6.12 guest of the matrix runs it, with 4 GiB). The soak
runs 5 + 3 minutes; PELAGOS_SOAK=SECONDS sets both parts (600: the long form, not in CI).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from agentlib import AgentProc, open_policy, short_tmp, thin_hook, wait_for
from net_helpers import C10, topology
from prometheus_client.parser import text_string_to_metric_families
from test_runtimes import (
    _check_classified_and_cleaned,
    _open,
    _passed_env,
    _rootfs,
    _runtime,
    container,
    v2_host,  # noqa: F401 (the fixture, used by pytestmark)
)

from pelagos_bpf import bpfsys, devices, net
from pelagos_bpf.agent import Client
from pelagos_bpf.hierarchy import discover
from pelagos_bpf.ocihook.locate import cgroup_of_pid

pytestmark = [pytest.mark.root, pytest.mark.runtimes, pytest.mark.usefixtures("v2_host")]

SOAK = float(os.environ.get("PELAGOS_SOAK", "0") or 0)
SOAK_STEADY = SOAK or 300.0
SOAK_KILLS = SOAK or 180.0
CLASSID = "io.pelagos-bpf.net.classid"
OUR_PROGS = (
    "pelagos_dev_v2",
    "pelagos_net_eg",
    "pelagos_net_in",
    "pelagos_net_sk",
    "pelagos_net_so",
)
# What a hook that fails on its own says (exit 2); any of these is a clear refusal.
CLEAR_FAILURES = (
    "closed the connection before its reply",
    "no reply from the agent",
    "agent overloaded",
    "did not take the request",
)


def thin_entry(a: AgentProc, **env: str) -> dict:  # type: ignore[type-arg]
    """The hooks' entry a runtime gets: the thin hook, the agent's socket, the same records
    dir as the agent (so the in-process fallback and the agent share them), and a deadline
    for TCG, where everything runs 10-20x slower than on a host (default 10 s)."""
    return {
        "path": thin_hook(),
        "args": ["pelagos-bpf-hook"],
        "env": [
            f"PELAGOS_BPF_AGENT_SOCKET={a.sock}",
            f"PELAGOS_BPF_HOOK_STATE={a.state}",
            "PELAGOS_BPF_AGENT_TIMEOUT=120",
            f"PELAGOS_BPF_POLICY={open_policy(a.dir)}",  # for the in-process fallback
            *_passed_env(),
            *(f"{k}={v}" for k, v in env.items()),
        ],
    }


@contextlib.contextmanager
def agent_proc(*args: str) -> Iterator[AgentProc]:
    """An agent whose queue wait matches the hooks' deadline under TCG (PELAGOS_BPF_AGENT_TIMEOUT
    above): its default 5 s suits a host, where a request takes ~0.5 ms, not a guest that runs
    10-20x slower beside other guests."""
    with short_tmp() as d:
        a = AgentProc(d, "--queue-wait", "100", *args).start()
        try:
            yield a
        finally:
            if a.proc is not None and a.proc.poll() is None:
                a.stop()


def memory_kb(pid: int) -> int:
    """The agent's memory: PSS summed over its main process and the serving processes it
    forked (the pages they share counted once; RSS summed would count them in each)."""
    kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    total = 0
    for p in (pid, *map(int, kids)):
        for line in Path(f"/proc/{p}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1])
    return total


def our_program_ids() -> set[int]:
    out = set()
    for pid in bpfsys.prog_ids():
        with contextlib.suppress(Exception):
            fd = bpfsys.prog_get_fd_by_id(pid)
            try:
                if bpfsys.prog_info(fd).name in OUR_PROGS:
                    out.add(pid)
            finally:
                os.close(fd)
    return out


def own_program_ids() -> set[int]:
    """Programs this pytest process loaded itself (other tests of the guest's suite)."""
    from pelagos_bpf.registry import FEATURES

    return {i for f in FEATURES if (got := f.loaded_if_any()) for i in got.ids.values()}


# ---------------------------------------------------------------- what the hook proves


def test_runc_through_the_agent(tmp_path: Path) -> None:
    """runc drops linux.resources.network on v2: the agent attaches the classid (packets land
    in HTB 1:10), our device rule denies c 1:5, runc's denies c 1:11; the denial is counted
    and exported with the container's id; delete removes everything."""
    with agent_proc() as a, topology(("va",)) as topo:
        before = topo.counters("va")
        ann = {"io.pelagos-bpf.devices": "deny c 1:5 r; allow c 1:11 rwm"}
        with container("runc", tmp_path, topo, ann, {"classID": C10}, thin_entry(a), a.state) as c:
            c.wait_output()
            text = a.client().metrics()
            fams = {f.name: f.samples for f in text_string_to_metric_families(text)}
            mine = [s for s in fams["pelagos_bpf_device_denials"] if s.labels["container"] == c.id]
            assert any(s.labels["device"] == "c 1:5" and s.value >= 1 for s in mine), mine
            devs = _check_classified_and_cleaned(c, topo, before, programs_die=False)
        st = a.client().status()["requests"]
        assert st["hook_create"]["count"] == 1 and st["hook_poststop"]["count"] == 1
    assert devs["null"] == "ok"
    assert "Operation not permitted" in devs["zero"]
    assert "Operation not permitted" in devs["kmsg"]


def test_crun_annotation_and_audit_through_the_agent(tmp_path: Path) -> None:
    with agent_proc() as a, topology(("va",)) as topo:
        before = topo.counters("va")
        ann = {CLASSID: "1:10", "io.pelagos-bpf.devices.audit": "true"}
        with container("crun", tmp_path, topo, ann, {}, thin_entry(a), a.state) as c:
            c.wait_output()
            denials = devices.read_device_denials(_open(cgroup_of_pid(c.pid())))
            assert denials.get("c 1:11 r", 0) >= 1, denials
            devs = _check_classified_and_cleaned(c, topo, before, programs_die=False)
    assert devs["null"] == "ok" and devs["zero"] == "ok"
    assert "Operation not permitted" in devs["kmsg"]


def test_podman_hooks_dir_with_the_thin_hook(tmp_path: Path) -> None:
    """contrib/hooks.d's entry, its path the one `pelagos-bpf hook-path` prints."""
    podman = _runtime("podman")
    _runtime("crun")
    cli = Path(sys.executable).parent / "pelagos-bpf"
    hook_path = subprocess.run([str(cli), "hook-path"], capture_output=True, text=True, check=True)
    with agent_proc() as a:
        hooks = tmp_path / "hooks.d"
        hooks.mkdir()
        spec = json.loads(
            (Path(__file__).parents[1] / "contrib/hooks.d/pelagos-bpf.json").read_text()
        )
        spec["hook"]["path"] = hook_path.stdout.strip()
        spec["hook"]["env"] = thin_entry(a)["env"]
        (hooks / "pelagos-bpf.json").write_text(json.dumps(spec))
        short = Path(tempfile.mkdtemp(prefix="pgpm", dir="/tmp"))
        pm = [
            podman, "--root", str(short / "storage"), "--runroot", str(short / "run"),
            "--storage-driver", "vfs", "--cgroup-manager", "cgroupfs",
            "--events-backend", "file", "--hooks-dir", str(hooks),
        ]  # fmt: skip

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            r = subprocess.run([*pm, *args], capture_output=True, text=True, timeout=600)
            assert r.returncode == 0, f"podman {args[0]}: {r.stderr}"
            return r

        _rootfs(tmp_path / "rootfs")
        tar = tmp_path / "rootfs.tar"
        subprocess.run(["tar", "-C", str(tmp_path / "rootfs"), "-cf", str(tar), "."], check=True)
        name = f"pelagos-ag-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        try:
            run("import", str(tar), "localhost/pelagos-busybox")
            run(
                "run", "-d", "--name", name, "--runtime", "crun",
                "--annotation", "io.pelagos-bpf.net.classid=1:10",
                "--annotation", "io.pelagos-bpf.net.priorities=lo=5",
                "localhost/pelagos-busybox", "sleep", "600",
            )  # fmt: skip
            pid = int(run("inspect", "--format", "{{.State.Pid}}", name).stdout)
            cg_path = cgroup_of_pid(pid)
            st = net.read_state(_open(cg_path))
            assert st.classid == C10
            assert [(n, p) for _i, n, p in st.priorities] == [("lo", 5)]
            held = {h["path"]: h["container"] for h in a.client().inspect()["cgroups"]}
            assert held.get(str(cg_path)) is not None
        finally:
            subprocess.run([*pm, "rm", "-f", name], capture_output=True, timeout=600)
            shutil.rmtree(short, ignore_errors=True)
        assert not cg_path.exists()
        assert not list(a.state.glob("*.json"))  # poststop ran through the agent
        assert a.client().status()["requests"]["hook_poststop"]["count"] >= 1


# ---------------------------------------------------------------- plain runc containers


class Runc:
    """`runc run -d` (or crun's, the same CLI) of busybox `sleep` containers sharing one
    read-only rootfs, each with its own bundle (config.json), cgroup under one prefix, and the
    thin hook."""

    def __init__(self, tmp: Path, hook: dict, runtime: str = "runc") -> None:  # type: ignore[type-arg]
        self.runc = _runtime(runtime)
        self.tmp = tmp
        self.root = tmp / "state"
        self.rootfs = tmp / "rootfs"
        _rootfs(self.rootfs)
        self.prefix = f"pelagos-ag-{os.getpid()}-{uuid.uuid4().hex[:6]}"
        self.hook = hook
        spec = tmp / "spec"
        spec.mkdir()
        subprocess.run([self.runc, "spec"], cwd=spec, check=True, capture_output=True)
        self.spec = json.loads((spec / "config.json").read_text())

    def bundle(self, cid: str, annotations: dict[str, str]) -> Path:
        b = self.tmp / "bundles" / cid
        b.mkdir(parents=True, exist_ok=True)  # a container refused once may be run again
        cfg = json.loads(json.dumps(self.spec))
        cfg["process"].update(terminal=False, args=["sleep", "600"])
        cfg["root"] = {"path": str(self.rootfs), "readonly": True}
        cfg["linux"]["cgroupsPath"] = f"/{self.prefix}/{cid}"
        # crun drops a hook's stderr unless told where to put it (runc puts it in its error)
        cfg["annotations"] = {**annotations, "run.oci.hooks.stderr": str(b / "hook.err")}
        cfg["hooks"] = {"createRuntime": [self.hook], "poststop": [self.hook]}
        (b / "config.json").write_text(json.dumps(cfg))
        return b

    def cmd(self, *args: str, **kw: object) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.runc, "--root", str(self.root), *args],
            capture_output=True,
            text=True,
            timeout=600,
            **kw,  # type: ignore[call-overload]
        )

    def run(self, cid: str, annotations: dict[str, str]) -> subprocess.CompletedProcess[str]:
        """runc run -d; the container's own stdio goes to /dev/null (a pipe never closes)."""
        b = self.bundle(cid, annotations)
        err = b / "runc.err"
        with open(err, "w") as f:
            r = subprocess.run(
                [self.runc, "--root", str(self.root), "run", "-d", "--bundle", str(b), cid],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=f,
                timeout=600,
            )
        hook_err = b / "hook.err"
        text = err.read_text() + (hook_err.read_text() if hook_err.exists() else "")
        return subprocess.CompletedProcess(r.args, r.returncode, "", text)

    def cgroup(self, cid: str) -> Path:
        """The container's cgroup: runc's cgroupfs driver makes exactly cgroupsPath (no
        `runc state` exec per check: under TCG each runc exec costs ~0.5 s)."""
        return discover().root / self.prefix / cid

    def delete(self, cid: str) -> None:
        """runc delete --force (its poststop hook runs then); the container is gone after it
        even when the hook failed (an agent killed meanwhile: runc reports it, and gc prunes
        the record the poststop could not remove)."""
        r = self.cmd("delete", "--force", cid)
        if r.returncode != 0:  # the poststop hook failed: runc and crun report it
            assert any(m in r.stderr for m in CLEAR_FAILURES), r.stderr
        assert not self.exists(cid)
        shutil.rmtree(self.tmp / "bundles" / cid, ignore_errors=True)

    def exists(self, cid: str) -> bool:
        return self.cmd("state", cid).returncode == 0

    def leftover_cgroups(self) -> list[Path]:
        base = discover().root / self.prefix
        return [p for p in base.rglob("*") if p.is_dir()] if base.exists() else []

    def close(self) -> None:
        for cid in os.listdir(self.root) if self.root.exists() else []:
            self.cmd("delete", "--force", cid)
        base = discover().root / self.prefix
        if base.exists():
            for d in sorted(self.leftover_cgroups(), key=lambda p: -len(p.parts)):
                d.rmdir()
            base.rmdir()


@contextlib.contextmanager
def runc_with(a: AgentProc, runtime: str = "runc", **env: str) -> Iterator[Runc]:
    with tempfile.TemporaryDirectory(prefix="pelagos-ag-") as d:
        r = Runc(Path(d), thin_entry(a, **env), runtime)
        try:
            yield r
        finally:
            r.close()


def classid_of(r: Runc, cid: str) -> int | None:
    st = net.read_state(_open(r.cgroup(cid)))
    return st.classid if st.attached else None


def test_sigkill_mid_create_fails_the_container_clearly() -> None:
    """The agent dies while a create waits for the cgroup's lock: runc fails the container
    with the hook's reason, and nothing of ours is left on the cgroup. The same container
    then starts, with its rules, once an agent is back."""
    with agent_proc("--lock-timeout", "600") as a, runc_with(a) as r:
        cg = discover().root / r.prefix / "victim"
        cg.mkdir(parents=True)  # runc joins an existing cgroup: we can lock it first
        fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            with ThreadPoolExecutor(1) as pool:
                run = pool.submit(r.run, "victim", {CLASSID: "1:10"})
                wait_for(lambda: a.client().status()["in_flight"] == 1, "the create", 300)
                a.kill()
                res = run.result(600)
        finally:
            os.close(fd)
        assert res.returncode != 0
        assert "closed the connection before its reply" in res.stderr, res.stderr
        assert not r.exists("victim")
        assert not cg.exists() or not net.read_state(_open(cg)).attached
        a.start()
        assert r.run("victim", {CLASSID: "1:10"}).returncode == 0
        assert classid_of(r, "victim") == C10
        r.delete("victim")


def test_restart_reads_back_every_container() -> None:
    with agent_proc() as a, runc_with(a) as r:
        ids = [f"k{i}" for i in range(3)]
        for i, cid in enumerate(ids):
            ann = {CLASSID: f"1:{10 + i}", "io.pelagos-bpf.net.priorities": "lo=5"}
            res = r.run(cid, ann)
            assert res.returncode == 0, res.stderr
        paths = {cid: r.cgroup(cid) for cid in ids}
        a.kill()
        for i, cid in enumerate(ids):  # enforced while no agent runs
            assert classid_of(r, cid) == 0x10010 + i
        a.start()
        held = {h["container"]: h["path"] for h in a.client().inspect()["cgroups"]}
        for i, cid in enumerate(ids):
            assert held[cid] == str(paths[cid])
            doc = a.client().inspect(paths[cid])
            assert doc["container"] == cid and doc["net"]["classid"] == 0x10010 + i
            assert [p["priority"] for p in doc["net"]["priorities"]] == [5]
        for cid in ids:
            r.delete(cid)
        assert not list(a.state.glob("*.json"))


def test_agent_down_falls_back_and_required_fails() -> None:
    with agent_proc() as a:
        a.stop()
        with runc_with(a) as r:
            res = r.run("fb", {CLASSID: "1:10"})
            assert res.returncode == 0, res.stderr
            assert classid_of(r, "fb") == C10  # the in-process hook did it
            r.delete("fb")
            assert not list(a.state.glob("*.json"))
        with runc_with(a, PELAGOS_BPF_AGENT="required") as r:
            res = r.run("req", {CLASSID: "1:10"})
            assert res.returncode != 0
            assert "PELAGOS_BPF_AGENT=required" in res.stderr, res.stderr
            assert not r.exists("req")


# ---------------------------------------------------------------- load and soak


def _fill(client: Client) -> dict[str, int]:
    fams = text_string_to_metric_families(client.metrics())
    return {
        f"{s.labels['feature']} {s.labels['map']}": int(s.value)
        for f in fams
        if f.name == "pelagos_bpf_map_entries"
        for s in f.samples
    }


def assert_nothing_leaked(a: AgentProc, r: Runc, baseline: dict[str, int]) -> None:
    """No cgroup under the prefix, no record, no map entry of a dead cgroup (after a gc), and
    no program of ours but the running agent's."""
    assert r.leftover_cgroups() == []
    keep = {p["id"] for p in a.client().status()["programs"]} | own_program_ids()
    wait_for(lambda: our_program_ids() <= keep, "programs of removed cgroups to be freed", 120)
    a.client().gc()
    assert not list(a.state.glob("*.json"))
    assert _fill(a.client()) == baseline


# Load and soak run crun (the same hook path): each runc exec costs ~0.5 s under TCG, crun's
# a fraction of it, so the time goes to the hook and the agent rather than to the runtime.


def test_load_200_containers_20_at_a_time() -> None:
    with agent_proc() as a, runc_with(a, "crun") as r:
        baseline = _fill(a.client())
        ids = [f"l{i}" for i in range(200)]
        ann = {"io.pelagos-bpf.devices": "deny c 1:5 r"}

        def start(i: int) -> subprocess.CompletedProcess[str]:
            return r.run(ids[i], {**ann, CLASSID: f"1:{i + 1:x}"})

        with ThreadPoolExecutor(20) as pool:
            results = list(pool.map(start, range(200)))
        failed = [(ids[i], x.stderr) for i, x in enumerate(results) if x.returncode]
        assert not failed, (failed[:3], a.client().status(), a.log_text()[-3000:])
        for i, cid in enumerate(ids):
            assert classid_of(r, cid) == 0x10000 + i + 1
        st = a.client().status()
        assert st["containers"] >= 200 and st["requests"]["hook_create"]["failed"] == 0
        with ThreadPoolExecutor(20) as pool:
            list(pool.map(r.delete, ids))
        assert_nothing_leaked(a, r, baseline)


def lifecycle(r: Runc, cid: str) -> None:
    res = r.run(cid, {CLASSID: "1:10", "io.pelagos-bpf.devices": "deny c 1:5 r"})
    assert res.returncode == 0, res.stderr
    assert classid_of(r, cid) == C10
    r.delete(cid)


def test_soak_steady_rss(capsys: pytest.CaptureFixture[str]) -> None:
    """Container lifecycles back to back for SOAK_STEADY seconds: after a warm-up of 40, the
    agent's memory (PSS over its processes) at the end is within 10 % of its start."""
    with agent_proc() as a, runc_with(a, "crun") as r:
        baseline = _fill(a.client())
        for i in range(40):  # every serving process warms up (its pages diverge from the fork)
            lifecycle(r, f"w{i}")
        start = peak = memory_kb(a.pid)
        t0, n = time.monotonic(), 0
        while time.monotonic() - t0 < SOAK_STEADY:
            lifecycle(r, f"s{n}")
            n += 1
            peak = max(peak, memory_kb(a.pid))
        end = memory_kb(a.pid)
        with capsys.disabled():
            print(
                f"\nsoak: {n} lifecycles in {time.monotonic() - t0:.0f} s; agent PSS start "
                f"{start / 1024:.1f} MB, peak {peak / 1024:.1f} MB, end {end / 1024:.1f} MB"
            )
        assert abs(end - start) <= 0.10 * start, (start, peak, end)
        assert_nothing_leaked(a, r, baseline)


def test_soak_random_agent_kills(capsys: pytest.CaptureFixture[str]) -> None:
    """Lifecycles (two at a time) for SOAK_KILLS seconds while the agent is SIGKILLed and
    restarted at random: every container either fails with a clear reason or runs with its
    rules; nothing leaks."""
    rng = random.Random(int(os.environ.get("PELAGOS_SOAK_SEED", "25")))
    outcomes = {"started": 0, "refused": 0}
    lock = threading.Lock()
    stop = threading.Event()
    with agent_proc() as a, runc_with(a, "crun") as r:
        baseline = _fill(a.client())

        def worker(w: int) -> None:
            n = 0
            while not stop.is_set():
                cid = f"x{w}-{n}"
                n += 1
                res = r.run(cid, {CLASSID: "1:10", "io.pelagos-bpf.devices": "deny c 1:5 r"})
                if res.returncode != 0:
                    assert any(m in res.stderr for m in CLEAR_FAILURES), res.stderr
                    assert not r.exists(cid)
                    with lock:
                        outcomes["refused"] += 1
                    continue
                assert classid_of(r, cid) == C10, f"{cid} runs without its classid"
                with lock:
                    outcomes["started"] += 1
                r.delete(cid)

        kills = 0
        with ThreadPoolExecutor(2) as pool:
            futures = [pool.submit(worker, w) for w in range(2)]
            t0 = time.monotonic()
            try:
                while time.monotonic() - t0 < SOAK_KILLS:
                    stop.wait(rng.uniform(3, 15))
                    a.kill()
                    kills += 1
                    stop.wait(rng.uniform(0, 3))  # hooks meanwhile run in-process
                    a.start()
                    for f in futures:
                        if f.done():
                            f.result()  # a failed assertion in a worker ends the soak
            finally:
                stop.set()
            for f in futures:
                f.result()
        assert kills >= 2 and outcomes["started"] > 0, (kills, outcomes)
        assert_nothing_leaked(a, r, baseline)
    with capsys.disabled():
        print(f"\nsoak with kills: {kills} SIGKILLs in {SOAK_KILLS:.0f} s, containers {outcomes}")


def test_sigterm_leaves_containers_enforced() -> None:
    """A clean stop (systemd's SIGTERM) changes nothing in force."""
    with agent_proc() as a, runc_with(a) as r:
        assert r.run("t", {CLASSID: "1:10"}).returncode == 0
        assert a.stop() == 0
        assert classid_of(r, "t") == C10
        a.start()
        r.delete("t")
        assert not list(a.state.glob("*.json"))
