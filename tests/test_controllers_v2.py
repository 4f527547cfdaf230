"""Controller effects on a pure cgroup v2 hierarchy (QEMU guests): the limits really bite.

Skipped, with the reason printed, where the cgroup2 root does not offer the controllers (e.g.
the hybrid development host, where they are bound to cgroup v1).
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cgtest import loop_device, rel

from pelagos_bpf import CgroupConfig, read_stats, setup_cgroup, teardown_cgroup
from pelagos_bpf.convert import blkio_weight_to_io_weight
from pelagos_bpf.errors import UnsupportedSetting
from pelagos_bpf.hierarchy import discover

NEEDED = {"memory", "cpu", "cpuset", "pids", "io"}


def _offered() -> tuple[Path | None, set[str]]:
    try:
        root = discover().root
    except OSError:
        return None, set()
    try:
        return root, set((root / "cgroup.controllers").read_text().split())
    except OSError:
        return root, set()


_ROOT, _OFFERED = _offered()
if os.geteuid() != 0 or NEEDED - _OFFERED:
    _why = (
        "needs root"
        if os.geteuid() != 0
        else f"cgroup2 root {_ROOT} offers {sorted(_OFFERED) or 'no controllers'}, "
        f"these tests need {sorted(NEEDED)} (run them in a pure-v2 QEMU guest)"
    )
    print(f"test_controllers_v2: skipped: {_why}", file=sys.stderr)
    pytest.skip(_why, allow_module_level=True)

pytestmark = [pytest.mark.root, pytest.mark.v2_controllers]
pytest_plugins = ["helpers"]
PY = sys.executable


def _wait_line(p: subprocess.Popen[str]) -> str:
    assert p.stdout is not None
    return p.stdout.readline().strip()


def test_memory_limit_oom_kills(cg_root: Path) -> None:
    p = subprocess.Popen(
        [PY, "-c", "import sys; sys.stdin.readline(); x = b'x' * (96 << 20); print(len(x))"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    cfg = CgroupConfig(memory_limit=32 << 20, path=rel(cg_root, "oom"))
    cg = setup_cgroup(cfg, p.pid)
    try:
        assert (cg.path / "memory.max").read_text().strip() == str(32 << 20)
        out, _ = p.communicate(b"go\n", timeout=120)
        assert p.returncode == -9, out
        s = read_stats(cg)
        assert s.memory_oom_kill >= 1
        if "memory.peak" not in s.unavailable:  # 5.19+
            assert 0 < s.memory_peak_bytes <= 32 << 20
    finally:
        teardown_cgroup(cg)


def test_memory_swap_and_reservation_read_back(cg_root: Path, spawn) -> None:
    cfg = CgroupConfig(
        memory_limit=64 << 20,
        memory_swap=96 << 20,
        memory_reservation=16 << 20,
        path=rel(cg_root, "mem"),
    )
    with setup_cgroup(CgroupConfig(memory_limit=-1, path=rel(cg_root, "probe")), None) as probe:
        has_swap_file = (probe.path / "memory.swap.max").exists()
    if not has_swap_file:  # kernel without swap accounting: a clear error, not a silent drop
        with pytest.raises(UnsupportedSetting) as e:
            setup_cgroup(cfg, spawn().pid)
        assert e.value.setting == "memory_swap"
        return
    # v2 charges memory where it is allocated, not where a process moves: the child allocates
    # (and touches) 8 MiB only after it is inside, so memory.current must see it.
    p = subprocess.Popen(
        [sys.executable, "-c", ALLOC_AFTER_GO],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert p.stdin is not None and p.stdout is not None
    cg = setup_cgroup(cfg, p.pid)
    try:
        assert (cg.path / "memory.swap.max").read_text().strip() == str(32 << 20)
        assert (cg.path / "memory.max").read_text().strip() == str(64 << 20)
        assert (cg.path / "memory.low").read_text().strip() == str(16 << 20)
        assert cg.report.applied == ["memory_swap", "memory_limit", "memory_reservation"]
        p.stdin.write(b"go\n")
        p.stdin.flush()
        assert p.stdout.readline() == b"allocated\n"
        s = read_stats(cg)
        assert s.memory_current_bytes >= 8 << 20
        if "memory.peak" not in s.unavailable:  # 5.19+
            assert s.memory_peak_bytes >= s.memory_current_bytes
    finally:
        teardown_cgroup(cg)
        p.wait()


ALLOC_AFTER_GO = """
import sys
sys.stdin.readline()
buf = bytearray(8 << 20)
for i in range(0, len(buf), 4096):
    buf[i] = 1
print("allocated", flush=True)
sys.stdin.readline()
"""


FORKER = """
import errno, os, signal, sys, time
sys.stdin.readline()
kids = []
try:
    for _ in range(64):
        pid = os.fork()
        if pid == 0:
            signal.pause()
        kids.append(pid)
    print("no-error", len(kids), flush=True)
except OSError as e:
    print(errno.errorcode[e.errno], len(kids), flush=True)
sys.stdin.readline()
"""


def test_pids_limit_fork_fails_with_eagain(cg_root: Path) -> None:
    p = subprocess.Popen(
        [PY, "-c", FORKER], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    cg = setup_cgroup(CgroupConfig(pids_limit=8, path=rel(cg_root, "pids")), p.pid)
    try:
        assert (cg.path / "pids.max").read_text().strip() == "8"
        assert p.stdin is not None
        p.stdin.write("go\n")
        p.stdin.flush()
        assert _wait_line(p) == f"{errno.errorcode[errno.EAGAIN]} 7"
        s = read_stats(cg)
        assert s.pids_current == 8
        assert s.pids_events_max >= 1
    finally:
        teardown_cgroup(cg)
        p.wait(timeout=30)


def test_cpu_quota_throttles_a_busy_loop(cg_root: Path) -> None:
    busy = (
        "import sys, time; sys.stdin.readline(); t = time.time()\nwhile time.time() - t < 1.5: pass"
    )
    p = subprocess.Popen([PY, "-c", busy], stdin=subprocess.PIPE)
    cg = setup_cgroup(CgroupConfig(cpu_quota=(10000, 100000), path=rel(cg_root, "q")), p.pid)
    try:
        assert (cg.path / "cpu.max").read_text().strip() == "10000 100000"
        p.communicate(b"go\n", timeout=120)
        s = read_stats(cg)
        assert s.cpu_nr_throttled > 0
        assert s.cpu_throttled_ns > 0
    finally:
        teardown_cgroup(cg)


def test_cpu_shares_become_cpu_weight(cg_root: Path, spawn) -> None:
    cg = setup_cgroup(CgroupConfig(cpu_shares=512, path=rel(cg_root, "w")), spawn().pid)
    try:
        assert (cg.path / "cpu.weight").read_text().strip() == "59"
    finally:
        teardown_cgroup(cg)


def test_cpuset_pins_the_process(cg_root: Path, spawn) -> None:
    p = spawn()
    cfg = CgroupConfig(cpuset_cpus="0", cpuset_mems="0", path=rel(cg_root, "cs"))
    cg = setup_cgroup(cfg, p.pid)
    try:
        assert (cg.path / "cpuset.cpus.effective").read_text().strip() == "0"
        status = Path(f"/proc/{p.pid}/status").read_text()
        assert "Cpus_allowed_list:\t0\n" in status
        assert "Mems_allowed_list:\t0\n" in status
    finally:
        teardown_cgroup(cg)


def test_blkio_weight_lands_in_bfq_or_io_weight(cg_root: Path, spawn) -> None:
    cg = setup_cgroup(CgroupConfig(blkio_weight=500, path=rel(cg_root, "bw")), spawn().pid)
    try:
        if (cg.path / "io.bfq.weight").exists():
            assert cg.report.written == [("io.bfq.weight", "500")]
            assert "default 500" in (cg.path / "io.bfq.weight").read_text()
        else:
            w = blkio_weight_to_io_weight(500)
            assert cg.report.written == [("io.weight", str(w))]
            assert f"default {w}" in (cg.path / "io.weight").read_text()
    finally:
        teardown_cgroup(cg)


READER = """
import mmap, os, sys, time
dev, total = sys.argv[1], int(sys.argv[2])
sys.stdin.readline()
fd = os.open(dev, os.O_RDONLY | os.O_DIRECT)
buf = mmap.mmap(-1, 1 << 16)
t, done = time.monotonic(), 0
while done < total:
    done += os.preadv(fd, [buf], done)
print(done, time.monotonic() - t, flush=True)
"""


def test_blkio_throttle_read_bps_limits_a_loop_device(cg_root: Path) -> None:
    if not Path("/dev/loop-control").exists():
        pytest.skip("no loop driver (/dev/loop-control) in this kernel")
    limit, total = 512 << 10, 2 << 20
    with loop_device() as dev:
        rdev = os.stat(dev).st_rdev
        major, minor = os.major(rdev), os.minor(rdev)
        p = subprocess.Popen(
            [PY, "-c", READER, str(dev), str(total)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        cfg = CgroupConfig(
            blkio_throttle_read_bps=[(major, minor, limit)],
            blkio_throttle_write_iops=[(major, minor, 100)],
            path=rel(cg_root, "io"),
        )
        cg = setup_cgroup(cfg, p.pid)
        try:
            io_max = (cg.path / "io.max").read_text()
            assert f"{major}:{minor} rbps={limit} wbps=max riops=max wiops=100" in io_max
            out, _ = p.communicate("go\n", timeout=120)
            done, elapsed = out.split()
            assert int(done) == total
            rate = total / float(elapsed)
            assert rate < limit * 1.5, f"read {rate:.0f} B/s with a {limit} B/s limit"
            assert read_stats(cg).io_read_bytes >= total
        finally:
            teardown_cgroup(cg)


def test_read_stats_live_values(cg_root: Path) -> None:
    # Allocate only after the move: memory charged before it stays with the old cgroup.
    code = "import sys; sys.stdin.readline(); x = b'y' * (8 << 20); print(1, flush=True); input()"
    p = subprocess.Popen([PY, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    cg = setup_cgroup(CgroupConfig(memory_limit=256 << 20, path=rel(cg_root, "st")), p.pid)
    try:
        assert p.stdin is not None and p.stdout is not None
        p.stdin.write(b"\n")
        p.stdin.flush()
        assert p.stdout.readline().strip() == b"1"
        deadline = time.monotonic() + 60
        while read_stats(cg).memory_current_bytes < 8 << 20 and time.monotonic() < deadline:
            time.sleep(0.05)
        s = read_stats(cg)
        assert s.memory_current_bytes >= 8 << 20
        assert s.unavailable == ([] if (cg.path / "memory.peak").exists() else ["memory.peak"])
        if not s.unavailable:  # memory.peak: 5.19+
            assert s.memory_peak_bytes >= s.memory_current_bytes
        assert s.cpu_usage_ns > 0
        assert "memory.some.avg10" in s.pressure
        p.communicate(b"\n", timeout=30)
    finally:
        teardown_cgroup(cg)
