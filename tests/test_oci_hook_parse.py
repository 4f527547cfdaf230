"""Pure parts of the OCI hook: state, annotations, request building, cgroup path mapping."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pelagos_bpf.config import CgroupDeviceRule
from pelagos_bpf.errors import ConfigError, UnsupportedSettings
from pelagos_bpf.ocihook import records
from pelagos_bpf.ocihook.locate import cgroup2_mounts, map_to_mount, v2_path
from pelagos_bpf.ocihook.request import (
    A_AUDIT,
    A_CLASSID,
    A_DEVICES,
    A_PRIOS,
    HookError,
    build_request,
    parse_classid,
    parse_device_rules,
    parse_priorities,
    parse_state,
    stage_of,
)

STATE = {"ociVersion": "1.0.2", "id": "c1", "status": "creating", "pid": 42, "bundle": "/b"}


def test_classid_forms() -> None:
    assert parse_classid("1:10") == 0x10010
    assert parse_classid("ffee:1") == 0xFFEE0001
    assert parse_classid("65552") == 0x10010
    assert parse_classid("0x10010") == 0x10010
    for bad in (
        "",
        "1:",
        "x:1",
        "1:10:2",
        "ten",
        "1:10001",
        "\uff11:\uff11\uff10",
        "+1:10",
        "1:1_0",
    ):
        with pytest.raises(ConfigError, match=re.escape("net.classid")):
            parse_classid(bad)


def test_priorities_forms() -> None:
    assert parse_priorities("eth0=5,eth1=2") == [("eth0", 5), ("eth1", 2)]
    assert parse_priorities(" eth0 = 5 ; lo=0 ") == [("eth0", 5), ("lo", 0)]
    for bad in (
        "eth0",
        "eth0=-1",
        "=3",
        "eth0=x",
        ",;",
        "eth0=\u00b2",
        "eth0=+5",
        "eth0=\uff15",
        "eth0=1_0",
    ):
        with pytest.raises(ConfigError, match=re.escape("net.priorities")):
            parse_priorities(bad)


def test_device_rules_grammar() -> None:
    assert parse_device_rules("deny c 1:5; allow b 8:* r") == [
        CgroupDeviceRule(False, "c", 1, 5, "rwm"),
        CgroupDeviceRule(True, "b", 8, -1, "r"),
    ]
    assert parse_device_rules("deny c 1:3 w,deny c 1:5") == [
        CgroupDeviceRule(False, "c", 1, 3, "w"),
        CgroupDeviceRule(False, "c", 1, 5, "rwm"),
    ]
    bad_rules = ("allow q 1:2", "deny c 1", "deny c x:1", "permit c 1:3", "deny c 1:3 z", ";")
    for bad in (*bad_rules, "allow c \uff11:\uff11\uff11", "deny c +1:5", "deny c 1:5\u2003r"):
        with pytest.raises(ConfigError, match=re.escape("io.pelagos-bpf.devices")):
            parse_device_rules(bad)


def test_state_checks() -> None:
    s = parse_state({**STATE, "annotations": {"a": "b"}})
    assert (s.id, s.pid, s.bundle, s.annotations) == ("c1", 42, "/b", {"a": "b"})
    assert parse_state({**STATE, "pid": 0}).pid is None  # poststop states may carry pid 0
    for bad, field in (
        ([], "JSON object"),
        ({**STATE, "id": ""}, "state.id"),
        ({**STATE, "pid": "42"}, "state.pid"),
        ({**STATE, "bundle": None}, "state.bundle"),
        ({**STATE, "annotations": {"a": 1}}, "annotations"),
    ):
        with pytest.raises(HookError, match=field):
            parse_state(bad)


def test_stage_from_status() -> None:
    assert stage_of(parse_state(STATE), "auto") == "create"
    assert stage_of(parse_state({**STATE, "status": "stopped"}), "auto") == "poststop"
    assert stage_of(parse_state({**STATE, "status": "paused"}), "poststop") == "poststop"
    with pytest.raises(HookError, match="paused"):
        stage_of(parse_state({**STATE, "status": "paused"}), "auto")


def test_request_from_config_and_annotations() -> None:
    cfg = {"linux": {"resources": {"network": {"classID": 0x10020}}}}
    assert build_request({}, cfg).classid == 0x10020
    req = build_request({A_CLASSID: "1:10", "io.pelagos-bpf.nett": "x"}, cfg)
    assert req.classid == 0x10010
    assert any("overrides" in w for w in req.warnings)
    assert any("io.pelagos-bpf.nett" in w for w in req.warnings)
    assert not req.wants_devices
    assert build_request({"other": "x"}, {}).empty


def test_request_devices_and_audit_flags() -> None:
    req = build_request({A_DEVICES: "deny c 1:5"}, {})
    assert req.extra_device_rules == [CgroupDeviceRule(False, "c", 1, 5, "rwm")]
    assert req.runtime_device_rules == []  # the caller fills the mirror (mirror.py)
    assert req.claim is not None
    assert req.claim.device_rules == (CgroupDeviceRule(False, "c", 1, 5, "rwm"),)
    assert build_request({A_AUDIT: "true"}, {}).wants_devices
    claim = build_request({A_AUDIT: "true"}, {}).claim  # the audit alone: an empty claim
    assert claim is not None and claim.empty
    assert not build_request({A_AUDIT: "false"}, {}).wants_devices
    with pytest.raises(ConfigError, match=re.escape("devices.audit")):
        build_request({A_AUDIT: "maybe"}, {})


def test_claim_holds_only_what_annotations_ask() -> None:
    """config.json's network field is the runtime's (not pod input): not in the claim."""
    cfg = {"linux": {"resources": {"network": {"classID": 0x10020}}}}
    req = build_request({}, cfg)
    assert req.classid == 0x10020 and req.claim is None
    req = build_request({A_CLASSID: "1:10", A_PRIOS: "eth0=5"}, cfg)
    assert req.claim is not None
    assert (req.claim.classid, req.claim.priorities) == (0x10010, (("eth0", 5),))
    assert req.claim.classid_setting == A_CLASSID


def test_request_rejects_bad_values_before_anything() -> None:
    with pytest.raises(ConfigError, match="net_classid"):
        build_request({A_CLASSID: "1:0"}, {})  # minor 0 names the qdisc, not a class
    with pytest.raises(ConfigError, match="net_priorities"):
        build_request({A_PRIOS: "eth0=1,eth0=2"}, {})
    with pytest.raises(UnsupportedSettings, match=re.escape("linux.resources.network.bogus")):
        build_request({}, {"linux": {"resources": {"network": {"bogus": 1}}}})


def test_v2_path_and_mount_mapping() -> None:
    assert v2_path("12:pids:/x\n0::/a/b\n") == "/a/b"
    with pytest.raises(HookError, match="no '0::'"):
        v2_path("12:pids:/x\n")
    mi = (
        "30 25 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw\n"
        "40 25 0:26 /kube/pod1 /mnt/pod\\040cg rw - cgroup2 cgroup2 rw\n"
        "41 25 0:27 / /sys/fs/cgroup/pids rw - cgroup cgroup rw,pids\n"
    )
    mounts = cgroup2_mounts(mi)
    assert mounts == [
        ("/", "/sys/fs/cgroup", os.makedev(0, 26)),
        ("/kube/pod1", "/mnt/pod cg", os.makedev(0, 26)),
    ]
    assert map_to_mount("/a/b", mounts) == "/sys/fs/cgroup/a/b"
    assert map_to_mount("/kube/pod1/c", mounts) == "/mnt/pod cg/c"  # longest root wins
    assert map_to_mount("/kube/pod1", mounts) == "/mnt/pod cg"
    assert map_to_mount("/kube/pod10", mounts) == "/sys/fs/cgroup/kube/pod10"
    assert map_to_mount("/a", [("/", "/", 1)]) == "/a"
    with pytest.raises(HookError, match="outside this process's cgroup namespace"):
        map_to_mount("/../other/c", mounts)
    with pytest.raises(HookError, match="no cgroup2 mount"):
        map_to_mount("/a", [("/kube", "/m", 1)])


def test_a_record_round_trips_every_field() -> None:
    rec = records.Record("c1", "/sys/fs/cgroup/x", 77, "team-a", 5)
    assert records.Record.from_json(rec.to_json(), "here") == rec
    assert set(json.loads(rec.to_json())) == {f.name for f in dataclasses.fields(rec)}


def test_record_names(tmp_path: Path) -> None:
    assert records.record_path("abc-1.x", tmp_path) == tmp_path / "abc-1.x.json"
    for odd in ("../etc/x", ".hidden", "a/b"):
        p = records.record_path(odd, tmp_path)
        assert p.parent == tmp_path and p.name.startswith("sha256-")


# What the hook loads only to attach or detach something (the BPF runtime), or for odd ids.
HEAVY = {"pelagos_bpf.bpfsys", "pelagos_bpf.cgroup", "pelagos_bpf.feature"}
HEAVY |= {"pelagos_bpf.devices.program", "pelagos_bpf.net.program", "hashlib"}  # hashlib: OpenSSL
HEAVY |= {"pelagos_bpf.policy", "tomllib"}  # only a request from annotations needs the policy
NOTHING_TO_DO = r"""
import io, json, sys
from pelagos_bpf.cli import main
codes = []
for text in sys.argv[1:]:
    sys.stdin = io.TextIOWrapper(io.BytesIO(text.encode()))
    codes.append(main(["oci-hook"]))
print(json.dumps({"codes": codes, "loaded": sorted(sys.modules)}))
"""


def test_hook_paths_with_nothing_to_attach_never_load_the_library(tmp_path: Path) -> None:
    """A container that asks nothing, and a poststop after the runtime removed the cgroup (the
    usual case), exit 0 without importing the BPF runtime: half the exec time here."""
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"ociVersion": "1.0.2", "linux": {}}))
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    gone = tmp_path / "gone-cgroup"
    record = record_dir / "c1.json"
    record.write_text(json.dumps({"id": "c1", "cgroup": str(gone), "cgroup_id": 7}))
    asks_nothing = {**STATE, "bundle": str(bundle), "annotations": {"other": "x"}}
    stopped = {**STATE, "status": "stopped", "bundle": str(bundle)}
    env = {**os.environ, records.STATE_DIR_ENV: str(record_dir)}
    out = subprocess.run(
        [sys.executable, "-c", NOTHING_TO_DO, json.dumps(asks_nothing), json.dumps(stopped)],
        capture_output=True,
        text=True,
        check=True,
        env=env,
        timeout=60,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["codes"] == [0, 0]
    assert "pelagos_bpf.ocihook.hook" in result["loaded"]  # it did run the hook
    assert HEAVY.isdisjoint(result["loaded"])
    assert not record.exists()  # poststop did its work: the record is gone


def test_runtime_names_and_processes(tmp_path: Path) -> None:
    from pelagos_bpf.ocihook import runtime

    for name, want in (
        ("/usr/sbin/runc", "runc"),
        ("/usr/bin/crun", "crun"),
        ("/usr/local/bin/runc.amd64", "runc"),
        ("/usr/bin/docker-runc", "runc"),
        ("/usr/bin/crun (deleted)", "crun"),
        ("/usr/bin/runcx", None),
        ("/usr/bin/scrunch", None),
        ("/usr/bin/conmon", None),
    ):
        assert runtime.classify(name) == want, name
    proc = tmp_path / "proc"
    (proc / "10").mkdir(parents=True)
    (proc / "10" / "exe").symlink_to("/usr/sbin/runc")
    (proc / "11").mkdir()
    (proc / "11" / "stat").write_text("11 (a (b) c) S 10 11 1 0 -1 4194560 90 0 0 0\n")
    (proc / "12").mkdir()
    (proc / "12" / "comm").write_text("crun\n")  # exe unreadable: comm
    assert runtime.runtime_of_pid(10, proc) == "runc"
    assert runtime.runtime_of_parent(11, proc) == "runc"
    assert runtime.runtime_of_pid(12, proc) == "crun"
    assert runtime.runtime_of_pid(13, proc) is None
    assert runtime.detect({"PELAGOS_BPF_HOOK_RUNTIME": "crun"}) == (
        "crun",
        "PELAGOS_BPF_HOOK_RUNTIME=crun",
    )
    assert runtime.detect({"PELAGOS_BPF_HOOK_RUNTIME": "none"})[0] is None
    with pytest.raises(ConfigError, match="PELAGOS_BPF_HOOK_RUNTIME"):
        runtime.detect({"PELAGOS_BPF_HOOK_RUNTIME": "youki"})


def test_mirror_never_denies_what_crun_allows() -> None:
    """The crun copy allows every request crun's own program allows (random rule lists, the
    crun model of test_device_semantics)."""
    from device_helpers import PROBE_DEVICES, rules_st
    from hypothesis import given, settings
    from test_device_semantics import crun_allowed

    from pelagos_bpf.devices.rules import device_allowed
    from pelagos_bpf.ocihook.mirror import crun_copy, mirror

    def oci(r: CgroupDeviceRule) -> dict:
        d = {"allow": r.allow, "type": r.kind, "access": r.access}
        d.update({k: v for k, v in (("major", r.major), ("minor", r.minor)) if v != -1})
        return d

    @settings(max_examples=200, deadline=None, database=None)
    @given(rules=rules_st)
    def check(rules: list[CgroupDeviceRule]) -> None:
        copy, warning = mirror({"resources": {"devices": [oci(r) for r in rules]}}, "crun")
        assert not warning
        for kind, major, minor in (*PROBE_DEVICES, ("c", 242, 2), ("c", 5, 1)):
            for req in ("r", "w", "rw", "m"):
                if crun_allowed(rules, kind, major, minor, req):
                    assert device_allowed(copy, kind, major, minor, req), (rules, req, kind)

    check()
    assert crun_copy([CgroupDeviceRule(False, "c", 1, 3, "wm")]) == [
        CgroupDeviceRule(False, "c", 1, 3, "m")
    ]


def test_mirror_reads_runc_lists_as_cgroup_v1() -> None:
    """runc's copy decides every probe as the v1 kernel model does; a list it cannot express
    gets no copy and a warning, never a stricter one."""
    from pelagos_bpf.devices.rules import device_allowed
    from pelagos_bpf.devices.v1emulator import v1_allowed
    from pelagos_bpf.ocihook.mirror import mirror, oci_rules

    linux = {
        "resources": {
            "devices": [
                {"allow": False, "access": "rwm"},
                {"allow": True, "type": "c", "major": 240, "minor": 1, "access": "rw"},
                {"allow": False, "type": "c", "major": 240, "access": "rw"},
            ]
        },
        "devices": [{"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229}],
    }
    copy, warning = mirror(linux, "runc")
    assert not warning
    full = oci_rules(linux)
    for dev in (("c", 240, 1), ("c", 240, 2), ("c", 10, 229), ("c", 1, 3), ("c", 1, 11)):
        for req in ("r", "w", "rw", "m"):
            assert device_allowed(copy, *dev, req) is v1_allowed(full, *dev, req), (dev, req)
    split = {"resources": {"devices": [
        {"allow": False, "access": "rwm"},
        {"allow": True, "type": "c", "major": 240, "access": "r"},
        {"allow": True, "type": "c", "major": 240, "minor": 1, "access": "w"},
    ]}}  # fmt: skip
    copy, warning = mirror(split, "runc")
    assert copy == [] and "not mirrored" in warning
    copy, warning = mirror(linux, None)
    assert copy == [] and "not recognised" in warning
