"""The agent's request statistics, and everything it exports in the Prometheus text format.

Why the format by hand: it is a few line shapes (exposition format 0.0.4), and the agent must
not depend on a client library; the tests parse the output with prometheus_client's parser.
Kernel counters (device denials, net bytes/packets per cgroup, map fill) are read when scraped,
never kept: the agent holds no state the kernel does not.
"""

from __future__ import annotations

import bisect
import collections
import io
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
"""Latency histogram bounds (seconds): from a create (well under a millisecond when all is
well) up to a gc or a scrape of a large node."""
RESERVOIR = 2048
"""Latencies kept per op for p50/p99 (the most recent ones): bounded memory."""


@dataclass
class _Op:
    ok: int = 0
    failed: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))
    total: float = 0.0
    recent: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=RESERVOIR)
    )


def quantile(values: Iterable[float], q: float) -> float | None:
    """The q-quantile (nearest rank) of `values`; None when empty."""
    xs = sorted(values)
    if not xs:
        return None
    return xs[min(len(xs) - 1, max(0, int(q * len(xs) + 0.5) - 1))]


class Stats:
    """Request counts, latencies and refusals, shared by the server's threads."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self._lock = threading.Lock()
        self._ops: dict[str, _Op] = {}
        self._refused: collections.Counter[str] = collections.Counter()

    def observe(self, op: str, seconds: float, ok: bool) -> None:
        with self._lock:
            o = self._ops.setdefault(op, _Op())
            if ok:
                o.ok += 1
            else:
                o.failed += 1
            i = bisect.bisect_left(BUCKETS, seconds)
            if i < len(BUCKETS):
                o.buckets[i] += 1
            o.total += seconds
            o.recent.append(seconds)

    def refuse(self, reason: str) -> None:
        with self._lock:
            self._refused[reason] += 1

    def uptime(self) -> float:
        return time.monotonic() - self.started

    def requests(self) -> dict[str, dict[str, Any]]:
        """op -> {count, failed, p50_ms, p99_ms} (quantiles of the recent RESERVOIR)."""
        with self._lock:
            ops = {k: (o.ok, o.failed, list(o.recent)) for k, o in self._ops.items()}
        out = {}
        for name, (ok, failed, recent) in sorted(ops.items()):
            p50, p99 = quantile(recent, 0.5), quantile(recent, 0.99)
            out[name] = {
                "count": ok + failed,
                "failed": failed,
                "p50_ms": None if p50 is None else round(p50 * 1e3, 3),
                "p99_ms": None if p99 is None else round(p99 * 1e3, 3),
            }
        return out

    def refused(self) -> dict[str, int]:
        with self._lock:
            return dict(self._refused)

    def histograms(self) -> dict[str, tuple[int, int, list[int], float]]:
        """op -> (ok, failed, per-bucket counts (not cumulative), sum of seconds)."""
        with self._lock:
            return {k: (o.ok, o.failed, list(o.buckets), o.total) for k, o in self._ops.items()}


# ---------------------------------------------------------------- exposition format


def _esc(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**kv: object) -> str:
    return "{" + ",".join(f'{k}="{_esc(v)}"' for k, v in kv.items()) + "}" if kv else ""


def _num(v: float) -> str:
    return repr(float(v)) if isinstance(v, float) else str(v)


class _Out:
    """One growing byte buffer, not a list of lines: 10,000 cgroups make tens of thousands of
    lines; a list would hold each line twice until the join, and a str once more when
    encoded for the HTTP reply."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()

    def family(self, name: str, kind: str, help_: str) -> None:
        self.buf.write(f"# HELP {name} {help_}\n# TYPE {name} {kind}\n".encode())

    def sample(self, name: str, value: float, **labels: object) -> None:
        self.buf.write(f"{name}{_labels(**labels)} {_num(value)}\n".encode())


def render(
    stats: Stats,
    *,
    in_flight: int,
    connections: int,
    programs: list[dict[str, Any]],
    held: list[dict[str, Any]],
    counters: dict[str, Any],
    nri: dict[str, Any] | None = None,
) -> bytes:
    """The whole exposition (UTF-8): agent, per-cgroup kernel counters, map fill levels."""
    out = _Out()
    out.family("pelagos_bpf_agent_uptime_seconds", "gauge", "Seconds since the agent started.")
    out.sample("pelagos_bpf_agent_uptime_seconds", round(stats.uptime(), 3))
    out.family("pelagos_bpf_agent_in_flight", "gauge", "Container requests being served or queued.")
    out.sample("pelagos_bpf_agent_in_flight", in_flight)
    out.family("pelagos_bpf_agent_connections", "gauge", "Open client connections.")
    out.sample("pelagos_bpf_agent_connections", connections)
    out.family(
        "pelagos_bpf_agent_programs_loaded", "gauge", "BPF programs the agent loaded or fetched."
    )
    out.sample("pelagos_bpf_agent_programs_loaded", len(programs))
    out.family(
        "pelagos_bpf_agent_cgroups_held", "gauge", "Cgroups with a pelagos-bpf program attached."
    )
    out.sample("pelagos_bpf_agent_cgroups_held", len(held))
    if nri is not None:
        out.family(
            "pelagos_bpf_agent_nri_registered",
            "gauge",
            "1 while the NRI plugin is registered with the runtime and synchronized, else 0.",
        )
        out.sample("pelagos_bpf_agent_nri_registered", int(nri["registered"]), plugin=nri["plugin"])

    hist = stats.histograms()
    out.family(
        "pelagos_bpf_agent_requests_total",
        "counter",
        "Requests served, by op and result (ok/failed).",
    )
    for op, (ok, failed, _b, _s) in sorted(hist.items()):
        out.sample("pelagos_bpf_agent_requests_total", ok, op=op, result="ok")
        out.sample("pelagos_bpf_agent_requests_total", failed, op=op, result="failed")
    out.family(
        "pelagos_bpf_agent_request_duration_seconds",
        "histogram",
        "Time the agent spent serving a request (queue wait excluded), by op.",
    )
    for op, (ok, failed, buckets, total) in sorted(hist.items()):
        acc = 0
        for le, n in zip(BUCKETS, buckets, strict=True):
            acc += n
            out.sample("pelagos_bpf_agent_request_duration_seconds_bucket", acc, op=op, le=le)
        out.sample(
            "pelagos_bpf_agent_request_duration_seconds_bucket", ok + failed, op=op, le="+Inf"
        )
        out.sample("pelagos_bpf_agent_request_duration_seconds_sum", total, op=op)
        out.sample("pelagos_bpf_agent_request_duration_seconds_count", ok + failed, op=op)
    out.family(
        "pelagos_bpf_agent_refused_total",
        "counter",
        "Connections refused or dropped, by reason (uid, frame, deadline, overload, ...).",
    )
    for reason, n in sorted(stats.refused().items()):
        out.sample("pelagos_bpf_agent_refused_total", n, reason=reason)

    where = {h["id"]: (h["path"], h["container"] or "") for h in held}
    out.family(
        "pelagos_bpf_device_denials_total",
        "counter",
        "Device accesses denied by a pelagos-bpf device program, per cgroup and device.",
    )
    for cg_id, items in sorted(counters["denials"].items()):
        if cg_id not in where:
            continue
        path, container = where[cg_id]
        for label, n in sorted(items.items()):
            device, _, access = label.rpartition(" ")
            out.sample(
                "pelagos_bpf_device_denials_total",
                n,
                cgroup=path,
                container=container,
                device=device,
                access=access,
            )
    for unit in ("bytes", "packets"):
        out.family(
            f"pelagos_bpf_net_{unit}_total",
            "counter",
            f"IP {unit} sent (egress) and received (ingress) by a cgroup's sockets.",
        )
        for cg_id, row in sorted(counters["net"].items()):
            if cg_id not in where:
                continue
            path, container = where[cg_id]
            for direction, base in (("egress", 0), ("ingress", 2)):
                value = row[base + (unit == "packets")]
                if value is not None:
                    out.sample(
                        f"pelagos_bpf_net_{unit}_total",
                        value,
                        cgroup=path,
                        container=container,
                        direction=direction,
                    )
    for name, key, what in (
        ("pelagos_bpf_map_entries", "entries", "Entries in a pelagos-bpf hash map."),
        ("pelagos_bpf_map_max_entries", "max_entries", "Capacity of a pelagos-bpf hash map."),
    ):
        out.family(name, "gauge", what)
        for m in counters["maps"]:
            out.sample(
                name, m[key], feature=m["feature"], version=m["version"], map=m["map"], id=m["id"]
            )
    return out.buf.getvalue()
