"""The NRI plugin stub's own cost per event, against the runtime's 2 s request timeout.

A fake runtime (tests/nri_runtime.py: our mux and ttrpc in the runtime's roles, on a real unix
socketpair) registers a PluginStub whose handler does no work beyond building its answer, then
times, per event, the runtime's call from request to decoded response:
- StateChange(START_CONTAINER) with a pod and container as containerd fills them (annotations,
  cgroups paths), the event the agent attaches on;
- CreateContainer answered with an adjustment (a device, a createRuntime hook, an annotation).

The plugin runs in its own process, launched as NRI launches plugins (NRI_PLUGIN_SOCKET), so it
does not share a GIL with the fake runtime. Components, each measured in the same run: the
handler's own time (inside the plugin), and the fake runtime's own encode/decode of the same
messages done without a socket. The rest of the round trip is the stub (mux, ttrpc, the
reader -> worker -> socket thread hops), the socket, and the fake runtime's reader thread
(an upper bound on the stub's overhead). No timing asserts: this prints numbers.

Usage: .venv/bin/python bench/bench_nri_stub.py [--events 2000]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from google.protobuf.message import Message

from pelagos_bpf.nri import api
from pelagos_bpf.nri.proto import nri_pb2, ttrpc_pb2
from pelagos_bpf.nri.stub import BaseHandler, PluginStub
from tests.nri_runtime import RuntimeConn

clock = time.perf_counter_ns


class Timed(BaseHandler):
    def __init__(self) -> None:
        self.handler_ns: list[int] = []

    def start_container(self, event: api.StateChangeEvent) -> None:
        t0 = clock()
        _ = event.pod.annotations.get("io.pelagos-bpf.net.classid")
        self.handler_ns.append(clock() - t0)

    def create_container(self, request: api.CreateContainerRequest) -> api.CreateContainerResponse:
        t0 = clock()
        adjust = api.ContainerAdjustment(annotations={"io.pelagos-bpf.applied": "1"})
        adjust.linux.devices.append(
            api.LinuxDevice(path="/dev/fuse", type="c", major=10, minor=229)
        )
        adjust.hooks.create_runtime.append(api.Hook(path="/usr/libexec/pelagos-bpf-hook"))
        resp = api.CreateContainerResponse(adjust=adjust)
        self.handler_ns.append(clock() - t0)
        return resp


def pod_and_container() -> tuple[api.PodSandbox, api.Container]:
    pod = api.PodSandbox(id="a" * 64, name="web-7d9f", uid="u" * 36, namespace="team-a", pid=4242)
    pod.annotations.update(
        {
            "io.pelagos-bpf.net.classid": "1:10",
            "io.pelagos-bpf.devices": "deny c 1:5 rwm",
            "io.kubernetes.cri.sandbox-id": "a" * 64,
            "kubernetes.io/config.seen": "2026-12-07T10:00:00Z",
        }
    )
    pod.linux.cgroups_path = (
        "kubepods-besteffort-pod" + "u" * 36 + ".slice:cri-containerd:" + "a" * 64
    )
    ctr = api.Container(id="c" * 64, pod_sandbox_id="a" * 64, name="app", pid=4343)
    ctr.annotations.update(pod.annotations)
    ctr.linux.cgroups_path = (
        "kubepods-besteffort-pod" + "u" * 36 + ".slice:cri-containerd:" + "c" * 64
    )
    for minor in (3, 5, 7, 8, 9):
        ctr.linux.devices.append(
            api.LinuxDevice(path=f"/dev/x{minor}", type="c", major=1, minor=minor)
        )
    return pod, ctr


def pct(xs: list[int], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(p * len(s)))] / 1000


def runtime_side_ns(
    request: Message, response_type: type[Message], reply: bytes, n: int
) -> list[int]:
    """The fake runtime's own work per call, no socket: build+encode the request, decode the
    ttrpc Response and its payload."""
    out = []
    for _ in range(n):
        t0 = clock()
        ttrpc_pb2.Request(
            service=api.PLUGIN_SERVICE,
            method="X",
            payload=request.SerializeToString(),
            timeout_nano=2 * 10**9,
        ).SerializeToString()
        resp = ttrpc_pb2.Response.FromString(reply)
        response_type.FromString(resp.payload)
        out.append(clock() - t0)
    return out


def measure(
    conn: RuntimeConn, method: str, req: Message, rtype: type[Message], n: int
) -> list[int]:
    for _ in range(50):
        conn.call(method, req, rtype)  # warm up
    out = []
    for _ in range(n):
        t0 = clock()
        conn.call(method, req, rtype)
        out.append(clock() - t0)
    return out


def plugin_main() -> None:
    """The plugin process, launched as NRI launches one (pre-connected socket in the env)."""
    handler = Timed()

    def report() -> None:
        print(json.dumps(handler.handler_ns), flush=True)

    handler.shutdown = report  # type: ignore[method-assign]
    PluginStub(handler, name="bench", index="50").run()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--events", type=int, default=2000)
    ap.add_argument("--plugin", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.plugin:
        plugin_main()
        return

    theirs, ours = socket.socketpair()
    child = subprocess.Popen(
        [sys.executable, __file__, "--plugin"],
        env={**os.environ, "NRI_PLUGIN_SOCKET": str(ours.fileno())},
        pass_fds=[ours.fileno()],
        stdout=subprocess.PIPE,
        text=True,
    )
    ours.close()
    conn = RuntimeConn(theirs)
    conn.register_and_configure()
    conn.call("Synchronize", api.SynchronizeRequest(), api.SynchronizeResponse)

    pod, ctr = pod_and_container()
    cases = [
        (
            "StateChange(START_CONTAINER)",
            "StateChange",
            api.StateChangeEvent(event=nri_pb2.START_CONTAINER, pod=pod, container=ctr),
            api.Empty,
        ),
        (
            "CreateContainer",
            "CreateContainer",
            api.CreateContainerRequest(pod=pod, container=ctr),
            api.CreateContainerResponse,
        ),
    ]
    results = [
        (name, measure(conn, method, req, rtype, args.events)) for name, method, req, rtype in cases
    ]
    conn.call("Shutdown", api.Empty(), api.Empty)
    assert child.stdout is not None
    handler_ns = json.loads(child.stdout.readline())
    conn.close()
    child.wait(10)

    print(f"{args.events} events per case; plugin in its own process on a socketpair, as NRI")
    print("launches one; its handler does no real work. Microseconds.")
    cols = ("round trip p50", "p99", "handler p50", "runtime side p50", "stub+socket p50")
    print(f"{'event':30} " + " ".join(f"{c:>16}" for c in cols))
    for i, ((name, rt), (_, _, req, rtype)) in enumerate(zip(results, cases, strict=True)):
        warm = 50
        hs = handler_ns[(i + 1) * warm + i * args.events : (i + 1) * (warm + args.events)]
        reply_payload = b"" if rtype is api.Empty else handler_reply()
        reply = ttrpc_pb2.Response(payload=reply_payload).SerializeToString()
        side = runtime_side_ns(req, rtype, reply, args.events)
        rest = statistics.median(rt) - statistics.median(hs) - statistics.median(side)
        vals = (pct(rt, 0.5), pct(rt, 0.99), pct(hs, 0.5), pct(side, 0.5), rest / 1000)
        print(f"{name:30} " + " ".join(f"{v:16.1f}" for v in vals))
    size = len(api.CreateContainerRequest(pod=pod, container=ctr).SerializeToString())
    print(f"CreateContainerRequest: {size} bytes")


def handler_reply() -> bytes:
    return Timed().create_container(api.CreateContainerRequest()).SerializeToString()


if __name__ == "__main__":
    main()
