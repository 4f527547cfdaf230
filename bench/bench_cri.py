"""Pod start through containerd's CRI, split into its parts (inside the containerd guest).

    python -m tests.vm.run --kernel 6.12 --node containerd --cmd 'python bench/bench_cri.py'

Interleaved rounds of: a bridge-network pod and a host-network pod started through the CRI
(RunPodSandbox, CreateContainer, StartContainer, the pid lookup; then removal), and the runtime
floor beside them: bookworm's runc creating, starting and deleting a busybox container from a
bundle directly. Medians per step; the differences name the costs: CNI (bridge minus host
network), containerd + shim over runc (StartContainer minus runc create + start). Also the
shell client's own cost (`python -m tests.cri` start-up with grpc). No assertions: ratios.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from datetime import datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.cri.client import Client, Pod
from tests.vm import containerd

RUNC = "/usr/sbin/runc"
BUSYBOX = "/bin/busybox"
BENCH_CGROUP = Path("/sys/fs/cgroup/pelagos-cri-bench")


def runc_bundle(tmp: Path) -> Path:
    """A busybox bundle whose process sleeps (so create and start are separate steps)."""
    b = tmp / "bundle"
    (b / "rootfs" / "bin").mkdir(parents=True)
    shutil.copy(BUSYBOX, b / "rootfs" / "bin" / "busybox")
    for a in ("sh", "sleep"):
        (b / "rootfs" / "bin" / a).symlink_to("busybox")
    subprocess.run([RUNC, "spec", "--bundle", str(b)], check=True)
    spec = json.loads((b / "config.json").read_text())
    spec["process"]["args"] = ["sleep", "inf"]
    spec["process"]["terminal"] = False
    spec["linux"]["cgroupsPath"] = f"/{BENCH_CGROUP.name}/runc"
    (b / "config.json").write_text(json.dumps(spec))
    return b


def runc_round(bundle: Path, n: int, out: dict[str, list[float]]) -> None:
    cid = f"pelagos-bench-{n}"
    steps = (
        ("runc create", ["create", "--bundle", str(bundle), cid]),
        ("runc start", ["start", cid]),
        ("runc delete -f", ["delete", "-f", cid]),
    )
    for label, args in steps:
        t0 = time.perf_counter()
        subprocess.run([RUNC, *args], check=True, stdin=subprocess.DEVNULL)
        out[label].append(time.perf_counter() - t0)


def pod_round(c: Client, host_network: bool, out: dict[str, list[float]], name: str) -> Pod:
    tag = "host-net" if host_network else "bridge"
    c.calls.clear()
    t0 = time.perf_counter()
    pod = c.run_pod(["sleep", "inf"], host_network=host_network, name=name)
    out[f"{tag}: run_pod total"].append(time.perf_counter() - t0)
    for name, secs in c.calls:
        out[f"{tag}: {name}"].append(secs)
    t0 = time.perf_counter()
    c.remove_pod(pod.pod)
    out[f"{tag}: remove_pod total"].append(time.perf_counter() - t0)
    return pod


def _stamp(line: str) -> float:
    """Seconds of a containerd log line's time="...Z" (nanoseconds cut to microseconds)."""
    iso = line.split('time="', 1)[1][:26]
    return datetime.fromisoformat(iso + "+00:00").timestamp()


def log_phases(log: str, pods: list[tuple[str, str, Pod]], out: dict[str, list[float]]) -> None:
    """Server-side phases from containerd's info log: sandbox set-up before its shim (netns,
    CNI), the shim and pause container (shim start, runc create + start), and StartContainer
    (runc create + start through the running shim, NRI hooks)."""
    lines = log.splitlines()

    def at(*needles: str) -> float:
        return _stamp(next(ln for ln in lines if all(n in ln for n in needles)))

    for tag, name, pod in pods:
        run = at("RunPodSandbox for", f"Name:{name},")
        shim = at(f"connecting to shim {pod.pod}")
        ready = at("returns sandbox id", pod.pod)
        start = at(f'StartContainer for \\"{pod.container}\\"')
        started = at(f'StartContainer for \\"{pod.container}\\" returns')
        out[f"{tag} log: sandbox before its shim"].append(shim - run)
        out[f"{tag} log: shim + pause container"].append(ready - shim)
        out[f"{tag} log: StartContainer"].append(started - start)


def cli_round(out: dict[str, list[float]]) -> None:
    for label, argv in (("python -c pass", ["-c", "pass"]),
                        ("python -m tests.cri --help", ["-m", "tests.cri", "--help"])):  # fmt: skip
        t0 = time.perf_counter()
        subprocess.run([sys.executable, *argv], check=True, stdout=subprocess.DEVNULL)
        out[label].append(time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--socket")
    args = ap.parse_args()
    out: dict[str, list[float]] = defaultdict(list)
    with Client(args.socket) as c, tempfile.TemporaryDirectory() as tmp:
        c.wait_ready(c.default_image())
        bundle = runc_bundle(Path(tmp))
        pod_round(c, False, defaultdict(list), "bench-warm-up")  # first use is not per pod
        pods = []
        for n in range(args.runs):
            for host_network, tag in ((False, "bridge"), (True, "host-net")):
                name = f"bench-{tag}-{n}"
                pods.append((tag, name, pod_round(c, host_network, out, name)))
            runc_round(bundle, n, out)
            cli_round(out)
    log_phases(containerd.log_path().read_text(errors="replace"), pods, out)
    with contextlib.suppress(FileNotFoundError):  # runc removed its own cgroup, not the parent
        BENCH_CGROUP.rmdir()
    med = {k: statistics.median(v) for k, v in out.items()}
    print(f"medians of {args.runs} interleaved rounds (ms):")
    for k, v in med.items():
        print(f"  {k:<36} {v * 1000:8.1f}")

    def m(k: str) -> float:
        return med[k] * 1000

    runc = m("runc create") + m("runc start")
    derived = {
        "CNI (bridge minus host-net RunPodSandbox)": m("bridge: RunPodSandbox")
        - m("host-net: RunPodSandbox"),
        f"StartContainer over runc create+start ({runc:.1f})": m("bridge: StartContainer") - runc,
        "shell client over python -c pass": m("python -m tests.cri --help") - m("python -c pass"),
    }
    print("derived (ms):")
    for k, v in derived.items():
        print(f"  {k:<52} {v:8.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
