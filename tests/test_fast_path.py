"""setup's fresh-cgroup path and teardown by rmdir keep the fail-closed guarantees (root).

Fresh path: rule set written, attached, switched, through the new dir's fd; it falls back to
the general path when a program got attached between mkdir and the lock. Teardown: no
PROG_DETACH, the kernel frees the attachment at rmdir; the rule entries go after it.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cgtest import rel

from pelagos_bpf import (
    DEFAULT_DEVICE_RULES,
    CgroupConfig,
    bpfsys,
    devices,
    setup_cgroup,
    teardown_cgroup,
)
from pelagos_bpf.cgroup import Cgroup
from pelagos_bpf.config import CgroupDeviceRule as R
from pelagos_bpf.devices import program as devprog
from pelagos_bpf.net import program as netprog

pytestmark = [pytest.mark.root]


def rule_entries(cgroup_id: int) -> int:
    own = devprog.FEATURE.loaded()
    fd = own.maps["dev_rules"]
    return sum(int.from_bytes(k[:8], "little") == cgroup_id for k in bpfsys.map_keys(fd, 24))


def test_fresh_setup_installs_generation_one_and_teardown_drops_entries(cg_root: Path) -> None:
    cfg = CgroupConfig(device_rules=list(DEFAULT_DEVICE_RULES), path=rel(cg_root, "fresh"))
    cg = setup_cgroup(cfg, None)
    st = devices.read_state(cg)
    rt = st.owner("runtime")
    assert rt is not None and [o.owner for o in st.owners] == ["runtime"]
    assert (st.attached, st.installed, rt.generation, rt.trusted) == (True, True, 1, True)
    n = rule_entries(cg.id)
    assert n == len(devprog.prepare(list(DEFAULT_DEVICE_RULES)).template)
    calls: list[str] = []
    real = bpfsys.prog_detach
    try:
        bpfsys.prog_detach = lambda *a: calls.append("detach") or real(*a)  # type: ignore
        teardown_cgroup(cg)
    finally:
        bpfsys.prog_detach = real  # type: ignore
    assert not cg.path.exists()
    assert calls == []  # rmdir freed the attachment
    assert rule_entries(cg.id) == 0


def test_fresh_setup_falls_back_when_a_program_is_already_attached(
    cg_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A writer that got in between our mkdir and our lock: the general path updates (gen 2)."""
    real_lock = devprog.flock_until
    target = cg_root / "raced"
    raced: list[bool] = []

    def racing_lock(fd: int, what: str, **kw: str) -> None:
        if not raced:
            raced.append(True)
            devices.attach_devices(Cgroup.open(target), [R(False, "a")])  # the other writer
        real_lock(fd, what, **kw)

    monkeypatch.setattr(devprog, "flock_until", racing_lock)
    cg = setup_cgroup(
        CgroupConfig(device_rules=list(DEFAULT_DEVICE_RULES), path=rel(cg_root, "raced")), None
    )
    monkeypatch.undo()
    st = devices.read_state(cg)
    rt = st.owner("runtime")
    assert rt is not None and [o.owner for o in st.owners] == ["runtime"]
    assert (st.installed, rt.generation, st.legacy_program_ids) == (True, 2, ())
    assert any(r.allow for r in rt.rules)  # DEFAULT_DEVICE_RULES, not the racer's deny-all
    teardown_cgroup(cg)
    assert rule_entries(cg.id) == 0


def test_teardown_of_an_opened_handle_still_detaches(cg_root: Path) -> None:
    """A handle this process did not set up takes the general path (find, detach, delete)."""
    cg = setup_cgroup(
        CgroupConfig(device_rules=list(DEFAULT_DEVICE_RULES), path=rel(cg_root, "opened")), None
    )
    other = Cgroup.open(cg.path)
    assert other.features is None
    teardown_cgroup(other)
    assert not cg.path.exists() and rule_entries(cg.id) == 0


def test_failed_rmdir_keeps_rules_in_force(cg_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Entries go only after a successful rmdir: a busy cgroup keeps enforcing its rules."""
    cg = setup_cgroup(
        CgroupConfig(device_rules=list(DEFAULT_DEVICE_RULES), path=rel(cg_root, "busy")), None
    )
    real_rmdir = os.rmdir

    def refuse(p: object, *a: object, **k: object) -> None:
        if os.fspath(p) == os.fspath(cg.path):  # type: ignore[arg-type]
            raise OSError(16, "Device or resource busy")
        real_rmdir(p, *a, **k)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "rmdir", refuse)
    with pytest.raises(Exception, match="busy"):
        teardown_cgroup(cg)
    monkeypatch.undo()
    st = devices.read_state(cg)
    assert (st.attached, st.installed) == (True, True)
    assert rule_entries(cg.id) > 0
    teardown_cgroup(cg)
    assert rule_entries(cg.id) == 0


def test_net_priorities_are_dropped_after_rmdir(cg_root: Path) -> None:
    cfg = CgroupConfig(
        net_classid=0x10010, net_priorities=[("lo", 5)], net_carrier="mark", path=rel(cg_root, "n")
    )
    cg = setup_cgroup(cfg, None)
    own = netprog.FEATURE.loaded()
    key = netprog.removal_key(cg)
    assert key == cg.id
    fd = own.maps["net_prios"]
    assert any(int.from_bytes(k[:8], "little") == cg.id for k in bpfsys.map_keys(fd, 16))
    teardown_cgroup(cg)
    assert not any(int.from_bytes(k[:8], "little") == cg.id for k in bpfsys.map_keys(fd, 16))


def test_rule_map_size_is_a_node_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from pelagos_bpf.devices import layout
    from pelagos_bpf.errors import BpfError

    spec = layout.LAYER.map("dev_rules")
    monkeypatch.delenv(layout.RULES_ENV, raising=False)
    assert spec.entries() == layout.RULES_MAX == 262144
    monkeypatch.setenv(layout.RULES_ENV, "1000000")
    assert spec.entries() == 1_000_000
    for bad in ("0", "-5", "lots"):
        monkeypatch.setenv(layout.RULES_ENV, bad)
        with pytest.raises(BpfError, match=layout.RULES_ENV):
            spec.entries()
