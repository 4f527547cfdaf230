"""ttrpc, the small RPC protocol NRI speaks on each mux connection: framing, a server, a client.

Follows containerd/ttrpc v1.2.7 (PROTOCOL.md, channel.go, server.go, client.go). A message is a
10-byte header (data length u32 BE, stream id u32 BE, type u8, flags u8) and at most 4 MiB of
data. A unary call is a Request (type 1) on a new odd stream id, answered by one Response
(type 2) on the same id; Request/Response are protobuf messages (proto/ttrpc.proto) whose
payload is the method's own message. Streaming (type 3, Data) is not used by NRI and not
served here.

Both ends are transport-agnostic: they are fed the bytes of their connection (any cuts) and send
through a callable, so the NRI mux and the tests plug in directly.
"""

from __future__ import annotations

import enum
import logging
import queue
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from google.protobuf.message import DecodeError
from google.protobuf.message import Message as ProtoMessage

from .proto import ttrpc_pb2

log = logging.getLogger(__name__)

HEADER = struct.Struct(">IIBB")
MAX_MESSAGE = 4 << 20

TYPE_REQUEST = 1
TYPE_RESPONSE = 2
TYPE_DATA = 3

Send = Callable[[bytes], None]
Req = TypeVar("Req", bound=ProtoMessage)
Resp = TypeVar("Resp", bound=ProtoMessage)


class Code(enum.IntEnum):
    """gRPC status codes, which ttrpc's Response.status carries."""

    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14


class TtrpcError(Exception):
    """A call failed with a status: from the peer, or local (deadline, closed connection)."""

    def __init__(self, code: int, message: str) -> None:
        self.code = code
        self.message = message
        try:
            name = Code(code).name
        except ValueError:
            name = str(code)
        super().__init__(f"ttrpc {name}: {message}")


class MessageTooLarge(ValueError):
    def __init__(self, length: int) -> None:
        self.length = length
        super().__init__(f"ttrpc message of {length} bytes exceeds the {MAX_MESSAGE}-byte maximum")


@dataclass(frozen=True)
class Frame:
    stream_id: int
    type: int
    flags: int
    data: bytes


@dataclass(frozen=True)
class Oversized:
    """A message over MAX_MESSAGE: its data was skipped, its stream gets RESOURCE_EXHAUSTED."""

    stream_id: int
    type: int
    length: int


def encode_message(stream_id: int, mtype: int, data: bytes, flags: int = 0) -> bytes:
    if len(data) > MAX_MESSAGE:
        raise MessageTooLarge(len(data))
    return HEADER.pack(len(data), stream_id, mtype, flags) + data


class MessageDecoder:
    """Turns a connection's bytes, cut anywhere, into Frames.

    An oversized message is skipped as its bytes arrive (never buffered), as upstream's
    channel.recv discards it, and reported as Oversized so the server can answer that stream.
    """

    def __init__(self, max_message: int = MAX_MESSAGE) -> None:
        self._buf = bytearray()
        self._max = max_message
        self._skip = 0

    @property
    def pending(self) -> int:
        return len(self._buf) + self._skip

    def feed(self, data: bytes) -> list[Frame | Oversized]:
        if self._skip:
            taken = min(self._skip, len(data))
            self._skip -= taken
            data = data[taken:]
        self._buf += data
        out: list[Frame | Oversized] = []
        buf = self._buf
        pos = 0
        while len(buf) - pos >= HEADER.size:
            length, stream_id, mtype, flags = HEADER.unpack_from(buf, pos)
            if length > self._max:
                out.append(Oversized(stream_id, mtype, length))
                pos += HEADER.size
                taken = min(length, len(buf) - pos)
                pos += taken
                self._skip = length - taken
                break
            end = pos + HEADER.size + length
            if end > len(buf):
                break
            out.append(Frame(stream_id, mtype, flags, bytes(buf[pos + HEADER.size : end])))
            pos = end
        del buf[:pos]
        return out


def _response(stream_id: int, code: int, message: str = "", payload: bytes = b"") -> bytes:
    resp = ttrpc_pb2.Response(payload=payload)
    resp.status.code = code
    resp.status.message = message
    return encode_message(stream_id, TYPE_RESPONSE, resp.SerializeToString())


@dataclass
class _Method(Generic[Req]):
    """A handler and the request type it decodes: typed as a pair, stored type-erased."""

    request_type: type[Req]
    handler: Callable[[Req], ProtoMessage]


@dataclass
class _Call:
    stream_id: int
    method: _Method[Any]
    name: str
    request: bytes
    deadline: float | None  # time.monotonic(), from the request's timeout_nano


class Server:
    """Unary ttrpc server. Requests are handled one at a time, in arrival order, on one worker
    thread; wire problems are answered from the feeding thread without waiting behind a handler.

    Every request gets a Response: an unknown service or method gets UNIMPLEMENTED (upstream's
    codes and wording; newer NRI runtimes fall back to older RPCs on it), an undecodable request
    INVALID_ARGUMENT, an oversized one RESOURCE_EXHAUSTED, a request whose deadline passed while
    it waited DEADLINE_EXCEEDED (its handler is not run), and a handler exception UNKNOWN with
    "<method>: <exception type>: <message>", which the runtime shows in its error (a handler
    that raises TtrpcError sets the code and message itself).
    """

    def __init__(self, send: Send, name: str = "ttrpc-server") -> None:
        self._send = send
        self._name = name
        self._methods: dict[tuple[str, str], _Method[Any]] = {}
        self._decoder = MessageDecoder()
        self._queue: queue.SimpleQueue[_Call | None] = queue.SimpleQueue()
        self._last_stream = 0
        self._worker: threading.Thread | None = None

    def register(
        self,
        service: str,
        method: str,
        request_type: type[Req],
        handler: Callable[[Req], ProtoMessage],
    ) -> None:
        self._methods[(service, method)] = _Method(request_type, handler)

    def start(self) -> None:
        if self._worker is not None:
            raise RuntimeError("server already started")
        self._worker = threading.Thread(target=self._work, name=self._name, daemon=True)
        self._worker.start()

    @property
    def worker_ident(self) -> int | None:
        """The handler thread's id (None before start), so callers can refuse re-entry."""
        return None if self._worker is None else self._worker.ident

    def close(self, join_timeout: float = 5.0) -> None:
        """Stop after the request in hand; a handler that hangs is left behind with a warning."""
        worker = self._worker
        if worker is None:
            return
        self._queue.put(None)
        if worker is not threading.current_thread():
            worker.join(join_timeout)
            if worker.is_alive():
                log.warning(
                    "%s: a handler is still running %.1f s after close", self._name, join_timeout
                )

    def feed(self, data: bytes) -> None:
        """Feed the connection's bytes (any cuts); answers wire errors on their streams.

        Raises OSError only when the answer cannot be sent (the connection is gone)."""
        for item in self._decoder.feed(data):
            if isinstance(item, Oversized):
                self._reply_error(
                    item.stream_id,
                    Code.RESOURCE_EXHAUSTED,
                    f"message length {item.length} exceeds maximum message size of {MAX_MESSAGE}",
                )
            else:
                self._frame(item)

    def _frame(self, frame: Frame) -> None:
        sid = frame.stream_id
        if frame.type == TYPE_DATA:
            # No method here streams, so no stream is ever open for data.
            self._reply_error(sid, Code.INVALID_ARGUMENT, "StreamID is no longer active")
            return
        if frame.type != TYPE_REQUEST:
            log.warning(
                "%s: ignored ttrpc message type %d on stream %d", self._name, frame.type, sid
            )
            return
        if sid % 2 != 1:
            self._reply_error(
                sid, Code.INVALID_ARGUMENT, "StreamID must be odd for client initiated streams"
            )
            return
        if sid <= self._last_stream:
            self._reply_error(
                sid, Code.INVALID_ARGUMENT, "StreamID cannot be re-used and must increment"
            )
            return
        self._last_stream = sid
        req = ttrpc_pb2.Request()
        try:
            req.ParseFromString(frame.data)
        except DecodeError as e:
            self._reply_error(sid, Code.INVALID_ARGUMENT, f"unmarshal request error: {e}")
            return
        if not any(svc == req.service for svc, _ in self._methods):
            self._reply_error(sid, Code.UNIMPLEMENTED, f"service {req.service}")
            return
        method = self._methods.get((req.service, req.method))
        if method is None:
            self._reply_error(sid, Code.UNIMPLEMENTED, f"method {req.method}")
            return
        deadline = time.monotonic() + req.timeout_nano / 1e9 if req.timeout_nano > 0 else None
        self._queue.put(_Call(sid, method, req.method, req.payload, deadline))

    def _work(self) -> None:
        while (call := self._queue.get()) is not None:
            try:
                out = self._handle(call)
            except Exception as e:  # the worker must outlive any one request
                log.exception("%s: %s failed outside its handler", self._name, call.name)
                out = _response(call.stream_id, Code.INTERNAL, f"{call.name}: {e}")
            try:
                self._send(out)
            except OSError as e:
                log.warning("%s: could not send the %s response: %s", self._name, call.name, e)

    def _handle(self, call: _Call) -> bytes:
        if call.deadline is not None and time.monotonic() >= call.deadline:
            log.warning("%s: %s expired before it was handled", self._name, call.name)
            return _response(
                call.stream_id, Code.DEADLINE_EXCEEDED, f"{call.name}: deadline passed"
            )
        request = call.method.request_type()
        try:
            request.ParseFromString(call.request)
        except DecodeError as e:
            return _response(call.stream_id, Code.INVALID_ARGUMENT, f"{call.name}: {e}")
        start = time.monotonic()
        try:
            result = call.method.handler(request)
        except TtrpcError as e:  # the handler chose the status itself
            log.warning("%s: %s answered %s", self._name, call.name, e)
            return _response(call.stream_id, e.code, e.message)
        except Exception as e:  # a handler error is the answer
            log.exception("%s: %s handler failed", self._name, call.name)
            return _response(call.stream_id, Code.UNKNOWN, f"{call.name}: {type(e).__name__}: {e}")
        end = time.monotonic()
        if call.deadline is not None and end > call.deadline:
            log.warning(
                "%s: %s took %.3f s, past the caller's deadline", self._name, call.name, end - start
            )
        try:
            return _response(call.stream_id, Code.OK, payload=result.SerializeToString())
        except MessageTooLarge as e:
            return _response(call.stream_id, Code.RESOURCE_EXHAUSTED, f"{call.name}: {e}")

    def _reply_error(self, stream_id: int, code: Code, message: str) -> None:
        log.warning("%s: stream %d: %s %s", self._name, stream_id, code.name, message)
        self._send(_response(stream_id, code, message))


class _Pending:
    __slots__ = ("done", "response")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.response: ttrpc_pb2.Response | TtrpcError | None = None


class Client:
    """Unary ttrpc client: odd, increasing stream ids; every call has a deadline."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._decoder = MessageDecoder()
        self._lock = threading.Lock()
        self._next_stream = 1
        self._pending: dict[int, _Pending] = {}
        self._closed: TtrpcError | None = None

    def call(
        self,
        service: str,
        method: str,
        request: ProtoMessage,
        response_type: type[Resp],
        timeout: float,
        metadata: Iterable[tuple[str, str]] = (),
    ) -> Resp:
        """Call and wait at most `timeout` seconds; raises TtrpcError on any failure status."""
        if timeout <= 0:
            raise ValueError(f"ttrpc call {service}/{method}: timeout must be positive")
        req = ttrpc_pb2.Request(
            service=service,
            method=method,
            payload=request.SerializeToString(),
            timeout_nano=int(timeout * 1e9),
            metadata=[ttrpc_pb2.KeyValue(key=k, value=v) for k, v in metadata],
        )
        data = req.SerializeToString()
        pending = _Pending()
        with self._lock:
            if self._closed is not None:
                raise self._closed
            sid = self._next_stream
            self._next_stream += 2
            self._pending[sid] = pending
        try:
            self._send(encode_message(sid, TYPE_REQUEST, data))
            if not pending.done.wait(timeout):
                raise TtrpcError(
                    Code.DEADLINE_EXCEEDED, f"{service}/{method}: no response in {timeout:g} s"
                )
        except OSError as e:
            raise TtrpcError(Code.UNAVAILABLE, f"{service}/{method}: send failed: {e}") from e
        finally:
            with self._lock:
                self._pending.pop(sid, None)
        got = pending.response
        if isinstance(got, TtrpcError):
            raise got
        assert got is not None
        if got.HasField("status") and got.status.code != Code.OK:
            raise TtrpcError(got.status.code, got.status.message)
        out = response_type()
        try:
            out.ParseFromString(got.payload)
        except DecodeError as e:
            raise TtrpcError(Code.INTERNAL, f"{service}/{method}: bad response: {e}") from e
        return out

    def feed(self, data: bytes) -> None:
        for item in self._decoder.feed(data):
            if isinstance(item, Oversized):
                self._resolve(
                    item.stream_id,
                    TtrpcError(
                        Code.RESOURCE_EXHAUSTED, f"response of {item.length} bytes is too large"
                    ),
                )
                continue
            if item.type != TYPE_RESPONSE:
                log.warning(
                    "ttrpc client: ignored message type %d on stream %d", item.type, item.stream_id
                )
                continue
            resp = ttrpc_pb2.Response()
            try:
                resp.ParseFromString(item.data)
            except DecodeError as e:
                self._resolve(item.stream_id, TtrpcError(Code.INTERNAL, f"bad response: {e}"))
                continue
            self._resolve(item.stream_id, resp)

    def close(self, reason: str = "connection closed") -> None:
        """Fail every call in flight and every later one."""
        err = TtrpcError(Code.UNAVAILABLE, reason)
        with self._lock:
            self._closed = err
            for p in self._pending.values():
                # A call whose response is already in keeps it: the caller may simply not have
                # run yet since the response woke it.
                if not p.done.is_set():
                    p.response = err
                    p.done.set()

    def _resolve(self, stream_id: int, result: ttrpc_pb2.Response | TtrpcError) -> None:
        with self._lock:
            pending = self._pending.get(stream_id)
            if pending is not None and not pending.done.is_set():
                pending.response = result
                pending.done.set()
                return
        log.warning("ttrpc client: response for stream %d, which no call waits for", stream_id)
