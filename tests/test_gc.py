"""Garbage collection: entries of dead cgroups and what killed setups left are reclaimed."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import signal
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pelagos_bpf import (
    DEFAULT_DEVICE_RULES,
    CgroupConfig,
    bpfsys,
    devices,
    gc,
    setup_cgroup,
    teardown_cgroup,
    update_cgroup,
)
from pelagos_bpf.cgroup import Cgroup
from pelagos_bpf.config import CgroupDeviceRule as R
from pelagos_bpf.devices import layout
from pelagos_bpf.devices import program as devprog
from pelagos_bpf.errors import BpfError
from pelagos_bpf.registry import FEATURES

pytestmark = [pytest.mark.root]
KILLS = 40


def entries_of(maps: dict[str, int], layer, cgroup_ids: set[int] | None = None) -> int:
    """Entries of cgroups in these maps (keyed by one of cgroup_ids when given); cgroup id 0
    is no cgroup: the feature's bookkeeping (the rule map's fill level)."""
    n = 0
    for spec in layer.maps:
        if spec.cgroup_of is None or spec.name not in maps:
            continue
        for k in bpfsys.map_keys(maps[spec.name], spec.key_size):
            cg = spec.cgroup_of(k)
            n += cg != 0 and (cgroup_ids is None or cg in cgroup_ids)
    return n


def test_entries_of_a_removed_cgroup_are_collected(make_cgroup: Callable[[str], Cgroup]) -> None:
    """Someone else rmdirs the cgroup (no teardown): gc reclaims its rule and denial entries."""
    cg = make_cgroup("gone")
    devices.attach_devices(cg, list(DEFAULT_DEVICE_RULES))
    own = devprog.FEATURE.loaded()
    assert entries_of(own.maps, own.layer, {cg.id}) > 0
    os.rmdir(cg.path)  # programs and storage go with the cgroup; our map entries do not
    assert entries_of(own.maps, own.layer, {cg.id}) > 0
    report = gc.collect()
    assert entries_of(own.maps, own.layer, {cg.id}) == 0
    assert report.dead_cgroups >= 1 and report.total_entries > 0
    assert "map entries removed" in str(report)


def test_gc_keeps_entries_of_live_cgroups(make_cgroup: Callable[[str], Cgroup]) -> None:
    cg = make_cgroup("live")
    devices.attach_devices(cg, list(DEFAULT_DEVICE_RULES))
    own = devprog.FEATURE.loaded()
    n = entries_of(own.maps, own.layer, {cg.id})
    gc.collect()
    assert entries_of(own.maps, own.layer, {cg.id}) == n
    assert devices.read_state(cg).installed


def test_teardown_removes_entries_when_the_program_is_gone(cg_root: Path) -> None:
    """Detached from inside before teardown: teardown still drops the cgroup's entries."""
    (cg_root / "inside").mkdir()
    cg = Cgroup.open(cg_root / "inside")
    devices.attach_devices(cg, list(DEFAULT_DEVICE_RULES))
    own = devprog.FEATURE.loaded()
    fd = cg.open_fd()
    try:
        bpfsys.prog_detach(own.progs[layout.FUNCS["runtime"]], fd, layout.ATTACH)
    finally:
        os.close(fd)
    assert not devices.read_state(cg).attached
    assert entries_of(own.maps, own.layer, {cg.id}) > 0
    teardown_cgroup(cg)
    assert entries_of(own.maps, own.layer, {cg.id}) == 0


def test_full_rule_map_collects_then_retries(
    make_cgroup: Callable[[str], Cgroup], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A full map (E2BIG) triggers one collection and one retry."""
    cg = make_cgroup("full")
    calls: list[int] = []
    real = bpfsys.map_update_batch
    purged: list[bool] = []
    real_purge = devprog.FEATURE.purge

    def full_once(fd: int, items, flags: int = 0) -> None:
        calls.append(len(items))
        if len(calls) == 1:
            raise BpfError(errno.E2BIG, "BPF_MAP_UPDATE_BATCH", "injected: map full")
        real(fd, items, flags)

    def spy(*a, **kw):
        purged.append(True)
        return real_purge(*a, **kw)

    monkeypatch.setattr(bpfsys, "map_update_batch", full_once)
    monkeypatch.setattr(devprog.FEATURE, "purge", spy)
    devices.attach_devices(cg, list(DEFAULT_DEVICE_RULES))
    assert len(calls) == 2 and purged
    assert devices.read_state(cg).installed


def churn(prefix: str, tag: str, pins: Path, ready: int) -> None:
    """Forked child: setup, update, teardown in a loop until killed (fork: no start-up cost)."""
    os.environ["PELAGOS_BPF_PIN_DIR"] = str(pins)
    for feat in FEATURES:
        feat._loaded = None  # the parent's programs are not pinned: load (or fetch) our own
    os.write(ready, b"r")
    i = 0
    while True:
        cfg = CgroupConfig(
            path=f"{prefix}/{tag}-{i}/c",
            device_rules=[*DEFAULT_DEVICE_RULES, R(True, "c", 242, i % 7, "r")],
            net_classid=0x10010,
        )
        cg = setup_cgroup(cfg, None)
        update_cgroup(
            cg, CgroupConfig(device_rules=list(DEFAULT_DEVICE_RULES), net_classid=0x10020)
        )
        teardown_cgroup(cg)
        i += 1


@contextlib.contextmanager
def bpffs(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / f"bpffs-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", str(d)], check=True)


def pinned_maps(pin_dir: Path) -> list[tuple[object, dict[str, int]]]:
    """The maps of every program pinned in pin_dir (this test's programs only)."""
    out = []
    for p in pin_dir.iterdir():
        if p.name.endswith(".debug"):
            continue
        fd = bpfsys.obj_get(p)
        try:
            info = bpfsys.prog_info(fd)
        finally:
            os.close(fd)
        for feat in FEATURES:
            hit = feat.recognise(info)
            if hit is not None:
                from pelagos_bpf.loader import open_maps

                out.append((hit[0], open_maps(info, hit[0])))
    return out


def test_sigkill_anywhere_then_gc_leaves_nothing(cg_root: Path, tmp_path: Path) -> None:
    """>= 40 SIGKILLs at random points of setup/update/teardown, then gc(prefix): no cgroup
    dir, no program of ours, and the entries of this test's (pinned) maps back to baseline."""
    rng = random.Random(8)
    with bpffs(tmp_path) as pins:
        rel = f"{cg_root.name}/crash"
        (cg_root / "crash").mkdir()
        # Load and pin our programs once, in a child that finishes: under TCG a first load can
        # outlast every kill delay below, and the killed children must use pinned maps.
        prepin = os.fork()
        if prepin == 0:
            code = 1
            try:
                os.environ["PELAGOS_BPF_PIN_DIR"] = str(pins)
                for feat in FEATURES:
                    feat._loaded = None
                    feat.loaded()
                code = 0
            finally:
                os._exit(code)
        assert os.waitpid(prepin, 0)[1] == 0
        killed = 0
        for n in range(KILLS):
            rfd, wfd = os.pipe()
            pid = os.fork()
            if pid == 0:
                try:
                    os.close(rfd)
                    churn(rel, f"k{n}", pins, wfd)
                finally:
                    os._exit(1)
            os.close(wfd)
            assert os.read(rfd, 1) == b"r"
            os.close(rfd)
            time.sleep(rng.uniform(0.0, 0.15))
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
            killed += os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
        assert killed == KILLS  # each child was still working when killed
        leftovers = [p for p in (cg_root / "crash").rglob("*") if p.is_dir()]
        maps = pinned_maps(pins)
        assert maps, f"no pinned programs: {list(pins.iterdir())}, {len(leftovers)} dirs"
        before = sum(entries_of(m, lay) for lay, m in maps)
        print(f"crash: {len(leftovers)} cgroup dirs and {before} map entries left by {KILLS} kills")

        report = gc.collect(cg_root / "crash")
        print(report)
        assert [p for p in (cg_root / "crash").rglob("*") if p.is_dir()] == []
        assert len(report.cgroups_removed) == len(leftovers)
        assert sum(entries_of(m, lay) for lay, m in maps) == 0  # baseline: empty shared maps
        assert report.errors == []
        for _, m in maps:
            for fd in m.values():
                os.close(fd)
