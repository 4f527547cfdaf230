"""`pelagos-bpf oci-hook` exec'd as a runtime would, on a real process in a test cgroup.

Each case checks the exit status, the stderr message, and what is attached at the cgroup
afterwards (PROG_QUERY on the cgroup itself, not a system-wide count).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest
from hook_helpers import HOOK, LEAN, Env, attached_ids, make_env, nothing_attached

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


# ---------------------------------------------------------------- the admin policy

CLASSID = {"io.pelagos-bpf.net.classid": "1:10"}
NS = "io.kubernetes.pod.namespace"


def refused_before_anything(env: Env, r: subprocess.CompletedProcess[str], *said: str) -> None:
    assert r.returncode == 2, r.stderr
    assert all(s in r.stderr for s in said), r.stderr
    assert nothing_attached(env.cg.path)
    assert not list(env.state_dir.glob("*.json"))


def test_policy_refuses_before_anything_is_attached(env: Env) -> None:
    env.write_policy('[default]\nclassids = ["1:20"]\n')
    r = env.run(CLASSID)
    refused_before_anything(
        env, r, "io.pelagos-bpf.net.classid: classid 1:10 is not allowed", "default.classids"
    )


def test_without_a_policy_file_pods_pick_no_class_but_may_restrict(env: Env) -> None:
    env.policy.unlink()
    r = env.run(CLASSID)
    refused_before_anything(env, r, "built-in default (no ", ": classids)")
    r = env.run({"io.pelagos-bpf.devices": "allow c 1:11"})
    refused_before_anything(env, r, "device grants (allow rules) are not allowed")
    r = env.run({"io.pelagos-bpf.devices": "deny c 1:5"})
    assert r.returncode == 0, r.stderr


def test_a_policy_others_can_write_fails_closed(env: Env) -> None:
    env.policy.chmod(0o666)
    r = env.run({"io.pelagos-bpf.devices": "deny c 1:5"})
    refused_before_anything(env, r, str(env.policy), "group/world-writable")
    r = env.run({"io.pelagos-bpf.devices": "deny c 1:5", "io.pelagos-bpf.best-effort": "true"})
    assert r.returncode == 0 and "best-effort" in r.stderr, r.stderr
    assert nothing_attached(env.cg.path)


def test_priority_above_0xffff_is_refused_unless_the_policy_allows(env: Env) -> None:
    """Finding 2: `eth0=65536` put every packet into HTB's unshaped direct queue. A priority
    above 0xffff selects an HTB class: refused unless the policy allows it (and the class);
    one that names the qdisc itself is refused whatever the policy says."""
    env.write_policy('[default]\npriorities = ["0-7"]\nclassids = ["1:10"]\n')
    prio = {"io.pelagos-bpf.net.priorities": "lo=65552"}
    refused_before_anything(env, env.run(prio), "priority_classids", "selects HTB class 1:10")
    r = env.run({"io.pelagos-bpf.net.priorities": "lo=65536"})
    refused_before_anything(env, r, "names the qdisc 1: itself")
    env.write_policy('[default]\npriorities = ["0-7"]\npriority_classids = true\nclassids=["*"]\n')
    r = env.run({"io.pelagos-bpf.net.priorities": "lo=65536"})
    refused_before_anything(env, r, "names the qdisc 1: itself")
    r = env.run(prio)
    assert r.returncode == 0, r.stderr


def test_the_namespace_selects_the_policy_and_cannot_be_spoofed(env: Env) -> None:
    env.write_policy('[namespaces.tenant]\nclassids = ["1:10"]\n')
    env.write_config({NS: "tenant"})
    r = env.run({NS: "tenant", **CLASSID})
    assert r.returncode == 0, r.stderr
    assert "namespace 'tenant'" in r.stderr
    assert env.run({}, status="stopped", pid=0).returncode == 0
    for key in (NS.upper(), NS + " ", "io.kubernetes.pod.namespace\u200b"):
        env.write_config({key: "tenant"})  # a pod's lookalike key: the default policy
        r = env.run({key: "tenant", **CLASSID})
        refused_before_anything(env, r, "containers without a namespace", "classids")
    env.write_config({NS: "batch"})
    r = env.run({NS: "tenant", **CLASSID})  # the state disagrees with config.json
    refused_before_anything(env, r, "the OCI state says 'tenant', config.json 'batch'")


def test_namespace_entry_quota_counts_the_records(
    env: Env, make_cgroup: Callable[[str], Cgroup], spawn: Callable[..., subprocess.Popen[bytes]]
) -> None:
    """Each record states its namespace and entries; the policy's per-namespace total is their
    sum over live containers, re-read on every exec (the policy file too)."""
    env.extra_env["PELAGOS_BPF_HOOK_RUNTIME"] = "runc"
    deny_all = {"resources": {"devices": [{"allow": False}]}}
    env.write_config({NS: "tenant"}, deny_all)
    audit = {NS: "tenant", "io.pelagos-bpf.devices.audit": "true"}
    assert env.run(audit).returncode == 0
    entries = json.loads((env.state_dir / "hooktest.json").read_text())["entries"]
    assert entries > 0
    env.write_policy(f"[default]\nentries_per_namespace = {entries + entries // 2}\n")
    cg2 = make_cgroup("ctr2")
    p2 = spawn("sleep", "300")
    (cg2.path / "cgroup.procs").write_text(str(p2.pid))
    r = env.run(audit, id="second", pid=p2.pid)
    assert r.returncode == 2 and "entries_per_namespace" in r.stderr, r.stderr
    assert f"on top of the {entries} in use" in r.stderr
    env.write_config({NS: "other"}, deny_all)
    r = env.run({**audit, NS: "other"}, id="second", pid=p2.pid)
    assert r.returncode == 0, r.stderr
    assert env.run({}, id="second", status="stopped", pid=0).returncode == 0
    assert env.run({}, status="stopped", pid=0).returncode == 0  # frees the tenant's entries
    env.write_config({NS: "tenant"}, deny_all)
    r = env.run(audit, id="second", pid=p2.pid)
    assert r.returncode == 0, r.stderr


# ---------------------------------------------------------------- records


def test_record_planted_in_a_world_writable_dir_touches_nothing(env: Env) -> None:
    """Finding 8: with a world-writable $PELAGOS_BPF_HOOK_STATE, `nobody` planted a record
    naming another container's cgroup, and poststop detached our program there."""
    victim = {"io.pelagos-bpf.devices": "deny c 240:* r"}
    assert env.run(victim).returncode == 0
    before = attached_ids(env.cg.path)
    assert before[AttachType.CGROUP_DEVICE]
    record = {"id": "planted", "cgroup": str(env.cg.path), "cgroup_id": env.cg.id}
    for mode in (0o777, 0o1777):
        planted = Path(tempfile.mkdtemp(prefix="pelagos-hook-planted-", dir="/tmp"))
        try:
            planted.chmod(mode)
            subprocess.run(
                ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--",
                 "sh", "-c", f"cat > {planted}/planted.json"],
                input=json.dumps(record), text=True, check=True, timeout=60,
            )  # fmt: skip
            assert (planted / "planted.json").stat().st_uid != 0
            env.extra_env["PELAGOS_BPF_HOOK_STATE"] = str(planted)
            r = env.run({}, id="planted", status="stopped", pid=0)
            assert r.returncode == 0, r.stderr
            assert "untrusted hook state dir" in r.stderr and "world-writable" in r.stderr
            assert attached_ids(env.cg.path) == before
        finally:
            shutil.rmtree(planted)
    del env.extra_env["PELAGOS_BPF_HOOK_STATE"]


def test_records_others_own_or_can_write_are_refused(env: Env) -> None:
    assert env.run({"io.pelagos-bpf.devices": "deny c 240:* r"}).returncode == 0
    before = attached_ids(env.cg.path)
    rec = env.state_dir / "hooktest.json"
    for change in (lambda: os.chown(rec, 65534, 65534), lambda: rec.chmod(0o666)):
        change()
        r = env.run({}, status="stopped", pid=0)
        assert r.returncode == 0 and "untrusted hook record" in r.stderr, r.stderr
        assert attached_ids(env.cg.path) == before and rec.exists()
        os.chown(rec, 0, 0)
        rec.chmod(0o644)


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        "[]",
        '{"id": "hooktest", "cgroup": 5, "cgroup_id": 1}',
        '{"id": "hooktest", "cgroup": "/x", "cgroup_id": "1"}',
        '{"id": "hooktest", "cgroup": "rel/x", "cgroup_id": 1}',
        '{"id": "other", "cgroup": "/x", "cgroup_id": 1}',
        "[" * 100_000,
    ],
)
def test_malformed_record_at_poststop_is_a_warning(env: Env, text: str) -> None:
    env.state_dir.mkdir()
    rec = env.state_dir / "hooktest.json"
    rec.write_text(text)
    argv = LEAN if text == "[]" else HOOK  # the lean entry point once: the same run_hook
    r = env.run({}, status="stopped", pid=0, argv=argv)
    assert r.returncode == 0, r.stderr
    assert "warning: poststop: record" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert not rec.exists()  # removed: it can never be used


def test_rule_count_limits_apply_before_anything_is_written(env: Env) -> None:
    """The policy's rules_per_set, then the library's per-set limit ($PELAGOS_BPF_RULES_PER_SET:
    the hook's whole set, the mirror included), each a ConfigError naming the annotation."""
    rules = {"io.pelagos-bpf.devices": "; ".join(f"deny c 241:{i} r" for i in range(20))}
    env.write_policy("[default]\nrules_per_set = 19\n")
    r = env.run(rules)
    refused_before_anything(env, r, "io.pelagos-bpf.devices: 20 rules: more than the 19")
    env.write_policy("[default]\nrules_per_set = 20\n")
    env.extra_env["PELAGOS_BPF_RULES_PER_SET"] = "19"
    r = env.run(rules)
    refused_before_anything(
        env, r, "io.pelagos-bpf.devices='20 rules'", "PELAGOS_BPF_RULES_PER_SET"
    )


def test_namespace_sum_reads_a_record_again_only_when_it_changed(
    make_cgroup: Callable[[str], Cgroup], tmp_path: Path
) -> None:
    """entries_of (the quota check's sum, run by a resident agent under a node lock) counts
    live records of that namespace only, sees a replaced, removed or loosened record at once,
    and re-reads only records whose file changed (each_cached)."""
    from pelagos_bpf.ocihook import records as rmod
    from pelagos_bpf.ocihook.records import Record, Records

    d = tmp_path / "state"
    d.mkdir(mode=0o755)
    a, b, gone = make_cgroup("ra"), make_cgroup("rb"), make_cgroup("rgone")
    gone_id = gone.id
    with Records(d, create=True) as recs:
        recs.write(Record("a", str(a.path), a.id, "t1", 10))
        recs.write(Record("b", str(b.path), b.id, "t1", 5))
        recs.write(Record("c", str(b.path), b.id, "t2", 7))
        recs.write(Record("g", str(gone.path), gone_id, "t1", 100))
        gone.path.rmdir()  # its record stays until gc: not counted
        assert recs.entries_of("t1") == 15 and recs.entries_of("t2") == 7
        assert recs.entries_of(None) == 0
        reads: list[str] = []
        real_read = Records._read

        def counting(self: Records, name: str) -> Record | None:
            reads.append(name)
            return real_read(self, name)

        Records._read = counting  # type: ignore[method-assign]
        try:
            assert recs.entries_of("t1") == 15
            assert reads == []  # nothing changed: nothing read
            recs.write(Record("b", str(b.path), b.id, "t1", 6))  # replaced (rename)
            assert recs.entries_of("t1") == 16 and reads == ["b.json"]
            recs.remove("a")
            assert recs.entries_of("t1") == 6
            os.chmod(d / "b.json", 0o666)  # loosened: untrusted, skipped
            assert recs.entries_of("t1") == 0
        finally:
            Records._read = real_read  # type: ignore[method-assign]
        assert recs.entries_of("t1") == recs.entries_by_namespace().get("t1", 0)
    assert not [k for k in rmod._CACHE if k[0] == str(d) and k[1] == "a.json"]


def _fake_proc(d: Path, rel: str, mount_point: Path | str, dev: int) -> str:
    """A /proc with one pid (42) in cgroup `rel` and one cgroup2 mount of device `dev`."""
    (d / "42").mkdir(parents=True)
    (d / "self").mkdir()
    (d / "42" / "cgroup").write_text(f"0::{rel}\n")
    (d / "self" / "mountinfo").write_text(
        f"30 25 {os.major(dev)}:{os.minor(dev)} / {mount_point} rw - cgroup2 cgroup2 rw\n"
    )
    return str(d)


def test_a_pid_maps_to_its_cgroup_only_on_the_cgroup2_filesystem(tmp_path: Path) -> None:
    """The hook maps /proc/PID/cgroup through the mount table and proves the dir a cgroup with
    its one stat: a dir on another filesystem (a moved mount, a plain dir) is refused."""
    from pelagos_bpf.hierarchy import discover
    from pelagos_bpf.ocihook.locate import cgroup_dir_of_pid
    from pelagos_bpf.ocihook.request import HookError

    root = discover().root
    st = os.stat(root)
    proc = _fake_proc(tmp_path / "real", "/", root, st.st_dev)
    assert cgroup_dir_of_pid(42, proc) == (str(root), st.st_ino)
    plain = tmp_path / "mnt"
    (plain / "x").mkdir(parents=True)  # where the table says cgroup2, a plain dir
    proc = _fake_proc(tmp_path / "plain", "/x", plain, st.st_dev)
    with pytest.raises(HookError, match="does not exist"):
        cgroup_dir_of_pid(42, proc)


def test_threads_listing_the_records_at_once_each_see_every_record(tmp_path: Path) -> None:
    """The agent's threads share one held fd of the state dir; a listing through it (or a dup
    of it, which shares its file offset) let two threads advance each other's position, and
    one saw a short list (a quota sum missing records). Each listing has its own open file."""
    import threading

    from pelagos_bpf.ocihook.records import Record, Records

    d = tmp_path / "state"
    d.mkdir(mode=0o755)
    with Records(d) as recs:
        for i in range(300):
            recs.write(Record(f"c{i}", "/sys/fs/cgroup/x", i + 1))
    short: list[int] = []

    def lister() -> None:
        for _ in range(100):
            with Records(d) as r:
                n = len(r._names())
            if n != 300:
                short.append(n)

    threads = [threading.Thread(target=lister) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert short == []
