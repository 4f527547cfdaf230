"""The container-start path never loads the compiler: bcc/LLVM stay out of the process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

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
    rel = f"{cg_root.name}/hot"
    out = subprocess.run(
        [sys.executable, "-c", CHILD, rel], capture_output=True, text=True, check=False, timeout=60
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"after_import": [], "after_setup": False}


LAZY_API = r"""
import json, sys
import pelagos_bpf
loaded_at_import = [m for m in ("pelagos_bpf.cgroup", "pelagos_bpf.stats") if m in sys.modules]
submodules = [pelagos_bpf.gc.collect.__module__, pelagos_bpf.devices.read_state.__module__]
from pelagos_bpf import *  # every name of __all__ resolves
from pelagos_bpf.cgroup import setup_cgroup as direct
try:
    pelagos_bpf.no_such_name
    missing = "no error"
except AttributeError as e:
    missing = str(e)
print(json.dumps({
    "loaded_at_import": loaded_at_import,
    "same_object": pelagos_bpf.setup_cgroup is direct,
    "in_dir": sorted(set(pelagos_bpf.__all__) - set(dir(pelagos_bpf))),
    "submodules": submodules,
    "missing": missing,
}))
"""


def test_package_api_loads_on_first_use() -> None:
    """`import pelagos_bpf` (which every submodule import, the OCI hook's included, runs first)
    defers the library to the first use of a name, and every exported name still resolves."""
    out = subprocess.run(
        [sys.executable, "-c", LAZY_API], capture_output=True, text=True, check=True, timeout=60
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {
        "loaded_at_import": [],
        "same_object": True,
        "in_dir": [],
        "submodules": ["pelagos_bpf.gc", "pelagos_bpf.devices.api"],  # docs/LIBRARY.md names them
        "missing": "module 'pelagos_bpf' has no attribute 'no_such_name'",
    }
