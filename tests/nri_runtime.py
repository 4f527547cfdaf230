"""The runtime's side of NRI for tests: what containerd's adaptation does with a plugin (nri
v0.8.0 pkg/adaptation/plugin.go), on real unix sockets, through our mux and ttrpc in the
runtime's roles (client on connection 1, server on connection 2)."""

from __future__ import annotations

import queue
import socket
import threading
from typing import TypeVar

from google.protobuf.message import Message as ProtoMessage

from pelagos_bpf.nri import api
from pelagos_bpf.nri.mux import PLUGIN_SERVICE_CONN, RUNTIME_SERVICE_CONN, Mux
from pelagos_bpf.nri.stub import PluginStub
from pelagos_bpf.nri.ttrpc import Client, Server

R = TypeVar("R", bound=ProtoMessage)
WAIT = 10.0  # generous: a loaded CI machine must not fail these


class RuntimeConn:
    """One accepted plugin connection."""

    def __init__(self, sock: socket.socket, refuse: str | None = None) -> None:
        self.refuse = refuse  # refuse the registration with this message (as a ttrpc error)
        self.mux = Mux(sock)
        self.client = Client(lambda data: self.mux.send(PLUGIN_SERVICE_CONN, data))
        self.server = Server(lambda data: self.mux.send(RUNTIME_SERVICE_CONN, data), "runtime")
        self.registrations: queue.Queue[api.RegisterPluginRequest] = queue.Queue()
        self.updates: queue.Queue[api.UpdateContainersRequest] = queue.Queue()
        self.closed = threading.Event()
        self.server.register(
            api.RUNTIME_SERVICE, "RegisterPlugin", api.RegisterPluginRequest, self._register
        )
        self.server.register(
            api.RUNTIME_SERVICE, "UpdateContainers", api.UpdateContainersRequest, self._update
        )
        self.server.start()
        self.mux.start(
            {PLUGIN_SERVICE_CONN: self.client.feed, RUNTIME_SERVICE_CONN: self.server.feed},
            self._on_close,
        )

    def _register(self, req: api.RegisterPluginRequest) -> api.Empty:
        self.registrations.put(req)
        if self.refuse is not None:
            raise ValueError(self.refuse)
        return api.Empty()

    def _update(self, req: api.UpdateContainersRequest) -> api.UpdateContainersResponse:
        self.updates.put(req)
        return api.UpdateContainersResponse(failed=[u for u in req.update if u.ignore_failure])

    def _on_close(self, error: BaseException | None) -> None:
        self.client.close("plugin went away")
        self.closed.set()

    def wait_registered(self) -> api.RegisterPluginRequest:
        return self.registrations.get(timeout=WAIT)

    def call(self, method: str, request: ProtoMessage, response_type: type[R]) -> R:
        return self.client.call(api.PLUGIN_SERVICE, method, request, response_type, timeout=WAIT)

    def configure(self, config: str = "") -> api.ConfigureResponse:
        req = api.ConfigureRequest(
            config=config,
            runtime_name="fake-containerd",
            runtime_version="2.1.9",
            registration_timeout=5000,
            request_timeout=2000,
        )
        return self.call("Configure", req, api.ConfigureResponse)

    def register_and_configure(self) -> tuple[api.RegisterPluginRequest, api.ConfigureResponse]:
        reg = self.wait_registered()
        return reg, self.configure()

    def close(self) -> None:
        self.mux.close()
        self.client.close()
        self.server.close()


class FakeRuntime:
    """Listens where a plugin dials, like NRI's socket; accept() hands out connections."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.bind(path)
        self.sock.listen(4)
        self.sock.settimeout(WAIT)
        self.conns: list[RuntimeConn] = []

    def accept(self, refuse: str | None = None) -> RuntimeConn:
        sock, _ = self.sock.accept()
        conn = RuntimeConn(sock, refuse)
        self.conns.append(conn)
        return conn

    def close(self) -> None:
        for conn in self.conns:
            conn.close()
        self.sock.close()


class Running:
    """A PluginStub.run() on its own thread, stopped and joined at the end."""

    def __init__(self, stub: PluginStub) -> None:
        self.stub = stub
        self.error: list[BaseException] = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.stub.run()
        except BaseException as e:
            self.error.append(e)

    def stop(self) -> None:
        self.stub.stop()
        self.thread.join(WAIT)
        assert not self.thread.is_alive(), "PluginStub.run() did not return after stop()"
