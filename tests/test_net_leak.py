"""200 setup/teardown cycles leave no programs, maps, map entries or fds behind (root)."""

from __future__ import annotations

import os
import time

import pytest
from net_helpers import our_bpf_objects, require_root

from pelagos_bpf import CgroupConfig, bpfsys, net, setup_cgroup, teardown_cgroup
from pelagos_bpf.layers import STORAGE_KEY
from pelagos_bpf.net.layout import PRIO_KEY
from pelagos_bpf.net.program import FEATURE

pytestmark = [pytest.mark.root]
CYCLES = 200


def test_setup_teardown_cycles_do_not_leak(cg_root) -> None:
    require_root()
    # The per-process programs and maps are loaded once, before the baseline, on purpose:
    # they are shared by every cgroup and live as long as this process.
    sh = FEATURE.loaded()
    base_objects = our_bpf_objects()
    base_fds = len(os.listdir("/proc/self/fd"))
    for i in range(CYCLES):
        cfg = CgroupConfig(net_classid=0x10010, net_priorities=[("lo", 0x10020)], path=f"l{i}")
        cg = setup_cgroup(cfg, None, root=cg_root)
        assert len(net.read_config(cg).priorities) == 1  # entries exist while attached
        if i == 0:  # the kernel made config + counter storage for this cgroup at attach
            keys = set(bpfsys.map_keys(sh.maps["net_acct"], STORAGE_KEY.size))
            assert {STORAGE_KEY.pack(cg.id, 0), STORAGE_KEY.pack(cg.id, 1)} <= keys
        teardown_cgroup(cg)
        assert not cg.path.exists()
    assert our_bpf_objects() == base_objects
    assert len(os.listdir("/proc/self/fd")) == base_fds
    assert bpfsys.map_keys(sh.maps["net_prios"], PRIO_KEY.size) == []
    # Cgroup storage (config, counters) lives as long as the cgroup, whose release after rmdir
    # is asynchronous in the kernel: wait (bounded) until every one has been freed.
    deadline = time.monotonic() + 30
    left: list[bytes] = []
    while time.monotonic() < deadline:
        left = bpfsys.map_keys(sh.maps["net_cfg"], STORAGE_KEY.size)
        left += bpfsys.map_keys(sh.maps["net_acct"], STORAGE_KEY.size)
        if not left:
            break
        time.sleep(0.05)
    assert left == []
