"""The NRI plugin in a real containerd (2.1.9, runc 1.1.5) with real pods, through the CRI.

Runs only inside the containerd guest:
    python -m tests.vm.run --kernel 6.12 --node containerd -- tests/test_nri_guest.py
(tests/test_containerd_node.py boots it under `-m matrix`). The module starts its own agent
(`pelagos-bpf agent --nri`, under the policy below) and waits for containerd to log the
plugin's registration, so it can SIGKILL and restart it: no --node-setup agent is needed (one
would register a second plugin of the same name). The agent's log comes home as
nri-agent.log with the run's files.

Proves: classid 1:10 puts a pod's packets in HTB class 1:10 on its eth0; `deny c 1:5 rwm`
takes /dev/zero from a pod (EPERM), also across a CRI resource update; a device grant works
where the policy allows it (narrowed to what it names) and fails the pod where not; a request
outside the namespace's policy fails the pod with the policy's message in the CRI error; an
error at StartContainer fails the container before its process runs; a containerd restart
and an agent SIGKILL keep the rules in force, the plugin re-registers, and Synchronize covers
a pod started while it was away; a removed pod leaves nothing of ours in the kernel.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.cri]

GUEST_CMD = "python -m tests.vm.run --kernel 6.12 --node containerd -- tests/test_nri_guest.py"
CLASSID = "io.pelagos-bpf.net.classid"
PRIOS = "io.pelagos-bpf.net.priorities"
DEVICES = "io.pelagos-bpf.devices"
C10, C20 = 0x10010, 0x10020
GATEWAY = "10.88.0.1"
NO_IPV6 = {"net.ipv6.conf.all.disable_ipv6": "1"}  # no autoconf/MLD in the class counters
AGENT_DIR = Path("/run/pelagos-nri-guest")
GUEST_OUT = Path("/run/pelagos-vm")
POLICY = """\
version = 1
[namespaces.nri-net]
classids = ["1:10"]
priorities = ["0-7"]
[namespaces.nri-dev]
device_grants = true
"""


def _not_a_node() -> str | None:
    if os.environ.get("PELAGOS_VM_NODE") != "containerd":
        return f"needs the containerd guest: {GUEST_CMD}"
    if os.geteuid() != 0:
        return "needs root"
    return None


if (_reason := _not_a_node()) is not None:
    pytest.skip(_reason, allow_module_level=True)

from pelagos_bpf import devices, net  # noqa: E402
from pelagos_bpf.cgref import Ref  # noqa: E402
from tests.agentlib import AgentProc  # noqa: E402
from tests.cri.client import Client, CriError, Pod  # noqa: E402
from tests.cri.cri_pb2 import LinuxContainerResources  # noqa: E402
from tests.vm import containerd  # noqa: E402


class Agent:
    """Our agent as the node's NRI plugin: (re)started and killed by the tests, never another
    process."""

    def __init__(self) -> None:
        AGENT_DIR.mkdir(mode=0o700, exist_ok=True)
        policy = AGENT_DIR / "policy.toml"
        policy.write_text(POLICY)
        policy.chmod(0o644)
        self.policy = policy
        self.proc = AgentProc(AGENT_DIR, "--nri", env={"PELAGOS_BPF_POLICY": str(policy)})

    def start(self) -> None:
        mark = containerd.log_offset()
        self.proc.start()
        containerd.wait_plugin("pelagos-bpf", since=mark)

    def kill(self) -> None:
        mark = containerd.log_offset()
        self.proc.kill()
        _wait_log('connection to plugin \\"10-pelagos-bpf\\" closed', mark)

    def status(self) -> dict[str, object]:
        return self.proc.client().status()


def _wait_log(text: str, since: int, timeout: float = 120.0) -> None:
    """Until containerd's log has `text` after byte `since` (a real condition, not a sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        with containerd.log_path().open("rb") as f:
            f.seek(since)
            if text.encode() in f.read():
                return
        if time.monotonic() >= deadline:
            with containerd.log_path().open("rb") as f:
                f.seek(since)
                lines = [x for x in f.read().decode(errors="replace").splitlines() if "NRI" in x]
            raise AssertionError(
                f"containerd never logged {text!r}; its NRI lines since:\n" + "\n".join(lines[-15:])
            )
        time.sleep(0.1)


@pytest.fixture(scope="module")
def agent() -> Iterator[Agent]:
    a = Agent()
    a.start()
    try:
        yield a
    finally:
        if a.proc.proc is not None and a.proc.proc.poll() is None:
            a.proc.stop()
        if GUEST_OUT.is_dir():
            shutil.copy(a.proc.log, GUEST_OUT / "nri-agent.log")


@pytest.fixture(scope="module")
def cri(agent: Agent) -> Iterator[Client]:
    with Client() as c:
        c.wait_ready(c.default_image())
        yield c


@pytest.fixture
def pods(cri: Client) -> Iterator[list[Pod]]:
    """Pods a test runs (append them); removed afterwards, even when the test failed."""
    made: list[Pod] = []
    yield made
    for p in made:
        cri.remove_pod(p.pod)


def _cgroup(pod: Pod) -> Path:
    rel = Path(f"/proc/{pod.pid}/cgroup").read_text().strip().removeprefix("0::")
    return Path("/sys/fs/cgroup" + rel)


def _denied_zero(cri: Client, pod: Pod) -> bool:
    """Can the pod read /dev/zero? False: yes; True: EPERM (our deny)."""
    r = cri.exec_sync(pod.container, ["head", "-c1", "/dev/zero"])
    if r.exit_code == 0:
        assert r.stdout == b"\0"
        return False
    assert b"Operation not permitted" in r.stderr, r.stderr
    return True


def _ours(pod: Pod) -> list[str]:
    return [o.owner for o in devices.read_state(Ref.of(_cgroup(pod))).owners if o.owner == "nri"]


def test_a_classid_pod_sends_its_packets_into_that_htb_class(cri: Client, pods: list[Pod]) -> None:
    from pyroute2 import IPRoute

    from pelagos_bpf.net import tc

    pod = cri.run_pod(
        ["sleep", "inf"], annotations={CLASSID: "1:10"}, namespace="nri-net", sysctls=NO_IPV6
    )
    pods.append(pod)
    st = net.read_state(Ref.of(_cgroup(pod)))
    assert st.classid == C10
    netns = cri.pod_netns(pod.pod)
    assert netns is not None
    with IPRoute(netns=netns) as ipr:
        (eth0,) = ipr.link_lookup(ifname="eth0")
        tc.install_htb(ipr, eth0, minors=(0x10, 0x20))
        before = tc.class_counters(ipr, eth0)
        r = cri.exec_sync(pod.container, ["ping", "-c", "5", "-W", "5", GATEWAY])
        assert r.exit_code == 0, r.stdout + r.stderr
        after = tc.class_counters(ipr, eth0)
    assert after[C10][1] - before[C10][1] >= 5  # the echo requests (ARP is not the pod's)


def test_a_deny_rule_takes_dev_zero_and_a_resource_update_keeps_it(
    cri: Client, pods: list[Pod]
) -> None:
    pod = cri.run_pod(["sleep", "inf"], annotations={DEVICES: "deny c 1:5 rwm"})
    pods.append(pod)
    assert _denied_zero(cri, pod)
    assert cri.exec_sync(pod.container, ["head", "-c1", "/dev/urandom"]).exit_code == 0
    st = devices.read_state(Ref.of(_cgroup(pod)))
    (mine,) = [o for o in st.owners if o.owner == "nri"]
    # runc's rules were mirrored (read from runc's init at StartContainer): deny-all first
    assert (mine.rules[0].allow, mine.rules[0].kind) == (False, "a"), mine.rules
    assert st.denials.get("c 1:5 r", 0) >= 1, st.denials  # the denial audit counted it
    # runc update (CRI UpdateContainerResources -> NRI UpdateContainer/PostUpdateContainer)
    cri.rt(
        "UpdateContainerResources",
        container_id=pod.container,
        linux=LinuxContainerResources(cpu_shares=512, memory_limit_in_bytes=256 << 20),
    )
    assert (_cgroup(pod) / "memory.max").read_text().strip() == str(256 << 20)
    assert _denied_zero(cri, pod)
    assert _ours(pod) == ["nri"]


def test_a_device_grant_works_where_the_policy_allows_it_and_only_there(
    cri: Client, pods: list[Pod]
) -> None:
    assert Path("/sys/dev/char/10:229").exists(), "the guest kernel has no /dev/fuse"
    pod = cri.run_pod(
        ["sleep", "inf"], annotations={DEVICES: "allow c 10:229 r"}, namespace="nri-dev"
    )
    pods.append(pod)
    opened = cri.exec_sync(pod.container, ["sh", "-c", "exec 3</dev/fuse && echo opened"])
    assert opened.stdout == b"opened\n", opened.stderr
    rw = cri.exec_sync(pod.container, ["sh", "-c", "exec 3<>/dev/fuse"])  # narrowed to r
    assert rw.exit_code != 0 and b"Operation not permitted" in rw.stderr, rw.stderr
    before = {p.id for p in cri.pods()}
    with pytest.raises(CriError) as e:
        cri.run_pod(["sleep", "inf"], annotations={DEVICES: "allow c 10:229 rw"}, namespace="other")
    assert e.value.method == "CreateContainer"
    assert (
        f"{DEVICES}: allow c 10:229 rw: device grants (allow rules) are not allowed for "
        f"namespace 'other'; deny rules are (policy {AGENT_DIR}/policy.toml: device_grants)"
    ) in e.value.details
    assert {p.id for p in cri.pods()} == before


def test_a_request_outside_the_namespaces_policy_fails_the_pod_with_the_policys_message(
    cri: Client,
) -> None:
    before = {p.id for p in cri.pods()}
    with pytest.raises(CriError) as e:
        cri.run_pod(["sleep", "inf"], annotations={CLASSID: "1:10"}, namespace="nri-other")
    assert e.value.method == "CreateContainer"
    assert "failed to get NRI adjustment for container" in e.value.details, e.value.details
    assert (
        "pelagos-bpf: pod nri-other/" in e.value.details
        and f"{CLASSID}: classid 1:10 is not allowed for namespace 'nri-other' (allowed: none) "
        f"(policy {AGENT_DIR}/policy.toml: classids)"
        in e.value.details
    ), e.value.details
    assert {p.id for p in cri.pods()} == before


def test_an_error_at_start_container_fails_the_container_before_its_process_runs(
    cri: Client,
) -> None:
    ann = {CLASSID: "1:10", PRIOS: "nosuch0=3"}  # the interface is checked in the pod's netns
    with pytest.raises(CriError) as e:
        cri.run_pod(["sleep", "inf"], annotations=ann, namespace="nri-net", keep_failed=True)
    try:
        assert e.value.method == "StartContainer", e.value
        assert "NRI container start failed" in e.value.details and "nosuch0" in e.value.details
        assert e.value.container is not None
        st = cri.rt("ContainerStatus", container_id=e.value.container).status
        assert (st.reason, st.exit_code, st.started_at) == ("StartError", 128, 0), st
        assert "nosuch0" in st.message
    finally:
        assert e.value.pod is not None
        cri.remove_pod(e.value.pod)


def test_containerd_restart_the_plugin_reconnects_and_rules_stay(
    cri: Client, agent: Agent, pods: list[Pod]
) -> None:
    pod = cri.run_pod(["sleep", "inf"], annotations={DEVICES: "deny c 1:5 rwm"})
    pods.append(pod)
    syncs = agent.status()["requests"]["nri_synchronize"]["count"]  # type: ignore[index]
    mark = containerd.log_offset()
    containerd.restart(log=lambda line: None)
    containerd.wait_plugin("pelagos-bpf", since=mark)
    cri.wait_ready(cri.default_image())
    assert _denied_zero(cri, pod)
    assert agent.status()["requests"]["nri_synchronize"]["count"] > syncs  # type: ignore[index]
    fresh = cri.run_pod(["sleep", "inf"], annotations={DEVICES: "deny c 1:5 rwm"})
    pods.append(fresh)
    assert _denied_zero(cri, fresh)


def test_agent_sigkill_keeps_rules_and_synchronize_covers_a_pod_started_meanwhile(
    cri: Client, agent: Agent, pods: list[Pod]
) -> None:
    pod = cri.run_pod(["sleep", "inf"], annotations={DEVICES: "deny c 1:5 rwm"})
    pods.append(pod)
    agent.kill()
    assert _denied_zero(cri, pod)  # the kernel holds the rules, not the agent
    # No plugin: containerd lets the pod run without it (NRI's fail-open)...
    late = cri.run_pod(["sleep", "inf"], annotations={DEVICES: "deny c 1:5 rwm"})
    pods.append(late)
    assert not _denied_zero(cri, late)
    agent.start()  # ...until the plugin registers again: Synchronize covers it
    assert _denied_zero(cri, late)
    assert _denied_zero(cri, pod)
    st = agent.status()
    assert st["nri"]["registered"] is True  # type: ignore[index]


def test_after_removal_nothing_of_ours_is_left(cri: Client, agent: Agent) -> None:
    from pelagos_bpf.agent import ops
    from pelagos_bpf.registry import FEATURES

    pod = cri.run_pod(
        ["sleep", "inf"],
        annotations={CLASSID: "1:10", PRIOS: "eth0=3", DEVICES: "deny c 1:5 rwm"},
        namespace="nri-net",
    )
    try:
        cg = Ref.of(_cgroup(pod))
        assert net.read_state(cg).classid == C10 and _ours(pod) == ["nri"]
        assert _entries_of(cg.id, FEATURES), "nothing of ours to look for"
    finally:
        cri.remove_pod(pod.pod)
    # RemoveContainer answered at once; the plugin's janitor walks the maps after it
    deadline = time.monotonic() + 120
    while left := _entries_of(cg.id, FEATURES):
        assert time.monotonic() < deadline, left
        time.sleep(0.1)
    assert cg.id not in {h["id"] for h in ops.held()}
    records = AGENT_DIR / "state"
    assert not records.exists() or list(records.iterdir()) == []  # the plugin keeps none
    requests = agent.status()["requests"]
    for event in ("create_container", "start_container", "remove_container"):
        r = requests[f"nri_{event}"]  # type: ignore[index]
        print(f"nri_{event}: {r}")


def _entries_of(cgroup_id: int, features: object) -> dict[str, int]:
    """Entries keyed by the cgroup in every map of every program of ours the kernel holds."""
    from pelagos_bpf import bpfsys

    out: dict[str, int] = {}
    for feat in features:  # type: ignore[attr-defined]
        for layer, maps in feat.reachable_maps():
            try:
                for spec in layer.maps:
                    if spec.cgroup_of is None or spec.name not in maps:
                        continue
                    keys = bpfsys.map_keys(maps[spec.name], spec.key_size)
                    n = sum(1 for k in keys if spec.cgroup_of(k) == cgroup_id)
                    if n:
                        out[f"{layer.feature} {spec.name}"] = n
            finally:
                for fd in maps.values():
                    os.close(fd)
    return out


def test_the_agent_drains_and_the_plugin_goes_with_it(agent: Agent) -> None:
    """Last: SIGTERM stops the plugin first; containerd sees the connection close."""
    mark = containerd.log_offset()
    assert agent.proc.proc is not None
    agent.proc.proc.send_signal(signal.SIGTERM)
    assert agent.proc.wait() == 0
    _wait_log('connection to plugin \\"10-pelagos-bpf\\" closed', mark)


def test_launched_by_containerd_from_its_plugin_dir(cri: Client, agent: Agent) -> None:
    """After the drain above (one plugin of that name at a time): containerd starts the agent
    itself from plugin_path at its own start, with only NRI_PLUGIN_* and fd 3, before it
    serves the CRI; a restart without the file ends it."""
    assert agent.proc.proc is not None and agent.proc.proc.poll() is not None
    plugins = Path("/opt/nri/plugins")
    plugins.mkdir(parents=True, exist_ok=True)
    wrapper = plugins / "10-pelagos-bpf"
    log = AGENT_DIR / "launched.log"
    exe = Path(sys.executable).parent / "pelagos-bpf"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"export PELAGOS_BPF_POLICY={agent.policy} PELAGOS_BPF_AGENT_SOCKET={AGENT_DIR}/x.sock\n"
        "export PELAGOS_BPF_PIN_DIR=\n"  # as the suite's own processes (tests/conftest.py)
        f"exec {exe} agent --nri 2>>{log}\n"
    )
    wrapper.chmod(0o755)
    pod = None
    try:
        mark = containerd.log_offset()
        # containerd gives a plugin it launched 5 s to register; under TCG, beside another
        # guest in CI, a Python process's start and imports (protobuf) took longer once
        containerd.restart(log=lambda line: None, nri_registration_timeout="60s")
        _wait_log('pre-installed NRI plugin \\"10-pelagos-bpf\\" synchronization success', mark)
        cri.wait_ready(cri.default_image())
        pod = cri.run_pod(["sleep", "inf"], annotations={DEVICES: "deny c 1:5 rwm"})
        assert _denied_zero(cri, pod)
        assert not (AGENT_DIR / "x.sock").exists()  # NRI only: no agent socket
        (launched,) = _nri_agents()
        assert b"NRI_PLUGIN_SOCKET=3" in Path(f"/proc/{launched}/environ").read_bytes()
    finally:
        if pod is not None:
            cri.remove_pod(pod.pod)
        wrapper.unlink()
        containerd.restart(log=lambda line: None)
        if GUEST_OUT.is_dir() and log.exists():
            shutil.copy(log, GUEST_OUT / "nri-launched.log")
    assert _nri_agents() == []  # its runtime went: it went too


def _nri_agents() -> list[int]:
    """Live processes running `pelagos-bpf agent --nri` (zombies are not)."""
    out = []
    for d in Path("/proc").iterdir():
        try:
            cmd = (d / "cmdline").read_bytes()
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if b"\0agent\0--nri" in cmd and state != "Z":
            out.append(int(d.name))
    return out
