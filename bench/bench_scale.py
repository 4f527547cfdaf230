"""Container scale (root): N live cgroups with DEFAULT_DEVICE_RULES on one node.

1. setup cost with few cgroups live vs with N live: `--probe` setup+teardown cycles of an extra
   cgroup at 10 live, then again at N live (goal of issue 12: within 1.2x);
2. what happens at the map limit (the shared rule map, sized by $PELAGOS_BPF_RULES_MAX: a
   clear error, and nothing of the failed cgroup left behind);
3. `read_stats_many` for up to 1,000 of the live cgroups in one call vs `read_stats` on each;
4. teardown of them all.

Small by default; the issue's figure needs `--n 10000`. Progress goes to stderr.

Usage: .venv/bin/python bench/bench_scale.py [--n 1000] [--probe 50] [--stats 1000]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_devices import remove_tree

from pelagos_bpf import bpfsys
from pelagos_bpf.cgroup import Cgroup, setup_cgroup, teardown_cgroup
from pelagos_bpf.config import CgroupConfig
from pelagos_bpf.devices import DEFAULT_DEVICE_RULES
from pelagos_bpf.devices import layout as devlay
from pelagos_bpf.devices import program as devprog
from pelagos_bpf.hierarchy import discover
from pelagos_bpf.stats import read_stats, read_stats_many

wall = time.perf_counter_ns


def progress(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def probe(rel: str, k: int, tag: str) -> list[float]:
    """Setup times (us) of k extra cgroups, each torn down before the next."""
    out = []
    for i in range(k):
        cfg = CgroupConfig(device_rules=DEFAULT_DEVICE_RULES, path=f"{rel}/probe-{tag}-{i}")
        t0 = wall()
        cg = setup_cgroup(cfg, None)
        out.append((wall() - t0) / 1000)
        teardown_cgroup(cg)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000, help="live cgroups to reach")
    ap.add_argument("--probe", type=int, default=50, help="setup cycles measured per level")
    ap.add_argument("--stats", type=int, default=1000, help="cgroups per read_stats_many call")
    args = ap.parse_args()
    if args.n <= 10:
        ap.error("--n must be above 10 (the first probe runs at 10 live cgroups)")
    root = discover().root
    parent = root / f"pelagos-scale-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    parent.mkdir()
    rel = str(parent.relative_to(root))
    live: list[Cgroup] = []
    entries = devprog.prepare(DEFAULT_DEVICE_RULES)
    size = bpfsys.map_info(devprog.FEATURE.loaded().maps["dev_rules"]).max_entries
    print(
        f"DEFAULT_DEVICE_RULES: {len(DEFAULT_DEVICE_RULES)} rules -> {len(entries.template)} "
        f"map entries per cgroup; dev_rules holds {size} entries "
        f"(~{size // len(entries.template)} cgroups; ${devlay.RULES_ENV}, "
        f"default {devlay.RULES_MAX})"
    )
    try:
        times: list[float] = []
        limit_error = None
        for i in range(args.n):
            if i == 10:
                few = probe(rel, args.probe, "few")
            cfg = CgroupConfig(device_rules=DEFAULT_DEVICE_RULES, path=f"{rel}/c{i}")
            t0 = wall()
            try:
                live.append(setup_cgroup(cfg, None))
            except Exception as e:  # the map limit: report it and stop growing
                limit_error = e
                break
            times.append((wall() - t0) / 1000)
            if (i + 1) % max(1, args.n // 10) == 0:
                progress(f"  {i + 1} live, last setup {times[-1]:.0f} us")
        n_live = len(live)
        if limit_error is not None:
            left = (parent / f"c{n_live}").exists()
            print(f"\n== map limit: setup #{n_live + 1} failed after {n_live} live cgroups")
            print(f"  {type(limit_error).__name__}: {limit_error}")
            print(f"  errno {getattr(limit_error, 'errno', None)}; cgroup dir left behind: {left}")
        # the probe at N live needs room in the map: free one cgroup if the map is full
        if limit_error is not None and live:
            teardown_cgroup(live.pop())
        many = probe(rel, args.probe, "many")
        f, m = statistics.median(few), statistics.median(many)
        print(f"\n== setup of one more cgroup (DEFAULT_DEVICE_RULES, medians of {args.probe})")
        print(f"  at 10 live cgroups     {f:8.0f} us")
        print(f"  at {len(live):<6} live      {m:8.0f} us   ratio {m / f:.2f} (goal <= 1.2)")
        head, tail = times[:100], times[-100:]
        print(
            f"  while growing: median {statistics.median(head):.0f} us for the first "
            f"{len(head)}, {statistics.median(tail):.0f} us for the last {len(tail)}"
        )
        k = min(args.stats, len(live))
        sample = live[:k]
        t0 = wall()
        one = [read_stats(cg) for cg in sample]
        t1 = wall()
        batch = read_stats_many(sample)
        t2 = wall()
        same = [s.to_dict() for s in one] == [s.to_dict() for s in batch]
        print(f"\n== stats of {k} cgroups ({len(live)} live)")
        print(f"  read_stats on each       {(t1 - t0) / 1e9:8.3f} s")
        print(f"  read_stats_many (1 call) {(t2 - t1) / 1e9:8.3f} s   same values: {same}")
    finally:
        try:
            t0 = wall()
            for i, cg in enumerate(live):
                teardown_cgroup(cg)
                if (i + 1) % max(1, len(live) // 10) == 0:
                    progress(f"  {i + 1} torn down")
            print(f"\n== teardown of {len(live)} cgroups: {(wall() - t0) / 1e9:.2f} s")
        finally:  # also when the output went away (`| head`): nothing of ours is left
            remove_tree(parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
