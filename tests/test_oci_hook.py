"""`pelagos-bpf oci-hook` exec'd as a runtime would, on a real process in a test cgroup.

Each case checks the exit status, the stderr message, and what is attached at the cgroup
afterwards (PROG_QUERY on the cgroup itself, not a system-wide count).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from hook_helpers import LEAN, Env, attached_ids, make_env, nothing_attached

from pelagos_bpf import bpfsys, net
from pelagos_bpf.bpfsys import AttachType, ProgType
from pelagos_bpf.cgroup import Cgroup

pytest_plugins = ["helpers"]
pytestmark = pytest.mark.root

ALLOW_ALL = bytes.fromhex("b7000000010000009500000000000000")  # r0 = 1; exit


@pytest.fixture
def env(
    tmp_path: Path,
    make_cgroup: Callable[[str], Cgroup],
    spawn: Callable[..., subprocess.Popen[bytes]],
) -> Env:
    return make_env(tmp_path, make_cgroup, spawn)


def test_create_then_poststop(env: Env) -> None:
    r = env.run({"io.pelagos-bpf.net.classid": "1:10", "io.pelagos-bpf.devices": "deny c 1:5"})
    assert r.returncode == 0, r.stderr
    assert str(env.cg.path) in r.stderr  # found through /proc/<pid>/cgroup
    plan = net.read_config(env.cg)
    assert plan is not None and plan.classid == 0x10010
    ids = attached_ids(env.cg.path)
    assert len(ids[AttachType.CGROUP_DEVICE]) == 1
    assert json.loads((env.state_dir / "hooktest.json").read_text())["cgroup_id"] == env.cg.id
    r = env.run({}, status="stopped", pid=0)
    assert r.returncode == 0, r.stderr
    assert "the hook's device set and net settings removed" in r.stderr
    assert nothing_attached(env.cg.path)
    assert not (env.state_dir / "hooktest.json").exists()


def test_network_field_of_config_json(env: Env) -> None:
    env.write_config(
        {},
        {
            "resources": {
                "network": {"classID": 0x10020, "priorities": [{"name": "lo", "priority": 3}]}
            }
        },
    )
    r = env.run({})
    assert r.returncode == 0, r.stderr
    plan = net.read_config(env.cg)
    assert plan is not None
    assert (plan.classid, plan.carrier) == (0x10020, "mark")  # priorities need skb->priority
    assert [p[2] for p in plan.priorities] == [3]


def test_nothing_asked_attaches_nothing(env: Env) -> None:
    r = env.run({"io.pelagos-bpf.nett.classid": "1:10"})
    assert r.returncode == 0
    assert "warning" in r.stderr and "io.pelagos-bpf.nett.classid" in r.stderr
    assert nothing_attached(env.cg.path)
    assert not env.state_dir.exists() or not list(env.state_dir.iterdir())


@pytest.mark.parametrize(
    "annotations, message",
    [
        ({"io.pelagos-bpf.net.classid": "one:ten"}, "io.pelagos-bpf.net.classid='one:ten'"),
        ({"io.pelagos-bpf.net.classid": "1:10001"}, "io.pelagos-bpf.net.classid='1:10001'"),
        ({"io.pelagos-bpf.net.priorities": "eth0"}, "io.pelagos-bpf.net.priorities"),
        ({"io.pelagos-bpf.devices": "allow q 1:2"}, "io.pelagos-bpf.devices"),
        (
            {"io.pelagos-bpf.net.classid": "1:10", "io.pelagos-bpf.net.priorities": "nosuch0=5"},
            "no interface 'nosuch0' in the network namespace of pid",
        ),
    ],
    ids=["classid", "classid-half", "priorities", "devices", "unknown-interface"],
)
def test_bad_annotation_fails_with_reason(env: Env, annotations: dict, message: str) -> None:
    r = env.run(annotations)
    assert r.returncode == 2
    assert "error:" in r.stderr and message in r.stderr, r.stderr
    assert nothing_attached(env.cg.path)
    assert not env.state_dir.exists() or not list(env.state_dir.iterdir())


def test_best_effort_turns_failure_into_warning(env: Env) -> None:
    r = env.run({"io.pelagos-bpf.net.classid": "zz", "io.pelagos-bpf.best-effort": "true"})
    assert r.returncode == 0
    assert "warning:" in r.stderr and "best-effort" in r.stderr
    assert nothing_attached(env.cg.path)


def test_missing_bundle(env: Env) -> None:
    r = env.run({"io.pelagos-bpf.net.classid": "1:10"}, bundle=str(env.bundle / "nope"))
    assert r.returncode == 2
    assert "no config.json" in r.stderr
    assert nothing_attached(env.cg.path)


def test_pid_that_exited(env: Env) -> None:
    p = subprocess.Popen(["true"])
    p.wait()
    r = env.run({"io.pelagos-bpf.net.classid": "1:10"}, pid=p.pid)
    assert r.returncode == 2
    assert f"process {p.pid} is gone" in r.stderr
    assert nothing_attached(env.cg.path)


def test_failed_device_attach_rolls_back_net(env: Env) -> None:
    """An exclusive device program forbids ours: the net programs attached first are undone."""
    prog = bpfsys.prog_load(ProgType.CGROUP_DEVICE, ALLOW_ALL, name="excl_hook")
    fd = env.cg.open_fd()
    try:
        bpfsys.prog_attach(prog, fd, AttachType.CGROUP_DEVICE, flags=0)
        r = env.run({"io.pelagos-bpf.net.classid": "1:10", "io.pelagos-bpf.devices": "deny c 1:5"})
        assert r.returncode == 2
        assert "device_rules" in r.stderr and "ALLOW_MULTI" in r.stderr, r.stderr
        ids = attached_ids(env.cg.path)
        assert not ids[AttachType.CGROUP_INET_EGRESS] and not ids[AttachType.CGROUP_INET_INGRESS]
        assert len(ids[AttachType.CGROUP_DEVICE]) == 1  # only the exclusive one
        assert not list(env.state_dir.iterdir())
    finally:
        bpfsys.prog_detach(prog, fd, AttachType.CGROUP_DEVICE)
        os.close(fd)
        os.close(prog)


def test_poststop_after_cgroup_removed(
    env: Env, spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    assert env.run({"io.pelagos-bpf.net.classid": "1:10"}).returncode == 0
    os.kill(env.pid, 9)
    os.waitpid(env.pid, 0)
    env.cg.path.rmdir()  # what the runtime does before poststop

    def record(name: str, cgroup: str, cgroup_id: int) -> None:
        doc = {"id": name, "cgroup": cgroup, "cgroup_id": cgroup_id}  # an older release's form
        (env.state_dir / f"{name}.json").write_text(json.dumps(doc))

    record("failed-create", str(env.cg.path) + "-gone", 1)  # a failed create gets no poststop
    record("running", str(env.cg.path.parent), 0)  # a new cgroup under the old name
    record("other", str(env.cg.path.parent), os.stat(env.cg.path.parent).st_ino)
    r = env.run({}, status="stopped", pid=0)
    assert r.returncode == 0 and "removed by the runtime" in r.stderr
    assert "2 stale record(s)" in r.stderr  # the missing cgroup and the reused name
    assert [p.name for p in env.state_dir.iterdir()] == ["other.json"]


def test_lean_entry_point(env: Env) -> None:
    """`python -m pelagos_bpf.ocihook` (no full CLI) does the same job."""
    r = env.run({"io.pelagos-bpf.net.classid": "1:30"}, argv=LEAN)
    assert r.returncode == 0, r.stderr
    plan = net.read_config(env.cg)
    assert plan is not None and plan.classid == 0x10030
    assert env.run({}, status="stopped", pid=0, argv=LEAN).returncode == 0
    assert nothing_attached(env.cg.path)
