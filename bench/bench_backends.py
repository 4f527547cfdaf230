"""bpfsys's two syscall backends side by side, one run: the C extension pelagos_bpf._sys and
the ctypes fallback (an install without a C compiler).

1. Fresh processes, the backends alternating ($PELAGOS_BPF_CTYPES=1 for ctypes): after the
   imports (not timed), the first bpf(2) of the process and the second (an OBJ_GET of a path
   that does not exist: ENOENT, so nothing is created), then a first MAP_CREATE.
2. Per call, one process, alternating blocks: map_lookup of a present key (kernel work
   included), through each backend.

Usage: .venv/bin/python bench/bench_backends.py [--procs 20] [--calls 2000] [--blocks 20]  (root)
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pelagos_bpf import bpfsys
from pelagos_bpf.bpfsys import MapType

_FRESH = r"""
import os, time
from pelagos_bpf import bpfabi, bpfsys
from pelagos_bpf.bpfsys import MapType
w = time.perf_counter_ns
a = bpfabi.ObjAttr(pathname=b"/nonexistent/pelagos-bench")
b = bpfabi.ObjAttr(pathname=b"/nonexistent/pelagos-bench")
t0 = w(); r1 = bpfsys._bpf("BPF_OBJ_GET", a); t1 = w(); r2 = bpfsys._bpf("BPF_OBJ_GET", b); t2 = w()
fd = bpfsys.map_create(MapType.HASH, 4, 8, 16, name="bench_backend"); t3 = w()
os.close(fd)
assert r1 == r2 < 0, (r1, r2)
print(bpfsys.BACKEND, t1 - t0, t2 - t1, t3 - t2)
"""


def fresh(procs: int) -> dict[str, list[tuple[int, int, int]]]:
    out: dict[str, list[tuple[int, int, int]]] = {"ext": [], "ctypes": []}
    base = {k: v for k, v in os.environ.items() if k != bpfsys.CTYPES_ENV}
    for _ in range(procs):
        for env in (base, {**base, bpfsys.CTYPES_ENV: "1"}):
            r = subprocess.run(
                [sys.executable, "-c", _FRESH], env=env, check=True, capture_output=True, text=True
            )
            name, *ns = r.stdout.split()
            out[name].append((int(ns[0]), int(ns[1]), int(ns[2])))
    return out


def per_call(calls: int, blocks: int) -> dict[str, float]:
    m = bpfsys.map_create(MapType.HASH, 8, 8, 16, name="bench_backend")
    key = b"k" * 8
    bpfsys.map_update(m, key, b"v" * 8)
    got: dict[str, list[float]] = {"ext": [], "ctypes": []}
    prev = bpfsys.BACKEND
    try:
        for _ in range(blocks):
            for name in got:
                bpfsys.use_backend(name)
                t0 = time.perf_counter_ns()
                for _ in range(calls):
                    bpfsys.map_lookup(m, key, 8)
                got[name].append((time.perf_counter_ns() - t0) / calls)
    finally:
        bpfsys.use_backend(prev)
        os.close(m)
    return {k: statistics.median(v) / 1000 for k, v in got.items()}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--procs", type=int, default=20, help="fresh processes per backend")
    ap.add_argument("--calls", type=int, default=2000)
    ap.add_argument("--blocks", type=int, default=20)
    args = ap.parse_args()
    if not bpfsys.HAVE_EXT:
        print("pelagos_bpf._sys is not built (pip install -e . with a C compiler): no comparison")
        return 1
    runs = fresh(args.procs)
    print(f"== fresh processes ({args.procs} per backend, alternating; medians, us)")
    print(f"{'backend':8} {'first bpf(2)':>13} {'second':>8} {'first MAP_CREATE':>17}")
    for name, rows in runs.items():
        cols = [statistics.median(r[i] for r in rows) / 1000 for i in range(3)]
        print(f"{name:8} {cols[0]:13.1f} {cols[1]:8.1f} {cols[2]:17.1f}")
    pc = per_call(args.calls, args.blocks)
    print(f"\n== map_lookup per call ({args.blocks} alternating blocks of {args.calls}; medians)")
    for name, us in pc.items():
        print(f"{name:8} {us:6.2f} us   ratio {us / pc['ctypes']:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
