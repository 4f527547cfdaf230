"""A newer release updates and tears down cgroups the previous release set up.

Two versions in one test: the previous release (commit 3e620aa, device layout version 2: one
program `pelagos_dev_v2`, no owners) is extracted with `git archive` and run in a subprocess
with its own bytecode cache; the current code then updates and tears down what it left, while
real device probes check what is enforced at each step. Its rule set belongs to the runtime
(the only writer that release knew): a runtime write migrates it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from device_helpers import probe

from pelagos_bpf import (
    DEFAULT_DEVICE_RULES,
    CgroupConfig,
    devices,
    net,
    teardown_cgroup,
    update_cgroup,
)
from pelagos_bpf.cgroup import Cgroup
from pelagos_bpf.config import CgroupDeviceRule as R
from pelagos_bpf.devices import layout
from pelagos_bpf.devices import program as devprog
from pelagos_bpf.feature import Feature

pytestmark = [pytest.mark.root]
PREVIOUS = "3e620aa"
REPO = Path(__file__).resolve().parent.parent
C10 = 0x10010

OLD_SETUP = r"""
import json, sys
from pelagos_bpf import CgroupConfig, DEFAULT_DEVICE_RULES, setup_cgroup
from pelagos_bpf.config import CgroupDeviceRule as R
assert "/old/" in __import__("pelagos_bpf").__file__  # really the previous release
out = []
for rel in sys.argv[1:]:
    cfg = CgroupConfig(
        path=rel,
        device_rules=[*DEFAULT_DEVICE_RULES, R(True, "c", 240, 1, "r")],
        net_classid=0x10010,
    )
    cg = setup_cgroup(cfg, None)
    out.append([str(cg.path), cg.id])
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def old_release(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("git") is None:
        pytest.skip("git is not installed: cannot extract the previous release")
    dest = tmp_path_factory.mktemp("prev") / "old"
    dest.mkdir()
    arch = subprocess.run(
        ["git", "-C", str(REPO), "archive", PREVIOUS], capture_output=True, check=False
    )
    if arch.returncode != 0:
        pytest.skip(f"git history unavailable ({arch.stderr.decode().strip()[:200]})")
    subprocess.run(["tar", "-x", "-C", str(dest)], input=arch.stdout, check=True)
    return dest


def run_old(old: Path, rels: list[str]) -> list[tuple[str, int]]:
    env = dict(
        os.environ,
        PYTHONPATH=str(old),
        PELAGOS_BPF_CACHE=str(old.parent / "cache"),
        PYTHONDONTWRITEBYTECODE="1",
    )
    env.pop("PELAGOS_BPF_PIN_DIR", None)
    out = subprocess.run(
        [sys.executable, "-c", OLD_SETUP, *rels],
        capture_output=True,
        text=True,
        env=env,
        cwd=str(old.parent),
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return [tuple(x) for x in json.loads(out.stdout.splitlines()[-1])]


def old_entries_of(keeper: Cgroup, cgroup_id: int) -> int:
    """Entries keyed by cgroup_id in the previous release's maps, reached through `keeper`, a
    cgroup whose old program keeps those maps alive."""
    fd = keeper.open_fd()
    try:
        with devprog.FEATURE.find(fd) as groups:
            (old,) = [g for g in groups if g.version == 2]
            assert old.layer is layout.LAYER_V2
            return sum(
                1
                for name, spec in ((m.name, m) for m in old.layer.maps)
                if spec.cgroup_of is not None
                for k in __import__("pelagos_bpf").bpfsys.map_keys(old.maps[name], spec.key_size)
                if spec.cgroup_of(k) == cgroup_id
            )
    finally:
        os.close(fd)


def test_update_and_teardown_of_previous_release_cgroups(cg_root: Path, old_release: Path) -> None:
    rels = [f"{cg_root.name}/{n}" for n in ("upd", "down", "keeper")]
    made = run_old(old_release, rels)
    upd, down, keeper = (Cgroup.open(p) for p, _ in made)
    probes = [("c", 240, 1, "r"), ("c", 240, 2, "r"), ("c", 1, 3, "rw")]
    assert probe(upd.path, probes) == [True, False, True]  # the old rules are in force
    before = devices.read_state(upd)
    assert (before.attached, before.version, before.owners) == (True, 2, ())
    assert len(before.legacy_program_ids) == 1

    # Update with this release: migrate (attach v3, switch, detach v2), keep net as it is.
    update_cgroup(
        upd, CgroupConfig(device_rules=[*DEFAULT_DEVICE_RULES, R(True, "c", 240, 2, "r")])
    )
    after = devices.read_state(upd)
    rt = after.owner("runtime")
    assert rt is not None and [o.owner for o in after.owners] == ["runtime"]
    assert (after.version, after.installed, rt.trusted, after.legacy_program_ids) == (
        3,
        True,
        True,
        (),
    )
    assert probe(upd.path, probes) == [False, True, True]
    assert old_entries_of(keeper, upd.id) == 0  # the old release's entries are gone
    assert net.read_state(upd).classid == C10  # net, same layout, untouched

    # Teardown with this release of a cgroup the old one set up: no program, no entry left.
    assert old_entries_of(keeper, down.id) > 0
    teardown_cgroup(down)
    assert not down.path.exists()
    assert old_entries_of(keeper, down.id) == 0
    teardown_cgroup(upd)
    teardown_cgroup(keeper)
    assert not upd.path.exists() and not keeper.path.exists()


def test_earlier_versions_are_recognised_not_loaded() -> None:
    feat: Feature = devprog.FEATURE
    assert feat.current.version == 3 and [lay.version for lay in feat.layers] == [3, 2, 1]
