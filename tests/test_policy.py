"""The admin policy (issue 23, finding 2): the file format, what it allows, where it may live.

Pure except the trust checks (root: files chowned to nobody) and `pelagos-bpf policy check`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pelagos_bpf import policy
from pelagos_bpf.devices.rules import CgroupDeviceRule as R
from pelagos_bpf.policy import Claim, PolicyError, PolicyFileError

DOC = Path(__file__).parents[1] / "docs" / "OCI_HOOK.md"
POLICY = """
version = 1
[default]
classids = ["1:10", "1:20-1:2f", "2:*"]
priorities = [5, "0-3"]
[namespaces.batch]
classids = ["1:30"]
device_grants = true
priority_classids = true
rules_per_set = 2
entries_per_namespace = 100
"""


def refused(pol: policy.Policy, ns: str | None, claim: Claim) -> PolicyError:
    with pytest.raises(PolicyError) as e:
        pol.check(ns, claim)
    return e.value


def test_builtin_default_is_closed_for_claims_and_open_for_restrictions() -> None:
    pol = policy.builtin("/etc/pelagos-bpf/policy.toml")
    e = refused(pol, None, Claim(classid=0x10010, classid_setting="io.pelagos-bpf.net.classid"))
    assert e.setting == "io.pelagos-bpf.net.classid" and e.rule.endswith(": classids")
    assert "built-in default (no /etc/pelagos-bpf/policy.toml)" in str(e)
    assert refused(pol, "tenant", Claim(priorities=(("eth0", 1),))).rule.endswith("priorities")
    assert "device_grants" in refused(pol, None, Claim(device_rules=(R(True, "c", 1, 11),))).rule
    pol.check("tenant", Claim(device_rules=(R(False, "c", 1, 5), R(False, "a"))))
    pol.check(None, Claim())  # the audit alone
    pol.check(None, Claim(classid=0))  # "no class" claims nothing
    e = refused(pol, None, Claim(device_rules=(R(False, "c", 1, 5),) * 65))
    assert "65 rules: more than the 64" in str(e)


def test_classids_priorities_and_inheritance() -> None:
    pol = policy.parse(POLICY, "/etc/p.toml")
    for ok in (0x10010, 0x10020, 0x1002F, 0x20000, 0x2FFFF):
        pol.check(None, Claim(classid=ok))
    for bad in (0x10011, 0x10030, 0x30001):
        e = refused(pol, None, Claim(classid=bad))
        assert e.rule == "/etc/p.toml: default.classids"
        assert "allowed: 1:10, 1:20-1:2f, 2:*" in str(e)
    pol.check("batch", Claim(classid=0x10030))  # its own list replaces the default's
    assert refused(pol, "batch", Claim(classid=0x10010)).rule.endswith("namespaces.batch.classids")
    pol.check("batch", Claim(priorities=(("eth0", 5), ("lo", 2))))  # inherited from [default]
    assert refused(pol, "batch", Claim(priorities=(("eth0", 4),))).rule.endswith(
        "default.priorities"
    )
    pol.check("other", Claim(classid=0x10010))  # a namespace not listed: [default]


def test_priorities_above_0xffff_select_a_class_and_need_both_keys() -> None:
    pol = policy.parse(POLICY, "p")
    e = refused(pol, None, Claim(priorities=(("eth0", 65536),)))
    assert e.rule.endswith("priority_classids") and "HTB class 1:0" in str(e)
    pol.check("batch", Claim(priorities=(("eth0", 0x10030),)))  # allowed, and class 1:30 is
    e = refused(pol, "batch", Claim(priorities=(("eth0", 0x10031),)))
    assert e.rule.endswith("namespaces.batch.classids")


def test_device_grants_quota_and_entries() -> None:
    pol = policy.parse(POLICY, "p")
    pol.check("batch", Claim(device_rules=(R(True, "c", 1, 11), R(False, "c", 1, 5))))
    e = refused(pol, "batch", Claim(device_rules=(R(False, "c", 1, 5),) * 3))
    assert e.rule.endswith("namespaces.batch.rules_per_set")
    pol.check_entries("batch", 60, 40)
    with pytest.raises(PolicyError, match=r"41 rule-map entries on top of the 60 in use") as e:
        pol.check_entries("batch", 60, 41, "io.pelagos-bpf.devices")
    assert e.value.rule.endswith("namespaces.batch.entries_per_namespace")
    pol.check_entries(None, 16000, 384)  # the built-in 16384 for the rest


@pytest.mark.parametrize(
    "text, key",
    [
        ("x = 1", "x"),
        ("version = 2", "version"),
        ("version = true", "version"),
        ("[default]\nclassid = []", "default.classid"),
        ('[default]\nclassids = "1:10"', "default.classids"),
        ('[default]\nclassids = ["1:10001"]', "default.classids"),
        ('[default]\nclassids = ["\uff11:10"]', "default.classids"),
        ('[default]\nclassids = ["1:20-1:10"]', "default.classids"),
        ("[default]\nclassids = [65552]", "default.classids"),
        ('[default]\npriorities = ["70000"]', "default.priorities"),
        ('[default]\npriorities = ["+5"]', "default.priorities"),
        ("[default]\npriorities = [-1]", "default.priorities"),
        ('[default]\ndevice_grants = "yes"', "default.device_grants"),
        ("[default]\nrules_per_set = -1", "default.rules_per_set"),
        ("[default]\nentries_per_namespace = true", "default.entries_per_namespace"),
        ("[namespaces.Kube_System]", "namespaces.Kube_System"),
        ("[namespaces.batch]\ncolour = 1", "namespaces.batch.colour"),
        ("namespaces = 1", "namespaces"),
        ("default = 1", "default"),
    ],
)
def test_bad_files_name_the_key(text: str, key: str) -> None:
    with pytest.raises(PolicyFileError) as e:
        policy.parse(text, "/p.toml")
    assert e.value.key == key, e.value
    assert str(e.value).startswith(f"policy /p.toml: {key}: ")


def test_unparsable_files() -> None:
    for raw, why in ((b"[[[", "not valid TOML"), (b"\xff = 1", "not UTF-8")):
        with pytest.raises(PolicyFileError, match=why):
            policy.parse(raw, "p")
    with pytest.raises(PolicyFileError):
        policy.parse("a = " + "[" * 5000 + "]" * 5000, "p")  # deep: an error, not a crash


def test_the_documented_example_is_valid() -> None:
    """docs/OCI_HOOK.md's example policy parses and means what the text around it says."""
    block = re.search(r"```toml\n(.*?)```", DOC.read_text(), re.S)
    assert block, "docs/OCI_HOOK.md has no ```toml example"
    pol = policy.parse(block[1], "doc")
    pol.check("batch", Claim(classid=0x10020))
    refused(pol, None, Claim(classid=0x10020))
    refused(pol, "batch", Claim(device_rules=(R(True, "c", 1, 11),)))
    pol.check("gpu", Claim(device_rules=(R(True, "c", 195, -1),)))


# ---------------------------------------------------------------- where it may live


@pytest.fixture
def etc(tmp_path: Path) -> Path:
    d = tmp_path / "etc"
    d.mkdir(mode=0o755)
    d.chmod(0o755)
    return d


def test_no_file_means_the_builtin_default(etc: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(policy.POLICY_ENV, str(etc / "policy.toml"))
    assert policy.load().default == policy.BUILTIN
    assert policy.load(str(etc / "absent" / "policy.toml")).source.startswith("built-in")


@pytest.mark.root
def test_only_a_file_root_alone_can_write_is_read(etc: Path) -> None:
    f = etc / "policy.toml"
    f.write_text(POLICY)
    f.chmod(0o644)
    assert policy.load(str(f)).namespaces["batch"].device_grants
    f.chmod(0o664)
    with pytest.raises(PolicyFileError, match="group/world-writable"):
        policy.load(str(f))
    f.chmod(0o644)
    os.chown(f, 65534, 65534)
    with pytest.raises(PolicyFileError, match="owned by uid 65534"):
        policy.load(str(f))
    os.chown(f, 0, 0)
    etc.chmod(0o777)
    with pytest.raises(PolicyFileError, match="untrusted policy directory"):
        policy.load(str(f))
    etc.chmod(0o755)
    link = etc / "link.toml"
    link.symlink_to(f)
    with pytest.raises(PolicyFileError, match="symlink"):
        policy.load(str(link))


def test_policy_check_command(etc: Path) -> None:
    good = etc / "good.toml"
    good.write_text(POLICY)
    good.chmod(0o644)
    bad = etc / "bad.toml"
    bad.write_text('[default]\nclassids = ["1:10001"]\n')
    bad.chmod(0o644)
    cli = [sys.executable, "-m", "pelagos_bpf.cli", "policy", "check"]
    r = subprocess.run([*cli, str(good)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "valid" in r.stdout and "namespace batch: classids 1:30" in r.stdout
    r = subprocess.run([*cli, str(bad)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "default.classids" in r.stderr and "0xffff" in r.stderr
    r = subprocess.run([*cli, str(etc / "none.toml")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "No such file" in r.stderr
