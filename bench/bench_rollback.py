"""A failed large setup against a successful one (root): issue 23's "a failed 100k-rule setup
rolls back in under 3x the time its success takes".

The failure is a real one, after the write: the parent cgroup carries a foreign device program
attached without flags (exclusive), so the kernel refuses our PROG_ATTACH on the child (EPERM)
once the whole rule set is in the map, and setup must delete it and the cgroup. Success is the
same setup under a parent without it. Rounds alternate (ABAB) so drift hits both sides; each
failed round checks the map holds what it held before (nothing left behind).

Prints the medians, the ratio, and the component costs the two share: the rule set's batch
write (BPF_MAP_UPDATE_BATCH) and its batch delete (BPF_MAP_DELETE_BATCH).

Usage: .venv/bin/python bench/bench_rollback.py [--rules 100000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from pathlib import Path

# A 100k-rule set is far above the per-set default (4,096) and the reserve (16,384): this
# script is the node admin raising both, as a node that wants such sets would.
os.environ.setdefault("PELAGOS_BPF_RULES_PER_SET", "200000")
os.environ.setdefault("PELAGOS_BPF_RULES_RESERVE", "0")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_devices import remove_tree

from pelagos_bpf import bpfsys
from pelagos_bpf.bpfabi import AttachType, ProgType
from pelagos_bpf.cgroup import setup_cgroup, teardown_cgroup
from pelagos_bpf.config import CgroupConfig
from pelagos_bpf.devices import encode as enc
from pelagos_bpf.devices import program as devprog
from pelagos_bpf.devices.rules import CgroupDeviceRule
from pelagos_bpf.errors import PelagosError
from pelagos_bpf.hierarchy import discover

ALLOW_ALL = bytes([0xB7, 0, 0, 0, 1, 0, 0, 0, 0x95, 0, 0, 0, 0, 0, 0, 0])  # r0 = 1; exit

wall = time.perf_counter_ns


def entries_in_map() -> int:
    return bpfsys.map_count(devprog.FEATURE.loaded().maps["dev_rules"], enc.RULE_KEY.size)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rules", type=int, default=100_000, help="rules in the set")
    ap.add_argument("--rounds", type=int, default=5, help="rounds per side (ABAB)")
    args = ap.parse_args()
    rules = tuple(
        CgroupDeviceRule(False, "c", 240 + i // 65536, i % 65536, "r") for i in range(args.rules)
    )
    root = discover().root
    top = root / f"pelagos-rollback-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    ok_parent, bad_parent = top / "ok", top / "locked"
    ok_parent.mkdir(parents=True)
    bad_parent.mkdir()
    foreign = bpfsys.prog_load(ProgType.CGROUP_DEVICE, ALLOW_ALL, name="foreign_excl")
    bad_fd = os.open(bad_parent, os.O_RDONLY | os.O_DIRECTORY)
    ok_ms: list[float] = []
    fail_ms: list[float] = []
    try:
        bpfsys.prog_attach(foreign, bad_fd, AttachType.CGROUP_DEVICE, flags=0)  # exclusive
        n_entries = len(devprog.prepare(rules).template)
        before = entries_in_map()
        print(f"{args.rules} rules -> {n_entries} map entries; the map holds {before} now")
        for r in range(args.rounds):
            rel_ok = str((ok_parent / f"c{r}").relative_to(root))
            t0 = wall()
            cg = setup_cgroup(CgroupConfig(device_rules=rules, path=rel_ok), None)
            ok_ms.append((wall() - t0) / 1e6)
            teardown_cgroup(cg)
            rel_bad = str((bad_parent / f"c{r}").relative_to(root))
            t0 = wall()
            try:
                setup_cgroup(CgroupConfig(device_rules=rules, path=rel_bad), None)
            except PelagosError as e:
                fail_ms.append((wall() - t0) / 1e6)
                if r == 0:
                    print(f"the failure: {e}")
            else:
                raise SystemExit("setup under an exclusive foreign program succeeded")
            left = entries_in_map()
            if left > before or (bad_parent / f"c{r}").exists():
                raise SystemExit(f"a failed setup left {left - before} entries or its cgroup")
            print(
                f"round {r + 1}: success {ok_ms[-1]:.1f} ms, failure {fail_ms[-1]:.1f} ms",
                file=sys.stderr,
            )
        # The component costs both sides share: the batch write and the batch delete.
        fd = devprog.FEATURE.loaded().maps["dev_rules"]
        items = enc.with_ruleset(0xFFFF_FFF0_0000_0001, 1, 1, devprog.prepare(rules).template)
        t0 = wall()
        bpfsys.map_update_batch(fd, items)
        write_ms = (wall() - t0) / 1e6
        t0 = wall()
        bpfsys.map_delete_batch(fd, [k for k, _ in items][::-1])
        delete_ms = (wall() - t0) / 1e6
    finally:
        os.close(foreign)
        os.close(bad_fd)
        remove_tree(top)
    ok, fail = statistics.median(ok_ms), statistics.median(fail_ms)
    print(f"\n{'':34}{'median ms':>12}")
    print(f"{'setup, success':34}{ok:12.1f}")
    print(f"{'setup, failed after its write':34}{fail:12.1f}")
    print(f"{'failed / success':34}{fail / ok:12.2f}x   (goal < 3x)")
    print(
        f"components: BPF_MAP_UPDATE_BATCH of {len(items)} entries {write_ms:.1f} ms, "
        f"BPF_MAP_DELETE_BATCH of them {delete_ms:.1f} ms"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
