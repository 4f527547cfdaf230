"""OCI hook exec -> exit at two revisions, side by side in one run (no root needed).

Each revision's `pelagos_bpf/` and `bpf/` are exported with `git archive` into a temporary
directory (the C extension built in this checkout is copied into both, so the syscall backend
is the same) and run through PYTHONPATH, which comes before an editable install. Rounds
alternate the revisions, fresh process by fresh process, after one warm-up run each (Python's
bytecode caches get written; the BPF programs are compiled into a private cache before, as an
install would). Two hook inputs, the ones that attach nothing and so need no root:
a container that asks nothing, and a poststop after the runtime removed the cgroup. As root with
runc installed, also `runc run` of a busybox `true` with each revision's hook (createRuntime and
poststop, a classid annotation: the create attaches), alternating (bench_hook.runc_bench).

Usage: .venv/bin/python bench/bench_hook_ab.py OLD_REV [NEW_REV (default HEAD)] [--runs 20]
       [--runc-runs 10]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.bench_hook import hook_entry, runc_bench  # noqa: E402

HOOK = "import sys; from pelagos_bpf.cli import main; sys.exit(main(['oci-hook']))"
WHERE = "import pelagos_bpf, sys; print(pelagos_bpf.__file__)"
COMPILE = "import sys; from pelagos_bpf.cli import main; sys.exit(main(['compile']))"
CACHE_ENV = "PELAGOS_BPF_CACHE"


def export(rev: str, dest: Path) -> None:
    dest.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "pelagos_bpf", "bpf"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    for ext in glob.glob(str(ROOT / "pelagos_bpf" / "_sys*.so")):
        shutil.copy2(ext, dest / "pelagos_bpf")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old")
    ap.add_argument("new", nargs="?", default="HEAD")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--runc-runs", type=int, default=10, help="0: skip (needs root and runc)")
    args = ap.parse_args()
    if args.old == args.new:
        ap.error("two different revisions, please")
    with tempfile.TemporaryDirectory(prefix="pelagos-bench-ab-") as d:
        tmp = Path(d)
        trees = {rev: tmp / f"tree{i}" for i, rev in enumerate((args.old, args.new))}
        for rev, tree in trees.items():
            export(rev, tree)
        bundle = tmp / "bundle"
        bundle.mkdir()
        (bundle / "config.json").write_text(json.dumps({"ociVersion": "1.0.2", "linux": {}}))
        records = tmp / "records"
        records.mkdir()
        base = {"ociVersion": "1.0.2", "id": "c1", "bundle": str(bundle), "annotations": {}}
        inputs = {
            "asks nothing": json.dumps({**base, "status": "creating", "pid": os.getpid()}),
            "poststop, cgroup removed": json.dumps({**base, "status": "stopped"}),
        }
        record = json.dumps({"id": "c1", "cgroup": str(tmp / "removed"), "cgroup_id": 1})
        # A private bytecode cache: each tree's sources are new paths, whose key index entries
        # would otherwise pile up in the node's cache dir (hook_entry passes it on to runc's).
        os.environ[CACHE_ENV] = str(tmp / "cache")
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["PELAGOS_BPF_HOOK_STATE"] = str(records)

        def python(tree: Path, code: str, stdin: str = "") -> str:
            """A fresh interpreter running `code` with the tree's pelagos_bpf; its stdout."""
            return subprocess.run(
                [sys.executable, "-c", code],
                input=stdin.encode(),
                env={**env, "PYTHONPATH": str(tree)},
                cwd=tmp,
                check=True,
                capture_output=True,
            ).stdout.decode()

        def run(tree: Path, text: str) -> float:
            (records / "c1.json").write_text(record)  # poststop consumes it
            t0 = time.perf_counter()
            python(tree, HOOK, text)
            return time.perf_counter() - t0

        for tree in trees.values():
            where = python(tree, WHERE).strip()
            assert where.startswith(str(tree)), f"{where} is not the exported tree {tree}"
            python(tree, COMPILE)  # what an install runs: no hook below compiles
            for text in inputs.values():
                run(tree, text)  # warm-up: writes the bytecode caches
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.runs):
            for rev, tree in trees.items():
                for name, text in inputs.items():
                    times.setdefault((rev, name), []).append(run(tree, text))
        print(f"hook exec -> exit, medians of {args.runs} alternating rounds (ms):")
        for name in inputs:
            old = statistics.median(times[(args.old, name)]) * 1e3
            new = statistics.median(times[(args.new, name)]) * 1e3
            print(f"  {name:26} {args.old} {old:7.1f}   {args.new} {new:7.1f}   ({new / old:.2f}x)")
        if args.runc_runs and os.geteuid() == 0:
            hooks = {
                # argv[0] absolute: with no PATH in a hook's environment, Python finds its venv
                # (and bcc, through it) only from there
                f"hook @ {rev}": hook_entry(
                    tmp, sys.executable, [sys.executable, "-c", HOOK], [f"PYTHONPATH={tree}"]
                )
                for rev, tree in trees.items()
            }
            runc_bench(args.runc_runs, tmp, hooks)
        elif args.runc_runs:
            print("runc: needs root; skipped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
