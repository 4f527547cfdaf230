"""NRI's connection multiplexer: two ttrpc byte streams over the one unix socket a plugin has.

The wire format follows containerd/nri v0.8.0 pkg/net/multiplex/mux.go: each frame is an 8-byte
header (connection id u32 big-endian, payload length u32 big-endian) and the payload. Opening a
connection sends nothing; both ends simply agree on the ids: 1 carries the plugin's ttrpc server
(the runtime calls Configure, CreateContainer, ... on it), 2 the plugin's ttrpc client (the
plugin calls RegisterPlugin on the runtime). Frames are only a transport: a ttrpc message may
span several frames and a socket read may hold several frames or part of one.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import socket
import struct
import threading
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

PLUGIN_SERVICE_CONN = 1
RUNTIME_SERVICE_CONN = 2

HEADER = struct.Struct(">II")
# The largest frame a runtime writes: v0.6.1's mux.go maxPayloadSize (containerd 1.7.24), 16 MiB.
# v0.8.0 caps frames at one ttrpc message (10 + 4 MiB), but 1.7.24's ttrpc v1.2.5 does not refuse
# to send a message over 4 MiB (a huge Synchronize), and that one should reach ttrpc, which
# answers it RESOURCE_EXHAUSTED, rather than kill the connection here.
MAX_PAYLOAD = 1 << 24
# How we cut one message (a whole ttrpc message: Mux.send is called once per message) into
# frames, the way Go's ttrpc does through its 4096-byte bufio.Writer: a first frame of at most
# FIRST_FRAME bytes, then the rest in one frame (split at MAX_WRITE, v0.8.0's maxPayloadSize).
# The runtime's reader needs both properties: it reads the first frame with one Read() into
# bufio's 4096-byte buffer and fails with ENOMEM on a larger one (mux.go conn.Read: cap(buf) <
# len(msg)), and it queues at most 256 frames per connection before closing it (readQueueLen,
# "failed to queue payload for reading"), so a big message must not become hundreds of frames.
FIRST_FRAME = 4096
MAX_WRITE = 10 + (4 << 20)

Receiver = Callable[[bytes], None]


class MuxError(Exception):
    """The trunk carried something that is not NRI mux framing; the connection is unusable."""


class FrameTooLarge(MuxError):
    def __init__(self, conn_id: int, length: int, limit: int) -> None:
        self.conn_id = conn_id
        self.length = length
        super().__init__(
            f"NRI mux frame for connection {conn_id} announces {length} bytes, over the "
            f"{limit}-byte limit: not NRI framing, or a corrupted stream"
        )


def encode(conn_id: int, data: bytes) -> bytes:
    """Frame one message for `conn_id` (see FIRST_FRAME for the cut)."""
    if not 0 < conn_id <= 0xFFFFFFFF:
        raise ValueError(f"NRI mux connection id {conn_id} is outside 1..2^32-1")
    cuts = [0, *range(FIRST_FRAME, len(data), MAX_WRITE), len(data)]
    parts = []
    for start, end in itertools.pairwise(cuts):
        if end > start:
            parts.append(HEADER.pack(conn_id, end - start))
            parts.append(data[start:end])
    return b"".join(parts)


class FrameDecoder:
    """Turns trunk bytes, cut anywhere, into (connection id, payload) frames.

    A header announcing more than `max_payload` raises FrameTooLarge as soon as the header is in,
    before any of that payload is buffered: a peer cannot make us hold gigabytes.
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self._buf = bytearray()
        self._max = max_payload

    @property
    def pending(self) -> int:
        """Bytes held back waiting for the rest of their frame."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        self._buf += data
        frames: list[tuple[int, bytes]] = []
        pos = 0
        buf = self._buf
        while len(buf) - pos >= HEADER.size:
            conn_id, length = HEADER.unpack_from(buf, pos)
            if length > self._max:
                raise FrameTooLarge(conn_id, length, self._max)
            end = pos + HEADER.size + length
            if end > len(buf):
                break
            frames.append((conn_id, bytes(buf[pos + HEADER.size : end])))
            pos = end
        del buf[:pos]
        return frames


class Mux:
    """One trunk socket, demultiplexed by a reader thread into per-connection receivers.

    Receivers run on the reader thread and must not block (ttrpc's queue work elsewhere).
    Frames for a connection nobody receives are dropped, as upstream does, but logged and
    counted in `dropped`. `send_timeout` bounds every send: a runtime that stops reading cannot
    wedge the plugin.
    """

    def __init__(
        self,
        sock: socket.socket,
        *,
        send_timeout: float = 2.0,
        max_payload: int = MAX_PAYLOAD,
        recv_size: int = 65536,
    ) -> None:
        self._sock = sock
        self._sock.settimeout(send_timeout)
        self._decoder = FrameDecoder(max_payload)
        self._recv_size = recv_size
        self._send_lock = threading.Lock()
        self._state_lock = threading.Lock()
        self._closing = False
        self._reader: threading.Thread | None = None
        self.dropped = 0
        self.error: BaseException | None = None

    def send(self, conn_id: int, data: bytes) -> None:
        """Send one message; its frames go out together, never interleaved with another's.

        Raises OSError (TimeoutError past the send deadline); the caller then closes the mux.
        """
        frames = encode(conn_id, data)
        with self._send_lock:
            self._sock.sendall(frames)

    def start(
        self,
        receivers: Mapping[int, Receiver],
        on_close: Callable[[BaseException | None], None],
        name: str = "nri-mux",
    ) -> None:
        """Start the reader; `on_close(error or None at EOF)` runs on it once, at the end."""
        if self._reader is not None:
            raise RuntimeError("mux already started")
        self._reader = threading.Thread(
            target=self._read_loop, args=(dict(receivers), on_close), name=name, daemon=True
        )
        self._reader.start()

    def close(self, join_timeout: float = 5.0) -> None:
        """Shut the trunk down, wait for the reader, then release the socket. Idempotent."""
        with self._state_lock:
            first = not self._closing
            self._closing = True
        if first:
            # shutdown() wakes a recv() blocked on the reader thread; closing the fd under it
            # instead could hand a reused descriptor number to that recv.
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
        reader = self._reader
        if reader is not None and reader is not threading.current_thread():
            reader.join(join_timeout)
            if reader.is_alive():
                log.warning("NRI mux reader still running %.1f s after close", join_timeout)
                return
        self._sock.close()

    @property
    def closed(self) -> bool:
        return self._closing

    def _read_loop(
        self, receivers: dict[int, Receiver], on_close: Callable[[BaseException | None], None]
    ) -> None:
        error: BaseException | None = None
        try:
            while not self._closing:
                try:
                    data = self._sock.recv(self._recv_size)
                except TimeoutError:
                    continue  # idle runtime: the timeout is only the send deadline
                if not data:
                    if self._decoder.pending:
                        error = MuxError(
                            f"NRI runtime closed the connection {self._decoder.pending} bytes "
                            "into a frame"
                        )
                    break
                for conn_id, payload in self._decoder.feed(data):
                    receiver = receivers.get(conn_id)
                    if receiver is None:
                        self.dropped += 1
                        log.warning(
                            "NRI mux: dropped %d bytes for unknown connection %d",
                            len(payload),
                            conn_id,
                        )
                    elif payload:
                        receiver(payload)
        except OSError as e:
            if not self._closing:
                error = e
        except Exception as e:  # a protocol error from the decoder or a receiver
            error = e
        finally:
            self.error = error
            with self._state_lock:
                self._closing = True
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            on_close(error)
