"""The systemd driver's cgroupsPath form: parsed like runc, refused clearly without systemd."""

from __future__ import annotations

import pytest

from pelagos_bpf import systemd
from pelagos_bpf.errors import ConfigError


def test_runc_forms() -> None:
    p = systemd.parse("system.slice:docker:abc")
    assert (p.slice, p.unit, p.cgroup_path) == (
        "system.slice",
        "docker-abc.scope",
        "system.slice/docker-abc.scope",
    )
    p = systemd.parse(":libpod:c1")  # empty slice: system.slice
    assert p.cgroup_path == "system.slice/libpod-c1.scope"
    p = systemd.parse("kubepods-burstable.slice:cri-containerd:0a1b")
    assert p.cgroup_path == "kubepods.slice/kubepods-burstable.slice/cri-containerd-0a1b.scope"
    assert systemd.parse("user.slice::x").unit == "x.scope"
    assert systemd.parse("system.slice::my.slice").unit == "my.slice"


def test_form_detection_and_bad_slices() -> None:
    assert systemd.is_systemd_form("system.slice:docker:abc")
    assert not systemd.is_systemd_form("a/b:c:d")
    assert not systemd.is_systemd_form("plain/path")
    assert systemd.expand_slice("-.slice") == "/"
    for bad in ("system", "a--b.slice", "-a.slice", "a-.slice"):
        with pytest.raises(ConfigError):
            systemd.expand_slice(bad)
    with pytest.raises(ConfigError, match="name part"):
        systemd.parse("system.slice:docker:")


def test_resolve_is_pure() -> None:
    """Validation parses the form and applies systemd's name rules; reaching systemd is the
    driver's question at setup (tests/test_systemd_setup.py)."""
    assert systemd.resolve("system.slice:docker:abc").cgroup_path == "system.slice/docker-abc.scope"
    with pytest.raises(ConfigError):
        systemd.resolve("system.slice:docker:a b")
