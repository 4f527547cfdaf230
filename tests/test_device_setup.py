"""Device rules wired through setup_cgroup / read_stats / update_cgroup / teardown_cgroup."""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path

import pytest
from device_helpers import probe

from pelagos_bpf import bpfsys
from pelagos_bpf.bpfsys import AttachType
from pelagos_bpf.cgroup import setup_cgroup, teardown_cgroup, update_cgroup
from pelagos_bpf.config import CgroupConfig
from pelagos_bpf.config import CgroupDeviceRule as R
from pelagos_bpf.devices import DEFAULT_DEVICE_RULES, program
from pelagos_bpf.devices import encode as enc
from pelagos_bpf.stats import read_stats

pytestmark = pytest.mark.root

RULES = [*DEFAULT_DEVICE_RULES, R(True, "c", 240, 1, "r"), R(False, "c", 1, 9, "w")]


def _prog_count(path: Path) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return len(bpfsys.prog_query(fd, AttachType.CGROUP_DEVICE))
    finally:
        os.close(fd)


def _sleeper() -> int:
    pid = os.fork()
    if pid == 0:
        signal.pause()
        os._exit(0)
    return pid


def test_setup_cgroup_enforces_device_rules(cg_root: Path) -> None:
    pid = _sleeper()
    rel = f"{cg_root.name}/ctr"
    cg = setup_cgroup(CgroupConfig(device_rules=RULES, path=rel), pid, root=cg_root.parent)
    try:
        assert "device_rules" in cg.report.applied
        assert _prog_count(cg.path) == 1
        assert str(pid) in (cg.path / "cgroup.procs").read_text().split()
        probes = [("c", 240, 0, "r"), ("c", 240, 1, "r"), ("c", 1, 9, "w"), ("c", 1, 3, "rw")]
        assert probe(cg.path, probes) == [False, True, False, True]
        assert read_stats(cg).device_denials == {"c 240:0 r": 1, "c 1:9 w": 1}
        update_cgroup(cg, CgroupConfig(device_rules=[*RULES, R(True, "c", 240, 0, "r")]))
        assert _prog_count(cg.path) == 1
        assert probe(cg.path, probes[:1]) == [True]
    finally:
        teardown_cgroup(cg)
        os.waitpid(pid, 0)
    assert not cg.path.exists()


def test_setup_failure_rolls_back_devices(cg_root: Path) -> None:
    rel = f"{cg_root.name}/ctr"
    rules_fd = program.FEATURE.loaded().maps["dev_rules"]
    before = len(bpfsys.map_keys(rules_fd, enc.RULE_KEY.size))
    with pytest.raises(OSError) as ei:
        # pid 2**22 + 1 does not exist (above pid_max): the final cgroup.procs write fails
        # after attach_devices, so the rollback must detach and remove everything.
        setup_cgroup(CgroupConfig(device_rules=RULES, path=rel), 2**22 + 1, root=cg_root.parent)
    assert ei.value.errno in (errno.ESRCH, errno.EINVAL)
    assert not (cg_root / "ctr").exists()
    assert len(bpfsys.map_keys(rules_fd, enc.RULE_KEY.size)) == before
