"""The plugin stub's NRI life cycle against a fake runtime on real unix sockets: registration,
Configure's event mask, Synchronize (whole and split), events, errors, reconnection, and the
NRI-launched mode. One conversation is hand-built byte by byte, so the stub is checked against
the protocol and not only against our own mux/ttrpc code."""

from __future__ import annotations

import logging
import os
import queue
import socket
import struct
import threading
from collections.abc import Callable, Collection, Iterator
from pathlib import Path

import pytest

from pelagos_bpf.nri import api
from pelagos_bpf.nri.api import Event
from pelagos_bpf.nri.proto import nri_pb2
from pelagos_bpf.nri.stub import BaseHandler, NriError, PluginStub
from pelagos_bpf.nri.ttrpc import Code, TtrpcError
from tests.nri_runtime import WAIT, FakeRuntime, Running, RuntimeConn


class PolicyError(Exception):
    pass


class Recorder(BaseHandler):
    """Records what reaches it; grants /dev/fuse and injects a hook at CreateContainer."""

    def __init__(self) -> None:
        self.seen: queue.Queue[tuple[str, object]] = queue.Queue()
        self.fail_start: bool | TtrpcError = False

    def synchronize(self, request: api.SynchronizeRequest) -> api.SynchronizeResponse:
        self.seen.put(("synchronize", request))
        return api.SynchronizeResponse(
            update=[api.ContainerUpdate(container_id=c.id) for c in request.containers]
        )

    def create_container(self, request: api.CreateContainerRequest) -> api.CreateContainerResponse:
        self.seen.put(("create", request))
        adjust = api.ContainerAdjustment(annotations={"io.pelagos-bpf.applied": "1"})
        adjust.linux.devices.append(
            api.LinuxDevice(path="/dev/fuse", type="c", major=10, minor=229)
        )
        adjust.hooks.create_runtime.append(
            api.Hook(path="/usr/libexec/pelagos-bpf-hook", args=["pelagos-bpf-hook", "attach"])
        )
        return api.CreateContainerResponse(adjust=adjust)

    def start_container(self, event: api.StateChangeEvent) -> None:
        if isinstance(self.fail_start, TtrpcError):
            raise self.fail_start
        if self.fail_start:
            raise PolicyError("io.pelagos-bpf.net.classid: namespace team-a allows 1:10..1:19")
        self.seen.put(("start", event))

    def remove_container(self, event: api.StateChangeEvent) -> None:
        self.seen.put(("remove", event))

    def shutdown(self) -> None:
        self.seen.put(("shutdown", None))

    def get(self, kind: str) -> object:
        got_kind, value = self.seen.get(timeout=WAIT)
        assert got_kind == kind
        return value


def _pod() -> api.PodSandbox:
    pod = api.PodSandbox(id="pod1", name="web", uid="u-1", namespace="team-a", pid=41)
    pod.annotations["io.pelagos-bpf.net.classid"] = "1:10"
    pod.linux.cgroups_path = "kubepods-besteffort-podu_1.slice:cri-containerd:pod1"
    return pod


def _container() -> api.Container:
    ctr = api.Container(id="ctr1", pod_sandbox_id="pod1", name="app", pid=42)
    ctr.state = api.ContainerState.CONTAINER_CREATED
    ctr.linux.cgroups_path = "kubepods-besteffort-podu_1.slice:cri-containerd:ctr1"
    return ctr


@pytest.fixture
def sock_path(tmp_path: Path) -> str:
    return str(tmp_path / "nri.sock")


@pytest.fixture
def runtime(sock_path: str) -> Iterator[FakeRuntime]:
    rt = FakeRuntime(sock_path)
    yield rt
    rt.close()


def _stub(handler: BaseHandler, path: str, **kw: object) -> PluginStub:
    return PluginStub(
        handler,
        name="pelagos-bpf",
        index="30",
        socket_path=path,
        environ={},
        backoff_initial=0.02,
        backoff_max=0.2,
        **kw,  # type: ignore[arg-type]
    )


def test_full_conversation(runtime: FakeRuntime, sock_path: str) -> None:
    h = Recorder()
    plugin = Running(_stub(h, sock_path))
    try:
        conn = runtime.accept()
        reg, cfg = conn.register_and_configure()
        assert (reg.plugin_name, reg.plugin_idx) == ("pelagos-bpf", "30")
        # create, start, remove, synchronize-relevant events: bits 1<<(N-1) for N = 4, 6, 11.
        assert cfg.events == (1 << 3) | (1 << 5) | (1 << 10) == 0x428
        assert api.events_in_mask(cfg.events) == {
            Event.CREATE_CONTAINER,
            Event.START_CONTAINER,
            Event.REMOVE_CONTAINER,
        }
        assert plugin.stub.request_timeout == 2.0

        sync = conn.call(
            "Synchronize",
            api.SynchronizeRequest(pods=[_pod()], containers=[_container()]),
            api.SynchronizeResponse,
        )
        assert [u.container_id for u in sync.update] == ["ctr1"]
        assert not sync.more
        got = h.get("synchronize")
        assert isinstance(got, api.SynchronizeRequest)
        assert got.pods[0].namespace == "team-a"
        assert plugin.stub.synchronized.wait(WAIT)

        resp = conn.call(
            "CreateContainer",
            api.CreateContainerRequest(pod=_pod(), container=_container()),
            api.CreateContainerResponse,
        )
        assert resp.adjust.linux.devices[0].path == "/dev/fuse"
        assert resp.adjust.hooks.create_runtime[0].args == ["pelagos-bpf-hook", "attach"]
        assert resp.adjust.annotations == {"io.pelagos-bpf.applied": "1"}
        created = h.get("create")
        assert isinstance(created, api.CreateContainerRequest)
        assert created.pod.annotations["io.pelagos-bpf.net.classid"] == "1:10"

        start = api.StateChangeEvent(
            event=nri_pb2.START_CONTAINER, pod=_pod(), container=_container()
        )
        assert conn.call("StateChange", start, api.Empty) == api.Empty()
        started = h.get("start")
        assert isinstance(started, api.StateChangeEvent)
        assert started.container.linux.cgroups_path.endswith(":cri-containerd:ctr1")

        h.fail_start = True
        with pytest.raises(TtrpcError) as e:
            conn.call("StateChange", start, api.Empty)
        assert e.value.code == Code.UNKNOWN
        assert e.value.message == (
            "StartContainer: PolicyError: io.pelagos-bpf.net.classid: namespace team-a allows "
            "1:10..1:19"
        )

        # A handler that raises TtrpcError chooses code and message (PluginHandler's contract).
        h.fail_start = TtrpcError(Code.FAILED_PRECONDITION, "pelagos-bpf: refused")
        with pytest.raises(TtrpcError) as e:
            conn.call("StateChange", start, api.Empty)
        assert (e.value.code, e.value.message) == (Code.FAILED_PRECONDITION, "pelagos-bpf: refused")

        remove = api.StateChangeEvent(
            event=nri_pb2.REMOVE_CONTAINER, pod=_pod(), container=_container()
        )
        conn.call("StateChange", remove, api.Empty)
        assert h.get("remove") == remove

        # A newer runtime (NRI v0.10+) first tries the dedicated RPC; UNIMPLEMENTED makes it fall
        # back to StateChange (nri pkg/adaptation/plugin_type.go).
        with pytest.raises(TtrpcError) as e:
            conn.call("StartContainer", start, api.Empty)
        assert e.value.code == Code.UNIMPLEMENTED

        # Plugin-initiated updates go over connection 2.
        failed = plugin.stub.update_containers(
            [
                api.ContainerUpdate(container_id="ctr1"),
                api.ContainerUpdate(container_id="x", ignore_failure=True),
            ]
        )
        assert [u.container_id for u in failed] == ["x"]
        assert [u.container_id for u in conn.updates.get(timeout=WAIT).update] == ["ctr1", "x"]

        conn.call("Shutdown", api.Empty(), api.Empty)
        assert h.get("shutdown") is None
    finally:
        plugin.stop()
    assert plugin.error == []


def test_split_synchronize_reaches_handler_once(runtime: FakeRuntime, sock_path: str) -> None:
    h = Recorder()
    plugin = Running(_stub(h, sock_path))
    try:
        conn = runtime.accept()
        conn.register_and_configure()
        pods = [api.PodSandbox(id=f"p{i}") for i in range(3)]
        ctrs = [api.Container(id=f"c{i}", pod_sandbox_id=f"p{i}") for i in range(3)]
        part = conn.call(
            "Synchronize",
            api.SynchronizeRequest(pods=pods[:2], containers=ctrs[:1], more=True),
            api.SynchronizeResponse,
        )
        # The runtime checks this echo: "plugin does not handle split sync requests" otherwise.
        assert part.more and not part.update
        assert h.seen.empty()
        last = conn.call(
            "Synchronize",
            api.SynchronizeRequest(pods=pods[2:], containers=ctrs[1:]),
            api.SynchronizeResponse,
        )
        assert [u.container_id for u in last.update] == ["c0", "c1", "c2"]
        got = h.get("synchronize")
        assert isinstance(got, api.SynchronizeRequest)
        assert [p.id for p in got.pods] == ["p0", "p1", "p2"]
        assert not got.more
    finally:
        plugin.stop()


class BadHandler(BaseHandler):
    def create_container(self, request: api.CreateContainerRequest) -> api.CreateContainerResponse:
        return None  # type: ignore[return-value]


def test_handler_returning_the_wrong_type_is_an_error(runtime: FakeRuntime, sock_path: str) -> None:
    plugin = Running(_stub(BadHandler(), sock_path))
    try:
        conn = runtime.accept()
        _, cfg = conn.register_and_configure()
        assert cfg.events == 1 << 3
        with pytest.raises(TtrpcError) as e:
            conn.call("CreateContainer", api.CreateContainerRequest(), api.CreateContainerResponse)
        assert "create_container returned NoneType, not CreateContainerResponse" in e.value.message
        # The plugin still serves.
        conn.call("Synchronize", api.SynchronizeRequest(), api.SynchronizeResponse)
    finally:
        plugin.stop()


def test_reconnects_after_runtime_restart(runtime: FakeRuntime, sock_path: str) -> None:
    h = Recorder()
    plugin = Running(_stub(h, sock_path))
    try:
        first = runtime.accept()
        first.register_and_configure()
        first.call("Synchronize", api.SynchronizeRequest(), api.SynchronizeResponse)
        h.get("synchronize")
        first.close()  # containerd restarts
        second = runtime.accept()
        reg, _ = second.register_and_configure()
        assert reg.plugin_idx == "30"
        second.call(
            "Synchronize",
            api.SynchronizeRequest(containers=[_container()]),
            api.SynchronizeResponse,
        )
        got = h.get("synchronize")
        assert isinstance(got, api.SynchronizeRequest)
        assert [c.id for c in got.containers] == ["ctr1"]
    finally:
        plugin.stop()


class LogSeen(logging.Handler):
    """Sets `seen` when a record containing `text` is logged (from any thread)."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.text = text
        self.seen = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        if self.text in record.getMessage():
            self.seen.set()


@pytest.fixture
def stub_log() -> Iterator[Callable[[str], LogSeen]]:
    logger = logging.getLogger("pelagos_bpf.nri.stub")
    level = logger.level
    logger.setLevel(logging.INFO)
    added: list[LogSeen] = []

    def watch(text: str) -> LogSeen:
        h = LogSeen(text)
        logger.addHandler(h)
        added.append(h)
        return h

    yield watch
    for h in added:
        logger.removeHandler(h)
    logger.setLevel(level)


def test_waits_for_a_runtime_that_is_not_there_yet(
    sock_path: str, stub_log: Callable[[str], LogSeen]
) -> None:
    failed = stub_log("unreachable")
    plugin = Running(_stub(Recorder(), sock_path))
    try:
        assert failed.seen.wait(WAIT)
        rt = FakeRuntime(sock_path)  # appears after the stub's first attempt failed
        try:
            rt.accept().register_and_configure()
        finally:
            rt.close()
    finally:
        plugin.stop()


def test_backoff_doubles_up_to_its_cap(sock_path: str, stub_log: Callable[[str], LogSeen]) -> None:
    steps = [stub_log(f"next attempt in {d:g} s") for d in (0.02, 0.04, 0.08, 0.16, 0.2)]
    plugin = Running(_stub(Recorder(), sock_path))  # nothing listens at sock_path
    try:
        for step in steps:
            assert step.seen.wait(WAIT), step.text
    finally:
        plugin.stop()


def test_dropped_before_synchronize_backs_off(
    runtime: FakeRuntime, sock_path: str, stub_log: Callable[[str], LogSeen]
) -> None:
    backing_off = stub_log("next attempt in 0.02 s")
    plugin = Running(_stub(Recorder(), sock_path))
    try:
        first = runtime.accept()
        first.register_and_configure()
        first.close()  # no Synchronize: not a good session, so no immediate redial
        assert backing_off.seen.wait(WAIT)
        runtime.accept().register_and_configure()
    finally:
        plugin.stop()


def test_refused_registration_is_retried(
    runtime: FakeRuntime, sock_path: str, stub_log: Callable[[str], LogSeen]
) -> None:
    refused = stub_log("registration of 30-pelagos-bpf failed: ttrpc UNKNOWN: RegisterPlugin")
    plugin = Running(_stub(Recorder(), sock_path))
    try:
        runtime.accept(refuse="plugin index 30 is taken").wait_registered()
        assert refused.seen.wait(WAIT)
        runtime.accept().register_and_configure()
    finally:
        plugin.stop()


def test_nri_launched_registration_failure_is_raised() -> None:
    theirs, ours = socket.socketpair()
    stub = PluginStub(
        Recorder(), name="p", index="01", environ={"NRI_PLUGIN_SOCKET": str(ours.detach())}
    )
    plugin = Running(stub)
    conn = RuntimeConn(theirs, refuse="no")
    try:
        plugin.thread.join(WAIT)
        assert not plugin.thread.is_alive()
        assert len(plugin.error) == 1
        assert isinstance(plugin.error[0], NriError)
        assert "ValueError: no" in str(plugin.error[0])
    finally:
        conn.close()


def test_nri_launched_plugin_returns_when_its_connection_ends() -> None:
    theirs, ours = socket.socketpair()
    env = {
        "NRI_PLUGIN_SOCKET": str(ours.fileno()),
        "NRI_PLUGIN_NAME": "bpf",
        "NRI_PLUGIN_IDX": "07",
    }
    stub = PluginStub(Recorder(), name="pelagos-bpf", index="30", environ=env)
    ours.detach()  # the stub owns the descriptor now, as it would after exec
    plugin = Running(stub)
    conn = RuntimeConn(theirs)
    try:
        reg, _ = conn.register_and_configure()
        assert (reg.plugin_name, reg.plugin_idx) == ("bpf", "07")
        conn.close()
        plugin.thread.join(WAIT)
        assert not plugin.thread.is_alive(), "an NRI-launched plugin must exit, not redial"
        assert plugin.error == []
    finally:
        conn.close()
        plugin.stop()


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="two digits"):
        PluginStub(Recorder(), name="x", index="1", environ={})
    with pytest.raises(NriError, match="not a file descriptor"):
        PluginStub(Recorder(), name="x", index="10", environ={"NRI_PLUGIN_SOCKET": "three"})
    with pytest.raises(ValueError, match="0 means all"):
        api.event_mask([])


# The hand-built conversation: mux frames, ttrpc headers and protobuf fields written and read
# with struct and a ten-line varint codec, none of them our mux/ttrpc/protobuf code.


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, value: bytes | int) -> bytes:
    if isinstance(value, int):
        return _varint(num << 3) + _varint(value)
    return _varint(num << 3 | 2) + _varint(len(value)) + value


def _fields(buf: bytes) -> dict[int, bytes | int]:
    out: dict[int, bytes | int] = {}
    pos = 0
    while pos < len(buf):
        key, pos = _read_varint(buf, pos)
        if key & 7 == 0:
            out[key >> 3], pos = _read_varint(buf, pos)
        else:
            assert key & 7 == 2
            length, pos = _read_varint(buf, pos)
            out[key >> 3], pos = buf[pos : pos + length], pos + length
    return out


def _read_varint(buf: bytes, pos: int) -> tuple[int, int]:
    n = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        n |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            return n, pos


class RawRuntime:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        sock.settimeout(WAIT)
        self.buf = b""

    def _read(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            assert chunk, "plugin closed the connection"
            self.buf += chunk
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def read_message(self) -> tuple[int, int, int, bytes]:
        """One ttrpc message, reassembled from its mux frames: (conn, stream, type, data)."""
        data = b""
        conn = 0
        while len(data) < 10 or len(data) < 10 + struct.unpack(">I", data[:4])[0]:
            conn, length = struct.unpack(">II", self._read(8))
            data += self._read(length)
        length, stream, mtype, _ = struct.unpack(">IIBB", data[:10])
        assert len(data) == 10 + length, "a mux frame mixed two ttrpc messages"
        return conn, stream, mtype, data[10:]

    def send(self, conn: int, stream: int, mtype: int, data: bytes) -> None:
        msg = struct.pack(">IIBB", len(data), stream, mtype, 0) + data
        self.sock.sendall(struct.pack(">II", conn, len(msg)) + msg)


def test_hand_built_registration_and_configure() -> None:
    theirs, ours = socket.socketpair()
    env = {"NRI_PLUGIN_SOCKET": str(ours.detach())}
    h = Recorder()
    plugin = Running(PluginStub(h, name="pelagos-bpf", index="30", environ=env))
    raw = RawRuntime(theirs)
    try:
        conn, stream, mtype, data = raw.read_message()
        assert (conn, stream, mtype) == (2, 1, 1)  # the plugin's client: conn 2, first odd id
        req = _fields(data)
        assert req[1] == b"nri.pkg.api.v1alpha1.Runtime"
        assert req[2] == b"RegisterPlugin"
        assert req[4] == 5_000_000_000  # timeout_nano: the 5 s registration timeout
        assert _fields(req[3]) == {1: b"pelagos-bpf", 2: b"30"}  # type: ignore[arg-type]
        raw.send(2, 1, 2, _field(1, b""))  # Response{status: {}} = OK, empty payload

        configure = _field(1, b"nri.pkg.api.v1alpha1.Plugin") + _field(2, b"Configure")
        configure += _field(3, _field(2, b"containerd") + _field(3, b"v1.7.24"))
        raw.send(1, 1, 1, configure)
        conn, stream, mtype, data = raw.read_message()
        assert (conn, stream, mtype) == (1, 1, 2)
        resp = _fields(data)
        assert _fields(resp.get(1, b"")).get(1, 0) == 0  # type: ignore[arg-type]
        # CreateContainer (4), StartContainer (6), RemoveContainer (11): 0x8 | 0x20 | 0x400.
        assert _fields(resp[2]) == {2: 0x428}  # type: ignore[arg-type]

        start = _field(1, 6) + _field(3, _field(1, b"ctr9"))  # StateChangeEvent, no pod
        raw.send(
            1,
            3,
            1,
            _field(1, b"nri.pkg.api.v1alpha1.Plugin")
            + _field(2, b"StateChange")
            + _field(3, start),
        )
        conn, stream, mtype, data = raw.read_message()
        assert (conn, stream, mtype) == (1, 3, 2)
        assert _fields(data).get(2, b"") == b""  # Empty
        got = h.get("start")
        assert isinstance(got, api.StateChangeEvent)
        assert got.container.id == "ctr9"
        assert plugin.stub.request_timeout == 2.0  # a v0.6 runtime sends no timeouts: default
    finally:
        theirs.close()
        plugin.thread.join(WAIT)
        plugin.stop()
    assert plugin.error == []


def test_launched_fd_is_not_inherited() -> None:
    theirs, ours = socket.socketpair()
    fd = ours.detach()
    os.set_inheritable(fd, True)
    stub = PluginStub(Recorder(), name="p", index="01", environ={"NRI_PLUGIN_SOCKET": str(fd)})
    plugin = Running(stub)
    conn = RuntimeConn(theirs)
    try:
        conn.wait_registered()
        assert not os.get_inheritable(fd)
    finally:
        conn.close()
        plugin.thread.join(WAIT)
        plugin.stop()


def _events(handler: BaseHandler) -> Collection[Event]:
    return handler.configure(api.ConfigureRequest())


def test_base_handler_subscribes_to_what_it_overrides() -> None:
    assert set(_events(Recorder())) == {
        Event.CREATE_CONTAINER,
        Event.START_CONTAINER,
        Event.REMOVE_CONTAINER,
    }
    with pytest.raises(NriError, match="overrides no NRI event method"):
        _events(BaseHandler())
