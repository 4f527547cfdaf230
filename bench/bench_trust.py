"""Cost of the trust checks on the first attach (root). Prints medians, ratios and components.

1. Fresh processes: the first cache read of the device program with the checks (progcache:
   openat walk + fstat + strict parse) vs the old unchecked read (read_text + json.loads +
   fromhex), each timed inside a new interpreter after imports and the cache key.
2. Components in one warm process: the walk, the checked file read, the strict parse, the tag,
   a pin fetch with checks (O_PATH + fstat + OBJ_GET + type/tag) vs a bare OBJ_GET, and for
   scale the rest of a first attach: map creation + PROG_LOAD of the same program.

Usage: .venv/bin/python bench/bench_trust.py [--procs 15] [--n 300]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pelagos_bpf import bpfsys, progcache, trust
from pelagos_bpf.bpfsys import ProgType
from pelagos_bpf.devices import layout as devlay
from pelagos_bpf.devices import program as devprog

FIRST_READ = """
import json, sys, time
from pathlib import Path
from pelagos_bpf import progcache
from pelagos_bpf.bpfsys import ProgType
from pelagos_bpf.devices import layout as devlay
src = progcache.bpf_source(devlay.SOURCE)
name = progcache.cache_file_name(src, devlay.FUNC, ProgType.CGROUP_DEVICE)
t = time.perf_counter()
if sys.argv[1] == "checked":
    prog = progcache.get_program(src, devlay.FUNC, ProgType.CGROUP_DEVICE)
else:  # what progcache did before the checks: key (stats), read, json, fromhex
    progcache.cache_key(src, devlay.FUNC, ProgType.CGROUP_DEVICE)
    d = json.loads((progcache.cache_dir() / name).read_text())
    prog = progcache.CompiledProgram(d["func"], int(d["prog_type"]), bytes.fromhex(d["insns"]),
        tuple((int(i), str(n)) for i, n in d["relocs"]), d["source_hash"])
print((time.perf_counter() - t) * 1e6)
"""


def _us(fn: Callable[[], object], n: int) -> float:
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e6)
    return statistics.median(out)


def fresh(kind: str, procs: int) -> float:
    runs = [
        float(subprocess.run([sys.executable, "-c", FIRST_READ, kind], check=True,
                             capture_output=True, text=True).stdout)
        for _ in range(procs)
    ]  # fmt: skip
    return statistics.median(runs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--procs", type=int, default=15)
    ap.add_argument("--n", type=int, default=300)
    a = ap.parse_args()

    src = progcache.bpf_source(devlay.SOURCE)
    prog = progcache.get_program(src, devlay.FUNC, ProgType.CGROUP_DEVICE)  # fill the cache
    cdir = str(progcache.cache_dir())
    name = progcache.cache_file_name(src, devlay.FUNC, ProgType.CGROUP_DEVICE)
    data = (Path(cdir) / name).read_bytes()

    checked, plain = fresh("checked", a.procs), fresh("plain", a.procs)
    print(f"first cache read in a fresh process ({a.procs} processes, median):")
    print(f"  checked {checked:8.1f} us   unchecked {plain:8.1f} us   "
          f"added {checked - plain:7.1f} us  (x{checked / plain:.2f})")  # fmt: skip

    def walk() -> None:
        os.close(trust.open_trusted_dir(cdir, "cache dir"))

    def read() -> None:
        fd = trust.open_trusted_dir(cdir, "cache dir")
        try:
            trust.read_trusted_file(fd, name, cdir, "cache file")
        finally:
            os.close(fd)

    parse = lambda: progcache.parse_cached(data, devlay.FUNC, ProgType.CGROUP_DEVICE)  # noqa: E731
    comp = {
        f"walk {cdir} ({len(Path(cdir).parts)} dirs)": _us(walk, a.n),
        "walk + checked file read": _us(read, a.n),
        "plain read_bytes": _us(lambda: (Path(cdir) / name).read_bytes(), a.n),
        f"strict parse ({prog.insn_count} insns)": _us(parse, a.n),
        "json.loads + fromhex": _us(lambda: bytes.fromhex(json.loads(data)["insns"]), a.n),
        "prog_tags (SHA-256 + SHA-1)": _us(lambda: trust.prog_tags(prog.insns), a.n),
    }

    def load() -> None:
        maps = {
            m.name: bpfsys.map_create(*m.layout, m.max_entries, name=m.name, flags=m.flags)
            for m in devlay.LAYER.maps
        }
        fd = progcache.load_program(prog, maps, name=devlay.PROG_NAME)
        for x in (fd, *maps.values()):
            os.close(x)

    comp["maps + PROG_LOAD (rest of a first attach)"] = _us(load, max(a.n // 10, 10))

    d = Path(f"/tmp/pelagos-bench-bpffs-{os.getpid()}-{uuid.uuid4().hex[:6]}")
    d.mkdir(mode=0o755)
    subprocess.run(["mount", "-t", "bpf", "bpf", str(d)], check=True)
    try:
        own = devprog.own_program()
        pin = d / "p"
        bpfsys.obj_pin(own.progs[devlay.FUNC], pin)

        def checked_pin() -> None:
            fd = trust.open_pinned_program(pin, insns=prog.insns, prog_type=ProgType.CGROUP_DEVICE)
            os.close(fd or -1)

        def bare_pin() -> None:
            fd = bpfsys.obj_get(pin)
            bpfsys.prog_info(fd)
            os.close(fd)

        comp["pin fetch, checked"] = _us(checked_pin, a.n)
        comp["pin fetch, bare OBJ_GET + prog_info"] = _us(bare_pin, a.n)
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)
        d.rmdir()

    print(f"components (warm, median of {a.n}):")
    for k, v in comp.items():
        print(f"  {k:45} {v:8.1f} us")


if __name__ == "__main__":
    main()
