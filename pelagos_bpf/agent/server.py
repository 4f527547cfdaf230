"""The agent's server: one event loop for every connection, a bounded pool for the work.

Why this shape: reading frames is waiting (a slow or stuck client must cost the others
nothing), the work is library calls that block on syscalls and the cgroup's flock. So one
asyncio loop accepts and reads every connection under its deadline, and hands whole requests
to a fixed pool of worker threads (operators' requests, status, metrics, inspect and gc, to a
small pool of their own, so a node saturated with containers can still be looked at). A
request is refused (an error reply, nothing done) when
too many are waiting or when it waited too long for a worker, so under overload no client gets
a half-attached cgroup: a request either runs whole or not at all.

Several processes (--processes, one per CPU up to 4) serve the one socket: the create path is
Python under one GIL, and a node starting many containers at once needs every CPU. They share
nothing but the kernel's state (pins, maps, flock locks) and one shared mapping of counters
(metrics.Stats); a busy process leaves new connections to a less busy sibling.

Life cycle: load the programs, read back what is held, bind, fork the other processes,
READY=1; SIGTERM (or SIGINT) stops accepting (a later client finds no agent and the thin hook
falls back to the in-process hook), serves every connection already accepted, then exits. The
first process (the main pid) also runs the NRI plugin, the metrics listener and periodic gc,
passes SIGTERM and SIGHUP on, and stops the agent (exit 1) when another process dies: a
supervisor (systemd) restarts it whole, and the kernel kept everything. A SIGKILL of the main
process takes the others with it (PR_SET_PDEATHSIG). See docs/AGENT.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import functools
import gc
import ipaddress
import logging
import os
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ..errors import PelagosError
from . import ops
from .codec import error_to_doc
from .daemon import (
    bind_socket,
    peer_uid_pid,
    release_memory,
    same_namespaces,
    sd_notify,
    set_pdeathsig,
)
from .metrics import Stats, render
from .nrihost import NriRunner, NriSettings, nri_status
from .protocol import (
    CALL,
    CALL_REPLY,
    FRAME_DEADLINE,
    HEADER,
    HOOK,
    HOOK_REPLY,
    REPLY_OF,
    ProtocolError,
    Request,
    call_error,
    call_ok_parts,
    error_doc,
    error_reply,
    hook_reply,
    parse_header,
    parse_request,
)

log = logging.getLogger("pelagos_bpf.agent")

HTTP_HEAD_MAX = 8192
SWITCH_INTERVAL = 0.0005
YIELD_POLL = 0.002  # how often a process that left the socket to a sibling looks again
MAX_PROCESSES = 4
ADMIN_OPS = frozenset({"inspect", "gc", "status", "metrics"})


@dataclass(frozen=True)
class Limits:
    """How much the agent takes on at once; every figure bounds memory or a wait."""

    processes: int = 1  # processes serving the socket (serve() picks one per CPU, up to 4)
    workers: int = 2  # threads per process running container requests (some wait on flock)
    max_pending: int = 256  # per process: container requests running or queued; more refused
    admin_workers: int = 2  # threads for status, metrics, inspect, gc
    admin_pending: int = 64  # of those, running or queued
    queue_wait: float = 5.0  # a request that waited longer for a worker is refused, not run
    max_connections: int = 2048  # open connections; more are refused at accept
    frame_deadline: float = FRAME_DEADLINE  # to send one whole request frame
    lock_timeout: float = 5.0  # for a cgroup's writer lock
    drain_timeout: float = 30.0  # SIGTERM: how long in-flight requests may still run
    gc_interval: float = 300.0  # seconds between periodic gc runs (0: never)


def parse_listen(spec: str) -> tuple[str, str, int]:
    """ "unix:PATH" -> ("unix", PATH, 0); "127.0.0.1:PORT" / "[::1]:PORT" -> ("tcp", host,
    port). ValueError for anything else: metrics name every container, so only loopback."""
    if spec.startswith("unix:"):
        path = spec[5:]
        if not path.startswith("/"):
            raise ValueError(f"--metrics-listen {spec}: want unix:/ABSOLUTE/PATH")
        return "unix", path, 0
    host, sep, port = spec.rpartition(":")
    host = host.strip("[]")
    try:
        if not sep or not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError
        if not ipaddress.ip_address(host).is_loopback:
            raise ValueError
    except ValueError:
        raise ValueError(
            f"--metrics-listen {spec}: want unix:PATH or a loopback address and port "
            "(127.0.0.1:9464, [::1]:9464)"
        ) from None
    return "tcp", host, int(port)


class _Cut(Exception):
    """The client closed its connection in the middle of a frame."""


class _Answer:
    """Whether a connection's answer is written (it then stops counting as load)."""

    __slots__ = ("done", "lock")

    def __init__(self) -> None:
        self.done = False
        self.lock = threading.Lock()


class Server:
    """One agent: `run()` serves `sock` until SIGTERM/SIGINT; returns the exit status."""

    def __init__(
        self,
        sock: socket.socket,
        path: str,
        *,
        unlink: bool,
        limits: Limits = Limits(),
        metrics_listen: str | None = None,
        nri: NriSettings | None = None,
        stats: Stats | None = None,
        main_pid: int | None = None,
        others: tuple[int, ...] = (),
        ready_fd: int | None = None,
    ) -> None:
        self.sock = sock
        self.path = path
        self.unlink = unlink  # remove the socket file at exit (not systemd's)
        self.limits = limits
        self.metrics_listen = metrics_listen
        self.stats = stats if stats is not None else Stats()
        # the main process (pid printed in status) runs the node-wide parts; `others` are the
        # processes it forked (main only)
        self.main_pid = main_pid or os.getpid()
        self.main = self.main_pid == os.getpid()
        self.others = set(others)
        # the pipe on which each other process says it serves (main: reads; others: write)
        self.ready_fd = ready_fd
        self.exit_code = 0
        self.pool = ThreadPoolExecutor(limits.workers, thread_name_prefix="pelagos-agent")
        self.admin = ThreadPoolExecutor(limits.admin_workers, thread_name_prefix="pelagos-admin")
        self.conns: set[asyncio.Task[None]] = set()
        self.pending = 0  # container requests running or queued
        self.admin_pending = 0
        self.draining = False
        self._last_warn: dict[str, tuple[float, int]] = {}
        self._stop: asyncio.Event | None = None
        # the NRI plugin (--nri): the main process's, started once the agent serves, stopped
        # when it drains; the others report its state from Stats
        self.nri_settings = nri
        self.nri = NriRunner(nri, self.stats) if nri is not None and self.main else None

    # ------------------------------------------------------------ life cycle

    def run(self) -> int:
        return asyncio.run(self._main())

    async def _main(self) -> int:
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._begin_drain, sig)
        # SIGHUP: re-read the admin policy (new containers only), as a daemon's reload does
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        if self.others:
            loop.add_signal_handler(signal.SIGCHLD, self._reap)
        self.sock.setblocking(False)
        main = self.main
        if self.ready_fd is not None:
            if main:  # READY=1 only once every process serves (and takes SIGHUP)
                await loop.run_in_executor(None, _await_others, self.ready_fd, len(self.others))
            else:
                os.write(self.ready_fd, b"r")
            os.close(self.ready_fd)
        metrics_server = await self._start_metrics() if main and self.metrics_listen else None
        accept = loop.create_task(self._accept_loop())
        gc_task = None
        if main and self.limits.gc_interval > 0:
            gc_task = loop.create_task(self._gc_loop())
        if main:
            sd_notify(f"READY=1\nSTATUS=serving on {self.path}\nMAINPID={os.getpid()}")
            log.info(
                "ready: serving on %s (pid %d, %d processes)",
                self.path,
                os.getpid(),
                1 + len(self.others),
            )
        if main and self.nri is not None:
            self.nri.start()
        await self._stop.wait()
        if main and self.nri is not None:  # the runtime sees us go and goes on without us
            await loop.run_in_executor(None, self.nri.stop)
        accept.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await accept
        self._accept_backlog()
        self.sock.close()
        if self.unlink:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        if gc_task is not None:
            gc_task.cancel()
        if metrics_server is not None:
            metrics_server.close()
        t_end = loop.time() + self.limits.drain_timeout
        if self.conns:
            log.info("draining %d connection(s)", len(self.conns))
            _done, left = await asyncio.wait(set(self.conns), timeout=self.limits.drain_timeout)
            if left:
                log.warning(
                    "%d request(s) still running after %g s: exiting without them",
                    len(left),
                    self.limits.drain_timeout,
                )
        await self._wait_others(t_end)
        self.pool.shutdown(wait=False, cancel_futures=True)
        self.admin.shutdown(wait=False, cancel_futures=True)
        if main:
            log.info("stopped")
        return self.exit_code

    def _begin_drain(self, sig: int) -> None:
        if self.draining:
            return
        self.draining = True
        if self.main:
            sd_notify("STOPPING=1")
            log.info(
                "%s: refusing new connections, serving the ones accepted", signal.strsignal(sig)
            )
        self._signal_others(signal.SIGTERM)
        assert self._stop is not None
        self._stop.set()

    def _reload(self) -> None:
        ops.reload_policy()
        self._signal_others(signal.SIGHUP)

    # ------------------------------------------------------------ the other processes (main)

    def _signal_others(self, sig: int) -> None:
        for pid in self.others:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)

    def _reap(self) -> None:
        """SIGCHLD: a serving process that exits unasked stops the agent (exit 1); its
        supervisor restarts it whole (Restart=always), and the kernel kept every rule."""
        for pid in list(self.others):
            try:
                got, status = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                got, status = pid, 0
            if got == 0:
                continue
            self.others.discard(pid)
            self.stats.forget(pid)
            if not self.draining:
                log.error(
                    "serving process %d exited (%s): stopping the agent so that its "
                    "supervisor restarts it whole",
                    pid,
                    _wait_status(status),
                )
                self.exit_code = 1
                self._begin_drain(signal.SIGTERM)

    async def _wait_others(self, t_end: float) -> None:
        """Main: the others drain as we do; past the deadline they are killed."""
        loop = asyncio.get_running_loop()
        while self.others and loop.time() < t_end + 1.0:
            self._reap()
            await asyncio.sleep(0.01)
        for pid in list(self.others):
            log.warning("serving process %d still running: killed", pid)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)

    async def _accept_loop(self) -> None:
        while True:
            if self._leave_to_sibling():
                await asyncio.sleep(YIELD_POLL)
                continue
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:  # none waiting (or a sibling took it): wait for one
                await self._readable()
                continue
            except OSError as e:  # EMFILE, ENFILE, ENOBUFS: back off, keep serving the rest
                self._warn("accept", f"accept failed: {e.strerror}")
                await asyncio.sleep(0.05)
                continue
            conn.setblocking(False)
            self._spawn(conn)

    def _leave_to_sibling(self) -> bool:
        """Every process waits on the one socket and the kernel wakes them all; the first
        awake would take nearly every connection (even with its workers stuck on a lock). So
        a process with a worker's worth of connections to answer leaves the next one to a
        sibling with fewer. Asked again whenever a connection is waiting, not once before a
        wait: the loads change while it waits."""
        if self.stats.processes == 1:
            return False
        load = self.stats.load()
        return load >= self.limits.workers and self.stats.least_load() < load

    async def _readable(self) -> None:
        """Until the listening socket has a connection waiting (or this task is cancelled)."""
        loop = asyncio.get_running_loop()
        ready = loop.create_future()
        fd = self.sock.fileno()

        def wake() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(fd, wake)
        try:
            await ready
        finally:
            loop.remove_reader(fd)

    def _accept_backlog(self) -> None:
        """Take the connections already queued on the listening socket (their clients saw
        connect() succeed) so they are served, not reset, when we stop listening."""
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, OSError):
                return
            conn.setblocking(False)
            self._spawn(conn)

    def _spawn(self, conn: socket.socket) -> None:
        if len(self.conns) >= self.limits.max_connections:
            self._refuse("connections", f"refused a connection: {len(self.conns)} already open")
            msg = f"agent busy: {len(self.conns)} connections open; nothing was done"
            with contextlib.suppress(OSError):
                conn.send(call_error(error_doc("AgentError", msg, errno=errno.EAGAIN)))
            conn.close()
            return
        self.stats.add_load(1)
        task = asyncio.get_running_loop().create_task(self._serve_conn(conn, _Answer()))
        self.conns.add(task)
        self._publish_load()
        task.add_done_callback(self._conn_done)

    def _conn_done(self, task: asyncio.Task[None]) -> None:
        self.conns.discard(task)
        self._publish_load()

    def _publish_load(self) -> None:
        self.stats.set_load(len(self.conns), self.pending, self.admin_pending)

    # ------------------------------------------------------------ one connection

    def _answered(self, answer: _Answer) -> None:
        """The connection no longer loads this process (once; from any thread)."""
        with answer.lock:
            if answer.done:
                return
            answer.done = True
        self.stats.add_load(-1)

    async def _serve_conn(self, conn: socket.socket, answer: _Answer) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.limits.frame_deadline
        reply_kind: int | None = None
        try:
            uid, pid = peer_uid_pid(conn)
            if uid != 0:
                self._refuse("uid", f"refused a client with uid {uid} (pid {pid}): root only")
                msg = "permission denied: the pelagos-bpf agent serves root only"
                await self._send(conn, call_error(error_doc("AgentError", msg, errno=errno.EACCES)))
                return
            got: list[int] = []  # the frame's kind, once its header is in
            try:
                kind, payload = await self._read_frame(conn, deadline, got)
            finally:
                reply_kind = REPLY_OF[got[0]] if got else None
            req = parse_request(kind, payload)
            if req.kind == HOOK and (ns := same_namespaces(pid)) is not None:
                self._refuse("namespace", f"refused a hook from pid {pid}: other {ns} namespace")
                msg = (
                    f"the agent runs in another {ns} namespace than this hook: run it in the "
                    "runtime's (the host's) namespaces"
                )
                await self._send(conn, error_reply(HOOK_REPLY, error_doc("AgentError", msg)))
                return
            await self._serve(dataclasses.replace(req, client_pid=pid), conn, answer)
        except ProtocolError as e:
            self._refuse("frame", f"refused a bad frame: {e}")
            await self._send(conn, error_reply(e.reply_kind or CALL_REPLY, _agent_error(e)))
        except TimeoutError:
            self._refuse("deadline", "dropped a client that sent no whole frame in time")
            if reply_kind is not None:
                msg = f"no whole request frame within {self.limits.frame_deadline:g} s"
                await self._send(conn, error_reply(reply_kind, error_doc("AgentError", msg)))
        except _Cut as e:
            self._refuse("cut", f"a client closed its connection mid-frame ({e})")
        except OSError as e:
            log.debug("connection: %s", e)
        finally:
            self._answered(answer)
            conn.close()

    async def _read_frame(
        self, conn: socket.socket, deadline: float, got: list[int]
    ) -> tuple[int, bytes]:
        """One whole request frame by `deadline` (loop time): (kind, payload). Read in as few
        recv calls as it arrives in (a thin hook's frame: one); ProtocolError as soon as the
        header is bad, so an oversized payload is never read. The kind goes into `got`."""
        loop = asyncio.get_running_loop()
        buf = bytearray()
        need = HEADER.size
        async with asyncio.timeout_at(deadline):
            while True:
                if len(buf) >= need:
                    if not got:
                        kind, length = parse_header(bytes(buf[: HEADER.size]))
                        got.append(kind)
                        need = HEADER.size + length
                        continue
                    return got[0], bytes(buf[HEADER.size : need])
                chunk = await loop.sock_recv(conn, max(need - len(buf), 1 << 16))
                if not chunk:
                    raise _Cut(f"{len(buf)} of {need} bytes")
                buf += chunk

    async def _send(self, conn: socket.socket, data: bytes) -> None:
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(loop.sock_sendall(conn, data), self.limits.frame_deadline)
        except (TimeoutError, OSError) as e:
            log.debug("reply not delivered: %r", e)

    async def _serve(self, req: Request, conn: socket.socket, answer: _Answer) -> None:
        """Run the request in its pool; the worker sends the reply itself (one thread
        hand-off on the client's path, not two)."""
        loop = asyncio.get_running_loop()
        admin = req.kind == CALL and req.op in ADMIN_OPS
        pending = self.admin_pending if admin else self.pending
        limit = self.limits.admin_pending if admin else self.limits.max_pending
        if pending >= limit:
            self._refuse("overload", f"refused {req.label}: {pending} requests pending")
            await self._send(conn, self._overloaded(req, f"{pending} requests in progress"))
            return
        if admin:
            self.admin_pending += 1
        else:
            self.pending += 1
        self._publish_load()
        try:
            pool = self.admin if admin else self.pool
            await loop.run_in_executor(pool, self._handle, req, conn, answer, time.monotonic())
        finally:
            if admin:
                self.admin_pending -= 1
            else:
                self.pending -= 1
            self._publish_load()

    def _overloaded(self, req: Request, why: str) -> bytes:
        msg = f"agent overloaded ({why}); nothing was done: retry"
        return error_reply(REPLY_OF[req.kind], error_doc("AgentError", msg, errno=errno.EAGAIN))

    # ------------------------------------------------------------ the work (pool threads)

    def _handle(self, req: Request, conn: socket.socket, answer: _Answer, queued_at: float) -> None:
        reply, done = self._reply(req, queued_at)
        self._answered(answer)
        try:
            conn.settimeout(self.limits.frame_deadline)  # a client that does not read
            for part in reply:
                conn.sendall(part)
        except OSError as e:
            log.debug("reply not delivered: %r", e)
        if done is not None:
            log.info("%s", done)  # what was done: after the reply, off the container's start
        if req.kind == CALL and req.op in ADMIN_OPS:
            del reply
            release_memory()  # after the reply: off the client's path

    def _reply(self, req: Request, queued_at: float) -> tuple[tuple[bytes, ...], str | None]:
        """The reply's parts (header and payload may come separately), and the line to log
        once it is sent."""
        waited = time.monotonic() - queued_at
        if waited > self.limits.queue_wait:
            self._refuse("overload", f"refused {req.label}: waited {waited:.1f} s for a worker")
            return (self._overloaded(req, f"waited {waited:.1f} s for a worker"),), None
        label = f"hook_{ops.hook_stage(req.stage, req.state)}" if req.kind == HOOK else req.op
        t0 = time.perf_counter()
        ok = False
        done = None
        try:
            reply, ok, done = self._dispatch(req)
        except (PelagosError, OSError) as e:
            reply = (error_reply(REPLY_OF[req.kind], error_to_doc(e)),)
        except Exception as e:
            log.exception("%s: internal error", req.label)
            reply = (error_reply(REPLY_OF[req.kind], _agent_error(e, "internal error: ")),)
        finally:
            self.stats.observe(label, time.perf_counter() - t0, ok)
        return reply, done

    def _dispatch(self, req: Request) -> tuple[tuple[bytes, ...], bool, str | None]:
        if req.kind == HOOK:
            code, text, done = ops.hook(req.stage, req.state, req.owner, req.client_pid)
            return (hook_reply(code, text),), code == 0, done
        assert req.kind == CALL
        a = req.args
        result: Any
        if req.op == "setup":
            result = ops.setup(
                _arg(a, "config", dict, {}),
                _arg(a, "pid", int, None),
                req.owner,
                strict=_arg(a, "strict", bool, True),
                net_carrier=_arg(a, "net_carrier", str, None),
            )
        elif req.op == "update":
            result = ops.update(_arg(a, "path", str), _arg(a, "config", dict), req.owner)
        elif req.op == "teardown":
            result = ops.teardown(_arg(a, "path", str), req.owner, _arg(a, "created", list, []))
        elif req.op == "inspect":
            result = ops.inspect(_arg(a, "path", str, None))
        elif req.op == "gc":
            result = ops.gc()
        elif req.op == "status":
            result = self.status()
        else:
            result = self.metrics_body().decode()
        return call_ok_parts(result), True, None

    def status(self) -> dict[str, Any]:
        held = ops.held()
        requests = self.stats.requests()
        loads = [x for x in self.stats.loads() if x["pid"]]
        return {
            "pid": self.main_pid,
            "processes": loads,
            "socket": self.path,
            "uptime_seconds": round(self.stats.uptime(), 3),
            "draining": self.draining,
            "requests": requests,
            "failed": sum(r["failed"] for r in requests.values()),
            "refused": self.stats.refused(),
            "in_flight": sum(x["pending"] for x in loads),
            "admin_in_flight": sum(x["admin_pending"] for x in loads),
            "connections": sum(x["connections"] for x in loads),
            "programs": ops.programs(),
            "cgroups_held": len(held),
            "containers": sum(1 for h in held if h["container"]),
            "nri": self._nri_status(),
        }

    def _nri_status(self) -> dict[str, Any] | None:
        if self.nri is not None:
            return self.nri.status()
        if self.nri_settings is None:
            return None
        return nri_status(self.nri_settings, self.stats.nri_registered())

    def metrics_body(self) -> bytes:
        loads = self.stats.loads()
        return render(
            self.stats,
            in_flight=sum(x["pending"] for x in loads),
            connections=sum(x["connections"] for x in loads),
            programs=ops.programs(),
            held=ops.held(),
            counters=ops.counters(),
            nri=self._nri_status(),
        )

    # ------------------------------------------------------------ periodic gc

    async def _gc_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self.limits.gc_interval)
            await loop.run_in_executor(self.admin, self._periodic_gc)

    def _periodic_gc(self) -> None:
        t0 = time.perf_counter()
        ok = False
        try:
            report = ops.gc()
            pruned = report["records_removed"]
            ok = not report["errors"]
            if report["total_entries"] or report["pins_removed"] or pruned:
                log.info(
                    "gc: %d map entries of %d removed cgroups, %d stale pins, %d stale records",
                    report["total_entries"],
                    report["dead_cgroups"],
                    len(report["pins_removed"]),
                    pruned,
                )
            for e in report["errors"]:
                log.warning("gc: %s", e)
        except (PelagosError, OSError) as e:
            log.warning("gc failed: %s", e)
        finally:
            self.stats.observe("gc_periodic", time.perf_counter() - t0, ok)
            release_memory()  # a walk of every map and record: hand its heap back, as after status

    # ------------------------------------------------------------ metrics listener

    async def _start_metrics(self) -> asyncio.AbstractServer:
        assert self.metrics_listen is not None
        kind, where, port = parse_listen(self.metrics_listen)
        if kind == "unix":
            sock = bind_socket(where, 64)
            server = await asyncio.start_unix_server(
                self._metrics_conn, sock=sock, limit=HTTP_HEAD_MAX
            )
        else:
            server = await asyncio.start_server(
                self._metrics_conn, where, port, limit=HTTP_HEAD_MAX
            )
        log.info("metrics: http://%s/metrics", self.metrics_listen)
        return server

    async def _metrics_conn(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), FRAME_DEADLINE)
            words = head.split(b"\r\n", 1)[0].decode("latin-1").split()
            if len(words) != 3 or words[0] not in ("GET", "HEAD"):
                status, data = "405 Method Not Allowed", b"GET /metrics\n"
            elif words[1].split("?", 1)[0] not in ("/", "/metrics"):
                status, data = "404 Not Found", b"GET /metrics\n"
            else:
                got = await self._metrics_body()
                status = "200 OK" if got is not None else "503 Service Unavailable"
                data = got if got is not None else b"# the metrics could not be read: see the log\n"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
            )
            if words[:1] != ["HEAD"]:
                writer.write(data)
            await asyncio.wait_for(writer.drain(), FRAME_DEADLINE)
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            writer.close()
        await asyncio.get_running_loop().run_in_executor(self.admin, release_memory)

    async def _metrics_body(self) -> bytes | None:
        """The exposition, built in the admin pool and counted as a "metrics" request; None
        when it cannot be built (logged)."""

        def build() -> bytes | None:
            t0 = time.perf_counter()
            ok = False
            try:
                body = self.metrics_body()
                ok = True
                return body
            except (PelagosError, OSError) as e:
                log.warning("metrics: %s", e)
                return None
            finally:
                self.stats.observe("metrics", time.perf_counter() - t0, ok)

        return await asyncio.get_running_loop().run_in_executor(self.admin, build)

    # ------------------------------------------------------------ refusals

    def _refuse(self, reason: str, message: str) -> None:
        self.stats.refuse(reason)
        self._warn(reason, message)

    def _warn(self, reason: str, message: str) -> None:
        """Log a refusal, at most once a second per reason (1,000 bad clients make one line a
        second, with the count of those not logged)."""
        now = time.monotonic()
        last, quiet = self._last_warn.get(reason, (0.0, 0))
        if now - last < 1.0:
            self._last_warn[reason] = (last, quiet + 1)
            return
        more = f" (and {quiet} more like it)" if quiet else ""
        log.warning("%s%s", message, more)
        self._last_warn[reason] = (now, 0)


def _arg(args: dict[str, Any], name: str, typ: type, default: Any = ...) -> Any:
    """args[name] checked against typ (bool is not an int here); a ConfigError names it."""
    from ..errors import ConfigError

    if name not in args or args[name] is None:
        if default is ...:
            raise ConfigError(f"args.{name}", None, "missing")
        return default
    v = args[name]
    if not isinstance(v, typ) or (typ is int and isinstance(v, bool)):
        raise ConfigError(f"args.{name}", v, f"want {typ.__name__}")
    return v


def _wait_status(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def default_processes() -> int:
    """One serving process per CPU this agent may run on, up to MAX_PROCESSES."""
    return max(1, min(len(os.sched_getaffinity(0)), MAX_PROCESSES))


def _agent_error(e: BaseException, prefix: str = "") -> dict[str, Any]:
    return error_doc("AgentError", f"{prefix}{e}")


def serve(
    path: str,
    *,
    metrics_listen: str | None = None,
    limits: Limits = Limits(),
    backlog: int = 4096,
    nri: NriSettings | None = None,
) -> int:
    """Start an agent in the foreground: bound lock waits, programs loaded, what is held read
    back from the kernel (logged), the socket bound (or taken from systemd), then served."""
    from .daemon import activated_socket, raise_nofile

    nofile = raise_nofile()
    # The loop thread must get the GIL back quickly from busy workers to accept and read
    # (with the default 5 ms slice every loop step waits behind a create, and the round trip
    # of parallel creates grows with the number of busy workers: bench/bench_agent.py).
    sys.setswitchinterval(SWITCH_INTERVAL)
    ops.configure(limits.lock_timeout)
    ops.reload_policy()
    t0 = time.perf_counter()
    progs = ops.load_programs()
    log.info(
        "loaded %d programs in %.1f ms: %s",
        len(progs),
        (time.perf_counter() - t0) * 1e3,
        ", ".join(f"{p['name']} (id {p['id']})" for p in progs),
    )
    held = ops.held()
    log.info(
        "holding %d cgroups with our programs, %d of them containers with a hook record",
        len(held),
        sum(1 for h in held if h["container"]),
    )
    sock = activated_socket()
    unlink = sock is None
    if sock is None:
        sock = bind_socket(path, backlog)
    else:
        path = sock.getsockname() or path
    log.info(
        "RLIMIT_NOFILE %d; %d processes of %d workers, at most %d pending each",
        nofile,
        limits.processes,
        limits.workers,
        limits.max_pending,
    )
    # Forked before any thread exists (the pools and the loop start in each process), with
    # every object so far out of the collector's reach (gc.freeze): a collection in one
    # process would otherwise write to, and so copy, pages all of them share.
    stats = Stats(limits.processes)
    if limits.processes > 1:
        gc.freeze()
    main_pid = os.getpid()
    others: list[int] = []
    ready_r, ready_w = os.pipe() if limits.processes > 1 else (None, None)
    server_on = functools.partial(Server, sock, path, limits=limits, nri=nri, stats=stats)
    for index in range(1, limits.processes):
        pid = fork_server_process(main_pid)
        if pid == 0:
            assert ready_r is not None
            os.close(ready_r)
            stats.bind(index)
            server = server_on(unlink=False, main_pid=main_pid, ready_fd=ready_w)
            code = 1
            try:
                code = server.run()
            except BaseException:
                log.exception("serving process %d failed", os.getpid())
            finally:
                logging.shutdown()
                os._exit(code)
        others.append(pid)
    if ready_w is not None:
        os.close(ready_w)
    server = server_on(
        unlink=unlink, metrics_listen=metrics_listen, others=tuple(others), ready_fd=ready_r
    )
    return server.run()


def _await_others(fd: int, n: int, timeout: float = 60.0) -> None:
    """Until `n` bytes came on `fd` (each other process's "serving"), EOF (one died: SIGCHLD
    says the rest) or `timeout`."""
    import select

    deadline = time.monotonic() + timeout
    got = 0
    while got < n and (left := deadline - time.monotonic()) > 0:
        if not select.select([fd], [], [], left)[0]:
            break
        chunk = os.read(fd, n - got)
        if not chunk:
            break
        got += len(chunk)
    if got < n:
        log.warning("%d of %d serving processes said they serve", got, n)


def fork_server_process(main_pid: int) -> int:
    """fork(): 0 in the new serving process, which dies with the main one (PR_SET_PDEATHSIG:
    a SIGKILLed agent leaves no process holding its socket) and sends systemd nothing."""
    pid = os.fork()
    if pid:
        return pid
    try:
        # a reload before this process takes SIGHUP must not kill it (it holds the policy
        # loaded before the fork; the main process says READY=1 only once all take SIGHUP)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        set_pdeathsig(signal.SIGKILL)
        if os.getppid() != main_pid:  # the main process died before the line above
            os._exit(1)
        os.environ.pop("NOTIFY_SOCKET", None)
    except BaseException:
        os._exit(1)
    return 0
