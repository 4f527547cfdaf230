"""A throw-away network lab for tests, the demo and the benchmark (pyroute2, root only).

Builds named netns joined by veth pairs with static addresses and static neighbour entries (no
ARP) and IPv6 off (no autoconf/MLD), so qdisc class counters see only the packets we send.
Senders are forked children that join a cgroup BEFORE creating their socket (a socket keeps
the cgroup it was created in) and enter a netns with setns (not `ip netns exec`, which remounts
/sys and hides the cgroup mount).
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import traceback
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pelagos_bpf.net.resolve import _setns, run_in_netns

NETNS_DIR = Path("/var/run/netns")
NUD_PERMANENT = 0x80
IFA_F_NODAD = 0x02


def unique_prefix(tag: str = "pgn") -> str:
    """Short, unique prefix for netns names (ours to create and remove)."""
    return f"{tag}{os.getpid() % 100000}{uuid.uuid4().hex[:6]}"


def _write_sysctl(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


@dataclass
class NetLab:
    """Namespaces and veth pairs we created; `close()` removes them all (veths die with them)."""

    prefix: str = field(default_factory=unique_prefix)
    names: list[str] = field(default_factory=list)
    _iprs: dict[str, Any] = field(default_factory=dict)

    def __enter__(self) -> NetLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def ns(self, tag: str, *, ipv6: bool = False) -> str:
        """Create netns `<prefix>-<tag>` with lo up and (by default) IPv6 disabled."""
        from pyroute2 import netns

        name = f"{self.prefix}-{tag}"
        netns.create(name)
        self.names.append(name)
        fd = os.open(NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC)
        try:
            if not ipv6:

                def off() -> None:
                    for scope in ("all", "default"):
                        _write_sysctl(f"/proc/sys/net/ipv6/conf/{scope}/disable_ipv6", "1")

                run_in_netns(fd, off)
        finally:
            os.close(fd)
        ipr = self.ipr(name)
        ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        return name

    def ipr(self, name: str) -> Any:
        """An IPRoute bound to netns `name` (kept open until close())."""
        if name not in self._iprs:
            from pyroute2 import IPRoute

            self._iprs[name] = IPRoute(netns=name)
        return self._iprs[name]

    def fd(self, name: str) -> int:
        """A fresh O_RDONLY fd of netns `name` (caller closes)."""
        return os.open(NETNS_DIR / name, os.O_RDONLY | os.O_CLOEXEC)

    def veth(
        self,
        ns_a: str,
        if_a: str,
        addr_a: str,
        ns_b: str,
        if_b: str,
        addr_b: str,
        prefixlen: int = 24,
    ) -> tuple[int, int]:
        """veth if_a (in ns_a) <-> if_b (in ns_b), addressed, up, with static neighbours."""
        a, b = self.ipr(ns_a), self.ipr(ns_b)
        a.link("add", ifname=if_a, kind="veth", peer={"ifname": if_b, "net_ns_fd": ns_b})
        ia = a.link_lookup(ifname=if_a)[0]
        ib = b.link_lookup(ifname=if_b)[0]
        family = socket.AF_INET6 if ":" in addr_a else socket.AF_INET
        # IPv6: no duplicate address detection, so the address is usable at once.
        extra = {"flags": IFA_F_NODAD} if family == socket.AF_INET6 else {}
        a.addr("add", index=ia, address=addr_a, prefixlen=prefixlen, family=family, **extra)
        b.addr("add", index=ib, address=addr_b, prefixlen=prefixlen, family=family, **extra)
        a.link("set", index=ia, state="up")
        b.link("set", index=ib, state="up")
        mac_a = a.get_links(ia)[0].get_attr("IFLA_ADDRESS")
        mac_b = b.get_links(ib)[0].get_attr("IFLA_ADDRESS")
        a.neigh("add", dst=addr_b, lladdr=mac_b, ifindex=ia, state=NUD_PERMANENT, family=family)
        b.neigh("add", dst=addr_a, lladdr=mac_a, ifindex=ib, state=NUD_PERMANENT, family=family)
        return ia, ib

    def close(self) -> None:
        from pyroute2 import netns

        for ipr in self._iprs.values():
            with contextlib.suppress(Exception):
                ipr.close()
        self._iprs.clear()
        for name in reversed(self.names):
            with contextlib.suppress(OSError):
                netns.remove(name)
        self.names.clear()


# ---------------------------------------------------------------- forked workers


class Worker:
    """What a forked child does: prepare() right after joining cgroup/netns, run() on go()."""

    def prepare(self) -> None:
        return None

    def run(self) -> str:
        raise NotImplementedError


@dataclass
class Child:
    """A forked worker that is ready (prepared) and waits for start()."""

    pid: int
    _go_w: int
    _res_r: int
    _done: bool = False

    def start(self) -> None:
        os.write(self._go_w, b"g")
        os.close(self._go_w)
        self._go_w = -1

    def go(self, timeout: float = 30.0) -> str:
        """Start the worker and return what run() returned (or raise its error)."""
        self.start()
        return self.result(timeout)

    def result(self, timeout: float = 30.0) -> str:
        try:
            out = _read_all(self._res_r, timeout, self)
        finally:
            if self._res_r >= 0:
                os.close(self._res_r)
                self._res_r = -1
        _, status = os.waitpid(self.pid, 0)
        self._done = True
        if os.waitstatus_to_exitcode(status) != 0 or not out.startswith("OK\n"):
            raise RuntimeError(f"worker {self.pid} failed: {out}")
        return out[3:]

    def kill(self) -> None:
        """Kill the worker (our own child) and reap it; no-op once reaped."""
        if self._done:
            return
        try:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        self._done = True
        for fd in (self._go_w, self._res_r):
            if fd >= 0:
                os.close(fd)
        self._go_w = self._res_r = -1


def _read_all(fd: int, timeout: float, child: Child | None = None, until: bytes = b"") -> str:
    """Read fd to EOF (or until `until` was read) within timeout; the caller closes fd."""
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    os.set_blocking(fd, False)
    while True:
        try:
            data = os.read(fd, 65536)
        except BlockingIOError:
            if time.monotonic() > deadline:
                if child is not None:
                    child.kill()
                raise TimeoutError(f"worker did not answer within {timeout}s") from None
            time.sleep(0.002)
            continue
        if not data:
            break
        chunks.append(data)
        if until and b"".join(chunks).endswith(until):
            break
    return b"".join(chunks).decode()


def spawn(
    worker: Worker,
    *,
    netns_path: str | os.PathLike[str] | None = None,
    cgroup: str | os.PathLike[str] | None = None,
    timeout: float = 30.0,
) -> Child:
    """Fork a child that joins `cgroup`, enters `netns_path`, runs worker.prepare(), then waits.

    Order matters: cgroup first (cgroupfs must still be visible), netns second, sockets last.
    Returns once the child is prepared; `.go()` runs worker.run() and returns its result.
    """
    go_r, go_w = os.pipe()
    res_r, res_w = os.pipe()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns
        code = 0
        try:
            for fd in (go_w, res_r, ready_r):
                os.close(fd)
            if cgroup is not None:
                Path(cgroup, "cgroup.procs").write_text(str(os.getpid()))
            if netns_path is not None:
                fd = os.open(netns_path, os.O_RDONLY)
                _setns(fd)
                os.close(fd)
            worker.prepare()
            os.write(ready_w, b"R")
            os.read(go_r, 1)
            out = "OK\n" + worker.run()
        except BaseException:
            out = "ERR\n" + traceback.format_exc()
            code = 1
        try:  # a failed prepare() never wrote "R": the parent sees EOF on ready and goes on
            os.write(res_w, out.encode())
        finally:
            os._exit(code)
    for fd in (go_r, res_w, ready_w):
        os.close(fd)
    child = Child(pid, go_w, res_r)
    try:
        _read_all(ready_r, timeout, child, until=b"R")
    finally:
        os.close(ready_r)
    return child


@dataclass
class UdpSender(Worker):
    """Sends `count` datagrams from a socket created in run(); returns "<sent> <seconds>"."""

    dst: str
    count: int
    payload: int = 100
    port: int = 9999
    priority: int | None = None
    mark: int | None = None

    def run(self) -> str:
        family = socket.AF_INET6 if ":" in self.dst else socket.AF_INET
        s = socket.socket(family, socket.SOCK_DGRAM)
        if self.priority is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_PRIORITY, self.priority)
        if self.mark is not None:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, self.mark)
        data = b"x" * self.payload
        addr = (self.dst, self.port)
        sent = 0
        t0 = time.perf_counter()
        while sent < self.count:
            try:
                s.sendto(data, addr)
                sent += 1
            except ConnectionRefusedError:  # ICMP port unreachable for an earlier datagram
                continue
        dt = time.perf_counter() - t0
        s.close()
        return f"{sent} {dt}"


@dataclass
class UdpReceiver(Worker):
    """Binds in prepare(); run() receives up to `count` datagrams -> "<count> <bytes>"."""

    bind: str
    count: int
    port: int = 9999
    timeout: float = 5.0
    _sock: socket.socket | None = None

    def prepare(self) -> None:
        family = socket.AF_INET6 if ":" in self.bind else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_DGRAM)
        self._sock.bind((self.bind, self.port))
        self._sock.settimeout(self.timeout)

    def run(self) -> str:
        assert self._sock is not None
        n = total = 0
        try:
            while n < self.count:
                total += len(self._sock.recv(65536))
                n += 1
        except TimeoutError:
            pass
        self._sock.close()
        return f"{n} {total}"


class Idle(Worker):
    """Does nothing: a process that just lives in a netns (its pid names that netns)."""

    def run(self) -> str:
        return ""
