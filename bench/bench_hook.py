"""OCI hook latency, side by side in one run (root; acts only on a cgroup this script creates).

1. Exec -> exit of `pelagos-bpf oci-hook` as a runtime runs it (state JSON on stdin), median of
   N runs each: create with net classid (annotation), create with classid + device rules, and
   poststop; with the components beside them: `python -c pass`, the CLI's import + parse
   (`pelagos-bpf oci-hook` on a state that asks nothing), and the in-process work of one create.
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
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pelagos_bpf import devices, net
from pelagos_bpf.cgroup import Cgroup
from pelagos_bpf.hierarchy import discover
from pelagos_bpf.ocihook import run_hook

HOOK = Path(sys.executable).parent / "pelagos-bpf"
CLASSID = {"io.pelagos-bpf.net.classid": "1:10"}
DEVICES = {**CLASSID, "io.pelagos-bpf.devices": "deny c 1:5 r"}


def median_ms(fn: Callable[[], None], n: int) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


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

        def cycle(ann: dict[str, str]) -> tuple[Callable[[], None], Callable[[], None]]:
            create = state("bench", proc.pid, bundle, ann)
            stop = state("bench", 0, bundle, {}, "stopped")
            return (lambda: exec_hook(create, env)), (lambda: exec_hook(stop, env))

        rows = []
        py = median_ms(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True), runs)
        rows.append(("python -c pass (interpreter start)", py))
        noop = state("bench", proc.pid, bundle, {})
        rows.append(
            ("hook, nothing asked (start + imports)", median_ms(lambda: exec_hook(noop, env), runs))
        )
        rows.append(
            (
                "hook, nothing asked, python -m pelagos_bpf.ocihook",
                median_ms(lambda: exec_hook(noop, env, LEAN_ARGV), runs),
            )
        )
        lean = state("bench", proc.pid, bundle, CLASSID)
        lean_stop = state("bench", 0, bundle, {}, "stopped")
        lean_times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            exec_hook(lean, env, LEAN_ARGV)
            lean_times.append(time.perf_counter() - t0)
            exec_hook(lean_stop, env, LEAN_ARGV)
        rows.append(
            (
                "hook create: classid, python -m pelagos_bpf.ocihook",
                statistics.median(lean_times) * 1e3,
            )
        )
        for label, ann in (("classid", CLASSID), ("classid + device rules", DEVICES)):
            create, stop = cycle(ann)
            c_times, s_times = [], []
            for _ in range(runs):  # create and poststop alternate, as in a container's life
                t0 = time.perf_counter()
                create()
                t1 = time.perf_counter()
                stop()
                c_times.append(t1 - t0)
                s_times.append(time.perf_counter() - t1)
            rows.append((f"hook create: {label}", statistics.median(c_times) * 1e3))
            rows.append(
                (f"hook poststop: {label} (cgroup alive)", statistics.median(s_times) * 1e3)
            )
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
        print(f"hook latency, exec -> exit, median of {runs} (ms):")
        for label, ms in rows:
            print(f"  {label:55} {ms:8.1f}")
        assert net.read_config(cg) is None and devices.read_device_denials(cg) == {}
    finally:
        proc.kill()
        proc.wait()
        cg_dir.rmdir()


def runc_bench(runs: int, tmp: Path) -> None:
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
    hook = {
        "path": str(HOOK),
        "args": ["pelagos-bpf", "oci-hook"],
        "env": [f"PELAGOS_BPF_HOOK_STATE={tmp / 'rstate'}"]
        + [f"{k}={v}" for k, v in os.environ.items() if k == "PELAGOS_BPF_CACHE"],
    }
    variants = {
        "runc run (no hook)": dict(cfg),
        "runc run + oci-hook (classid)": {
            **cfg,
            "annotations": CLASSID,
            "hooks": {"createRuntime": [hook], "poststop": [hook]},
        },
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
        hook_bench(args.runs, Path(d))
        if args.runc_runs:
            runc_bench(args.runc_runs, Path(d))
    return 0


if __name__ == "__main__":
    sys.exit(main())
