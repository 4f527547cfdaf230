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
import mmap
import os
import threading
import time
from collections.abc import Iterable
from typing import Any

BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
"""Latency histogram bounds (seconds): from a create (well under a millisecond when all is
well) up to a gc or a scrape of a large node."""
RESERVOIR = 2048
"""Latencies kept per op and process for p50/p99 (the most recent ones): bounded memory."""


MAX_OPS = 32
"""Op names one process can count separately (more fold into "other"): hook stages, library
calls, admin calls, NRI events."""
MAX_REASONS = 16
NAME = 32  # bytes per op or reason name
_OP_INTS = 3 + len(BUCKETS)  # ok, failed, ring position, the buckets
_GAUGES = ("pid", "connections", "pending", "admin_pending", "load", "nri")


def quantile(values: Iterable[float], q: float) -> float | None:
    """The q-quantile (nearest rank) of `values`; None when empty."""
    xs = sorted(values)
    if not xs:
        return None
    return xs[min(len(xs) - 1, max(0, int(q * len(xs) + 0.5) - 1))]


class _Slot:
    """One process's counters, as typed views on its part of the shared mapping.

    Layout (8-byte words): gauges, op count, reason count; op names; per op: ints
    (ok, failed, ring position, buckets), the sum of seconds, the ring of recent latencies;
    reason names; reason counts."""

    def __init__(self, buf: memoryview) -> None:
        off = 0

        def take(nbytes: int) -> memoryview:
            nonlocal off
            view = buf[off : off + nbytes]
            off += nbytes
            return view

        self.gauges = take(8 * len(_GAUGES)).cast("q")
        self.counts = take(16).cast("q")  # ops named, reasons named
        self.op_names = take(NAME * MAX_OPS)
        self.op_ints = take(8 * _OP_INTS * MAX_OPS).cast("q")
        self.op_sums = take(8 * MAX_OPS).cast("d")
        self.rings = take(8 * RESERVOIR * MAX_OPS).cast("d")
        self.reason_names = take(NAME * MAX_REASONS)
        self.reasons = take(8 * MAX_REASONS).cast("q")
        self.size = off

    @staticmethod
    def _name(table: memoryview, i: int) -> str:
        return bytes(table[i * NAME : (i + 1) * NAME]).rstrip(b"\0").decode()

    def names(self, table: memoryview, n: int) -> list[str]:
        return [self._name(table, i) for i in range(n)]

    def op(self, i: int) -> tuple[int, int, list[int], float, list[float]]:
        """(ok, failed, buckets, sum, recent latencies) of op i."""
        base = i * _OP_INTS
        ok, failed, pos = self.op_ints[base], self.op_ints[base + 1], self.op_ints[base + 2]
        buckets = list(self.op_ints[base + 3 : base + _OP_INTS])
        ring = self.rings[i * RESERVOIR : (i + 1) * RESERVOIR]
        recent = list(ring[: min(pos, RESERVOIR)])
        return ok, failed, buckets, self.op_sums[i], recent


def _slot_size() -> int:
    words = len(_GAUGES) + 2 + (_OP_INTS + 1 + RESERVOIR) * MAX_OPS + MAX_REASONS
    return 8 * words + NAME * (MAX_OPS + MAX_REASONS)


class Stats:
    """Request counts, latencies, refusals and load, shared by the agent's threads and
    processes.

    Why shared memory: the agent may serve from several processes (one socket, the kernel as
    the only state), yet its status and metrics are the node's. Each process writes only its
    own slot of one anonymous shared mapping made before the fork (under a thread lock);
    readers add the slots up. No message per request, no lock between processes: a reader may
    see a count one request ahead of its latency, never a torn total worth worrying about."""

    def __init__(self, processes: int = 1) -> None:
        self.started = time.monotonic()
        self._lock = threading.Lock()
        size = _SLOT_SIZE
        self._map = mmap.mmap(-1, size * processes)  # anonymous, MAP_SHARED: seen across fork
        whole = memoryview(self._map)
        self._slots = [_Slot(whole[i * size : (i + 1) * size]) for i in range(processes)]
        self._own = self._slots[0]
        self._ops: dict[str, int] = {}
        self._reasons: dict[str, int] = {}
        self.bind(0)

    @property
    def processes(self) -> int:
        return len(self._slots)

    def bind(self, index: int) -> None:
        """This process writes slot `index` from now on (each forked worker its own)."""
        self._own = self._slots[index]
        self._ops, self._reasons = {}, {}
        self._own.gauges[0] = os.getpid()

    def _index(
        self, table: dict[str, int], names: memoryview, n_at: int, cap: int, name: str
    ) -> int:
        i = table.get(name)
        if i is None:
            n = self._own.counts[n_at]
            if n >= cap:
                return table.get("other", cap - 1)
            i = table[name] = n
            raw = name.encode()[:NAME]
            names[i * NAME : (i + 1) * NAME] = raw.ljust(NAME, b"\0")
            self._own.counts[n_at] = n + 1  # the name is in before anyone may read it
            if n + 1 == cap:
                table["other"] = n
                names[n * NAME : (n + 1) * NAME] = b"other".ljust(NAME, b"\0")
        return i

    def observe(self, op: str, seconds: float, ok: bool) -> None:
        with self._lock:
            s = self._own
            i = self._index(self._ops, s.op_names, 0, MAX_OPS, op)
            base = i * _OP_INTS
            s.op_ints[base + (0 if ok else 1)] += 1
            b = bisect.bisect_left(BUCKETS, seconds)
            if b < len(BUCKETS):
                s.op_ints[base + 3 + b] += 1
            s.op_sums[i] += seconds
            pos = s.op_ints[base + 2]
            s.rings[i * RESERVOIR + pos % RESERVOIR] = seconds
            s.op_ints[base + 2] = pos + 1

    def refuse(self, reason: str) -> None:
        with self._lock:
            s = self._own
            s.reasons[self._index(self._reasons, s.reason_names, 1, MAX_REASONS, reason)] += 1

    def set_load(self, connections: int, pending: int, admin_pending: int) -> None:
        """This process's open connections and requests in progress (for status, metrics and
        for siblings deciding who accepts next)."""
        g = self._own.gauges
        g[1], g[2], g[3] = connections, pending, admin_pending

    def loads(self) -> list[dict[str, int]]:
        """Every process's gauges (pid, connections, pending, admin_pending) and how many
        requests it has served."""
        out = []
        for s in self._slots:
            d = dict(zip(_GAUGES[:5], s.gauges[:5], strict=True))
            d["requests"] = sum(
                s.op_ints[i * _OP_INTS] + s.op_ints[i * _OP_INTS + 1] for i in range(s.counts[0])
            )
            out.append(d)
        return out

    def add_load(self, delta: int) -> None:
        """Connections this process must still answer: +1 at accept, -1 once its reply is
        written (by the worker, before it sends: the client's next connection must not find
        this process still loaded) or once it ends without one."""
        with self._lock:
            self._own.gauges[4] += delta

    def load(self) -> int:
        return int(self._own.gauges[4])

    def least_load(self) -> int:
        """The least load of any other live process (a large number if none)."""
        return min(
            (s.gauges[4] for s in self._slots if s is not self._own and s.gauges[0]),
            default=1 << 30,
        )

    def set_nri_registered(self, registered: bool) -> None:
        """The main process's NRI plugin is (not) registered with the runtime: any process
        answering a status or a scrape reports it."""
        self._slots[0].gauges[5] = 2 if registered else 1

    def nri_registered(self) -> bool:
        return self._slots[0].gauges[5] == 2

    def forget(self, pid: int) -> None:
        """A process that exited holds no connections any more (its counts stay: history)."""
        for s in self._slots:
            if s.gauges[0] == pid:
                for i in range(len(_GAUGES)):
                    s.gauges[i] = 0

    def uptime(self) -> float:
        return time.monotonic() - self.started

    def _merged(self) -> dict[str, tuple[int, int, list[int], float, list[float]]]:
        out: dict[str, tuple[int, int, list[int], float, list[float]]] = {}
        for s in self._slots:
            for i, name in enumerate(s.names(s.op_names, s.counts[0])):
                ok, failed, buckets, total, recent = s.op(i)
                if name in out:
                    ok0, f0, b0, t0, r0 = out[name]
                    buckets = [x + y for x, y in zip(b0, buckets, strict=True)]
                    ok, failed, total, recent = ok + ok0, failed + f0, total + t0, r0 + recent
                out[name] = (ok, failed, buckets, total, recent)
        return out

    def requests(self) -> dict[str, dict[str, Any]]:
        """op -> {count, failed, p50_ms, p99_ms} (quantiles of the RESERVOIR most recent of
        each process)."""
        out = {}
        for name, (ok, failed, _b, _t, recent) in sorted(self._merged().items()):
            p50, p99 = quantile(recent, 0.5), quantile(recent, 0.99)
            out[name] = {
                "count": ok + failed,
                "failed": failed,
                "p50_ms": None if p50 is None else round(p50 * 1e3, 3),
                "p99_ms": None if p99 is None else round(p99 * 1e3, 3),
            }
        return out

    def refused(self) -> dict[str, int]:
        out: collections.Counter[str] = collections.Counter()
        for s in self._slots:
            for i, name in enumerate(s.names(s.reason_names, s.counts[1])):
                out[name] += s.reasons[i]
        return dict(out)

    def histograms(self) -> dict[str, tuple[int, int, list[int], float]]:
        """op -> (ok, failed, per-bucket counts (not cumulative), sum of seconds)."""
        return {k: (ok, f, b, t) for k, (ok, f, b, t, _r) in self._merged().items()}


_SLOT_SIZE = _slot_size()


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
