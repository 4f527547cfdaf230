"""Real containerd pods through CRI: the test client and the containerd guest work together.

Runs only inside the containerd guest (`python -m tests.vm.run --kernel 6.12 --node containerd
-- tests/test_cri_guest.py`; tests/test_containerd_node.py boots it under `-m matrix`).
Proves what the NRI tests build on: a pod runs with its pid in the pod's cgroup, exec passes
output and status, an `io.pelagos-bpf.*` pod annotation reaches the OCI config (others do
not), a bridge pod's eth0 carries an HTB qdisc whose class counters see the pod's packets, and
removal leaves no container, task, cgroup, netns or process behind, and a containerd restart
keeps the pods running.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = [pytest.mark.root, pytest.mark.cri]

GUEST_CMD = "python -m tests.vm.run --kernel 6.12 --node containerd -- tests/test_cri_guest.py"
ROOT = Path(__file__).resolve().parents[1]
TASKS = Path("/run/containerd/io.containerd.runtime.v2.task/k8s.io")
CLASSID = "io.pelagos-bpf.net.classid"
C10, C20 = 0x10010, 0x10020  # HTB 1:10 and 1:20 (the default class)


def _not_a_node() -> str | None:
    if os.environ.get("PELAGOS_VM_NODE") != "containerd":
        return f"needs the containerd guest: {GUEST_CMD}"
    if os.geteuid() != 0:
        return "needs root"
    return None


if (_reason := _not_a_node()) is not None:
    pytest.skip(_reason, allow_module_level=True)

from tests.cri.__main__ import main  # noqa: E402  (grpc only on a node)
from tests.cri.client import Client, CriError, Pod  # noqa: E402


@pytest.fixture(scope="module")
def cri() -> Iterator[Client]:
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


def _cgroup_of(pid: int) -> str:
    return Path(f"/proc/{pid}/cgroup").read_text().strip().removeprefix("0::")


def test_pod_runs_in_its_pod_cgroup_and_exec_passes_output_and_status(
    cri: Client, pods: list[Pod]
) -> None:
    pod = cri.run_pod(["sleep", "inf"], namespace="team-a")
    pods.append(pod)
    assert Path(f"/proc/{pod.pid}").exists()
    cg = _cgroup_of(pod.pid)
    assert cg.startswith("/pelagos-cri/pod") and cg.endswith("/" + pod.container), cg
    r = cri.exec_sync(pod.container, ["sh", "-c", "echo out; echo err >&2; exit 7"])
    assert (r.stdout, r.stderr, r.exit_code) == (b"out\n", b"err\n", 7)
    status = cri.rt("PodSandboxStatus", pod_sandbox_id=pod.pod).status
    assert status.metadata.namespace == "team-a"


def test_allowlisted_pod_annotations_reach_the_oci_config(cri: Client, pods: list[Pod]) -> None:
    annotations = {CLASSID: "1:10", "example.com/other": "x"}
    pod = cri.run_pod(["sleep", "inf"], annotations=annotations)
    pods.append(pod)
    config = json.loads((TASKS / pod.container / "config.json").read_text())
    assert config["annotations"][CLASSID] == "1:10"
    assert "example.com/other" not in config["annotations"]  # pod_annotations allowlist
    assert cri.container_info(pod.container)["runtimeSpec"]["annotations"][CLASSID] == "1:10"
    # the sandbox keeps every pod annotation (what NRI plugins see as PodSandbox.annotations)
    status = cri.rt("PodSandboxStatus", pod_sandbox_id=pod.pod).status
    assert dict(status.annotations) == annotations


def test_bridge_pod_packets_leave_through_eth0_where_htb_counts_them(
    cri: Client, pods: list[Pod]
) -> None:
    from pyroute2 import IPRoute

    pod = cri.run_pod(["sleep", "inf"])
    pods.append(pod)
    netns = cri.pod_netns(pod.pod)
    assert netns is not None and netns.startswith("/var/run/netns/cni-"), netns
    with IPRoute(netns=netns) as ipr:
        (eth0,) = ipr.link_lookup(ifname="eth0")
        ipr.tc("add", "htb", index=eth0, handle=0x10000, default=0x20)
        ipr.tc("add-class", "htb", index=eth0, handle=0x10001, parent=0x10000, rate="1gbit")
        for minor in (0x10, 0x20):
            ipr.tc(
                "add-class", "htb", index=eth0, handle=0x10000 | minor, parent=0x10001, rate="1gbit"
            )
        before = _class_packets(ipr, eth0)
        r = cri.exec_sync(pod.container, ["ping", "-c", "3", "-W", "5", "10.88.0.1"])
        assert r.exit_code == 0, r.stdout + r.stderr
        after = _class_packets(ipr, eth0)
    assert after[C20] - before[C20] >= 3  # unclassified: the default class
    assert after[C10] == before[C10]


def _class_packets(ipr: object, index: int) -> dict[int, int]:
    out = {}
    for msg in ipr.get_classes(index=index):  # type: ignore[attr-defined]
        basic = msg.get_attr("TCA_STATS2").get_attr("TCA_STATS_BASIC")
        out[msg["handle"]] = int(basic["packets"])
    return out


def test_host_network_pod_shares_the_nodes_netns(cri: Client, pods: list[Pod]) -> None:
    pod = cri.run_pod(["sleep", "inf"], host_network=True)
    pods.append(pod)
    assert os.stat(f"/proc/{pod.pid}/ns/net").st_ino == os.stat("/proc/self/ns/net").st_ino
    assert cri.pod_netns(pod.pod) is None


def test_containerd_restart_keeps_the_pods_running(cri: Client, pods: list[Pod]) -> None:
    """The node helper the NRI restart tests use: the shims (and so the pods) outlive it."""
    from tests.vm import containerd

    pod = cri.run_pod(["sleep", "inf"])
    pods.append(pod)
    old = containerd.running_pid()
    new = containerd.restart(log=lambda line: None)
    assert new != old and containerd.running_pid() == new
    assert Path(f"/proc/{pod.pid}").exists()
    cri.wait_ready(cri.default_image())
    assert cri.exec_sync(pod.container, ["echo", "still here"]).stdout == b"still here\n"


def test_removal_leaves_nothing_behind(cri: Client) -> None:
    netns_before = set(os.listdir("/var/run/netns")) if Path("/var/run/netns").is_dir() else set()
    pod = cri.run_pod(["sleep", "inf"])
    netns = cri.pod_netns(pod.pod)
    assert netns is not None
    cg = Path("/sys/fs/cgroup" + _cgroup_of(pod.pid))
    pod_cg = cg.parent
    sandbox_pid = cri.rt("PodSandboxStatus", pod_sandbox_id=pod.pod, verbose=True).info["info"]
    sandbox_pid = json.loads(sandbox_pid)["pid"]
    try:
        assert cg.is_dir() and Path(netns).exists()
    finally:
        cri.remove_pod(pod.pod)
    assert [c.id for c in cri.containers(pod.pod)] == []
    assert pod.pod not in [p.id for p in cri.pods()]
    assert not pod_cg.exists(), f"{pod_cg} is still there"
    assert not (TASKS / pod.container).exists() and not (TASKS / pod.pod).exists()
    assert not Path(netns).exists()
    assert set(os.listdir("/var/run/netns")) == netns_before
    for pid in (pod.pid, sandbox_pid):
        assert not Path(f"/proc/{pid}").exists() or _is_zombie(pid)
    cri.remove_pod(pod.pod)  # idempotent, like the CRI's own calls


def _is_zombie(pid: int) -> bool:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tests.cri", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def test_cli_runs_execs_and_removes_a_pod(cri: Client) -> None:
    r = _cli(
        "run-pod", "--annotation", f"{CLASSID}=1:20", "--name", "cli-pod", "--", "sleep", "inf"
    )
    assert r.returncode == 0, r.stderr
    (line,) = r.stdout.splitlines()
    out = json.loads(line)
    assert set(out) == {"pod", "container", "pid"}
    try:
        assert cri.rt("PodSandboxStatus", pod_sandbox_id=out["pod"]).status.metadata.name == (
            "cli-pod"
        )
        e = _cli("exec", out["container"], "--", "sh", "-c", "echo hi; exit 3")
        assert (e.returncode, e.stdout) == (3, "hi\n")
    finally:  # in-process: each `python -m tests.cri` pays seconds of grpc import under TCG
        assert main(["rm", out["pod"]]) == 0
    assert out["pod"] not in [p.id for p in cri.pods()]


def test_cli_reports_the_cri_error_and_leaves_no_pod(
    cri: Client, capsys: pytest.CaptureFixture[str]
) -> None:
    """In-process, as above; the round trip above proves the shell path."""
    before = {p.id for p in cri.pods()}
    assert main(["run-pod", "--image", "localhost/pelagos-bpf/no-such-image:0", "--", "true"]) == 1
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("cri: CreateContainer: "), err
    assert "no-such-image" in err
    assert {p.id for p in cri.pods()} == before


def test_a_missing_container_is_a_cri_error(cri: Client) -> None:
    with pytest.raises(CriError, match="ExecSync: NOT_FOUND"):
        cri.exec_sync("0" * 64, ["true"])
