"""Where a fresh process's first device attach spends its time (root; a diagnostic, not a bench).

bench_devices.py times the whole first attach and two floors of it (the same syscalls in
straight-line Python, and from C). This probe splits ours: each fresh process wraps the
library's steps in timers (monkeypatching; the timers cost a fresh process ~0.5 ms, so the
total is also timed without them), runs one
`attach_devices(cg, DEFAULT_DEVICE_RULES)` with the program pinned in a private bpffs, then
resets every per-process cache (the loaded program, the key index, the cache dir fd, the
prepared rule sets: private state, which is why this is a probe) and runs the same attach on
a second cgroup: the same work on a warm interpreter. Steps nest (the fetch holds the walk,
the key index and the pins); "total" is the whole call, timed unwrapped in a separate process.

Usage: .venv/bin/python bench/probe_first_attach.py [--runs 12]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pelagos_bpf.feature import PIN_ENV
from pelagos_bpf.hierarchy import discover

# (label, object path in the child, attribute): what the child times, in print order.
STEPS = (
    ("validate + encode the rules", "program", "prepare"),
    ("fetch the pinned program (all below)", "program.FEATURE", "_load_or_fetch"),
    ("  pin dir: trust walk", "trust", "check_pin_dir"),
    ("  key index: stamps, cache dir, read, checks", "program.FEATURE", "idents"),
    ("    its cache dir walk", "progcache", "_open_cache_dir"),
    ("    its file read", "trust", "read_trusted_file"),
    ("  pin names", "program.FEATURE", "pin_paths"),
    ("  pins: open, OBJ_GET, checks, map fds", "program.FEATURE", "_from_pins"),
    ("PROG_ATTACH", "program.FEATURE", "attach"),
    ("storage read (current generation)", "program", "current_gen"),
    ("rule set write", "program", "write_set"),
    ("storage switch", "program", "_switch"),
)

_CHILD = """
import functools, json, sys, time
from pelagos_bpf import progcache, trust
from pelagos_bpf.cgroup import Cgroup
from pelagos_bpf.devices import DEFAULT_DEVICE_RULES, attach_devices, detach_devices, program
steps, dirs = json.loads(sys.argv[1]), sys.argv[2:]
spent = {}
def timed(label, f):
    @functools.wraps(f)
    def w(*a, **k):
        t = time.perf_counter_ns()
        try:
            return f(*a, **k)
        finally:
            spent[label] = spent.get(label, 0) + time.perf_counter_ns() - t
    return w
for label, where, attr in steps:
    obj = {"program": program, "program.FEATURE": program.FEATURE, "trust": trust,
           "progcache": progcache}[where]
    setattr(obj, attr, timed(label, getattr(obj, attr)))
def reset():
    loaded, program.FEATURE._loaded = program.FEATURE._loaded, None
    loaded.close()
    progcache.reset_process_state()
    program._prepare.cache_clear()
out = []
for d in dirs:
    cg = Cgroup.open(d)
    spent.clear()
    t0 = time.perf_counter_ns()
    attach_devices(cg, DEFAULT_DEVICE_RULES)
    spent["total"] = time.perf_counter_ns() - t0
    detach_devices(cg)
    out.append({k: v / 1000 for k, v in spent.items()})
    reset()
print(json.dumps(out))
"""


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=12, help="fresh processes per variant")
    args = ap.parse_args()
    parent = discover().root / f"pelagos-probe-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    tmp = Path(tempfile.mkdtemp(prefix="pelagos-probe-"))
    pins = tmp / "bpffs"
    pins.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(pins)], check=True)
    env = {**os.environ, PIN_ENV: str(pins)}
    dirs = [parent / "cold", parent / "warm"]
    steps = json.dumps([list(s) for s in STEPS])
    wrapped: list[list[dict[str, float]]] = []
    plain: list[list[dict[str, float]]] = []
    try:
        parent.mkdir()
        for d in dirs:
            d.mkdir()
        for i in range(args.runs + 1):  # the first process loads and pins: dropped
            for variant, out in ((steps, wrapped), ("[]", plain)):
                r = subprocess.run(
                    [sys.executable, "-c", _CHILD, variant, *map(str, dirs)],
                    check=True,
                    capture_output=True,
                    text=True,
                    env=env,
                )
                if i:
                    out.append(json.loads(r.stdout))
    finally:
        for d in (*dirs, parent):
            if d.exists():
                d.rmdir()
        for p in pins.glob("pelagos_*"):  # our pins (the bpffs also lists progs.debug, ...)
            p.unlink()
        subprocess.run(["umount", str(pins)], check=True)
        pins.rmdir()
        tmp.rmdir()

    def med(runs: list[list[dict[str, float]]], which: int, key: str) -> float:
        return statistics.median(r[which].get(key, 0.0) for r in runs)

    print(f"first attach of DEFAULT_DEVICE_RULES, pinned; medians of {args.runs} fresh processes")
    print(f"{'step':48} {'fresh':>8} {'warm':>8}  (us; warm: same process, caches reset)")
    for label, *_ in STEPS:
        print(f"{label:48} {med(wrapped, 0, label):8.0f} {med(wrapped, 1, label):8.0f}")
    for label, runs in (("total, with the timers", wrapped), ("total, no timers", plain)):
        print(f"{label:48} {med(runs, 0, 'total'):8.0f} {med(runs, 1, 'total'):8.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
