"""The plugin side of NRI's life cycle, like upstream's pkg/stub (containerd/nri v0.8.0).

A PluginStub connects to the runtime (or takes the socket NRI launched it with), multiplexes
it, serves the Plugin service on mux connection 1, registers on connection 2, then relays each
request to a PluginHandler and its answer back. The handler sees decoded messages only.

Threads, per connection: the mux reader (demultiplexes, answers wire errors), one worker that
calls the handler one request at a time in arrival order (the runtime sends them one at a time
anyway: its adaptation holds a lock around each event), and the thread that called run(). Every
blocking call has a deadline: sends (the runtime's request timeout), registration, joins.

When the runtime goes away an external plugin reconnects with capped exponential backoff and
registers again (the runtime then sends Synchronize with everything running); a plugin NRI
launched itself returns from run(), as NRI will launch it again.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Collection, Iterable, Mapping
from typing import Protocol, TypeVar

from google.protobuf.message import Message as ProtoMessage

from ..errors import PelagosError
from . import api
from .api import (
    ConfigureRequest,
    ConfigureResponse,
    ContainerEviction,
    ContainerUpdate,
    CreateContainerRequest,
    CreateContainerResponse,
    Empty,
    Event,
    RegisterPluginRequest,
    StateChangeEvent,
    StopContainerRequest,
    StopContainerResponse,
    SynchronizeRequest,
    SynchronizeResponse,
    UpdateContainerRequest,
    UpdateContainerResponse,
    UpdateContainersRequest,
    UpdateContainersResponse,
)
from .mux import PLUGIN_SERVICE_CONN, RUNTIME_SERVICE_CONN, Mux
from .ttrpc import Client, Code, Server, TtrpcError

log = logging.getLogger(__name__)

M = TypeVar("M", bound=ProtoMessage)


class NriError(PelagosError):
    """The plugin cannot talk to the runtime (registration refused, bad socket, not connected)."""


class PluginHandler(Protocol):
    """What the plugin does, free of wire concerns: decoded requests in, responses out.

    Methods run one at a time on the stub's worker thread, and must answer well inside the
    runtime's request timeout (2 s by default; ConfigureRequest.request_timeout has the value in
    ms). An exception becomes an error response "<Event>: <exception type>: <message>" (status
    UNKNOWN; raise ttrpc.TtrpcError to choose code and message), which the runtime reports and,
    at CreateContainer and StartContainer, fails the container with. A missed deadline is not
    an error to the runtime: it drops the plugin and lets the container go ahead without it.
    Never call PluginStub.update_containers from a handler: the runtime holds its lock while
    it waits for the handler.
    """

    def configure(self, request: ConfigureRequest) -> Collection[Event]:
        """The events to subscribe to (non-empty); called once per registration."""
        ...

    def synchronize(self, request: SynchronizeRequest) -> SynchronizeResponse:
        """Every pod and container the runtime has, after each (re)registration; parts of a
        split request are joined first, so `request.more` is always false here."""
        ...

    def shutdown(self) -> None:
        """The runtime is going down; the stub reconnects when it is back."""
        ...

    def create_container(self, request: CreateContainerRequest) -> CreateContainerResponse: ...

    def update_container(self, request: UpdateContainerRequest) -> UpdateContainerResponse: ...

    def stop_container(self, request: StopContainerRequest) -> StopContainerResponse: ...

    def run_pod_sandbox(self, event: StateChangeEvent) -> None: ...

    def stop_pod_sandbox(self, event: StateChangeEvent) -> None: ...

    def remove_pod_sandbox(self, event: StateChangeEvent) -> None: ...

    def post_create_container(self, event: StateChangeEvent) -> None: ...

    def start_container(self, event: StateChangeEvent) -> None:
        """The container's task (and cgroup) exists and its process has not started."""
        ...

    def post_start_container(self, event: StateChangeEvent) -> None: ...

    def post_update_container(self, event: StateChangeEvent) -> None: ...

    def remove_container(self, event: StateChangeEvent) -> None: ...


# Which handler method each event reaches; the rest of the events come through StateChange.
_EVENT_METHODS: dict[Event, str] = {
    Event.RUN_POD_SANDBOX: "run_pod_sandbox",
    Event.STOP_POD_SANDBOX: "stop_pod_sandbox",
    Event.REMOVE_POD_SANDBOX: "remove_pod_sandbox",
    Event.CREATE_CONTAINER: "create_container",
    Event.POST_CREATE_CONTAINER: "post_create_container",
    Event.START_CONTAINER: "start_container",
    Event.POST_START_CONTAINER: "post_start_container",
    Event.UPDATE_CONTAINER: "update_container",
    Event.POST_UPDATE_CONTAINER: "post_update_container",
    Event.STOP_CONTAINER: "stop_container",
    Event.REMOVE_CONTAINER: "remove_container",
}
_REQUEST_EVENTS = {Event.CREATE_CONTAINER, Event.UPDATE_CONTAINER, Event.STOP_CONTAINER}


class BaseHandler:
    """A PluginHandler that answers everything with "no change" and subscribes, by default, to
    exactly the events whose methods a subclass overrides (as upstream's stub does)."""

    def configure(self, request: ConfigureRequest) -> Collection[Event]:
        events = {
            event
            for event, name in _EVENT_METHODS.items()
            if getattr(type(self), name) is not getattr(BaseHandler, name)
        }
        if not events:
            raise NriError(f"{type(self).__name__} overrides no NRI event method")
        return events

    def synchronize(self, request: SynchronizeRequest) -> SynchronizeResponse:
        return SynchronizeResponse()

    def shutdown(self) -> None:
        return None

    def create_container(self, request: CreateContainerRequest) -> CreateContainerResponse:
        return CreateContainerResponse()

    def update_container(self, request: UpdateContainerRequest) -> UpdateContainerResponse:
        return UpdateContainerResponse()

    def stop_container(self, request: StopContainerRequest) -> StopContainerResponse:
        return StopContainerResponse()

    def run_pod_sandbox(self, event: StateChangeEvent) -> None:
        return None

    def stop_pod_sandbox(self, event: StateChangeEvent) -> None:
        return None

    def remove_pod_sandbox(self, event: StateChangeEvent) -> None:
        return None

    def post_create_container(self, event: StateChangeEvent) -> None:
        return None

    def start_container(self, event: StateChangeEvent) -> None:
        return None

    def post_start_container(self, event: StateChangeEvent) -> None:
        return None

    def post_update_container(self, event: StateChangeEvent) -> None:
        return None

    def remove_container(self, event: StateChangeEvent) -> None:
        return None


def _expect(method: str, result: object, kind: type[M]) -> M:
    if not isinstance(result, kind):
        raise TypeError(f"handler {method} returned {type(result).__name__}, not {kind.__name__}")
    return result


class _Session:
    """One connection to the runtime: mux, Plugin server, Runtime client, registration."""

    def __init__(self, stub: PluginStub, sock: socket.socket) -> None:
        self.stub = stub
        self.mux = Mux(sock, send_timeout=stub.request_timeout)
        self.server = Server(
            lambda data: self.mux.send(PLUGIN_SERVICE_CONN, data), name="nri-plugin"
        )
        self.client = Client(lambda data: self.mux.send(RUNTIME_SERVICE_CONN, data))
        self.closed = threading.Event()
        self.configured = threading.Event()
        self.synchronized = False  # the runtime's Synchronize was answered on this connection
        self._sync_pods: list[api.PodSandbox] = []
        self._sync_containers: list[api.Container] = []
        svc = api.PLUGIN_SERVICE
        self.server.register(svc, "Configure", ConfigureRequest, self._configure)
        self.server.register(svc, "Synchronize", SynchronizeRequest, self._synchronize)
        self.server.register(svc, "Shutdown", Empty, self._shutdown)
        self.server.register(svc, "CreateContainer", CreateContainerRequest, self._create)
        self.server.register(svc, "UpdateContainer", UpdateContainerRequest, self._update)
        self.server.register(svc, "StopContainer", StopContainerRequest, self._stop)
        self.server.register(svc, "StateChange", StateChangeEvent, self._state_change)

    def run(self) -> None:
        """Register, then serve until the connection ends or the stub stops."""
        stub = self.stub
        self.server.start()
        self.mux.start(
            {PLUGIN_SERVICE_CONN: self.server.feed, RUNTIME_SERVICE_CONN: self.client.feed},
            self._on_close,
        )
        try:
            self.client.call(
                api.RUNTIME_SERVICE,
                "RegisterPlugin",
                RegisterPluginRequest(plugin_name=stub.name, plugin_idx=stub.index),
                Empty,
                timeout=stub.registration_timeout,
            )
            deadline = time.monotonic() + stub.registration_timeout
            while not self.configured.wait(0.05):
                if self.closed.is_set():
                    if stub.stopping:
                        return
                    raise NriError(
                        "the runtime closed the connection during registration"
                        + (f": {self.mux.error}" if self.mux.error else "")
                    )
                if time.monotonic() > deadline:
                    raise NriError(
                        "the runtime accepted the registration but sent no Configure within "
                        f"{stub.registration_timeout:g} s"
                    )
            log.info("NRI plugin %s-%s registered", stub.index, stub.name)
            self.closed.wait()
        except TtrpcError as e:
            if stub.stopping:
                return
            raise NriError(f"NRI registration of {stub.index}-{stub.name} failed: {e}") from e
        finally:
            self.close()

    def close(self) -> None:
        self.closed.set()
        self.mux.close()
        self.client.close("NRI connection closed")
        self.server.close(join_timeout=self.stub.request_timeout)
        self.stub.synchronized.clear()

    def interrupt(self) -> None:
        """Wake run() and any call waiting on the runtime (stop(), from any thread)."""
        self.client.close("NRI plugin stopping")
        self.closed.set()

    def _on_close(self, error: BaseException | None) -> None:
        if error is None:
            log.info("NRI runtime closed the connection")
        else:
            log.warning("NRI connection failed: %s", error)
        self.client.close(f"NRI connection closed: {error or 'EOF'}")
        self.closed.set()

    # The Plugin service, on the server's worker thread.

    def _configure(self, req: ConfigureRequest) -> ConfigureResponse:
        stub = self.stub
        if req.request_timeout > 0:
            stub.request_timeout = req.request_timeout / 1000
        if req.registration_timeout > 0:
            stub.registration_timeout = req.registration_timeout / 1000
        events = stub.handler.configure(req)
        mask = api.event_mask(events)
        log.info(
            "NRI runtime %s %s configured us for %s (mask 0x%x)",
            req.runtime_name,
            req.runtime_version,
            ",".join(e.name for e in sorted(api.events_in_mask(mask))),
            mask,
        )
        self.configured.set()
        return ConfigureResponse(events=mask)

    def _synchronize(self, req: SynchronizeRequest) -> SynchronizeResponse:
        self._sync_pods.extend(req.pods)
        self._sync_containers.extend(req.containers)
        if req.more:
            return SynchronizeResponse(more=True)
        whole = SynchronizeRequest(pods=self._sync_pods, containers=self._sync_containers)
        self._sync_pods, self._sync_containers = [], []
        resp = _expect("synchronize", self.stub.handler.synchronize(whole), SynchronizeResponse)
        resp.more = False
        self.synchronized = True
        self.stub.synchronized.set()
        return resp

    def _shutdown(self, req: Empty) -> Empty:
        self.stub.handler.shutdown()
        return Empty()

    def _create(self, req: CreateContainerRequest) -> CreateContainerResponse:
        result = self.stub.handler.create_container(req)
        return _expect("create_container", result, CreateContainerResponse)

    def _update(self, req: UpdateContainerRequest) -> UpdateContainerResponse:
        result = self.stub.handler.update_container(req)
        return _expect("update_container", result, UpdateContainerResponse)

    def _stop(self, req: StopContainerRequest) -> StopContainerResponse:
        result = self.stub.handler.stop_container(req)
        return _expect("stop_container", result, StopContainerResponse)

    def _state_change(self, evt: StateChangeEvent) -> Empty:
        try:
            event = Event(evt.event)
        except ValueError:
            event = None
        if event is None or event in _REQUEST_EVENTS:
            log.warning("NRI StateChange with event %d, which we do not handle: ignored", evt.event)
            return Empty()
        method: Callable[[StateChangeEvent], None] = getattr(
            self.stub.handler, _EVENT_METHODS[event]
        )
        try:
            method(evt)
        except TtrpcError as e:  # the handler chose code and message (PluginHandler's contract)
            log.warning("NRI %s refused: %s", _event_name(event), e.message)
            raise
        except Exception as e:
            # Name the event, not the StateChange RPC that carries it: this message is what
            # the runtime reports ("NRI container start failed: ... StartContainer: ...").
            log.exception("NRI %s handler failed", _event_name(event))
            raise TtrpcError(Code.UNKNOWN, f"{_event_name(event)}: {type(e).__name__}: {e}") from e
        return Empty()


def _event_name(event: Event) -> str:
    """START_CONTAINER -> StartContainer, as upstream names events in its logs."""
    return "".join(word.capitalize() for word in event.name.split("_"))


class PluginStub:
    """Runs a PluginHandler as the NRI plugin `<index>-<name>`.

    `environ` (default os.environ) is read for NRI_PLUGIN_SOCKET (a pre-connected socket fd
    from NRI's launcher; then NRI_PLUGIN_NAME/NRI_PLUGIN_IDX, when set, name the plugin) and
    otherwise the stub dials `socket_path`.
    """

    def __init__(
        self,
        handler: PluginHandler,
        *,
        name: str,
        index: str,
        socket_path: str = api.DEFAULT_SOCKET_PATH,
        environ: Mapping[str, str] | None = None,
        registration_timeout: float = api.DEFAULT_REGISTRATION_TIMEOUT,
        request_timeout: float = api.DEFAULT_REQUEST_TIMEOUT,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
    ) -> None:
        env = os.environ if environ is None else environ
        self.launched_fd = _parse_fd(env.get(api.PLUGIN_SOCKET_ENV))
        if self.launched_fd is not None:
            name = env.get(api.PLUGIN_NAME_ENV) or name
            index = env.get(api.PLUGIN_IDX_ENV) or index
        if not name:
            raise ValueError("NRI plugin name must not be empty")
        api.check_plugin_index(index)
        if backoff_initial <= 0 or backoff_max < backoff_initial:
            raise ValueError(f"backoff {backoff_initial}..{backoff_max} s is not a valid range")
        self.handler = handler
        self.name = name
        self.index = index
        self.socket_path = socket_path
        self.registration_timeout = registration_timeout
        self.request_timeout = request_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.synchronized = threading.Event()  # set once the runtime's Synchronize is answered
        self._stop = threading.Event()
        self._session: _Session | None = None
        self._lock = threading.Lock()

    def run(self) -> None:
        """Serve until stop(); for an NRI-launched plugin, until its connection ends.

        Raises NriError only when NRI launched us and registration fails (we cannot redial).
        """
        backoff = self.backoff_initial
        while not self._stop.is_set():
            served = False
            try:
                sock = self._connect()
            except OSError as e:
                if self.launched_fd is not None:
                    raise NriError(f"{api.PLUGIN_SOCKET_ENV}={self.launched_fd}: {e}") from e
                log.warning("NRI runtime at %s unreachable: %s", self.socket_path, e)
            else:
                session = _Session(self, sock)
                with self._lock:
                    self._session = session
                    if self._stop.is_set():
                        session.interrupt()
                try:
                    session.run()
                except NriError as e:
                    if self.launched_fd is not None:
                        raise
                    log.warning("%s", e)
                finally:
                    with self._lock:
                        self._session = None
                if self.launched_fd is not None:
                    return
                served = session.synchronized
            if served:
                # The runtime went away after a good session (a restart): try again at once.
                # A runtime that drops us before Synchronize gets the backoff, not a busy loop.
                backoff = self.backoff_initial
                continue
            log.info("NRI: next attempt in %g s", backoff)
            if self._stop.wait(backoff):
                return
            backoff = min(backoff * 2, self.backoff_max)

    @property
    def stopping(self) -> bool:
        return self._stop.is_set()

    def stop(self) -> None:
        """Make run() return soon; safe from any thread."""
        self._stop.set()
        with self._lock:
            if self._session is not None:
                self._session.interrupt()

    def update_containers(
        self,
        updates: Iterable[ContainerUpdate],
        evictions: Iterable[ContainerEviction] = (),
        timeout: float | None = None,
    ) -> list[ContainerUpdate]:
        """Ask the runtime for unsolicited container updates/evictions; returns the updates it
        failed. Not from a handler: the runtime would wait on its own lock until the timeout."""
        with self._lock:
            session = self._session
        if session is None or not session.configured.is_set() or session.closed.is_set():
            raise NriError("not registered with an NRI runtime")
        if threading.get_ident() == session.server.worker_ident:
            raise NriError("update_containers called from an NRI handler would deadlock")
        resp = session.client.call(
            api.RUNTIME_SERVICE,
            "UpdateContainers",
            UpdateContainersRequest(update=list(updates), evict=list(evictions)),
            UpdateContainersResponse,
            timeout=self.request_timeout if timeout is None else timeout,
        )
        return list(resp.failed)

    def _connect(self) -> socket.socket:
        if self.launched_fd is not None:
            os.set_inheritable(self.launched_fd, False)
            return socket.socket(fileno=self.launched_fd)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(self.registration_timeout)
            sock.connect(self.socket_path)
        except OSError:
            sock.close()
            raise
        return sock


def _parse_fd(value: str | None) -> int | None:
    if value is None or value == "":
        return None
    try:
        fd = int(value)
    except ValueError:
        raise NriError(f"{api.PLUGIN_SOCKET_ENV}={value!r} is not a file descriptor") from None
    if fd < 0:
        raise NriError(f"{api.PLUGIN_SOCKET_ENV}={value!r} is not a file descriptor")
    return fd
