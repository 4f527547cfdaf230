"""runtime-spec v1.3 mappings proven on a pure cgroup v2 hierarchy (QEMU guests).

Each test reads the value back from the kernel, and shows the effect where one is observable.
Skipped, with the reason printed, where the root offers no controllers (the hybrid host).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cgtest import loop_device, rel, root_controllers

from pelagos_bpf import CgroupConfig, setup_cgroup, teardown_cgroup, update_cgroup
from pelagos_bpf.controllers import hugetlb
from pelagos_bpf.convert import blkio_weight_to_io_weight
from pelagos_bpf.errors import ConfigError, UnsupportedSetting
from pelagos_bpf.hierarchy import discover

NEEDED = {"memory", "cpu", "pids", "io", "hugetlb"}
try:
    _OFFERED = root_controllers()
except OSError:
    _OFFERED = set()
_ROOT = discover().root if _OFFERED else Path("/sys/fs/cgroup")
if os.geteuid() != 0 or NEEDED - _OFFERED:
    _why = f"the cgroup2 root offers {sorted(_OFFERED)}, these tests need {sorted(NEEDED)}"
    print(f"test_oci_v2: skipped: {_why}", file=sys.stderr)
    pytest.skip(_why, allow_module_level=True)

pytestmark = [pytest.mark.root, pytest.mark.v2_controllers]
pytest_plugins = ["helpers"]
PY = sys.executable


def read(cg, name: str) -> str:
    return (cg.path / name).read_text().strip()


def test_moby_shaped_config_with_limits_applies(cg_root: Path, spawn) -> None:
    r = {
        "memory": {"limit": 64 << 20, "disableOOMKiller": False, "kernel": -1},
        "cpu": {"shares": 0, "quota": -500, "period": 100000, "burst": 0, "idle": 0},
        "pids": {"limit": 0},
        "blockIO": {"weight": 0},
        "hugepageLimits": [],
        "unified": {"memory.high": "48M", "memory.oom.group": "1"},
    }
    cfg = CgroupConfig.from_oci(r, rel(cg_root, "moby"))
    assert cfg.cpu_burst is None and cfg.cpu_idle is None  # 0 is the default: unset (any kernel)
    cg = setup_cgroup(cfg, spawn().pid)
    try:
        assert read(cg, "memory.max") == str(64 << 20)
        assert read(cg, "cpu.max") == "max 100000"  # negative quota: max (runc/crun/youki)
        assert read(cg, "pids.max") == "0"  # runtime-spec v1.3: 0 is a real limit
        assert read(cg, "memory.high") == str(48 << 20)  # unified, written after typed
        assert read(cg, "memory.oom.group") == "1"
        assert ("linux.resources.memory.kernel", cfg.ignored[0][1]) in cg.report.skipped
    finally:
        teardown_cgroup(cg)


FORK = """
try:
    os.fork() or os._exit(0)
    print("forked")
except OSError as e:
    print(e.errno)
"""


def test_pids_zero_forbids_forks(cg_root: Path) -> None:
    p = subprocess.Popen(
        [PY, "-c", "import os, sys; sys.stdin.readline()\n" + FORK],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    cg = setup_cgroup(CgroupConfig(pids_limit=0, path=rel(cg_root, "p0")), p.pid)
    try:
        out, _ = p.communicate("go\n", timeout=60)
        assert out.strip() == str(errno.EAGAIN)
    finally:
        teardown_cgroup(cg)


def _cpu_knobs_missing(cg_root: Path) -> list[str]:
    """Probe: the cpu files this kernel lacks in a child cgroup (cpu.max.burst 5.14+, cpu.idle
    5.15+)."""
    probe = setup_cgroup(CgroupConfig(cpu_quota=(50000, 100000), path=rel(cg_root, "probe")), None)
    try:
        return [f for f in ("cpu.max.burst", "cpu.idle") if not (probe.path / f).exists()]
    finally:
        teardown_cgroup(probe)


def test_cpu_burst_and_idle_accepted(cg_root: Path, spawn) -> None:
    missing = _cpu_knobs_missing(cg_root)
    if missing:  # an old kernel: each knob is refused by name, and nothing is left behind
        cfg = CgroupConfig(cpu_quota=(50000, 100000), cpu_burst=20000, cpu_idle=1)
        cfg.path = rel(cg_root, "old")
        with pytest.raises(UnsupportedSetting) as e:
            setup_cgroup(cfg, None)
        assert e.value.setting in ("cpu_burst", "cpu_idle"), e.value
        assert not (cg_root / "old").exists()
        pytest.skip(f"kernel lacks {', '.join(missing)}: refused by name (checked)")
    cg = setup_cgroup(
        CgroupConfig(
            cpu_quota=(50000, 100000), cpu_burst=20000, cpu_idle=1, path=rel(cg_root, "b")
        ),
        spawn().pid,
    )
    try:
        assert read(cg, "cpu.max") == "50000 100000"
        assert read(cg, "cpu.max.burst") == "20000"
        assert read(cg, "cpu.idle") == "1"
        # Lower the quota below the old burst: burst 0 -> cpu.max -> burst passes.
        update_cgroup(cg, CgroupConfig(cpu_quota=(10000, 100000), cpu_burst=5000))
        assert read(cg, "cpu.max") == "10000 100000"
        assert read(cg, "cpu.max.burst") == "5000"
    finally:
        teardown_cgroup(cg)


@pytest.fixture
def loop() -> Iterator[tuple[int, int]]:
    """(major, minor) of a fresh loop device, detached afterwards."""
    if not Path("/dev/loop-control").exists():
        pytest.skip("no loop driver (/dev/loop-control) in this kernel")
    with loop_device() as dev:
        rdev = os.stat(dev).st_rdev
        yield os.major(rdev), os.minor(rdev)


def test_weight_device_lands_in_io_weight(cg_root: Path, spawn, loop) -> None:
    """Per-device io.weight needs the iocost controller enabled for the device (root's
    io.cost.qos), else the kernel says EOPNOTSUPP; BFQ's io.bfq.weight is preferred when the
    kernel has it. The test enables iocost on its own loop device only."""
    major, minor = loop
    qos = _ROOT / "io.cost.qos"
    if qos.exists():
        qos.write_text(f"{major}:{minor} enable=1")
    try:
        cfg = CgroupConfig.from_oci(
            {"blockIO": {"weightDevice": [{"major": major, "minor": minor, "weight": 500}]}},
            rel(cg_root, "wd"),
        )
        cg = setup_cgroup(cfg, spawn().pid)
        try:
            fname, value = cg.report.written[0]
            if fname == "io.bfq.weight":
                assert value == f"{major}:{minor} 500"
            else:
                w = blkio_weight_to_io_weight(500)
                assert (fname, value) == ("io.weight", f"{major}:{minor} {w}")
            assert f"{major}:{minor} " in (cg.path / fname).read_text()
        finally:
            teardown_cgroup(cg)
    finally:
        if qos.exists():
            qos.write_text(f"{major}:{minor} enable=0")


def test_unified_multiline_io_max(cg_root: Path, spawn, loop) -> None:
    d = f"{loop[0]}:{loop[1]}"
    cfg = CgroupConfig(
        unified={"io.max": f"{d} rbps=2097152\n{d} wiops=120"}, path=rel(cg_root, "u")
    )
    cg = setup_cgroup(cfg, spawn().pid)
    try:
        assert f"{d} rbps=2097152 wbps=max riops=max wiops=120" in read(cg, "io.max")
    finally:
        teardown_cgroup(cg)


def test_check_before_update_refuses_below_usage(cg_root: Path) -> None:
    p = subprocess.Popen(
        [
            PY,
            "-c",
            "import sys; b = bytearray(24 << 20); print('ok', flush=True); sys.stdin.readline()",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    cg = setup_cgroup(CgroupConfig(memory_limit=256 << 20, path=rel(cg_root, "cbu")), p.pid)
    try:
        assert p.stdout is not None
        assert p.stdout.readline().strip() == "ok"
        with pytest.raises(ConfigError) as e:
            update_cgroup(cg, CgroupConfig(memory_limit=8 << 20, memory_check_before_update=True))
        assert e.value.setting == "memory_limit"
        assert read(cg, "memory.max") == str(256 << 20)  # nothing written
        assert p.poll() is None  # and nobody was OOM-killed
    finally:
        teardown_cgroup(cg)
        p.kill()
        p.wait()


HUGE = """
import mmap, sys
sys.stdin.readline()
n = int(sys.argv[1])
try:
    m = mmap.mmap(-1, n << 21, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x40000)
    for i in range(n):
        m[i << 21] = 1
    print("ok", flush=True)
except OSError as e:
    print("errno", e.errno, flush=True)
"""


@pytest.mark.parametrize(("pages", "allowed"), [(1, True), (2, False)])
def test_hugetlb_limit_enforced(cg_root: Path, pages: int, allowed: bool) -> None:
    if 2 << 20 not in hugetlb.page_sizes():
        pytest.skip("no 2MB huge pages in this kernel")
    nr = Path("/proc/sys/vm/nr_hugepages")
    old = nr.read_text().strip()
    nr.write_text("4")
    try:
        if int(nr.read_text()) < 2:
            pytest.skip("could not reserve 2 huge pages")
        p = subprocess.Popen(
            [PY, "-c", HUGE, str(pages)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        cfg = CgroupConfig.from_oci(
            {"hugepageLimits": [{"pageSize": "2MB", "limit": 2 << 20}]}, rel(cg_root, "h")
        )
        cg = setup_cgroup(cfg, p.pid)
        try:
            assert read(cg, "hugetlb.2MB.max") == str(2 << 20)
            if (cg.path / "hugetlb.2MB.rsvd.max").exists():
                assert read(cg, "hugetlb.2MB.rsvd.max") == str(2 << 20)
            out, _ = p.communicate("go\n", timeout=60)
            if allowed:
                assert out.strip() == "ok"
            else:  # reservation refused (ENOMEM), or without rsvd: SIGBUS at the fault
                assert out.strip() == f"errno {errno.ENOMEM}" or p.returncode == -7, (
                    out,
                    p.returncode,
                )
        finally:
            teardown_cgroup(cg)
    finally:
        nr.write_text(old)
