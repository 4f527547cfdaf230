"""Each documented device-semantics case against the real kernel (root, host or guest).

setup_cgroup installs the rules in both modes; probes (open/mknod of real nodes from a process
inside the cgroup) must match our evaluator for "last-match" and the v1 kernel model for "v1".
The program is unchanged: "v1" only changes which last-match rules reach it.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from cgtest import rel
from device_helpers import grid, probe
from test_device_semantics import CASES

from pelagos_bpf import CgroupConfig, setup_cgroup, teardown_cgroup
from pelagos_bpf.devices import device_allowed
from pelagos_bpf.devices.v1emulator import v1_allowed
from pelagos_bpf.errors import ConfigError

pytestmark = pytest.mark.root


def _devices(case_probe) -> list[tuple[str, int, int]]:
    out = {case_probe[:3], ("c", 240, 0), ("c", 240, 1), ("b", 240, 1), ("c", 1, 9)}
    return sorted(out)


@pytest.mark.parametrize(
    ("rules", "case_probe", "v1_mode"),
    [(c[1], c[2], c[7]) for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_case_in_the_kernel(cg_root: Path, rules, case_probe, v1_mode: str) -> None:
    probes = grid(_devices(case_probe))
    last = setup_cgroup(CgroupConfig(device_rules=rules, path=rel(cg_root, "last")), None)
    try:
        got = probe(last.path, probes)
        assert got == [device_allowed(rules, *p) for p in probes]
    finally:
        teardown_cgroup(last)
    cfg = CgroupConfig(device_rules=rules, device_semantics="v1", path=rel(cg_root, "v1"))
    if v1_mode == "refused":
        with pytest.raises(ConfigError):
            setup_cgroup(cfg, None)
        assert not (cg_root / "v1").exists()  # refused before anything was created
        return
    v1 = setup_cgroup(cfg, None)
    try:
        got_v1 = probe(v1.path, probes)
        assert got_v1 == [v1_allowed(rules, *p) for p in probes]
    finally:
        teardown_cgroup(v1)
    i = probes.index(case_probe)
    # The case's own probe shows the documented difference (or agreement) in the kernel.
    assert got[i] is device_allowed(rules, *case_probe)
    assert got_v1[i] is v1_allowed(rules, *case_probe)
