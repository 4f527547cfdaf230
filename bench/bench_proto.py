"""Design study for issue 12 (root): measurements of single mechanisms, NOT library code.

1. CLONE_INTO_CGROUP (clone3 with the cgroup dir fd from `setup_cgroup(cfg, pid=None)` +
   `cg.open_fd()`) vs fork + a cgroup.procs write.
2. dirfd-relative syscalls vs pathlib for mkdir + open + procs write + rmdir.
3. first attach in a fresh process, by component: bpf(2) handle, bytecode cache read, each
   map create, PROG_LOAD, and fetching the program and maps from a pin instead.

The earlier prototypes (attach once at the parent cgroup, a "lean" per-cgroup attach) were
measured against the first runtime and are in docs/PERFORMANCE.md; the lean path is now the
library's own fresh-cgroup path (bench_devices.py measures it against the C floor).

Usage: .venv/bin/python bench/bench_proto.py [--runs 200] [--first-runs 7]
"""

from __future__ import annotations

import argparse
import ast
import ctypes
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_devices import remove_tree, sleeper

from pelagos_bpf.cgroup import setup_cgroup, teardown_cgroup
from pelagos_bpf.config import CgroupConfig
from pelagos_bpf.devices import DEFAULT_DEVICE_RULES
from pelagos_bpf.hierarchy import discover

DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
wall = time.perf_counter_ns


def med_us(xs: list[int] | list[float]) -> float:
    return statistics.median(xs) / 1000


def _write_at(dfd: int, name: str, data: bytes) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CLOEXEC, dir_fd=dfd)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- CLONE_INTO_CGROUP


class CloneArgs(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_uint64)
        for n in (
            "flags",
            "pidfd",
            "child_tid",
            "parent_tid",
            "exit_signal",
            "stack",
            "stack_size",
            "tls",
            "set_tid",
            "set_tid_size",
            "cgroup",
        )
    ]


SYS_clone3 = 435
CLONE_INTO_CGROUP = 0x200000000


def bench_clone(parent: Path, runs: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    # The documented CLONE_INTO_CGROUP use: set up without a pid, clone3 with the handle's fd.
    rel = parent.relative_to(discover().root) / "clone"
    cg = setup_cgroup(CgroupConfig(device_rules=DEFAULT_DEVICE_RULES, path=str(rel)), None)
    d = cg.path
    dfd = cg.open_fd()
    procs = os.open(d / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
    fork_t, clone_t, write_t = [], [], []
    try:
        for _ in range(runs):
            # fork, then move the child in (it waits on a pipe so the move finds it alive)
            r, w = os.pipe()
            t0 = wall()
            pid = os.fork()
            if pid == 0:
                os.read(r, 1)
                os._exit(0)
            tw = wall()
            os.write(procs, str(pid).encode())
            t1 = wall()
            write_t.append(t1 - tw)
            os.write(w, b"x")
            os.waitpid(pid, 0)
            os.close(r)
            os.close(w)
            fork_t.append(t1 - t0)
            # clone3 straight into the cgroup
            r, w = os.pipe()
            args = CloneArgs(flags=CLONE_INTO_CGROUP, exit_signal=signal.SIGCHLD, cgroup=dfd)
            t0 = wall()
            pid = libc.syscall(SYS_clone3, ctypes.byref(args), ctypes.sizeof(args))
            if pid == 0:
                os.read(r, 1)
                os._exit(0)
            t1 = wall()
            if pid < 0:
                raise OSError(ctypes.get_errno(), "clone3")
            inside = str(pid) in (d / "cgroup.procs").read_text().split()
            os.write(w, b"x")
            os.waitpid(pid, 0)
            os.close(r)
            os.close(w)
            if not inside:
                raise SystemExit("clone3 child is not in the cgroup")
            clone_t.append(t1 - t0)
    finally:
        os.close(procs)
        os.close(dfd)
        teardown_cgroup(cg)
    f, c = med_us(fork_t), med_us(clone_t)
    print(f"\n== starting a child inside the cgroup, parent side (wall, {runs} runs, medians)")
    print(f"  fork + write pid to cgroup.procs            {f:8.1f} us")
    print(f"    of which the cgroup.procs write           {med_us(write_t):8.1f} us")
    print(f"  clone3(CLONE_INTO_CGROUP, cgroup dir fd)    {c:8.1f} us   saves {f - c:6.1f} us")


# ---------------------------------------------------------------- dirfd vs pathlib


def bench_dirfd(parent: Path, sleeper_pid: int, runs: int) -> None:
    pid = str(sleeper_pid)
    back = parent / "cgroup.procs"
    pfd = os.open(parent, DIR)
    path_t, fd_t = [], []
    for i in range(runs):
        t0 = wall()
        p = parent / f"pl{i}"
        p.mkdir()
        fd = os.open(p, DIR)
        (p / "cgroup.procs").write_text(pid)
        back.write_text(pid)
        os.close(fd)
        p.rmdir()
        t1 = wall()
        name = f"fd{i}"
        os.mkdir(name, dir_fd=pfd)
        fd = os.open(name, DIR, dir_fd=pfd)
        _write_at(fd, "cgroup.procs", pid.encode())
        _write_at(pfd, "cgroup.procs", pid.encode())
        os.close(fd)
        os.rmdir(name, dir_fd=pfd)
        t2 = wall()
        path_t.append(t1 - t0)
        fd_t.append(t2 - t1)
    os.close(pfd)
    a, b = med_us(path_t), med_us(fd_t)
    print(f"\n== mkdir + open + procs write + write back + rmdir (wall, {runs} runs, medians)")
    print(f"  pathlib                    {a:8.1f} us")
    print(f"  dir fds (os.*(dir_fd=))    {b:8.1f} us   saves {a - b:6.1f} us")


# ---------------------------------------------------------------- first attach, by component


_FIRST = r"""
import os, sys, time
w = time.perf_counter_ns
from pelagos_bpf import bpfsys, progcache
from pelagos_bpf.devices import layout as lay
from pelagos_bpf.devices import program as dp
from pelagos_bpf.feature import open_maps
t = {}
t0 = w(); bpfsys._syscall(); t["libc syscall() handle (CDLL(None))"] = w() - t0
t0 = w(); prog = dp.compiled(); t["bytecode cache: key + JSON read"] = w() - t0
pin = sys.argv[1]
if os.path.exists(pin):
    t0 = w(); fd = bpfsys.obj_get(pin); t["BPF_OBJ_GET of the pinned program"] = w() - t0
    t0 = w(); info = bpfsys.prog_info(fd); maps = open_maps(info, lay.LAYER)
    t["prog info + map fds by id + map info"] = w() - t0
else:
    maps = {}
    for m in lay.LAYER.maps:
        t0 = w()
        maps[m.name] = bpfsys.map_create(
            m.type, m.key_size, m.value_size, m.max_entries, name=m.name, flags=m.flags
        )
        t[f"MAP_CREATE {m.name} ({m.max_entries} entries)"] = w() - t0
    t0 = w(); fd = progcache.load_program(prog, maps, name=lay.PROG_NAME)
    t[f"PROG_LOAD ({prog.insn_count} insns)"] = w() - t0
    bpfsys.obj_pin(fd, pin)
print(repr(t))
"""


def bench_first(tmp: Path, runs: int) -> None:
    pin_dir = tmp / "bpffs"
    pin_dir.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(pin_dir)], check=True)
    rows: dict[str, dict[str, list[int]]] = {"load": {}, "pin": {}}
    try:
        for i in range(runs):
            pin = pin_dir / f"p{i}"
            for kind in ("load", "pin"):  # the first run pins, the second fetches
                out = subprocess.run(
                    [sys.executable, "-c", _FIRST, str(pin)],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                for k, v in ast.literal_eval(out).items():
                    rows[kind].setdefault(k, []).append(v)
            pin.unlink()
    finally:
        subprocess.run(["umount", str(pin_dir)], check=True)
    print(f"\n== first attach in a fresh process, by component (wall, {runs} runs, medians)")
    for kind, title in (("load", "load (no pin)"), ("pin", "fetch from a pin")):
        total = sum(med_us(v) for v in rows[kind].values())
        print(f"  {title}: {total:.0f} us before PROG_ATTACH")
        for k, v in rows[kind].items():
            print(f"    {k:44} {med_us(v):8.0f} us")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200, help="clone and dirfd runs")
    ap.add_argument("--first-runs", type=int, default=7, help="fresh processes per variant")
    args = ap.parse_args()
    root = discover().root
    parent = root / f"pelagos-proto-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    parent.mkdir()
    pid = sleeper()
    (parent / "cgroup.procs").write_text(str(pid))
    try:
        with tempfile.TemporaryDirectory(prefix="pelagos-proto-") as tmpd:
            bench_clone(parent, args.runs)
            bench_dirfd(parent, pid, args.runs)
            bench_first(Path(tmpd), args.first_runs)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        remove_tree(parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
