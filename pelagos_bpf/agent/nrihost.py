"""The agent's NRI side: the plugin (pelagos_bpf.nri.plugin) on a stub thread of its own.

Why a thread beside the asyncio loop: the stub is blocking code with its own threads (mux
reader, handler worker) and every wait bounded; the plugin calls the library directly, as the
agent's workers do (the cgroup locks order them). Its events are counted in the agent's Stats
as "nri_<event>", so `agent status` and the metrics show their p50/p99.

Two modes (docs/NRI.md):
- external (`pelagos-bpf agent --nri`): the agent serves its socket and dials the runtime's
  NRI socket; the stub reconnects, with backoff, whenever the runtime restarts;
- launched by NRI (NRI_PLUGIN_SOCKET set: containerd started us from its plugin_path, a
  connected socket on fd 3): NRI only, no agent socket, exit when the connection ends (NRI
  launches the plugin again with the runtime). The agent socket is a node service's (systemd
  unit, DaemonSet); a copy whose life is containerd's would fight it for the socket.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from . import ops
from .metrics import Stats

log = logging.getLogger("pelagos_bpf.agent")

NAME = "pelagos-bpf"
INDEX = "10"
"""NRI calls plugins in ascending index order and stops at the first error: at 10 our
refusals come before most plugins (resource managers, injectors) have done any work for the
container, and 00-09 stay free for plugins that must run before everything."""
JOIN_TIMEOUT = 30.0
BACKOFF_MAX = 2.0
"""Seconds between attempts to reach a runtime that is down, at most (the stub's default is
30): an attempt is one connect() on a unix socket, and every second without the plugin is a
second in which pods start without their settings (Synchronize covers them late)."""


class NriUnavailable(Exception):
    """--nri cannot run here (the protobuf extra is missing, bad settings)."""


@dataclass(frozen=True)
class NriSettings:
    socket: str = "/var/run/nri/nri.sock"
    index: str = INDEX
    name: str = NAME


def launched(environ: Mapping[str, str] | None = None) -> bool:
    """NRI started us (NRI_PLUGIN_SOCKET names our connected socket)."""
    env = os.environ if environ is None else environ
    return bool(env.get("NRI_PLUGIN_SOCKET"))


class NriRunner:
    """The plugin stub on a daemon thread: start(), stop(), status()."""

    def __init__(
        self, settings: NriSettings, stats: Stats, environ: Mapping[str, str] | None = None
    ) -> None:
        try:
            from ..nri.plugin import Plugin
            from ..nri.stub import NriError, PluginStub
        except ImportError as e:  # protobuf: the [nri] extra
            raise NriUnavailable(
                f"the NRI plugin needs protobuf: pip install 'pelagos-bpf[nri]' ({e})"
            ) from None

        def observe(op: str, seconds: float, ok: bool) -> None:
            stats.observe(f"nri_{op}", seconds, ok)

        self.plugin = Plugin(ops.current_policy, observe=observe)
        try:
            self.stub = PluginStub(
                self.plugin,
                name=settings.name,
                index=settings.index,
                socket_path=settings.socket,
                environ=environ,
                backoff_max=BACKOFF_MAX,
            )
        except (ValueError, NriError) as e:
            raise NriUnavailable(str(e)) from None
        self.stub.synchronized = _Published(stats)
        self.settings = settings
        self.error: BaseException | None = None
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="pelagos-nri", daemon=True)

    @property
    def launched(self) -> bool:
        return self.stub.launched_fd is not None

    def start(self) -> None:
        self.thread.start()
        where = (
            f"fd {self.stub.launched_fd} (launched by NRI)"
            if self.launched
            else self.stub.socket_path
        )
        log.info("NRI plugin %s-%s on %s", self.stub.index, self.stub.name, where)

    def _run(self) -> None:
        try:
            self.stub.run()
        except Exception as e:  # NriError: an NRI-launched plugin's registration failed
            self.error = e
            log.error("NRI plugin stopped: %s", e)
        finally:
            self.done.set()

    def stop(self, timeout: float = JOIN_TIMEOUT) -> None:
        self.stub.stop()
        self.thread.join(timeout)
        if self.thread.is_alive():
            log.warning("NRI plugin thread still running after %g s", timeout)

    def status(self) -> dict[str, Any]:
        return nri_status(self.settings, self.stub.synchronized.is_set(), self.launched)


def nri_status(settings: NriSettings, registered: bool, launched: bool = False) -> dict[str, Any]:
    """The NRI part of `agent status` (any serving process answers it: `registered` comes
    from the main process through Stats)."""
    return {
        "plugin": f"{settings.index}-{settings.name}",
        "socket": None if launched else settings.socket,
        "launched": launched,
        "registered": registered,
    }


class _Published(threading.Event):
    """The stub's "synchronized" event, also published in Stats for the other processes."""

    def __init__(self, stats: Stats) -> None:
        super().__init__()
        self._stats = stats
        stats.set_nri_registered(False)

    def set(self) -> None:
        super().set()
        self._stats.set_nri_registered(True)

    def clear(self) -> None:
        super().clear()
        self._stats.set_nri_registered(False)


def serve_launched(settings: NriSettings, lock_timeout: float) -> int:
    """NRI launched us: the plugin alone, until the runtime closes the connection (0) or
    registration fails (1). SIGTERM/SIGINT stop it; SIGHUP re-reads the policy.

    The runtime waits for a launched plugin's registration at its own start (5 s by
    default), so the plugin registers first and the programs load meanwhile (an event that
    needs them waits for the load: Feature.loaded holds a lock)."""
    ops.configure(lock_timeout)
    ops.reload_policy()
    runner = NriRunner(settings, Stats())

    def on_stop(sig: int, _frame: object) -> None:
        log.info("%s: stopping", signal.strsignal(sig))
        runner.stub.stop()

    signal.signal(signal.SIGTERM, on_stop)
    signal.signal(signal.SIGINT, on_stop)
    signal.signal(signal.SIGHUP, lambda _s, _f: ops.reload_policy())
    runner.start()
    log.info("loaded %d programs", len(ops.load_programs()))
    while not runner.done.wait(0.5):
        pass
    runner.thread.join(JOIN_TIMEOUT)
    return 1 if runner.error is not None else 0
