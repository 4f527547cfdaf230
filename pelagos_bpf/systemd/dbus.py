"""systemd's Manager over D-Bus through jeepney: blocking calls, job waits with a deadline.

Why jeepney: pure Python with a blocking API and no libsystemd (dbus-fast is asyncio only,
sdbus binds libsystemd). It is an optional dependency (`pip install 'pelagos-bpf[systemd]'`);
without it, or without a bus, `SystemdUnavailable` names the systemd driver.

Which socket: the system bus first, then (root only) systemd's private socket, as go-systemd
does for runc. The private socket is peer-to-peer: no bus daemon, so no Hello and no AddMatch;
systemd sends every signal to its direct connections. On the bus, JobRemoved needs a match
rule, in place before the call that queues a job, so the signal cannot be missed.
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from ..errors import PelagosError

SYSTEM_BUS = "/run/dbus/system_bus_socket"
PRIVATE_SOCKET = "/run/systemd/private"
DEADLINE = 30.0  # runc's wait for a job, seconds
DEST = "org.freedesktop.systemd1"
PATH = "/org/freedesktop/systemd1"
MANAGER = "org.freedesktop.systemd1.Manager"
UNIT_IFACE = "org.freedesktop.systemd1.Unit"
SCOPE_IFACE = "org.freedesktop.systemd1.Scope"
PROPS_IFACE = "org.freedesktop.DBus.Properties"
DRIVER = "systemd cgroup driver"
NO_SUCH_UNIT = "org.freedesktop.systemd1.NoSuchUnit"


class SystemdUnavailable(PelagosError):
    """systemd cannot be reached (no jeepney, no bus, not PID 1); the message says which."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"{DRIVER}: {reason}")


class SystemdError(PelagosError):
    """systemd refused a call or a job did not end "done"; names the unit, the operation and
    systemd's own error name and words."""

    def __init__(self, unit: str, op: str, name: str, message: str) -> None:
        self.unit = unit
        self.op = op
        self.name = name
        self.message = message
        super().__init__(f"{DRIVER}: {op} {unit}: {name}: {message}")


@dataclass(frozen=True)
class Property:
    """A unit property as D-Bus carries it: name, D-Bus signature, value."""

    name: str
    signature: str
    value: Any

    def wire(self) -> tuple[str, tuple[str, Any]]:
        return (self.name, (self.signature, self.value))


def _jeepney() -> Any:
    try:
        import jeepney  # type: ignore[import-untyped]
        import jeepney.io.blocking  # type: ignore[import-untyped]
    except ImportError:
        raise SystemdUnavailable(
            "needs the jeepney package: pip install 'pelagos-bpf[systemd]'"
        ) from None
    return jeepney


def parse_version(text: str) -> int:
    """systemd's Version property ("252.38-1~deb12u1", "v245.4-1.fc32") -> 252."""
    m = re.match(r'"?v?(\d+)', text)
    if m is None:
        raise SystemdError("-", "read Version", "unparsable", repr(text))
    return int(m.group(1))


class Manager:
    """One connection to systemd's Manager. A context manager; close() ends the connection."""

    def __init__(self, conn: Any, peer: bool, where: str) -> None:
        self._conn = conn
        self.peer = peer  # the private socket: no bus daemon in between
        self.where = where
        self._version: int | None = None
        self._matched = False

    # ------------------------------------------------------------ connecting

    @classmethod
    def connect(cls, timeout: float = 5.0) -> Manager:
        """The system bus ($DBUS_SYSTEM_BUS_ADDRESS or SYSTEM_BUS), else, for root, systemd's
        private socket; SystemdUnavailable with both reasons when neither answers."""
        jeepney = _jeepney()
        blocking = jeepney.io.blocking
        tried: list[str] = []
        try:
            conn = blocking.open_dbus_connection(bus="SYSTEM", auth_timeout=timeout)
            return cls(conn, False, "the system bus")
        except (OSError, ValueError, TimeoutError) as e:
            tried.append(f"system bus: {e}")
        if os.geteuid() == 0:
            try:
                sock = blocking.prep_socket(PRIVATE_SOCKET, timeout=timeout)
            except (OSError, TimeoutError) as e:
                tried.append(f"{PRIVATE_SOCKET}: {e}")
            else:
                conn = _peer_connection(blocking, sock)
                try:
                    _first_answer(jeepney, conn, timeout)
                except BaseException:
                    conn.close()
                    raise
                return cls(conn, True, PRIVATE_SOCKET)
        raise SystemdUnavailable("cannot reach systemd over D-Bus (" + "; ".join(tried) + ")")

    def close(self) -> None:
        self._conn.close()

    def __enter__(self) -> Manager:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------ calls

    def call(
        self,
        method: str,
        signature: str,
        body: tuple[Any, ...],
        *,
        unit: str = "-",
        path: str = PATH,
        interface: str = MANAGER,
        timeout: float = DEADLINE,
    ) -> tuple[Any, ...]:
        """Call a method; its reply's body, or SystemdError with systemd's error name."""
        reply = self._send(method, signature, body, path, interface, timeout)
        return self._reply(reply, unit, method)

    def _send(
        self, method: str, signature: str, body: tuple[Any, ...], path: str, iface: str, t: float
    ) -> Any:
        jeepney = _jeepney()
        addr = jeepney.DBusAddress(path, bus_name=DEST, interface=iface)
        msg = jeepney.new_method_call(addr, method, signature or None, body)
        try:
            return self._conn.send_and_get_reply(msg, timeout=t)
        except TimeoutError:
            raise SystemdError("-", method, "timeout", f"no reply from systemd in {t}s") from None
        except OSError as e:
            raise SystemdUnavailable(f"D-Bus connection ({self.where}) failed: {e}") from None

    def _reply(self, reply: Any, unit: str, method: str) -> tuple[Any, ...]:
        jeepney = _jeepney()
        if reply.header.message_type == jeepney.MessageType.error:
            name = reply.header.fields.get(jeepney.HeaderFields.error_name, "?")
            words = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
            raise SystemdError(unit, method, str(name), words)
        return tuple(reply.body)

    def get(self, path: str, interface: str, prop: str, unit: str = "-") -> Any:
        """One property's value (the variant unwrapped)."""
        try:
            (variant,) = self.call(
                "Get", "ss", (interface, prop), unit=unit, path=path, interface=PROPS_IFACE
            )
        except SystemdError as e:
            raise SystemdError(unit, f"read {interface}.{prop}", e.name, e.message) from None
        return variant[1]

    def version(self) -> int:
        """systemd's version number (cached per connection)."""
        if self._version is None:
            self._version = parse_version(str(self.get(PATH, MANAGER, "Version")))
        return self._version

    # ------------------------------------------------------------ units

    def unit_path(self, unit: str) -> str | None:
        """The unit's object path, None when systemd has no such unit loaded."""
        try:
            (path,) = self.call("GetUnit", "s", (unit,), unit=unit)
        except SystemdError as e:
            if e.name == NO_SUCH_UNIT:
                return None
            raise
        return str(path)

    def unit_property(self, unit: str, prop: str, interface: str = UNIT_IFACE) -> Any:
        path = self.unit_path(unit)
        if path is None:
            raise SystemdError(unit, f"read {prop}", NO_SUCH_UNIT, "")
        return self.get(path, interface, prop, unit)

    def start_transient_unit(
        self, unit: str, props: Sequence[Property], deadline: float = DEADLINE
    ) -> str:
        """StartTransientUnit(unit, "replace", props) and wait for its job; the job's result."""
        aux: list[Any] = []  # the auxiliary units StartTransientUnit can create: none
        body = (unit, "replace", [p.wire() for p in props], aux)
        return self._job("StartTransientUnit", "ssa(sv)a(sa(sv))", body, unit, deadline)

    def stop_unit(self, unit: str, deadline: float = DEADLINE) -> str:
        """StopUnit(unit, "replace") and wait for its job; the job's result."""
        return self._job("StopUnit", "ss", (unit, "replace"), unit, deadline)

    def reset_failed_unit(self, unit: str) -> None:
        self.call("ResetFailedUnit", "s", (unit,), unit=unit)

    def set_unit_properties(self, unit: str, props: Iterable[Property], runtime: bool) -> None:
        """SetUnitProperties: runtime=True changes the running unit only (as runc), False
        also writes a persistent drop-in under /etc."""
        wire = [p.wire() for p in props]
        self.call("SetUnitProperties", "sba(sv)", (unit, runtime, wire), unit=unit)

    def reload(self, deadline: float = 120.0) -> None:
        """daemon-reload (Manager.Reload): the reply comes once the reload is done."""
        self.call("Reload", "", (), timeout=deadline)

    # ------------------------------------------------------------ jobs

    def _job(self, method: str, sig: str, body: tuple[Any, ...], unit: str, deadline: float) -> str:
        jeepney = _jeepney()
        rule = jeepney.MatchRule(type="signal", interface=MANAGER, member="JobRemoved", path=PATH)
        self._add_match(rule)
        end = time.monotonic() + deadline
        queue: deque[Any] = deque()
        with self._conn.filter(rule, queue=queue):
            reply = self._send(method, sig, body, PATH, MANAGER, deadline)
            (job,) = self._reply(reply, unit, method)
            while True:  # signals that came before the reply wait in the queue
                try:
                    msg = (
                        queue.popleft()
                        if queue
                        else self._conn.recv_until_filtered(
                            queue, timeout=max(0.0, end - time.monotonic())
                        )
                    )
                except TimeoutError:
                    break
                except OSError as e:
                    raise SystemdUnavailable(f"D-Bus connection ({self.where}) failed: {e}") from e
                _id, path, _unit, result = msg.body
                if path == job:
                    return str(result)
        raise SystemdError(unit, method, "timeout", f"job {job} not finished after {deadline}s")

    def _add_match(self, rule: Any) -> None:
        """Once per connection, on the bus only (the private socket gets every signal). No
        Subscribe: systemd sends a job's JobRemoved to the client that queued it (measured on
        252), and Subscribe would make it broadcast every unit change while we are connected."""
        if self._matched or self.peer:
            return
        jeepney = _jeepney()
        msg = jeepney.bus_messages.message_bus.AddMatch(rule)
        self._reply(self._conn.send_and_get_reply(msg, timeout=DEADLINE), "-", "AddMatch")
        self._matched = True


def _peer_connection(blocking: Any, sock: socket.socket) -> Any:
    """A jeepney blocking connection without the bus Hello (systemd's private socket has no
    bus daemon to greet). Uses jeepney's DBusConnection minus its __init__'s Hello."""
    from jeepney.io.common import MessageFilters  # type: ignore[import-untyped]

    conn = blocking.DBusConnection.__new__(blocking.DBusConnection)
    blocking.DBusConnectionBase.__init__(conn, sock)
    conn._filters = MessageFilters()
    conn.unique_name = None
    return conn


def _first_answer(jeepney: Any, conn: Any, timeout: float) -> None:
    """Ping until systemd answers one. systemd 252 leaves a message that reaches its private
    socket in the same read as the auth's BEGIN unprocessed until more data arrives (measured
    in the guest: always when pipelined with BEGIN, ~2 in 5 when sent just after), so a call
    could wait forever; each new Ping is such data. After one answer, none is held back."""
    addr = jeepney.DBusAddress("/", bus_name=DEST, interface="org.freedesktop.DBus.Peer")
    sent: set[int] = set()
    end = time.monotonic() + timeout
    while (left := end - time.monotonic()) > 0:
        serial = next(conn.outgoing_serial)
        conn.send(jeepney.new_method_call(addr, "Ping"), serial=serial)
        sent.add(serial)
        try:
            while True:
                msg = conn.receive(timeout=min(0.2, left))
                if msg.header.fields.get(jeepney.HeaderFields.reply_serial) in sent:
                    return
        except TimeoutError:
            continue
    raise SystemdUnavailable(f"no answer from systemd on {PRIVATE_SOCKET} in {timeout}s")
