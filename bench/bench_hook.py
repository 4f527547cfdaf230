"""OCI hook latency, side by side in one run (root; acts only on a cgroup this script creates).

1. Exec -> exit of `pelagos-bpf oci-hook` as a runtime runs it (state JSON on stdin), medians
   of N interleaved rounds: create with net classid (annotation), create with classid + device
   rules, poststop with the cgroup still there and (the usual case) already removed; with the
   components beside them: `python -c pass`, the hook on a state that asks nothing (the CLI's
   and the lean entry's), and the in-process work of one create.
2. If runc is installed and works here: `runc run` of a busybox `true` container end to end,
   without the hook and with it (classid by annotation), interleaved.

Usage: .venv/bin/python bench/bench_hook.py [--runs 100] [--runc-runs 20]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pelagos_bpf import devices, net
from pelagos_bpf.cgroup import Cgroup
from pelagos_bpf.hierarchy import discover
from pelagos_bpf.ocihook import run_hook
from pelagos_bpf.ocihook.records import record_path

HOOK = Path(sys.executable).parent / "pelagos-bpf"
CLASSID = {"io.pelagos-bpf.net.classid": "1:10"}
DEVICES = {**CLASSID, "io.pelagos-bpf.devices": "deny c 1:5 r"}
# passed on to runc's hooks
NODE_SETTINGS = ("PELAGOS_BPF_BYTECODE", "PELAGOS_BPF_PIN_DIR", "PELAGOS_BPF_POLICY")
# The admin policy the benches' hooks run under: their containers ask for a classid and device
# rules by annotation, which the built-in default refuses.
BENCH_POLICY = '[default]\nclassids = ["*"]\ndevice_grants = true\n'


def use_bench_policy(d: Path) -> None:
    """Write BENCH_POLICY into d (a root-owned dir) and point $PELAGOS_BPF_POLICY at it."""
    policy = d / "policy.toml"
    policy.write_text(BENCH_POLICY)
    policy.chmod(0o644)
    os.environ["PELAGOS_BPF_POLICY"] = str(policy)


Step = tuple[str | None, Callable[[], None]]  # (row label, or None: run but not timed)


def interleaved(variants: list[list[Step]], runs: int) -> dict[str, float]:
    """Median ms of every labelled step. Each round runs every variant once, in turn, so the
    machine's drift (a few ms over a minute here) falls on all rows alike."""
    times: dict[str, list[float]] = {}
    for _ in range(runs):
        for steps in variants:
            for label, fn in steps:
                t0 = time.perf_counter()
                fn()
                if label is not None:
                    times.setdefault(label, []).append(time.perf_counter() - t0)
    return {label: statistics.median(t) * 1e3 for label, t in times.items()}


def state(cid: str, pid: int, bundle: Path, ann: dict[str, str], status: str = "creating") -> str:
    return json.dumps(
        {
            "ociVersion": "1.0.2",
            "id": cid,
            "status": status,
            "pid": pid,
            "bundle": str(bundle),
            "annotations": ann,
        }
    )


CLI_ARGV = [str(HOOK), "oci-hook"]
LEAN_ARGV = [sys.executable, "-m", "pelagos_bpf.ocihook"]
PASS_ARGV = [sys.executable, "-c", "pass"]


def exec_hook(text: str, env: dict[str, str], argv: list[str] = CLI_ARGV) -> None:
    r = subprocess.run(argv, input=text.encode(), capture_output=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"hook failed: {r.stderr.decode()}")


def hook_bench(runs: int, tmp: Path) -> None:
    bundle = tmp / "bundle"
    bundle.mkdir()
    (bundle / "config.json").write_text(json.dumps({"ociVersion": "1.0.2", "linux": {}}))
    env = dict(os.environ, PELAGOS_BPF_HOOK_STATE=str(tmp / "state"))
    cg_dir = discover().root / f"pelagos-bench-hook-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    cg_dir.mkdir()
    proc = subprocess.Popen(["sleep", "3600"])
    try:
        (cg_dir / "cgroup.procs").write_text(str(proc.pid))
        cg = Cgroup.open(cg_dir)

        def hook(text: str, argv: list[str] = CLI_ARGV) -> Callable[[], None]:
            return lambda: exec_hook(text, env, argv)

        noop = state("bench", proc.pid, bundle, {})
        stop = state("bench", 0, bundle, {}, "stopped")
        variants: list[list[Step]] = [
            [("python -c pass (interpreter start)", lambda: exec_hook("", env, PASS_ARGV))],
            [("hook, nothing asked (start + imports)", hook(noop))],
            [("hook, nothing asked, python -m pelagos_bpf.ocihook", hook(noop, LEAN_ARGV))],
            [
                (
                    "hook create: classid, python -m pelagos_bpf.ocihook",
                    hook(state("bench", proc.pid, bundle, CLASSID), LEAN_ARGV),
                ),
                (None, hook(stop, LEAN_ARGV)),
            ],
        ]
        # The usual poststop: the runtime removed the cgroup before running the hook.
        gone = {"id": "gone", "cgroup": f"{cg_dir}-removed", "cgroup_id": 1}
        (tmp / "state").mkdir(exist_ok=True)
        gone_record = record_path("gone", tmp / "state")
        variants.append(
            [
                (None, lambda: gone_record.write_text(json.dumps(gone))),
                (
                    "hook poststop: cgroup removed by the runtime (usual)",
                    hook(state("gone", 0, bundle, {}, "stopped")),
                ),
            ]
        )
        for label, ann in (("classid", CLASSID), ("classid + device rules", DEVICES)):
            # create and poststop alternate, as in a container's life
            variants.append(
                [
                    (f"hook create: {label}", hook(state("bench", proc.pid, bundle, ann))),
                    (f"hook poststop: {label} (cgroup alive)", hook(stop)),
                ]
            )
        rows = list(interleaved(variants, runs).items())
        os.environ["PELAGOS_BPF_HOOK_STATE"] = str(tmp / "state")
        inproc = state("bench", proc.pid, bundle, DEVICES)
        stop_s = state("bench", 0, bundle, {}, "stopped")

        def in_process() -> None:
            assert run_hook(inproc).code == 0

        run_hook(inproc), run_hook(stop_s)  # load programs once, as a warm library would
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            in_process()
            times.append(time.perf_counter() - t0)
            run_hook(stop_s)
        rows.append(
            ("  in-process work of one create (classid + devices)", statistics.median(times) * 1e3)
        )
        print(f"hook latency, exec -> exit, median of {runs} interleaved rounds (ms):")
        for label, ms in rows:
            print(f"  {label:55} {ms:8.1f}")
        assert net.read_config(cg) is None and devices.read_device_denials(cg) == {}
    finally:
        proc.kill()
        proc.wait()
        cg_dir.rmdir()


def hook_entry(tmp: Path, path: str, args: list[str], env: Sequence[str] = ()) -> dict[str, Any]:
    """A config.json hook running `args`; its environment is only what the entry lists, plus
    the node settings of this run that decide what the hook loads (bytecode dir, pin dir)."""
    node = [f"{k}={v}" for k, v in os.environ.items() if k in NODE_SETTINGS]
    return {
        "path": path,
        "args": args,
        "env": [f"PELAGOS_BPF_HOOK_STATE={tmp / 'rstate'}", *node, *env],
    }


def runc_bench(runs: int, tmp: Path, hooks: dict[str, dict[str, Any]] | None = None) -> None:
    """`runc run` of busybox `true` without a hook and with each of `hooks` (label -> hook
    entry; default: the installed `pelagos-bpf oci-hook`) as createRuntime and poststop, with
    a classid annotation; the variants alternate run by run."""
    runc = shutil.which("runc")
    if runc is None:
        print("runc: not installed; skipped")
        return
    bundle = tmp / "rbundle"
    (bundle / "rootfs" / "bin").mkdir(parents=True)
    shutil.copy2("/bin/busybox", bundle / "rootfs" / "bin" / "busybox")
    (bundle / "rootfs" / "bin" / "true").symlink_to("busybox")
    subprocess.run([runc, "spec"], cwd=bundle, check=True)
    cfg = json.loads((bundle / "config.json").read_text())
    cfg["process"].update(terminal=False, args=["true"])
    cfg["root"]["readonly"] = True
    prefix = f"pelagos-bench-runc-{os.getpid()}"
    if hooks is None:
        hooks = {"oci-hook (classid)": hook_entry(tmp, str(HOOK), ["pelagos-bpf", "oci-hook"])}
    variants = {"runc run (no hook)": dict(cfg)}
    for label, hook in hooks.items():
        variants[f"runc run + {label}"] = {
            **cfg,
            "annotations": CLASSID,
            "hooks": {"createRuntime": [hook], "poststop": [hook]},
        }
    times: dict[str, list[float]] = {k: [] for k in variants}
    root = tmp / "runc-root"
    for i in range(runs):
        for label, c in variants.items():
            c = json.loads(json.dumps(c))
            c["linux"]["cgroupsPath"] = f"/{prefix}-{i}"
            (bundle / "config.json").write_text(json.dumps(c))
            t0 = time.perf_counter()
            r = subprocess.run(
                [runc, "--root", str(root), "run", f"b{i}"],
                cwd=bundle,
                stdin=subprocess.DEVNULL,
                capture_output=True,
            )
            times[label].append(time.perf_counter() - t0)
            if r.returncode != 0:
                print(f"runc: run failed here ({r.stderr.decode().strip()[:200]}); skipped")
                return
    print(f"runc end to end (run -> exit -> delete), median of {runs} (ms):")
    base = statistics.median(times["runc run (no hook)"])
    for label, ts in times.items():
        m = statistics.median(ts)
        print(f"  {label:55} {m * 1e3:8.1f}  ({m / base:.2f}x)")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=100)
    ap.add_argument("--runc-runs", type=int, default=20)
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("needs root")
        return 2
    with tempfile.TemporaryDirectory(prefix="pelagos-bench-hook-") as d:
        use_bench_policy(Path(d))
        hook_bench(args.runs, Path(d))
        if args.runc_runs:
            runc_bench(args.runc_runs, Path(d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
