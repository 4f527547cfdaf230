"""NRI's connection multiplexer: framing edge cases as pure logic, then over real sockets."""

from __future__ import annotations

import functools
import queue
import socket
import struct
import threading
from collections.abc import Iterator

import pytest

from pelagos_bpf.nri import mux
from pelagos_bpf.nri.mux import FrameDecoder, FrameTooLarge, Mux, MuxError

WAIT = 10.0


def _frame(conn: int, payload: bytes) -> bytes:
    # Built by hand (not with mux.encode) so the decoder is checked against the spec, not itself.
    return struct.pack(">II", conn, len(payload)) + payload


def test_frame_split_across_chunks_byte_by_byte() -> None:
    wire = _frame(1, b"hello") + _frame(2, b"") + _frame(2, b"world!")
    dec = FrameDecoder()
    got = []
    for i in range(len(wire)):
        got += dec.feed(wire[i : i + 1])
    assert got == [(1, b"hello"), (2, b""), (2, b"world!")]
    assert dec.pending == 0


def test_several_frames_in_one_chunk_and_a_partial_tail() -> None:
    wire = _frame(1, b"a" * 3) + _frame(2, b"b" * 7) + _frame(1, b"c" * 5)
    dec = FrameDecoder()
    assert dec.feed(wire[:-2]) == [(1, b"aaa"), (2, b"bbbbbbb")]
    assert dec.pending == 8 + 3
    assert dec.feed(wire[-2:]) == [(1, b"ccccc")]


def test_oversized_frame_rejected_at_its_header() -> None:
    dec = FrameDecoder(max_payload=100)
    assert dec.feed(_frame(1, b"x" * 100)) == [(1, b"x" * 100)]
    with pytest.raises(FrameTooLarge, match="101 bytes, over the 100-byte limit"):
        dec.feed(struct.pack(">II", 1, 101))  # no payload sent: refused before buffering it


def test_default_cap_is_the_largest_frame_a_runtime_writes() -> None:
    dec = FrameDecoder()
    big = b"z" * (5 << 20)  # nri v0.6.1 writes a 5 MiB ttrpc message as one frame
    assert dec.feed(_frame(1, big)) == [(1, big)]
    with pytest.raises(FrameTooLarge):
        dec.feed(struct.pack(">II", 1, (16 << 20) + 1))


def test_encode_cuts_like_go_ttrpc() -> None:
    """First frame <= 4096 bytes (the Go reader's bufio buffer), the rest in one frame (its
    queue holds 256 frames per connection): what Go's 4096-byte bufio.Writer produces."""
    dec = FrameDecoder()

    def lengths(data: bytes) -> list[int]:
        frames = dec.feed(mux.encode(2, data))
        assert all(c == 2 for c, _ in frames)
        assert b"".join(p for _, p in frames) == data
        return [len(p) for _, p in frames]

    assert lengths(b"s" * 100) == [100]
    assert lengths(b"e" * 4096) == [4096]
    assert lengths(bytes(range(256)) * 40) == [4096, 6144]
    whole = 10 + (4 << 20)  # the largest ttrpc message
    assert lengths(b"m" * whole) == [4096, whole - 4096]
    assert lengths(b"o" * (whole + 5000)) == [4096, whole, 904]
    assert lengths(b"") == []
    assert mux.encode(1, b"abc") == b"\x00\x00\x00\x01\x00\x00\x00\x03abc"


def test_encode_rejects_reserved_conn() -> None:
    with pytest.raises(ValueError, match="connection id 0"):
        mux.encode(0, b"x")


class _Receiver:
    def __init__(self) -> None:
        self.chunks: queue.Queue[tuple[int, bytes]] = queue.Queue()
        self.closed: queue.Queue[BaseException | None] = queue.Queue()

    def receivers(self) -> dict[int, mux.Receiver]:
        return {c: functools.partial(self._got, c) for c in (1, 2)}

    def _got(self, conn: int, data: bytes) -> None:
        self.chunks.put((conn, data))

    def on_close(self, error: BaseException | None) -> None:
        self.closed.put(error)


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, Mux, _Receiver]]:
    a, b = socket.socketpair()
    rx = _Receiver()
    m = Mux(b)
    m.start(rx.receivers(), rx.on_close)
    yield a, m, rx
    m.close()
    a.close()


def test_mux_delivers_frames_cut_anywhere(pair: tuple[socket.socket, Mux, _Receiver]) -> None:
    peer, _, rx = pair
    wire = _frame(1, b"first") + _frame(2, b"second")
    peer.sendall(wire[:3])
    peer.sendall(wire[3:15])
    peer.sendall(wire[15:])
    assert rx.chunks.get(timeout=WAIT) == (1, b"first")
    assert rx.chunks.get(timeout=WAIT) == (2, b"second")


def test_unknown_conn_is_dropped_and_counted(pair: tuple[socket.socket, Mux, _Receiver]) -> None:
    peer, m, rx = pair
    peer.sendall(_frame(7, b"nobody") + _frame(0, b"reserved") + _frame(1, b"after"))
    assert rx.chunks.get(timeout=WAIT) == (1, b"after")
    assert m.dropped == 2
    assert rx.closed.empty()


def test_oversized_frame_closes_with_error(pair: tuple[socket.socket, Mux, _Receiver]) -> None:
    peer, m, rx = pair
    peer.sendall(struct.pack(">II", 1, 64 << 20))
    err = rx.closed.get(timeout=WAIT)
    assert isinstance(err, FrameTooLarge)
    assert m.closed
    assert peer.recv(1) == b""  # the trunk is shut down: the peer sees EOF


def test_eof_mid_frame_is_an_error(pair: tuple[socket.socket, Mux, _Receiver]) -> None:
    peer, _, rx = pair
    peer.sendall(_frame(1, b"abcdef")[:-2])
    peer.shutdown(socket.SHUT_WR)
    err = rx.closed.get(timeout=WAIT)
    assert isinstance(err, MuxError)
    assert "12 bytes into a frame" in str(err)  # the 8-byte header and 4 of 6 payload bytes


def test_clean_eof_reports_none(pair: tuple[socket.socket, Mux, _Receiver]) -> None:
    peer, _, rx = pair
    peer.shutdown(socket.SHUT_WR)
    assert rx.closed.get(timeout=WAIT) is None


def test_concurrent_sends_keep_messages_whole() -> None:
    a, b = socket.socketpair()
    m = Mux(a)
    rx = _Receiver()
    other = Mux(b)
    other.start(rx.receivers(), rx.on_close)
    msgs = {1: b"A" * 9000, 2: b"B" * 9000}

    def send_all(conn: int) -> None:
        for _ in range(20):
            m.send(conn, msgs[conn])

    threads = [threading.Thread(target=send_all, args=(c,)) for c in (1, 2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    got: dict[int, bytearray] = {1: bytearray(), 2: bytearray()}
    while sum(len(v) for v in got.values()) < 2 * 20 * 9000:
        c, data = rx.chunks.get(timeout=WAIT)
        got[c] += data
    assert got[1] == msgs[1] * 20
    assert got[2] == msgs[2] * 20
    m.close()
    other.close()


def test_close_wakes_an_idle_reader() -> None:
    a, b = socket.socketpair()
    rx = _Receiver()
    m = Mux(b)
    m.start(rx.receivers(), rx.on_close)
    m.close()
    assert rx.closed.get(timeout=WAIT) is None
    assert a.recv(1) == b""
    a.close()
