"""The NRI plugin: its annotation reading and grants (pure), and its events against the fake
runtime (tests/nri_runtime.py) on real cgroups: devices probed from a process inside, net read
back from the kernel, map entries looked up after removal.

The real containerd runs it in tests/test_nri_guest.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pelagos_bpf import devices, locks, net
from pelagos_bpf.cgref import Ref
from pelagos_bpf.devices import program
from pelagos_bpf.devices.rules import CgroupDeviceRule, parse_rule
from pelagos_bpf.errors import ConfigError
from pelagos_bpf.nri import api, grants, request
from pelagos_bpf.nri.plugin import Plugin
from pelagos_bpf.nri.proto import nri_pb2
from pelagos_bpf.nri.stub import PluginStub
from pelagos_bpf.nri.ttrpc import Code, TtrpcError
from pelagos_bpf.policy import parse as parse_policy
from pelagos_bpf.registry import FEATURES
from tests.device_helpers import probe
from tests.nri_runtime import WAIT, FakeRuntime, Running, RuntimeConn

CLASSID = "io.pelagos-bpf.net.classid"
PRIOS = "io.pelagos-bpf.net.priorities"
DEVICES = "io.pelagos-bpf.devices"
AUDIT = "io.pelagos-bpf.devices.audit"
BEST = "io.pelagos-bpf.best-effort"
r = parse_rule


# ---------------------------------------------------------------- annotations (pure)


def test_the_container_key_wins_then_the_pod_key_then_the_bare_key() -> None:
    ann = {
        CLASSID: "1:10",
        f"{CLASSID}/container.side": "1:20",
        f"{DEVICES}/pod": "deny c 1:5 rwm",
        f"{DEVICES}/container.other": "deny c 1:3 rwm",
    }
    main = request.parse(ann, "main")
    assert (main.classid, main.rules) == (0x10010, (r("deny c 1:5 rwm"),))
    assert main.sources == {CLASSID: CLASSID, DEVICES: f"{DEVICES}/pod"}
    side = request.parse(ann, "side")
    assert (side.classid, side.source(CLASSID)) == (0x10020, f"{CLASSID}/container.side")
    assert request.parse(ann, "other").rules == (r("deny c 1:3 rwm"),)


def test_an_empty_container_value_opts_that_container_out() -> None:
    ask = request.parse({CLASSID: "1:10", f"{CLASSID}/container.side": ""}, "side")
    assert ask.empty and ask.claim is None
    assert request.parse({}, "main").empty


def test_the_key_and_its_pod_form_together_are_refused() -> None:
    with pytest.raises(ConfigError) as e:
        request.parse({CLASSID: "1:10", f"{CLASSID}/pod": "1:10"}, "main")
    assert e.value.setting == f"{CLASSID}/pod" and "keep one" in e.value.reason


def test_unknown_keys_are_warned_about_and_ignored() -> None:
    ask = request.parse(
        {
            "io.pelagos-bpf.net.clasid": "1:10",
            f"{CLASSID}/containers.x": "1:10",
            f"{CLASSID}/container.": "1:10",
            f"{CLASSID}/container.other": "1:20",
            "example.com/x": "y",
        },
        "main",
    )
    assert ask.empty
    assert [w.split()[1] for w in ask.warnings] == [
        "io.pelagos-bpf.net.clasid",
        f"{CLASSID}/container.",
        f"{CLASSID}/containers.x",
    ]


def test_errors_name_the_annotation_as_the_pod_author_wrote_it() -> None:
    with pytest.raises(ConfigError) as e:
        request.parse({f"{CLASSID}/container.main": "1:zz"}, "main")
    assert e.value.setting == f"{CLASSID}/container.main"
    with pytest.raises(ConfigError) as e:
        request.parse({f"{DEVICES}/pod": "deny x 1:5"}, "main")
    assert e.value.setting == f"{DEVICES}/pod"
    with pytest.raises(ConfigError, match="more than"):
        request.parse({DEVICES: "deny c 1:5 rwm;" * 20000}, "main")
    ask = request.parse({f"{CLASSID}/container.main": "1:10"}, "main")
    assert ask.claim is not None and ask.claim.classid_setting == f"{CLASSID}/container.main"


@pytest.mark.parametrize("grant", ["allow c 10:*", "allow a 1:3", "allow b *:*", "allow c *:229"])
def test_a_grant_names_one_device_node(grant: str) -> None:
    with pytest.raises(ConfigError, match="a grant names one device node"):
        request.parse({DEVICES: f"deny c 1:5; {grant}"}, "main")


def test_a_grant_narrower_than_the_runtimes_rule_is_narrowed_by_our_set() -> None:
    full = request.parse({DEVICES: "allow c 10:229 rw; allow b 7:0"}, "main")
    assert not full.wants_program  # the runtime's rule for the node is the whole grant
    assert [str(x) for x in request.own_rules(full.rules)] == [
        "allow c 10:229 rw",
        "allow b 7:0 rwm",
    ]
    ro = request.parse({DEVICES: "allow c 10:229 r; allow b 7:0 rw"}, "main")
    assert ro.wants_program
    assert [str(x) for x in request.own_rules(ro.rules)] == [
        "allow c 10:229 r",
        "deny c 10:229 w",
        "allow b 7:0 rw",
        "deny b 7:0 m",
    ]
    assert request.parse({DEVICES: "deny c 1:5"}, "main").wants_program
    assert request.parse({AUDIT: "true"}, "main").wants_program


def test_cgroups_path_is_read_as_runc_reads_it(tmp_path: Path) -> None:
    cg = request.cgroup_dir
    assert cg("/kubepods/burstable/pod1/abc", tmp_path) == tmp_path / "kubepods/burstable/pod1/abc"
    assert cg("kubepods-besteffort-pod1_2.slice:cri-containerd:abc", tmp_path) == tmp_path / (
        "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod1_2.slice/"
        "cri-containerd-abc.scope"
    )
    assert cg(":cri-containerd:abc", tmp_path) == tmp_path / "system.slice/cri-containerd-abc.scope"
    for bad, why in (
        ("pod1/abc", "absolute path"),
        ("/a/../b", "'..'"),
        ("/", "cgroup root"),
        ("bad--name.slice:p:n", "not a valid systemd slice"),
    ):
        with pytest.raises(ConfigError, match=why) as e:
            cg(bad, tmp_path)
        assert e.value.setting == "linux.cgroups_path"


def test_the_runtimes_rules_are_read_from_the_nri_container() -> None:
    c = api.Container()
    c.linux.resources.devices.append(api.LinuxDeviceCgroup(allow=False, access="rwm"))
    c.linux.resources.devices.append(
        api.LinuxDeviceCgroup(
            allow=True,
            type="c",
            major=api.OptionalInt64(value=10),
            minor=api.OptionalInt64(value=229),
            access="rw",
        )
    )
    c.linux.resources.devices.append(
        api.LinuxDeviceCgroup(
            allow=True, type="c", major=api.OptionalInt64(value=136), access="rwm"
        )
    )
    c.linux.devices.append(api.LinuxDevice(path="/dev/fuse", type="c", major=10, minor=229))
    linux = request.oci_linux_of(request.device_key(c.linux))
    assert linux == {
        "devices": [{"type": "c", "major": 10, "minor": 229}],
        "resources": {
            "devices": [
                {"allow": False, "access": "rwm"},
                {"allow": True, "access": "rw", "type": "c", "major": 10, "minor": 229},
                {"allow": True, "access": "rwm", "type": "c", "major": 136},
            ]
        },
    }
    from pelagos_bpf.ocihook import mirror

    copy, warning = mirror.mirror(linux, "runc")
    assert warning == "" and copy[0] == CgroupDeviceRule(False, "a", -1, -1, "rwm")
    # the node's own allow (the mirror allows nodes whole: more than the runtime, never less)
    assert r("allow c 10:229 rwm") in copy and r("allow c 136:* rwm") in copy


def test_namespaces_come_from_the_pod_sandbox_and_are_checked() -> None:
    assert request.namespace_of("") is None
    assert request.namespace_of("team-a") == "team-a"
    with pytest.raises(ConfigError, match="not a Kubernetes namespace"):
        request.namespace_of("Team_A")


def test_the_runtime_is_read_from_its_init_process() -> None:
    import sys

    from pelagos_bpf.nri.plugin import runtime_of_init

    # runc's init renames itself and runs from a memfd copy of runc
    code = "open('/proc/self/comm', 'w').write('runc:[2:INIT]'); print(flush=True); input()"
    p = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE
    )
    try:
        assert p.stdout is not None and p.stdout.readline() == b"\n"
        assert runtime_of_init(p.pid) == "runc"
    finally:
        p.kill()
        p.wait()
    assert runtime_of_init(os.getpid()) is None
    assert runtime_of_init(p.pid) is None  # gone


# ---------------------------------------------------------------- grants: the host's node


def _sys_dev(tmp_path: Path, kind: str, major: int, minor: int, devname: str | None) -> Path:
    d = tmp_path / "sys" / {"c": "char", "b": "block"}[kind] / f"{major}:{minor}"
    d.mkdir(parents=True)
    lines = [f"MAJOR={major}", f"MINOR={minor}"] + ([f"DEVNAME={devname}"] if devname else [])
    (d / "uevent").write_text("\n".join(lines) + "\n")
    return tmp_path / "sys"


def test_a_grant_becomes_the_host_node_in_the_adjustment(tmp_path: Path) -> None:
    sys_dev = _sys_dev(tmp_path, "c", 1, 3, "null")
    st = os.stat("/dev/null")
    adjust = grants.adjustment((r("allow c 1:3 r"), r("allow c 1:3 w")), DEVICES, sys_dev)
    assert adjust is not None
    (dev,) = adjust.linux.devices  # one node for both rules
    assert (dev.path, dev.type, dev.major, dev.minor) == ("/dev/null", "c", 1, 3)
    assert dev.file_mode.value == st.st_mode & 0o7777 and dev.uid.value == st.st_uid
    assert grants.adjustment((), DEVICES, sys_dev) is None


@pytest.mark.parametrize(
    ("devname", "why"),
    [
        (None, "has no DEVNAME"),
        ("zero", "is not the char device 1:3 \\(found c 1:5\\)"),
        ("../etc/passwd", "is not a name"),
        ("no-such-node-here", "does not exist"),
    ],
)
def test_a_grant_without_its_node_is_refused(tmp_path: Path, devname: str | None, why: str) -> None:
    sys_dev = _sys_dev(tmp_path, "c", 1, 3, devname)
    with pytest.raises(ConfigError, match=why) as e:
        grants.adjustment((r("allow c 1:3 rw"),), f"{DEVICES}/pod", sys_dev)
    assert e.value.setting == f"{DEVICES}/pod"
    with pytest.raises(ConfigError, match="this node has no char device 1:4"):
        grants.adjustment((r("allow c 1:4 rw"),), DEVICES, sys_dev)


# ---------------------------------------------------------------- events on real cgroups

POLICY = """
[default]
rules_per_set = 64
[namespaces.team-a]
classids = ["1:10-1:1f"]
priorities = ["0-7"]
device_grants = true
[namespaces.team-b]
device_grants = false
"""


@dataclass
class Node:
    """A fake runtime with the plugin registered, and the containers' processes."""

    conn: RuntimeConn
    plugin: Plugin
    cg_root: Path
    bin_dir: Path
    seen: list[tuple[str, bool]] = field(default_factory=list)
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def container(
        self, name: str = "main", *, runtime: str = "runc", cid: str | None = None
    ) -> api.Container:
        """A container whose process waits in its own cgroup as runc init would (its
        executable named `runtime`, so the plugin reads the rules as that runtime does)."""
        cid = cid or f"{name}-{len(self.procs)}"
        path = self.cg_root / cid
        path.mkdir()
        exe = self.bin_dir / runtime
        if not exe.exists():
            shutil.copy("/bin/sleep", exe)
        p = subprocess.Popen(
            ["/bin/sh", "-c", 'echo $$ > "$1/cgroup.procs" && exec "$2" 1000', "sh", path, exe]
        )
        self.procs.append(p)
        deadline = time.monotonic() + WAIT
        while not _runs(p.pid, exe):
            assert time.monotonic() < deadline, "the container's process did not start"
            time.sleep(0.01)
        ctr = api.Container(id=cid, pod_sandbox_id="pod1", name=name, pid=p.pid)
        ctr.state = api.ContainerState.CONTAINER_CREATED
        ctr.linux.cgroups_path = "/" + str(path.relative_to(_root()))
        # what containerd's spec holds: deny all, the default allowlist
        for rule in ("deny a *:* rwm", "allow c 1:3 rwm", "allow c 1:5 rwm", "allow c 1:9 rwm"):
            ctr.linux.resources.devices.append(_cgroup_rule(r(rule)))
        return ctr

    def create(self, pod: api.PodSandbox, ctr: api.Container) -> api.CreateContainerResponse:
        resp = self.conn.call(
            "CreateContainer",
            api.CreateContainerRequest(pod=pod, container=ctr),
            api.CreateContainerResponse,
        )
        for d in resp.adjust.linux.devices:  # as containerd applies the adjustment
            ctr.linux.devices.append(d)
            ctr.linux.resources.devices.append(
                _cgroup_rule(CgroupDeviceRule(True, d.type, d.major, d.minor, "rw"))
            )
        return resp

    def event(self, event: int, pod: api.PodSandbox, ctr: api.Container) -> None:
        msg = api.StateChangeEvent(event=event, pod=pod, container=ctr)
        self.conn.call("StateChange", msg, api.Empty)

    def start(self, pod: api.PodSandbox, ctr: api.Container) -> None:
        self.event(nri_pb2.START_CONTAINER, pod, ctr)
        ctr.state = api.ContainerState.CONTAINER_RUNNING

    def remove(self, pod: api.PodSandbox, ctr: api.Container) -> None:
        self.event(nri_pb2.REMOVE_CONTAINER, pod, ctr)

    def synchronize(self, pods: list[api.PodSandbox], ctrs: list[api.Container]) -> None:
        req = api.SynchronizeRequest(pods=pods, containers=ctrs)
        self.conn.call("Synchronize", req, api.SynchronizeResponse)


def _root() -> Path:
    from pelagos_bpf.hierarchy import discover

    return discover().root


def _runs(pid: int, exe: Path) -> bool:
    try:
        return os.readlink(f"/proc/{pid}/exe") == str(exe)
    except OSError:
        return False


def _cgroup_rule(rule: CgroupDeviceRule) -> api.LinuxDeviceCgroup:
    out = api.LinuxDeviceCgroup(allow=rule.allow, access=rule.access)
    if rule.kind != "a":
        out.type = rule.kind
    if rule.major != -1:
        out.major.value = rule.major
    if rule.minor != -1:
        out.minor.value = rule.minor
    return out


def _pod(namespace: str = "team-a", **annotations: str) -> api.PodSandbox:
    pod = api.PodSandbox(id="pod1", name="web", uid="u1", namespace=namespace)
    pod.annotations.update(annotations)
    return pod


@pytest.fixture
def node(cg_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Node]:
    # Configure bounds the lock waits for the rest of the process: restored after the test.
    monkeypatch.setattr(locks, "LOCK_TIMEOUT", locks.LOCK_TIMEOUT)
    policy = parse_policy(POLICY, "test-policy.toml")
    seen: list[tuple[str, bool]] = []
    plugin = Plugin(
        lambda: policy, observe=lambda op, _s, ok: seen.append((op, ok)), sys_dev=Path("/sys/dev")
    )
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    runtime = FakeRuntime(str(tmp_path / "nri.sock"))
    stub = PluginStub(plugin, name="pelagos-bpf", index="10", socket_path=runtime.path, environ={})
    running = Running(stub)
    n = None
    try:
        conn = runtime.accept()
        _, cfg = conn.register_and_configure()
        assert api.events_in_mask(cfg.events) == {
            api.Event.CREATE_CONTAINER,
            api.Event.START_CONTAINER,
            api.Event.POST_UPDATE_CONTAINER,
            api.Event.REMOVE_CONTAINER,
        }
        assert locks.LOCK_TIMEOUT == 0.5  # a quarter of the 2 s request timeout
        n = Node(conn, plugin, cg_root, bin_dir, seen)
        yield n
    finally:
        running.stop()
        runtime.close()
        for p in n.procs if n else []:
            p.kill()
            p.wait()


def _entries_of(cgroup_id: int) -> dict[str, int]:
    """Entries keyed by this cgroup in every map of this process's programs."""
    from pelagos_bpf import bpfsys

    out: dict[str, int] = {}
    for feat in FEATURES:
        loaded = feat.loaded_if_any()
        if loaded is None:
            continue
        for spec in loaded.layer.maps:
            if spec.cgroup_of is None or spec.name not in loaded.maps:
                continue
            keys = bpfsys.map_keys(loaded.maps[spec.name], spec.key_size)
            n = sum(1 for k in keys if spec.cgroup_of(k) == cgroup_id)
            if n:
                out[spec.name] = n
    return out


def test_create_start_remove_on_a_real_cgroup(node: Node) -> None:
    pod = _pod(**{CLASSID: "1:10", DEVICES: "deny c 1:5 rwm; allow c 10:229 r"})
    ctr = node.container()
    resp = node.create(pod, ctr)
    (dev,) = resp.adjust.linux.devices
    assert (dev.path, dev.type, dev.major, dev.minor) == ("/dev/fuse", "c", 10, 229)
    node.start(pod, ctr)
    cg = Ref.of(node.cg_root / ctr.id)
    st = net.read_state(cg)
    assert st.attached and st.classid == 0x10010
    (mine,) = [o for o in devices.read_state(cg).owners if o.owner == "nri"]
    assert mine.installed
    assert mine.rules[-3:] == (r("deny c 1:5 rwm"), r("allow c 10:229 r"), r("deny c 10:229 w"))
    # runc's rules (read as runc reads them) come first: deny-all, then its allowlist
    assert (mine.rules[0].allow, mine.rules[0].kind) == (False, "a")
    assert r("allow c 1:3 rwm") in mine.rules
    allowed = probe(
        node.cg_root / ctr.id,
        [
            ("c", 1, 5, "r"),  # our deny
            ("c", 10, 229, "r"),  # the grant
            ("c", 10, 229, "rw"),  # narrowed: the runtime's rule alone would allow it
            ("c", 1, 3, "rw"),  # the runtime's allowlist, mirrored
            ("c", 240, 0, "r"),  # the runtime's deny-all, mirrored
        ],
    )
    assert allowed == [False, True, False, True, False]
    assert ("create_container", True) in node.seen and ("start_container", True) in node.seen

    node.remove(pod, ctr)
    assert not net.read_state(cg).attached
    assert [o.owner for o in devices.read_state(cg).owners] == []
    assert _entries_of(cg.id) == {}
    assert probe(node.cg_root / ctr.id, [("c", 1, 5, "r"), ("c", 240, 0, "r")]) == [True, True]


def test_a_request_outside_the_policy_fails_the_container_naming_rule_and_annotation(
    node: Node,
) -> None:
    ctr = node.container()
    with pytest.raises(TtrpcError) as e:
        node.create(_pod(**{f"{CLASSID}/container.main": "1:20"}), ctr)
    assert e.value.code == Code.FAILED_PRECONDITION
    assert e.value.message == (
        f"pelagos-bpf: pod team-a/web container main: {CLASSID}/container.main: classid 1:20 "
        "is not allowed for namespace 'team-a' (allowed: 1:10-1:1f) (policy test-policy.toml: "
        "namespaces.team-a.classids)"
    )
    with pytest.raises(TtrpcError, match=r"device grants \(allow rules\) are not allowed"):
        node.create(_pod("team-b", **{DEVICES: "allow c 10:229 rw"}), ctr)
    with pytest.raises(TtrpcError, match="classid 1:10 is not allowed for namespace 'other'"):
        node.create(_pod("other", **{CLASSID: "1:10"}), ctr)
    with pytest.raises(TtrpcError) as e:
        node.create(_pod(**{PRIOS: "eth0"}), ctr)
    assert e.value.code == Code.INVALID_ARGUMENT and f"{PRIOS}='eth0'" in e.value.message
    # best-effort: refused, but nothing attached and the container goes on
    assert node.create(_pod("other", **{CLASSID: "1:10", BEST: "true"}), ctr).adjust.ByteSize() == 0
    assert [ok for op, ok in node.seen if op == "create_container"] == [False] * 4 + [True]


def test_a_failed_start_is_an_error_that_leaves_nothing(node: Node) -> None:
    pod = _pod(**{CLASSID: "1:10", PRIOS: "nosuch0=3", DEVICES: "deny c 1:5"})
    ctr = node.container()
    node.create(pod, ctr)
    with pytest.raises(TtrpcError) as e:
        node.start(pod, ctr)
    assert "nosuch0" in e.value.message and e.value.message.startswith("pelagos-bpf: pod team-a")
    cg = Ref.of(node.cg_root / ctr.id)
    assert not net.read_state(cg).attached and devices.read_state(cg).owners == ()
    # a grant whose node the container does not have (created while the plugin was away)
    ctr2 = node.container()
    with pytest.raises(TtrpcError, match="created without the plugin's adjustment"):
        node.start(_pod(**{DEVICES: "allow c 10:229 rw"}), ctr2)
    # a cgroups_path that is not the process's cgroup
    ctr3 = node.container()
    ctr3.linux.cgroups_path = ctr.linux.cgroups_path
    with pytest.raises(TtrpcError, match=f"but process {ctr3.pid} is in"):
        node.start(_pod(**{CLASSID: "1:10"}), ctr3)
    assert ("start_container", False) in node.seen


def test_removal_after_the_runtime_removed_the_cgroup_leaves_no_entries(node: Node) -> None:
    pod = _pod(**{CLASSID: "1:10", PRIOS: "lo=5", DEVICES: "deny c 1:5"})
    ctr = node.container()
    node.create(pod, ctr)
    node.start(pod, ctr)
    cg = Ref.of(node.cg_root / ctr.id)
    held = _entries_of(cg.id)
    assert held.get("dev_rules") and held.get("net_prios"), held
    node.procs[-1].kill()  # the container exits; runc delete removes its cgroup
    node.procs[-1].wait()
    _rmdir(node.cg_root / ctr.id)
    node.remove(pod, ctr)  # answered at once; the janitor walks the maps
    deadline = time.monotonic() + WAIT
    while _entries_of(cg.id) or ("purge", True) not in node.seen:
        assert time.monotonic() < deadline, (_entries_of(cg.id), node.seen)
        time.sleep(0.01)


def _rmdir(d: Path) -> None:
    deadline = time.monotonic() + WAIT
    while True:
        try:
            d.rmdir()
            return
        except OSError:
            assert time.monotonic() < deadline, f"cannot remove {d}"
            time.sleep(0.01)


def test_synchronize_covers_running_containers_and_keeps_what_is_there(node: Node) -> None:
    pod = _pod(**{CLASSID: "1:11", DEVICES: "deny c 1:5"})
    plain = node.container("plain", runtime="sleep")
    late = node.container("late", runtime="sleep")  # started while no plugin was there
    for c in (plain, late):
        c.state = api.ContainerState.CONTAINER_RUNNING
    plain_pod = _pod()
    plain_pod.id = plain.pod_sandbox_id = "pod0"
    node.synchronize([pod, plain_pod], [plain, late])
    cg = Ref.of(node.cg_root / late.id)
    assert net.read_state(cg).classid == 0x10011
    (mine,) = [o for o in devices.read_state(cg).owners if o.owner == "nri"]
    assert mine.rules == (r("deny c 1:5 rwm"),)  # no mirror: the process is the workload's
    assert probe(node.cg_root / late.id, [("c", 1, 5, "r"), ("c", 1, 3, "r")]) == [False, True]
    assert not net.read_state(Ref.of(node.cg_root / plain.id)).attached
    node.synchronize([pod], [late])  # an agent or runtime restart: what is there stays
    (again,) = [o for o in devices.read_state(cg).owners if o.owner == "nri"]
    assert again.generation == mine.generation
    # a runtime update that took our program away: PostUpdateContainer puts it back
    devices.detach_devices(cg, owner="nri")
    node.event(nri_pb2.POST_UPDATE_CONTAINER, pod, late)
    assert [o.owner for o in devices.read_state(cg).owners] == ["nri"]
    assert ("synchronize", True) in node.seen and ("post_update_container", True) in node.seen


def test_a_namespace_gets_its_quota_of_rule_map_entries(node: Node) -> None:
    rules = "deny c 1:5; deny c 1:7"
    one = program.prepare(request.own_rules(request.parse({DEVICES: rules}, "x").rules))
    policy = parse_policy(
        POLICY + f"entries_per_namespace = {2 * one.n_entries - 1}\n", "quota.toml"
    )
    node.plugin._policy = lambda: policy
    pod = _pod("team-b", **{DEVICES: rules})
    first, second = node.container(runtime="sleep"), node.container(runtime="sleep")
    node.start(pod, first)
    with pytest.raises(TtrpcError, match="entries_per_namespace"):
        node.start(pod, second)
    assert devices.read_state(Ref.of(node.cg_root / second.id)).owners == ()
    node.remove(pod, first)  # its entries are given back
    node.start(pod, second)


# ---------------------------------------------------------------- in the agent


def test_the_agent_is_the_plugin_and_reports_each_events_latency(tmp_path: Path) -> None:
    from tests.agentlib import AGENT, AgentProc, short_tmp

    with short_tmp() as d:
        runtime = FakeRuntime(str(d / "nri.sock"))
        agent = AgentProc(d, "--nri", "--nri-socket", runtime.path).start()
        try:
            conn = runtime.accept()
            reg, _ = conn.register_and_configure()
            assert (reg.plugin_name, reg.plugin_idx) == ("pelagos-bpf", "10")
            conn.call("Synchronize", api.SynchronizeRequest(), api.SynchronizeResponse)
            ctr = api.Container(id="c1", pod_sandbox_id="pod1", name="main")
            bad = api.CreateContainerRequest(pod=_pod(**{CLASSID: "1:1:1"}), container=ctr)
            with pytest.raises(TtrpcError, match=f"{CLASSID}='1:1:1'"):
                conn.call("CreateContainer", bad, api.CreateContainerResponse)
            good = api.CreateContainerRequest(pod=_pod(), container=ctr)
            conn.call("CreateContainer", good, api.CreateContainerResponse)
            st = agent.client().status()
            assert st["nri"] == {
                "plugin": "10-pelagos-bpf",
                "socket": runtime.path,
                "launched": False,
                "registered": True,
            }
            assert st["requests"]["nri_create_container"]["count"] == 2
            assert st["requests"]["nri_create_container"]["failed"] == 1
            assert st["requests"]["nri_synchronize"]["p99_ms"] is not None
            shown = subprocess.run(
                [*AGENT, "--socket", str(agent.sock), "status"],
                capture_output=True,
                text=True,
                timeout=120,
                check=True,
            ).stdout
            assert f"nri:        plugin 10-pelagos-bpf on {runtime.path}: registered\n" in shown
            text = agent.client().metrics()
            assert 'pelagos_bpf_agent_nri_registered{plugin="10-pelagos-bpf"} 1' in text
            assert 'requests_total{op="nri_create_container",result="failed"} 1' in text
            assert agent.stop() == 0
            assert conn.closed.wait(WAIT)  # the runtime sees the plugin go
        finally:
            if agent.proc is not None and agent.proc.poll() is None:
                agent.kill()
            runtime.close()


def test_launched_by_nri_the_agent_serves_nri_only_and_exits_with_its_connection() -> None:
    import socket

    from tests.agentlib import AGENT, open_policy, short_tmp

    theirs, ours = socket.socketpair()
    with short_tmp() as d:
        env = {
            **os.environ,
            "NRI_PLUGIN_SOCKET": str(ours.fileno()),
            "NRI_PLUGIN_NAME": "pelagos-bpf",
            "NRI_PLUGIN_IDX": "42",
            "PELAGOS_BPF_AGENT_SOCKET": str(d / "agent.sock"),
            "PELAGOS_BPF_POLICY": str(open_policy(d)),
        }
        with open(d / "log", "wb") as log:
            proc = subprocess.Popen(
                [*AGENT, "--nri"], env=env, pass_fds=(ours.fileno(),), stdout=log, stderr=log
            )
        ours.close()
        conn = RuntimeConn(theirs)
        try:
            reg, _ = conn.register_and_configure()
            assert (reg.plugin_name, reg.plugin_idx) == ("pelagos-bpf", "42")
            conn.call("Synchronize", api.SynchronizeRequest(), api.SynchronizeResponse)
            assert not (d / "agent.sock").exists()  # NRI only
            conn.close()  # the runtime goes away: a launched plugin exits (NRI relaunches it)
            assert proc.wait(120) == 0, (d / "log").read_text()
        finally:
            conn.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_the_shipped_unit_drop_in_and_daemonset_run_the_plugin() -> None:
    """What contrib/ starts parses as `agent --nri` with the defaults docs/NRI.md names."""
    import configparser
    import shlex

    from pelagos_bpf.cli import build_parser

    root = Path(__file__).resolve().parents[1]
    cp = configparser.ConfigParser(strict=False, interpolation=None)
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read_string((root / "contrib/systemd/pelagos-bpf-agent.service.d/nri.conf").read_text())
    argv = shlex.split(cp["Service"]["ExecStart"])  # the last ExecStart= (the first resets)
    assert argv[0] == "/usr/local/bin/pelagos-bpf"
    daemonset = (root / "contrib/kubernetes/pelagos-bpf-nri.yaml").read_text()
    line = next(ln for ln in daemonset.splitlines() if ln.strip().startswith("command:"))
    ds_argv = [a.strip(' "') for a in line.split("[", 1)[1].rstrip("]").split(",")]
    assert ds_argv[0] == "pelagos-bpf"
    for args in (argv[1:], ds_argv[1:]):
        ns = build_parser(args).parse_args(args)
        assert (ns.nri, ns.nri_socket, ns.nri_index) == (True, "/var/run/nri/nri.sock", "10")
