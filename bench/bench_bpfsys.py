"""The BPF layer with libbpf (main's bpfsys: libbpf.so.1 through ctypes) vs raw bpf(2), one run.

1. Fresh processes, old and new alternating: exec of the layer's module, its call handle
   (dlopen libbpf.so.1 + argtypes vs libc's syscall() from CDLL(None)), the first MAP_CREATE of
   a small hash, and OBJ_GET_INFO of that map. Imports both layers share (ctypes, the package)
   come before the clock starts; bytecode is cached (.pyc) for both, as in an install.
2. Per call, in one process holding both layers, in alternating blocks: map_update,
   map_lookup, prog_query (one program attached to a bench cgroup).

Usage: .venv/bin/python bench/bench_bpfsys.py [--procs 30] [--calls 300] [--blocks 30]
       [--old-ref main]   (root; the old layer is `git show REF:pelagos_bpf/bpfsys.py`)
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pelagos_bpf.hierarchy import discover

REPO = Path(__file__).resolve().parent.parent
ALLOW = bytes.fromhex("b7000000010000009500000000000000")  # r0 = 1; exit
wall = time.perf_counter_ns

_FRESH = r"""
import importlib.util, sys, time
w = time.perf_counter_ns
import ctypes, pelagos_bpf.errors  # shared by both layers: not counted
t = {}
t0 = w()
spec = importlib.util.spec_from_file_location("pelagos_bpf._bench_layer", sys.argv[1])
m = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = m
spec.loader.exec_module(m)
t["module exec (classes, enums)"] = w() - t0
t0 = w(); (m._lib if hasattr(m, "_lib") else m._syscall)(); t["call handle"] = w() - t0
t0 = w(); fd = m.map_create(m.MapType.HASH, 4, 8, 16, name="bench_bpfsys")
t["first MAP_CREATE (hash, 16 entries)"] = w() - t0
t0 = w(); m.map_info(fd); t["OBJ_GET_INFO_BY_FD (map_info)"] = w() - t0
print(repr(t))
"""

HANDLE = {"old": "dlopen libbpf.so.1 + argtypes", "new": "CDLL(None).syscall + argtypes"}


def load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"pelagos_bpf.{name}", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def med_us(xs: list[int] | list[float]) -> float:
    return statistics.median(xs) / 1000


def bench_fresh(layers: dict[str, Path], pyc: Path, procs: int) -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(pyc)  # .pyc as an install has them, outside the repo
    rows: dict[str, dict[str, list[int]]] = {v: {} for v in layers}
    totals: dict[str, list[int]] = {v: [] for v in layers}

    def run(variant: str) -> dict[str, int]:
        out = subprocess.run(
            [sys.executable, "-c", _FRESH, str(layers[variant])],
            check=True,
            capture_output=True,
            text=True,
            env=env,
        ).stdout
        return ast.literal_eval(out)

    for v in layers:  # warm-up: writes the .pyc files
        run(v)
    for i in range(procs):
        for v in sorted(layers, reverse=bool(i % 2)):
            parts = run(v)
            totals[v].append(sum(parts.values()))
            for k, x in parts.items():
                rows[v].setdefault(k, []).append(x)
    print(f"\n== fresh process: first use of the layer (wall, {procs} runs each, alternating)")
    print(f"  {'median us':44} {'old libbpf':>11} {'new bpf(2)':>11}")
    for k in rows["new"]:
        print(f"  {k:44} {med_us(rows['old'][k]):11.0f} {med_us(rows['new'][k]):11.0f}")
    for v in layers:
        print(f"    call handle, {v}: {HANDLE[v]}")
    tot = {v: med_us(totals[v]) for v in layers}
    print(f"  {'total (median of per-run sums)':44} {tot['old']:11.0f} {tot['new']:11.0f}")
    print(f"  new/old {tot['new'] / tot['old']:.2f}x, saves {tot['old'] - tot['new']:.0f} us")


def bench_calls(mods: dict[str, ModuleType], calls: int, blocks: int) -> None:
    new = mods["new"]
    root = discover().root
    cg = root / f"pelagos-bench-bpfsys-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    cg.mkdir()
    cg_fd = os.open(cg, os.O_RDONLY | os.O_DIRECTORY)
    egress = new.AttachType.CGROUP_INET_EGRESS
    map_fd = new.map_create(new.MapType.HASH, 4, 8, 64, name="bench_bpfsys")
    prog = new.prog_load(new.ProgType.CGROUP_SKB, ALLOW, name="bench_bpfsys")
    key, value = b"k\0\0\0", b"v" * 8
    try:
        new.prog_attach(prog, cg_fd, egress)
        new.map_update(map_fd, key, value)
        ops: dict[str, Callable[[ModuleType], object]] = {
            "map_update (BPF_MAP_UPDATE_ELEM)": lambda m: m.map_update(map_fd, key, value),
            "map_lookup (BPF_MAP_LOOKUP_ELEM, hit)": lambda m: m.map_lookup(map_fd, key, 8),
            "prog_query (BPF_PROG_QUERY, 1 program)": lambda m: m.prog_query(cg_fd, egress),
        }
        per: dict[tuple[str, str], list[float]] = {}
        for op, fn in ops.items():
            for v in mods:
                fn(mods[v])  # warm: handles loaded, code paths hot
            for b in range(blocks):
                for v in sorted(mods, reverse=bool(b % 2)):
                    m = mods[v]
                    t0 = wall()
                    for _ in range(calls):
                        fn(m)
                    per.setdefault((op, v), []).append((wall() - t0) / calls)
        print(
            f"\n== per call, one process ({blocks} blocks of {calls} calls, alternating, medians)"
        )
        print(f"  {'us per call':44} {'old libbpf':>11} {'new bpf(2)':>11} {'new/old':>8}")
        for op in ops:
            o, n = med_us(per[(op, "old")]), med_us(per[(op, "new")])
            print(f"  {op:44} {o:11.2f} {n:11.2f} {n / o:7.2f}x")
    finally:
        new.prog_detach(prog, cg_fd, egress)
        for fd in (cg_fd, map_fd, prog):
            os.close(fd)
        cg.rmdir()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--procs", type=int, default=30, help="fresh processes per layer")
    ap.add_argument("--calls", type=int, default=300, help="calls per timed block")
    ap.add_argument("--blocks", type=int, default=30, help="timed blocks per layer and op")
    ap.add_argument("--old-ref", default="main", help="git ref holding the libbpf layer")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="pelagos-bench-bpfsys-") as tmpd:
        tmp = Path(tmpd)
        old = tmp / "bpfsys_libbpf.py"
        src = f"{args.old_ref}:pelagos_bpf/bpfsys.py"
        old.write_bytes(
            subprocess.run(
                ["git", "-C", str(REPO), "show", src], check=True, capture_output=True
            ).stdout
        )
        if "libbpf.so.1" not in old.read_text():
            raise SystemExit(f"{src} is not the libbpf layer")
        layers = {"old": old, "new": REPO / "pelagos_bpf" / "bpfsys.py"}
        print(f"old: {src} (libbpf.so.1 via ctypes); new: this checkout's bpfsys (raw bpf(2))")
        bench_fresh(layers, tmp / "pyc", args.procs)
        bench_calls({v: load(p, f"_bench_{v}") for v, p in layers.items()}, args.calls, args.blocks)
    return 0


if __name__ == "__main__":
    sys.exit(main())
