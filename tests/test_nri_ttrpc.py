"""ttrpc framing, server and client: pure framing cases, then calls over a real socketpair."""

from __future__ import annotations

import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from pelagos_bpf.nri import ttrpc
from pelagos_bpf.nri.mux import Mux
from pelagos_bpf.nri.proto import ttrpc_pb2
from pelagos_bpf.nri.ttrpc import (
    MAX_MESSAGE,
    Client,
    Code,
    Frame,
    MessageDecoder,
    Oversized,
    Server,
    TtrpcError,
)

WAIT = 10.0
SVC = "test.Echo"


def _hdr(length: int, stream: int, mtype: int, flags: int = 0) -> bytes:
    return struct.pack(">IIBB", length, stream, mtype, flags)


def test_decoder_split_and_batched() -> None:
    wire = _hdr(3, 1, 1) + b"abc" + _hdr(0, 3, 1) + _hdr(2, 5, 2, 0x1) + b"zz"
    dec = MessageDecoder()
    got: list[Frame | Oversized] = []
    for i in range(0, len(wire), 4):
        got += dec.feed(wire[i : i + 4])
    assert got == [Frame(1, 1, 0, b"abc"), Frame(3, 1, 0, b""), Frame(5, 2, 1, b"zz")]
    assert dec.pending == 0


def test_decoder_skips_oversized_across_chunks() -> None:
    dec = MessageDecoder(max_message=16)
    body = b"y" * 40
    out = dec.feed(_hdr(40, 7, 1) + body[:10])
    assert out == [Oversized(7, 1, 40)]
    assert dec.pending == 30  # still to skip, not buffered
    assert dec.feed(body[10:35]) == []
    assert dec.feed(body[35:] + _hdr(1, 9, 1) + b"k") == [Frame(9, 1, 0, b"k")]


def test_encode_refuses_over_4mib() -> None:
    assert len(ttrpc.encode_message(1, 1, b"x" * MAX_MESSAGE)) == MAX_MESSAGE + 10
    with pytest.raises(ttrpc.MessageTooLarge, match="4194305 bytes"):
        ttrpc.encode_message(1, 1, b"x" * (MAX_MESSAGE + 1))


class Link:
    """A Server and a Client on the two ends of a real socketpair, through the NRI mux."""

    def __init__(self) -> None:
        a, b = socket.socketpair()
        self.server_mux = Mux(a)
        self.client_mux = Mux(b)
        self.server = Server(lambda d: self.server_mux.send(1, d), "test-server")
        self.client = Client(lambda d: self.client_mux.send(1, d))
        self.release = threading.Event()
        self.server.register(SVC, "Echo", ttrpc_pb2.KeyValue, self._echo)
        self.server.register(SVC, "Fail", ttrpc_pb2.KeyValue, self._fail)
        self.server.register(SVC, "Block", ttrpc_pb2.KeyValue, self._block)
        self.server.start()
        self.server_mux.start({1: self.server.feed}, lambda e: None)
        self.client_mux.start({1: self.client.feed}, lambda e: self.client.close(str(e)))

    def _echo(self, req: ttrpc_pb2.KeyValue) -> ttrpc_pb2.KeyValue:
        return ttrpc_pb2.KeyValue(key=req.value, value=req.key)

    def _fail(self, req: ttrpc_pb2.KeyValue) -> ttrpc_pb2.KeyValue:
        raise PermissionError(f"policy forbids {req.key}")

    def _block(self, req: ttrpc_pb2.KeyValue) -> ttrpc_pb2.KeyValue:
        self.release.wait(WAIT)
        return req

    def call(self, method: str, key: str = "k", timeout: float = WAIT) -> ttrpc_pb2.KeyValue:
        req = ttrpc_pb2.KeyValue(key=key, value="v")
        return self.client.call(SVC, method, req, ttrpc_pb2.KeyValue, timeout=timeout)

    def close(self) -> None:
        self.release.set()
        self.client_mux.close()
        self.server_mux.close()
        self.server.close()


@pytest.fixture
def link() -> Iterator[Link]:
    lk = Link()
    yield lk
    lk.close()


def test_unary_call(link: Link) -> None:
    assert link.call("Echo", "a") == ttrpc_pb2.KeyValue(key="v", value="a")
    assert link.call("Echo", "b").value == "b"


def test_unknown_service_and_method_are_unimplemented(link: Link) -> None:
    req = ttrpc_pb2.KeyValue()
    with pytest.raises(TtrpcError) as e:
        link.client.call("no.Such", "Echo", req, ttrpc_pb2.KeyValue, timeout=WAIT)
    assert (e.value.code, e.value.message) == (Code.UNIMPLEMENTED, "service no.Such")
    with pytest.raises(TtrpcError) as e:
        link.call("StartContainer")
    assert (e.value.code, e.value.message) == (Code.UNIMPLEMENTED, "method StartContainer")
    assert link.call("Echo", "still").value == "still"


def test_handler_exception_is_an_error_response(link: Link) -> None:
    with pytest.raises(TtrpcError) as e:
        link.call("Fail", "io.pelagos-bpf.devices")
    assert e.value.code == Code.UNKNOWN
    assert e.value.message == "Fail: PermissionError: policy forbids io.pelagos-bpf.devices"
    assert link.call("Echo", "alive").value == "alive"


def test_client_timeout_then_late_response_dropped(link: Link) -> None:
    with pytest.raises(TtrpcError) as e:
        link.call("Block", timeout=0.2)
    assert e.value.code == Code.DEADLINE_EXCEEDED
    link.release.set()  # the late response arrives for a stream nobody waits on
    assert link.call("Echo", "next").value == "next"


def test_call_in_flight_fails_when_connection_closes(link: Link) -> None:
    result: list[BaseException] = []

    def call() -> None:
        try:
            link.call("Block")
        except TtrpcError as e:
            result.append(e)

    t = threading.Thread(target=call)
    t.start()
    link.server_mux.close()  # the peer goes away mid-call
    t.join(WAIT)
    assert not t.is_alive()
    assert isinstance(result[0], TtrpcError)
    assert result[0].code == Code.UNAVAILABLE
    with pytest.raises(TtrpcError):
        link.call("Echo")


class RawServer:
    """Our Server fed hand-built ttrpc bytes over a socketpair (no mux), replies read raw."""

    def __init__(self) -> None:
        self.peer, mine = socket.socketpair()
        self.mine = mine
        self.server = Server(mine.sendall, "raw")
        self.server.register(SVC, "Echo", ttrpc_pb2.KeyValue, lambda r: r)
        self.server.start()
        self.peer.settimeout(WAIT)

    def feed(self, data: bytes) -> None:
        self.server.feed(data)

    def response(self) -> tuple[int, ttrpc_pb2.Response]:
        hdr = self._read(10)
        length, stream, mtype, flags = struct.unpack(">IIBB", hdr)
        assert (mtype, flags) == (2, 0)
        resp = ttrpc_pb2.Response()
        resp.ParseFromString(self._read(length))
        return stream, resp

    def _read(self, n: int) -> bytes:
        buf = b""
        while len(buf) < n:
            chunk = self.peer.recv(n - len(buf))
            assert chunk, "server closed"
            buf += chunk
        return buf

    def close(self) -> None:
        self.server.close()
        self.peer.close()
        self.mine.close()


@pytest.fixture
def raw() -> Iterator[RawServer]:
    r = RawServer()
    yield r
    r.close()


def _request(method: str = "Echo", payload: bytes = b"") -> bytes:
    return ttrpc_pb2.Request(service=SVC, method=method, payload=payload).SerializeToString()


def test_oversized_request_gets_resource_exhausted(raw: RawServer) -> None:
    big = MAX_MESSAGE + 1
    raw.feed(_hdr(big, 1, 1))
    raw.feed(b"\0" * big)  # discarded as it comes
    stream, resp = raw.response()
    assert stream == 1
    assert resp.status.code == Code.RESOURCE_EXHAUSTED
    ok = _request(payload=ttrpc_pb2.KeyValue(key="x").SerializeToString())
    raw.feed(_hdr(len(ok), 3, 1) + ok)
    stream, resp = raw.response()
    assert (stream, resp.status.code) == (3, Code.OK)
    assert ttrpc_pb2.KeyValue.FromString(resp.payload).key == "x"


def test_stream_id_rules(raw: RawServer) -> None:
    req = _request()
    raw.feed(_hdr(len(req), 2, 1) + req)
    assert raw.response()[1].status.message == "StreamID must be odd for client initiated streams"
    raw.feed(_hdr(len(req), 5, 1) + req)
    assert raw.response()[1].status.code == Code.OK
    raw.feed(_hdr(len(req), 3, 1) + req)
    stream, resp = raw.response()
    assert (stream, resp.status.code) == (3, Code.INVALID_ARGUMENT)
    assert "must increment" in resp.status.message


def test_undecodable_request_and_data_frames(raw: RawServer) -> None:
    raw.feed(_hdr(3, 1, 1) + b"\xff\xff\xff")
    stream, resp = raw.response()
    assert (stream, resp.status.code) == (1, Code.INVALID_ARGUMENT)
    raw.feed(_hdr(1, 3, 3) + b"d")  # streaming data: no stream is open
    stream, resp = raw.response()
    assert (stream, resp.status.code) == (3, Code.INVALID_ARGUMENT)


def test_request_split_into_single_bytes(raw: RawServer) -> None:
    req = _request(payload=ttrpc_pb2.KeyValue(value="split").SerializeToString())
    wire = _hdr(len(req), 1, 1) + req
    for i in range(len(wire)):
        raw.feed(wire[i : i + 1])
    stream, resp = raw.response()
    assert (stream, resp.status.code) == (1, Code.OK)
    assert ttrpc_pb2.KeyValue.FromString(resp.payload).value == "split"


def test_expired_request_is_not_handled() -> None:
    ran = threading.Event()
    peer, mine = socket.socketpair()
    gate = threading.Event()
    server = Server(mine.sendall, "expiry")

    def slow(r: ttrpc_pb2.KeyValue) -> ttrpc_pb2.KeyValue:
        gate.wait(WAIT)
        return r

    def echo(r: ttrpc_pb2.KeyValue) -> ttrpc_pb2.KeyValue:
        ran.set()
        return r

    server.register(SVC, "Slow", ttrpc_pb2.KeyValue, slow)
    server.register(SVC, "Echo", ttrpc_pb2.KeyValue, echo)
    server.start()
    try:
        first = ttrpc_pb2.Request(service=SVC, method="Slow").SerializeToString()
        fast = ttrpc_pb2.Request(service=SVC, method="Echo", timeout_nano=1).SerializeToString()
        server.feed(_hdr(len(first), 1, 1) + first + _hdr(len(fast), 3, 1) + fast)
        gate.set()  # Echo waited behind Slow past its 1 ns deadline
        peer.settimeout(WAIT)
        seen: dict[int, int] = {}
        dec = MessageDecoder()
        while len(seen) < 2:
            for f in dec.feed(peer.recv(4096)):
                assert isinstance(f, Frame)
                seen[f.stream_id] = ttrpc_pb2.Response.FromString(f.data).status.code
        assert seen == {1: Code.OK, 3: Code.DEADLINE_EXCEEDED}
        assert not ran.is_set()
    finally:
        gate.set()
        server.close()
        peer.close()
        mine.close()


def test_response_in_before_close_is_kept() -> None:
    """A response that has arrived wins over a close that comes before the caller wakes up (the
    stub once lost a RegisterPlugin reply this way when the runtime hung up right after it)."""
    sent = threading.Event()
    client = Client(lambda data: sent.set())
    result: list[object] = []
    t = threading.Thread(
        target=lambda: result.append(
            client.call(SVC, "Echo", ttrpc_pb2.KeyValue(), ttrpc_pb2.KeyValue, timeout=WAIT)
        )
    )
    t.start()
    assert sent.wait(WAIT)
    reply = ttrpc_pb2.Response(payload=ttrpc_pb2.KeyValue(key="ok").SerializeToString())
    client.feed(ttrpc.encode_message(1, ttrpc.TYPE_RESPONSE, reply.SerializeToString()))
    client.close("peer hung up")
    t.join(WAIT)
    assert result == [ttrpc_pb2.KeyValue(key="ok")]
