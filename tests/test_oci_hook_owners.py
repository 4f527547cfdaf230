"""The hook never widens what the runtime enforces (issue 23, finding 1), on real device nodes.

The "runtime" is either a caller of this library (DEFAULT_DEVICE_RULES through attach_devices,
owner "runtime") or a FOREIGN program (hand-made deny-all-but-null, attached with
BPF_F_ALLOW_MULTI as runc's is). The hook runs as a runtime would run it (exec, state on
stdin). Every verdict comes from a process inside the cgroup opening or mknod-ing a real node
(device_helpers.probe: EPERM or not). Behaviour is asserted before structure, so on a release
without owners (3e620aa) each our-runtime case fails at its probe or its classid.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from device_helpers import grid, probe
from hook_helpers import HOOK, Env, attached_ids, make_env

from pelagos_bpf import bpfsys, devices, net
from pelagos_bpf.bpfsys import AttachType, ProgType
from pelagos_bpf.cgroup import Cgroup
from pelagos_bpf.devices import DEFAULT_DEVICE_RULES

pytest_plugins = ["helpers"]
pytestmark = pytest.mark.root

KMSG = ("c", 1, 11, "r")
NULL = ("c", 1, 3, "rw")
# Devices the runtime denies (kmsg, free majors) or allows (null), every op on each.
GRID = [*grid([("c", 1, 11), ("c", 240, 0), ("b", 240, 0)]), NULL, ("c", 1, 3, "m")]
DENY_ALL_CONFIG = {"resources": {"devices": [{"allow": False, "access": "rwm"}]}}
NULL_ONLY_CONFIG = {
    "resources": {
        "devices": [
            {"allow": False, "access": "rwm"},
            {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rwm"},
        ]
    }
}


def _insn(op: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", op, src << 4 | dst, off, imm)


# A foreign device program: c 1:3 (/dev/null) passes, everything else (mknod too) is denied.
# ctx is struct bpf_cgroup_dev_ctx {u32 access_type (access << 16 | type); u32 major, minor}.
NULL_ONLY = b"".join(
    (
        _insn(0x61, 2, 1, 0),  # r2 = ctx->access_type
        _insn(0x57, 2, imm=0xFFFF),  # r2 &= 0xffff (the type)
        _insn(0x55, 2, off=6, imm=2),  # if r2 != CHAR goto deny
        _insn(0x61, 3, 1, 4),  # r3 = ctx->major
        _insn(0x55, 3, off=4, imm=1),  # if r3 != 1 goto deny
        _insn(0x61, 4, 1, 8),  # r4 = ctx->minor
        _insn(0x55, 4, off=2, imm=3),  # if r4 != 3 goto deny
        _insn(0xB7, 0, imm=1),  # r0 = 1
        _insn(0x95),  # exit
        _insn(0xB7, 0, imm=0),  # deny: r0 = 0
        _insn(0x95),  # exit
    )
)


@pytest.fixture
def env(
    tmp_path: Path,
    make_cgroup: Callable[[str], Cgroup],
    spawn: Callable[..., subprocess.Popen[bytes]],
) -> Env:
    e = make_env(tmp_path, make_cgroup, spawn)
    e.extra_env["PELAGOS_BPF_HOOK_RUNTIME"] = "runc"  # the mirror, read as runc reads it
    return e


@pytest.fixture(params=["ours", "foreign"])
def runtime(request: pytest.FixtureRequest, env: Env) -> Iterator[str]:
    """The runtime's device enforcement on env's cgroup, and config.json saying the same."""
    if request.param == "ours":
        devices.attach_devices(env.cg, list(DEFAULT_DEVICE_RULES))
        env.write_config({}, DENY_ALL_CONFIG)  # runc appends the default allowlist
        yield "ours"
        return
    prog = bpfsys.prog_load(ProgType.CGROUP_DEVICE, NULL_ONLY, name="foreign_rt")
    fd = env.cg.open_fd()
    try:
        bpfsys.prog_attach(prog, fd, AttachType.CGROUP_DEVICE)  # BPF_F_ALLOW_MULTI
        env.write_config({}, NULL_ONLY_CONFIG)
        yield "foreign"
        assert bpfsys.prog_info(prog).id in attached_ids(env.cg.path)[AttachType.CGROUP_DEVICE]
    finally:
        with contextlib.suppress(OSError):  # the hook under test detached it: already failed
            bpfsys.prog_detach(prog, fd, AttachType.CGROUP_DEVICE)
        os.close(fd)
        os.close(prog)


def hook_set(env: Env) -> object:
    return next((s for s in devices.read_state(env.cg).owners if s.owner == "hook"), None)


def stop(env: Env) -> None:
    r = env.run({}, status="stopped", pid=0)
    assert r.returncode == 0 and "warning" not in r.stderr, r.stderr


# ---------------------------------------------------------------- devices


def test_allow_in_an_annotation_never_overrides_the_runtimes_deny(env: Env, runtime: str) -> None:
    """(a): `allow c 1:11 rwm` acts only within the hook's own set: /dev/kmsg stays EPERM."""
    assert probe(env.cg.path, [KMSG, NULL]) == [False, True]
    r = env.run({"io.pelagos-bpf.devices": "allow c 1:11 rwm"})
    assert r.returncode == 0, r.stderr
    assert probe(env.cg.path, [KMSG, NULL]) == [False, True]
    stop(env)
    assert probe(env.cg.path, [KMSG, NULL]) == [False, True]


def test_audit_poststop_leaves_every_denial_of_the_runtime(env: Env, runtime: str) -> None:
    """(b): audit only; poststop removes the hook's set, the runtime's stays whole."""
    before = probe(env.cg.path, GRID)
    assert before[GRID.index(("c", 1, 11, "r"))] is False
    r = env.run({"io.pelagos-bpf.devices.audit": "true"})
    assert r.returncode == 0, r.stderr
    assert probe(env.cg.path, GRID) == before
    counted = devices.read_device_denials(env.cg)
    assert counted.get("c 1:11 r", 0) >= 1, counted  # the mirror counts the runtime's denials
    stop(env)
    assert probe(env.cg.path, GRID) == before
    assert hook_set(env) is None


def test_failure_under_best_effort_rolls_back_only_the_hooks_state(env: Env, runtime: str) -> None:
    """(c): an exclusive egress program makes the hook's net attach fail; under best-effort it
    warns, exits 0, and its rollback leaves the runtime's device enforcement whole."""
    before = probe(env.cg.path, GRID)
    skb = bpfsys.prog_load(ProgType.CGROUP_SKB, bytes.fromhex("b7000000010000009500000000000000"))
    fd = env.cg.open_fd()
    try:
        bpfsys.prog_attach(skb, fd, AttachType.CGROUP_INET_EGRESS, flags=0)  # exclusive
        ann = {
            "io.pelagos-bpf.net.classid": "1:10",
            "io.pelagos-bpf.devices": "deny c 240:* r",
            "io.pelagos-bpf.best-effort": "true",
        }
        r = env.run(ann)
        assert r.returncode == 0, r.stderr
        assert "best-effort" in r.stderr
        assert probe(env.cg.path, GRID) == before
    finally:
        bpfsys.prog_detach(skb, fd, AttachType.CGROUP_INET_EGRESS)
        os.close(fd)
        os.close(skb)
    assert hook_set(env) is None
    assert not list(env.state_dir.glob("*.json"))


def test_device_failure_after_net_rolls_back_the_hooks_net_only(env: Env, runtime: str) -> None:
    """(c) the other way round: the hook's net is attached, then its device set is refused
    (the rule map's reserve, $PELAGOS_BPF_RULES_RESERVE): both of the hook's are undone, the
    runtime's devices stay."""
    before = probe(env.cg.path, GRID)
    env.extra_env["PELAGOS_BPF_RULES_RESERVE"] = str(0xFFFF_FFFF)
    rules = "; ".join(f"deny c 241:{i} r" for i in range(100))  # > 64 entries: no exemption
    ann = {
        "io.pelagos-bpf.net.classid": "1:10",
        "io.pelagos-bpf.devices": rules,
        "io.pelagos-bpf.best-effort": "true",
    }
    r = env.run(ann)
    assert r.returncode == 0, r.stderr
    assert "best-effort" in r.stderr and "PELAGOS_BPF_RULES_RESERVE" in r.stderr, r.stderr
    assert probe(env.cg.path, GRID) == before
    assert net.read_config(env.cg) is None
    assert hook_set(env) is None


# ---------------------------------------------------------------- net


def test_runtimes_classid_is_neither_overwritten_nor_removed(env: Env) -> None:
    """(e): the runtime set classid 1:20 through the library. The hook's request for 1:10 is
    refused (exit 2, OwnerConflict's message), and neither that failure's rollback nor a later
    create + poststop of the hook removes the runtime's classid."""
    net.attach_net(env.cg, net.resolve_net(0x10020, None, None))
    r = env.run({"io.pelagos-bpf.net.classid": "1:10"})
    plan = net.read_config(env.cg)
    assert plan is not None and plan.classid == 0x10020
    assert r.returncode == 2, r.stderr
    assert "belong to the runtime; the hook may not change them" in r.stderr
    r = env.run({"io.pelagos-bpf.devices": "deny c 240:* r"})
    assert r.returncode == 0, r.stderr
    stop(env)
    plan = net.read_config(env.cg)
    assert plan is not None and plan.classid == 0x10020


# ---------------------------------------------------------------- the mirror follows the runtime


@pytest.mark.parametrize(
    "hook_runtime, config_rules, probe_op",
    [
        # DEVICE_SEMANTICS case E: runc (v1) keeps 240:1 readable; per bit it would be denied.
        (
            "runc",
            [
                {"allow": False, "access": "rwm"},
                {"allow": True, "type": "c", "major": 240, "minor": 1, "access": "rw"},
                {"allow": False, "type": "c", "major": 240, "access": "rw"},
            ],
            ("c", 240, 1, "r"),
        ),
        # Case D: crun lets O_RDWR through an earlier `rw` allow despite a later `w` deny.
        (
            "crun",
            [
                {"allow": False, "access": "rwm"},
                {"allow": True, "type": "c", "major": 240, "minor": 1, "access": "rw"},
                {"allow": False, "type": "c", "major": 240, "minor": 1, "access": "w"},
            ],
            ("c", 240, 1, "rw"),
        ),
    ],
    ids=["runc-v1", "crun-first-match"],
)
def test_mirror_reads_the_rules_as_the_runtime_does(
    env: Env, hook_runtime: str, config_rules: list[dict], probe_op: tuple
) -> None:
    """The audit's copy of the runtime's rules must not deny what the runtime allows: read per
    bit (the old mirror) these lists deny an access runc / crun allow."""
    from pelagos_bpf.devices.rules import CgroupDeviceRule as R

    # What that runtime enforces on c 240:1 for these lists: r and w (O_RDWR) allowed.
    devices.attach_devices(env.cg, [R(False, "a"), R(True, "c", 240, 1, "rw")])
    env.write_config({}, {"resources": {"devices": config_rules}})
    env.extra_env["PELAGOS_BPF_HOOK_RUNTIME"] = hook_runtime
    assert probe(env.cg.path, [probe_op]) == [True]
    r = env.run({"io.pelagos-bpf.devices.audit": "true"})
    assert r.returncode == 0, r.stderr
    assert probe(env.cg.path, [probe_op]) == [True]


def _fake_runtime(tmp: Path, name: str) -> Path:
    """A copy of /bin/sh named like a runtime: /proc/<ppid>/exe of the hook it runs."""
    exe = tmp / name
    shutil.copy2("/bin/sh", exe)
    return exe


@pytest.mark.parametrize("name, found", [("runc", "runc"), ("crun", "crun"), ("shim", None)])
def test_runtime_is_the_hooks_parent(env: Env, name: str, found: str | None) -> None:
    """runc and crun exec hooks themselves: the hook reads its parent's executable."""
    del env.extra_env["PELAGOS_BPF_HOOK_RUNTIME"]
    env.write_config({}, DENY_ALL_CONFIG)
    parent = _fake_runtime(env.tmp, name)
    cmd = " ".join(HOOK) + " -v; exit $?"  # not the last command: sh forks, stays the parent
    state = env.state({"io.pelagos-bpf.devices.audit": "true"}, "creating")
    r = subprocess.run(
        [str(parent), "-c", cmd],
        input=json.dumps(state),
        capture_output=True,
        text=True,
        env=env.environ(),
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    if found:
        assert f"runtime {found} (the hook's parent process" in r.stderr, r.stderr
        assert hook_set(env) is not None
    else:
        assert "the runtime was not recognised" in r.stderr, r.stderr
        assert hook_set(env) is None  # nothing to count with: nothing attached
