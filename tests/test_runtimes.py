"""Real runc and crun containers whose net classid and device rules come through the OCI hook.

Needs a pure cgroup v2 host (the QEMU guests: `python -m tests.vm.run --kernel 6.12 --
tests/test_runtimes.py`): on the hybrid development host runc tries v1 net_cls for classID.

Each container: a busybox rootfs (no image registry), joins a netns the test owns whose veth
carries HTB 1:10/1:20(default)/1:30, pings the peer, probes device nodes, then sleeps. runc gets
its classID from `linux.resources.network` (which runc 1.1 drops on v2); crun, which refuses
that field on v2, from the `io.pelagos-bpf.net.classid` annotation.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from cgtest import root_controllers
from net_helpers import C10, C20, Topo, topology

from pelagos_bpf import bpfsys, net
from pelagos_bpf.bpfsys import AttachType
from pelagos_bpf.errors import BpfError
from pelagos_bpf.hierarchy import discover
from pelagos_bpf.ocihook.locate import cgroup_of_pid
from pelagos_bpf.pins import PIN_ENV

pytestmark = [pytest.mark.root, pytest.mark.runtimes, pytest.mark.net]

PINGS = 5
APPLETS = ("sh", "sleep", "head", "ping", "echo", "cat")
HOOK_BIN = Path(sys.executable).parent / "pelagos-bpf"
OUR_PROGS = ("pelagos_net_eg", "pelagos_net_in", "pelagos_dev")
ATTACH_TYPES = (
    AttachType.CGROUP_INET_EGRESS,
    AttachType.CGROUP_INET_INGRESS,
    AttachType.CGROUP_DEVICE,
)

# Probe each node; print "dev NAME ok" or "dev NAME <error>", then ping, then wait to be killed.
SCRIPT = (
    "for d in null zero kmsg; do "
    'if e=$(head -c1 /dev/$d 2>&1 >/dev/null); then echo "dev $d ok"; else echo "dev $d $e"; fi; '
    "done; "
    f"ping -q -c {PINGS} -i 0.2 -W 2 {{peer}} >/dev/null 2>&1; echo ping $?; "
    "echo DONE; exec sleep 600"
)


def _pure_v2_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root"
    h = discover()
    if h.mode != "unified" or not root_controllers():
        return (
            f"needs a pure cgroup v2 host (this one is {h.mode} at {h.root}; runc would try v1 "
            "net_cls): run `python -m tests.vm.run --kernel 6.12 -- tests/test_runtimes.py`"
        )
    return None


@pytest.fixture(scope="module")
def v2_host() -> None:
    reason = _pure_v2_reason()
    if reason:
        pytest.skip(reason)


def _runtime(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (scripts/bootstrap installs Debian's)")
    return path


@dataclass
class Container:
    runtime: str
    state_root: Path
    id: str
    bundle: Path
    log: Path
    hook_state: Path

    def cmd(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            [self.runtime, "--root", str(self.state_root), *args],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if check and r.returncode != 0:
            raise AssertionError(f"{self.runtime} {' '.join(args)}: {r.stderr}{r.stdout}")
        return r

    def pid(self) -> int:
        return int(json.loads(self.cmd("state", self.id).stdout)["pid"])

    def wait_output(self, timeout: float = 180.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            lines = self.log.read_text().splitlines()
            if "DONE" in lines:
                return lines
            time.sleep(0.2)
        raise AssertionError(f"container never finished its probes: {self.log.read_text()!r}")


def _rootfs(dest: Path) -> None:
    (dest / "bin").mkdir(parents=True)
    shutil.copy2("/bin/busybox", dest / "bin" / "busybox")
    for a in APPLETS:
        (dest / "bin" / a).symlink_to("busybox")
    for d in ("dev", "proc", "sys", "tmp"):
        (dest / d).mkdir()


def _config(
    c: Container,
    topo: Topo,
    cgroups_path: str,
    annotations: dict,
    network: dict,
    hook: dict | None = None,
) -> None:
    """config.json of a container; `hook` is the hooks' entry (default: the in-process
    `pelagos-bpf oci-hook`; test_agent_runtimes.py passes the thin hook's)."""
    subprocess.run([c.runtime, "spec"], cwd=c.bundle, check=True, capture_output=True)
    cfg_path = c.bundle / "config.json"
    cfg = json.loads(cfg_path.read_text())
    proc = cfg["process"]
    proc["terminal"] = False
    proc["args"] = ["sh", "-c", SCRIPT.format(peer=topo.peers["va"])]
    for k in ("bounding", "effective", "permitted"):
        proc["capabilities"][k].append("CAP_NET_RAW")  # busybox ping uses a raw socket
    cfg["root"] = {"path": "rootfs", "readonly": True}
    linux = cfg["linux"]
    linux["namespaces"] = [
        n for n in linux["namespaces"] if n["type"] not in ("network", "cgroup")
    ] + [
        {"type": "network", "path": topo.path_a},
        {"type": "cgroup"},
    ]
    linux["cgroupsPath"] = cgroups_path
    if network:
        linux["resources"]["network"] = network
    # A node the runtime's rules deny (c 1:11): only a bind mount can bring it in.
    cfg["mounts"].append(
        {"destination": "/dev/kmsg", "type": "bind", "source": "/dev/kmsg", "options": ["bind"]}
    )
    if hook is None:
        env = [f"PELAGOS_BPF_HOOK_STATE={c.hook_state}", _policy_env(c.hook_state.parent)]
        env += _passed_env()
        hook = {"path": str(HOOK_BIN), "args": ["pelagos-bpf", "oci-hook"], "env": env}
    cfg["hooks"] = {"createRuntime": [hook], "poststop": [hook]}
    cfg["annotations"] = annotations
    cfg_path.write_text(json.dumps(cfg, indent=1))


@contextmanager
def container(
    runtime_name: str,
    tmp: Path,
    topo: Topo,
    annotations: dict,
    network: dict,
    hook: dict | None = None,
    hook_state: Path | None = None,
) -> Iterator[Container]:
    runtime = _runtime(runtime_name)
    uniq = f"pelagos-rt-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    c = Container(
        runtime,
        tmp / "state",
        f"{uniq}-{runtime_name}",
        tmp / "bundle",
        tmp / "console.log",
        hook_state or tmp / "hook-state",
    )
    c.bundle.mkdir()
    _rootfs(c.bundle / "rootfs")
    cgroup_dir = discover().root / uniq
    _config(c, topo, f"/{uniq}", annotations, network, hook)
    try:
        with open(c.log, "w") as out:
            r = subprocess.run(
                [
                    runtime,
                    "--root",
                    str(c.state_root),
                    "run",
                    "-d",
                    "--bundle",
                    str(c.bundle),
                    c.id,
                ],
                # The container inherits these: a pipe would never reach EOF while it runs.
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                text=True,
                timeout=300,
            )
        assert r.returncode == 0, f"{runtime_name} run failed: {c.log.read_text()}"
        yield c
    finally:
        c.cmd("delete", "--force", c.id, check=False)
        if cgroup_dir.exists():
            cgroup_dir.rmdir()


def _ours(cg_path: Path) -> tuple[list[int], list[int]]:
    """Ids of our programs attached at the cgroup and of the maps they use."""
    fd = os.open(cg_path, os.O_RDONLY | os.O_DIRECTORY)
    progs, maps = [], []
    try:
        for t in ATTACH_TYPES:
            for pid in bpfsys.prog_query(fd, t):
                pfd = bpfsys.prog_get_fd_by_id(pid)
                try:
                    info = bpfsys.prog_info(pfd)
                finally:
                    os.close(pfd)
                if info.name in OUR_PROGS:
                    progs.append(pid)
                    maps += info.map_ids
    finally:
        os.close(fd)
    return progs, maps


def _passed_env() -> list[str]:
    """The suite's cache and pin settings for the hook, which runtimes start with the hook's own
    env only. Pins are off in the suite (conftest): with the guests' bpffs on /sys/fs/bpf the
    hook would otherwise pin its programs (the default), which outlive the container on purpose
    and would fail the checks below that everything of ours is gone afterwards."""
    return [f"{k}={os.environ[k]}" for k in ("PELAGOS_BPF_BYTECODE", PIN_ENV) if k in os.environ]


def _policy_env(tmp: Path) -> str:
    """An admin policy that lets these containers' annotations through (the built-in default
    refuses classids and device grants by annotation), as the hook's env entry."""
    etc = tmp / "etc"
    etc.mkdir(mode=0o755, exist_ok=True)
    policy = etc / "policy.toml"
    policy.write_text('[default]\nclassids = ["1:10"]\ndevice_grants = true\n')
    policy.chmod(0o644)
    return f"PELAGOS_BPF_POLICY={policy}"


def _gone(get_fd, obj_id: int) -> bool:  # type: ignore[no-untyped-def]
    try:
        os.close(get_fd(obj_id))
    except BpfError:
        return True
    return False


def _check_classified_and_cleaned(
    c: Container, topo: Topo, before: dict, programs_die: bool = True
) -> dict[str, str]:
    """Classified, then gone after delete. programs_die=False: the programs belong to a
    resident process (the agent), which keeps them loaded for the next container."""
    lines = c.wait_output()
    devs = {ln.split()[1]: ln.split(None, 2)[2] for ln in lines if ln.startswith("dev ")}
    assert "ping 0" in lines, lines
    after = topo.counters("va")
    assert after[C10][1] - before.get(C10, (0, 0))[1] == PINGS  # every echo request in 1:10
    assert after[C20][1] - before.get(C20, (0, 0))[1] == 0  # none fell to the default class
    cg_path = cgroup_of_pid(c.pid())
    plan = net.read_config(_open(cg_path))
    assert plan is not None and plan.classid == C10
    inspect = subprocess.run(
        [str(HOOK_BIN), "inspect", "--json", str(cg_path)], capture_output=True, text=True
    )
    assert inspect.returncode == 0, inspect.stderr
    assert json.loads(inspect.stdout)["stats"]["net"]["egress_packets"] >= PINGS
    progs, maps = _ours(cg_path)
    assert len(progs) >= 2 and maps
    record = c.hook_state / f"{c.id}.json"
    assert record.exists()
    c.cmd("kill", c.id, "KILL")
    deadline = time.monotonic() + 60
    while json.loads(c.cmd("state", c.id).stdout)["status"] != "stopped":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    c.cmd("delete", c.id)
    assert not cg_path.exists()
    if programs_die:
        assert all(_gone(bpfsys.prog_get_fd_by_id, p) for p in progs)
        assert all(_gone(bpfsys.map_get_fd_by_id, m) for m in maps)
    assert not record.exists()  # poststop ran
    return devs


def _open(path: Path):  # type: ignore[no-untyped-def]
    from pelagos_bpf.cgroup import Cgroup

    return Cgroup.open(path)


@pytest.mark.usefixtures("v2_host")
def test_runc_classid_from_dropped_network_field(tmp_path: Path) -> None:
    """runc drops linux.resources.network on v2; the hook attaches it. Devices: ours denies
    c 1:5 (runc allows it), runc denies c 1:11 (ours allows it): both are denied."""
    with topology(("va",)) as topo:
        before = topo.counters("va")
        ann = {"io.pelagos-bpf.devices": "deny c 1:5 r; allow c 1:11 rwm"}
        with container("runc", tmp_path, topo, ann, {"classID": C10}) as c:
            devs = _check_classified_and_cleaned(c, topo, before)
    assert devs["null"] == "ok"
    assert "Operation not permitted" in devs["zero"]  # ours denies
    assert "Operation not permitted" in devs["kmsg"]  # runc denies


@pytest.mark.usefixtures("v2_host")
def test_crun_classid_from_annotation_with_audit(tmp_path: Path) -> None:
    """crun refuses the network field on v2: the annotation carries the class. The audit
    program mirrors crun's rules, so crun's denial of c 1:11 is counted; c 1:5 stays allowed."""
    with topology(("va",)) as topo:
        before = topo.counters("va")
        ann = {"io.pelagos-bpf.net.classid": "1:10", "io.pelagos-bpf.devices.audit": "true"}
        with container("crun", tmp_path, topo, ann, {}) as c:
            lines = c.wait_output()
            cg_path = cgroup_of_pid(c.pid())
            from pelagos_bpf import devices

            denials = devices.read_device_denials(_open(cg_path))
            assert denials.get("c 1:11 r", 0) >= 1, denials
            devs = _check_classified_and_cleaned(c, topo, before)
    assert lines
    assert devs["null"] == "ok" and devs["zero"] == "ok"
    assert "Operation not permitted" in devs["kmsg"]


@pytest.mark.usefixtures("v2_host")
def test_podman_hooks_dir_and_annotation(tmp_path: Path) -> None:
    """podman (crun) with --hooks-dir pointing at contrib/hooks.d's JSON and an annotation."""
    podman = _runtime("podman")
    _runtime("crun")
    hooks = tmp_path / "hooks.d"
    hooks.mkdir()
    spec = json.loads((Path(__file__).parents[1] / "contrib/hooks.d/pelagos-bpf.json").read_text())
    spec["hook"]["path"] = str(HOOK_BIN)  # the in-process hook (the thin one: test_agent_runtimes)
    spec["hook"]["args"] = ["pelagos-bpf", "oci-hook"]
    spec["hook"]["env"] = [
        f"PELAGOS_BPF_HOOK_STATE={tmp_path / 'hook-state'}",
        _policy_env(tmp_path),
        *_passed_env(),
    ]
    (hooks / "pelagos-bpf.json").write_text(json.dumps(spec))
    short = Path(tempfile.mkdtemp(prefix="pgpm", dir="/tmp"))  # podman: runroot < 50 chars
    pm = [
        podman,
        "--root", str(short / "storage"),
        "--runroot", str(short / "run"),
        "--storage-driver", "vfs",
        "--cgroup-manager", "cgroupfs",
        "--events-backend", "file",
        "--hooks-dir", str(hooks),
    ]  # fmt: skip

    def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        r = subprocess.run([*pm, *args], capture_output=True, text=True, timeout=600)
        assert not check or r.returncode == 0, f"podman {args[0]}: {r.stderr}"
        return r

    _rootfs(tmp_path / "rootfs")
    tar = tmp_path / "rootfs.tar"
    subprocess.run(["tar", "-C", str(tmp_path / "rootfs"), "-cf", str(tar), "."], check=True)
    run("import", str(tar), "localhost/pelagos-busybox")
    name = f"pelagos-rt-{os.getpid()}-{uuid.uuid4().hex[:6]}-podman"
    with topology(("va",)) as topo:
        before = topo.counters("va")
        try:
            run(
                "run", "-d", "--name", name, "--runtime", "crun",
                "--network", f"ns:{topo.path_a}", "--cap-add", "NET_RAW",
                "--ulimit", "nofile=1024:1024", "--ulimit", "nproc=1024:1024",
                "--annotation", "io.pelagos-bpf.net.classid=1:10",
                "localhost/pelagos-busybox", "sh", "-c", SCRIPT.format(peer=topo.peers["va"]),
            )  # fmt: skip
            deadline = time.monotonic() + 180
            while "DONE" not in (out := run("logs", name).stdout).splitlines():
                assert time.monotonic() < deadline, out
                time.sleep(0.5)
            assert "ping 0" in out.splitlines(), out
            after = topo.counters("va")
            assert after[C10][1] - before.get(C10, (0, 0))[1] == PINGS
            pid = int(run("inspect", "--format", "{{.State.Pid}}", name).stdout)
            cg_path = cgroup_of_pid(pid)
            plan = net.read_config(_open(cg_path))
            assert plan is not None and plan.classid == C10
            progs, maps = _ours(cg_path)
            assert len(progs) == 2
        finally:
            run("rm", "-f", name, check=False)
            shutil.rmtree(short, ignore_errors=True)
    assert not cg_path.exists()
    assert all(_gone(bpfsys.prog_get_fd_by_id, p) for p in progs)
    assert all(_gone(bpfsys.map_get_fd_by_id, m) for m in maps)
    assert not list((tmp_path / "hook-state").glob("*.json"))  # poststop ran
