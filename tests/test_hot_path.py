"""The container-start path never loads the compiler: bcc/LLVM stay out of the process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pelagos_bpf.devices.program as devprog
from pelagos_bpf import net
from pelagos_bpf.bpfsys import ProgType
from pelagos_bpf.progcache import bpf_source, get_program

CHILD = r"""
import json, os, sys
import pelagos_bpf
after_import = sorted(m for m in ("bcc", "pyroute2") if m in sys.modules)
from pelagos_bpf import (CgroupConfig, DEFAULT_DEVICE_RULES, CgroupDeviceRule,
    setup_cgroup, teardown_cgroup, read_stats)
cfg = CgroupConfig(
    device_rules=[*DEFAULT_DEVICE_RULES, CgroupDeviceRule(False, "c", 1, 7, "w")],
    net_classid=0x10010,
    path=sys.argv[1],
)
cg = setup_cgroup(cfg, None)
read_stats(cg)
teardown_cgroup(cg)
print(json.dumps({"after_import": after_import, "after_setup": "bcc" in sys.modules}))
"""


def test_import_and_setup_never_import_bcc(cg_root: Path) -> None:
    # Fill the bytecode cache first (what `pelagos-bpf compile` does at install time).
    get_program(bpf_source(devprog.SOURCE), devprog.FUNC, ProgType.CGROUP_DEVICE)
    for src, func, ptype in net.PROGRAMS:
        get_program(bpf_source(src), func, ptype)
    rel = f"{cg_root.name}/hot"
    out = subprocess.run(
        [sys.executable, "-c", CHILD, rel], capture_output=True, text=True, check=False, timeout=60
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"after_import": [], "after_setup": False}
