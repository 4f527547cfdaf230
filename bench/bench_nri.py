"""Pod start through containerd's CRI with our NRI plugin over without (inside the containerd
guest).

    python -m tests.vm.run --kernel 6.12 --node containerd --cmd 'python bench/bench_nri.py'

Annotated pods (classid 1:10 and `deny c 1:5 rwm`, a namespace the policy allows) are started
(RunPodSandbox + CreateContainer + StartContainer), checked, and removed, alternately with the
plugin registered and without it, in ABBA order so drift hits both sides alike. Without the
plugin containerd ignores the annotations; with it every pod gets its classid and deny rule
(checked on the first pod of each side).

The plugin runs in this process (pelagos_bpf.nri.plugin.Plugin on a PluginStub thread, its
programs loaded once and the GIL switch interval set as in the agent), so switching it on and
off costs a registration, not an agent start (seconds under TCG), and its per-event times are
its own samples. This process's gRPC client only waits while containerd calls the plugin.
After each removal the plugin's janitor (the dead cgroup's map entries) is let finish before
the next pod: it runs off the start path, and under TCG's one emulated CPU it would otherwise
land in the next start; its time is printed as "purge".

Printed: medians per CRI call on both sides, the ratio of the pod start (goal <= 1.05x), the
plugin's p50/p99 per event, and what the difference is made of (the plugin's own time vs NRI's
transport and containerd's work around it). No assertions: ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pelagos_bpf import devices, net
from pelagos_bpf.agent.metrics import quantile
from pelagos_bpf.agent.server import SWITCH_INTERVAL
from pelagos_bpf.cgref import Ref
from pelagos_bpf.nri.plugin import Plugin
from pelagos_bpf.nri.stub import PluginStub
from pelagos_bpf.policy import parse as parse_policy
from pelagos_bpf.registry import FEATURES
from tests.cri.client import Client, Pod
from tests.vm import containerd

NAMESPACE = "bench"
POLICY = f'[namespaces.{NAMESPACE}]\nclassids = ["1:10"]\n'
ANNOTATIONS = {"io.pelagos-bpf.net.classid": "1:10", "io.pelagos-bpf.devices": "deny c 1:5 rwm"}
STEPS = ("RunPodSandbox", "CreateContainer", "StartContainer")
WAIT = 120.0


class InProcessPlugin:
    """The plugin on a stub thread; on() registers it (and waits until containerd has it),
    off() closes its connection (and waits until containerd has dropped it)."""

    def __init__(self) -> None:
        policy = parse_policy(POLICY, "bench-policy.toml")
        self.samples: dict[str, list[float]] = defaultdict(list)

        def observe(op: str, seconds: float, ok: bool) -> None:
            self.samples[op if ok else f"{op} (failed)"].append(seconds)

        self.plugin = Plugin(lambda: policy, observe=observe)
        self.stub: PluginStub | None = None
        self.thread: threading.Thread | None = None

    def on(self) -> None:
        if self.stub is not None:
            return
        mark = containerd.log_offset()
        self.stub = PluginStub(self.plugin, name="pelagos-bpf", index="10", environ={})
        self.thread = threading.Thread(target=self.stub.run, daemon=True)
        self.thread.start()
        containerd.wait_plugin("pelagos-bpf", since=mark)

    def off(self) -> None:
        if self.stub is None:
            return
        mark = containerd.log_offset()
        self.stub.stop()
        assert self.thread is not None
        self.thread.join(WAIT)
        self.stub = self.thread = None
        wait_log('connection to plugin \\"10-pelagos-bpf\\" closed', mark)


def wait_log(text: str, since: int) -> None:
    deadline = time.monotonic() + WAIT
    while True:
        with containerd.log_path().open("rb") as f:
            f.seek(since)
            if text.encode() in f.read():
                return
        if time.monotonic() > deadline:
            raise SystemExit(f"containerd never logged {text!r}")
        time.sleep(0.05)


def pod_round(
    c: Client, side: str, out: dict[str, list[float]], check: bool, plugin: InProcessPlugin
) -> None:
    purged = len(plugin.samples["purge"])
    c.calls.clear()
    pod = c.run_pod(["sleep", "inf"], annotations=ANNOTATIONS, namespace=NAMESPACE)
    try:
        took = dict(c.calls)
        for step in STEPS:
            out[f"{side}: {step}"].append(took[step])
        out[f"{side}: pod start"].append(sum(took[s] for s in STEPS))
        if check:
            check_pod(pod, side == "with")
    finally:
        t0 = time.perf_counter()
        c.remove_pod(pod.pod)
        out[f"{side}: remove_pod"].append(time.perf_counter() - t0)
    deadline = time.monotonic() + WAIT
    while side == "with" and len(plugin.samples["purge"]) == purged:
        if time.monotonic() > deadline:
            raise SystemExit("the plugin's janitor never ran after a removal")
        time.sleep(0.01)


def check_pod(pod: Pod, plugin: bool) -> None:
    rel = Path(f"/proc/{pod.pid}/cgroup").read_text().strip().removeprefix("0::")
    cg = Ref.of("/sys/fs/cgroup" + rel)
    classid = net.read_state(cg).classid if net.read_state(cg).attached else None
    owners = [o.owner for o in devices.read_state(cg).owners]
    want = (0x10010, ["nri"]) if plugin else (None, [])
    if (classid, owners) != want:
        raise SystemExit(f"pod {pod.pod}: classid {classid}, device owners {owners}; want {want}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=24, help="pods per side (default 24)")
    args = ap.parse_args()
    if os.environ.get("PELAGOS_VM_NODE") != "containerd":
        raise SystemExit("run inside the containerd guest (see the docstring)")
    for feat in FEATURES:  # once, as the agent does at start
        feat.loaded()
    sys.setswitchinterval(SWITCH_INTERVAL)  # as the agent
    plugin = InProcessPlugin()
    out: dict[str, list[float]] = defaultdict(list)
    with Client() as c:
        c.wait_ready(c.default_image())
        sides = {"with": plugin.on, "without": plugin.off}
        for side, switch in sides.items():  # warm-up: first pods pay one-time costs
            switch()
            pod_round(c, side, defaultdict(list), True, plugin)
        plugin.samples.clear()
        for n in range(args.runs):
            order = ("with", "without") if n % 2 == 0 else ("without", "with")
            for side in order:
                sides[side]()
                pod_round(c, side, out, n < 2, plugin)
        plugin.off()
    med = {k: statistics.median(v) * 1000 for k, v in out.items()}
    print(f"medians of {args.runs} annotated pods per side, interleaved ABBA (ms):")
    for k in sorted(med):
        print(f"  {k:<30} {med[k]:8.1f}")
    ratio = med["with: pod start"] / med["without: pod start"]
    ratio_cs = (med["with: CreateContainer"] + med["with: StartContainer"]) / (
        med["without: CreateContainer"] + med["without: StartContainer"]
    )
    print(f"pod start with the plugin over without: {ratio:.3f}x (goal <= 1.05x)")
    print(f"  CreateContainer + StartContainer alone: {ratio_cs:.3f}x")
    print("the plugin's own time per event (ms):")
    for op, xs in sorted(plugin.samples.items()):
        p50, p99 = quantile(xs, 0.5), quantile(xs, 0.99)
        assert p50 is not None and p99 is not None
        print(f"  {op:<26} n={len(xs):3}  p50 {p50 * 1000:7.2f}  p99 {p99 * 1000:7.2f}")
    for step, op in (
        ("CreateContainer", "create_container"),
        ("StartContainer", "start_container"),
    ):
        delta = med[f"with: {step}"] - med[f"without: {step}"]
        own = statistics.median(plugin.samples.get(op, [0.0])) * 1000
        print(
            f"  {step}: +{delta:.1f} ms with the plugin = {own:.2f} ms in the plugin + "
            f"{delta - own:.1f} ms of NRI transport and containerd around it (and noise)"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
