"""The NRI plugin: pod annotations -> our programs on the containers' cgroups, as owner "nri".

Events (docs/NRI.md has the operator's view):
- CreateContainer: parse the annotations (request.py) and check them against the admin policy
  of the pod's Kubernetes namespace (PodSandbox.namespace, never an annotation). Invalid or
  refused: an error naming the annotation and the policy rule, which fails the container
  ("failed to get NRI adjustment for container: ..."). Device grants become the adjustment's
  `linux.devices` (grants.py).
- StartContainer: the task exists (runc create ran: cgroup made, pid known) and the process has
  not started: attach classid/priorities (net.update_net) and our device set (the mirror of
  the runtime's rules, then the annotation's rules: devices.update_devices), both as owner
  "nri". Any failure is an error, which fails the container (containerd 2.1.9
  internal/cri/server/container_start.go: NRI StartContainer runs between NewTask and
  task.Start; on error the task is deleted and StartContainer fails with our message).
- PostUpdateContainer: the runtime has applied a resource update; ours is checked and put back
  if gone (runc `update` skips device programs, runc v1.1.5 update.go SkipDevices; a runtime
  that replaced them would be caught here).
- RemoveContainer: our settings go. The runtime has usually removed the cgroup by then (runc
  delete runs at the task's exit), which freed our programs with it; what is left are map
  entries of a dead cgroup, removed here (any owner's: a dead cgroup's entries are nobody's).
- Synchronize (every registration: a late install, an agent or runtime restart): running
  containers whose pods asked get what they miss; what is in force is kept.

No state the kernel and the runtime do not hold: each event recomputes from its own message
(annotations, cgroups_path, pid) and the kernel (read_state). The only memory is the per-
namespace count of rule-map entries for the policy's quota, rebuilt from the kernel at every
Synchronize.

Deadlines: NRI drops a plugin that does not answer within its request timeout (2 s by
default) and lets the container run without it (fail-open by NRI's design). So every wait here
is bounded well inside it (the cgroup locks: a quarter of the timeout) and every failure is an
explicit error, answered in time.

The cgroup comes from `linux.cgroups_path` (request.cgroup_dir): it is there at every event,
RemoveContainer and Synchronize included, and it is where runc made the cgroup. At
StartContainer it is checked against the pid's /proc/<pid>/cgroup (a mismatch, e.g. an agent
in another cgroup namespace, is refused, never guessed around).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

from ..devices.rules import CgroupDeviceRule
from ..errors import ConfigError, PelagosError
from ..ocihook.request import A_BEST_EFFORT, A_DEVICES
from ..owners import NRI
from ..policy import PolicyError, PolicyFileError
from . import grants, request
from .api import (
    ConfigureRequest,
    Container,
    ContainerState,
    CreateContainerRequest,
    CreateContainerResponse,
    Event,
    PodSandbox,
    StateChangeEvent,
    SynchronizeRequest,
    SynchronizeResponse,
)
from .stub import BaseHandler
from .ttrpc import Code, TtrpcError

if TYPE_CHECKING:
    from ..cgref import Ref
    from ..ocihook.runtime import Runtime
    from ..policy import Policy

log = logging.getLogger(__name__)

EVENTS = frozenset(
    {
        Event.CREATE_CONTAINER,
        Event.START_CONTAINER,
        Event.POST_UPDATE_CONTAINER,
        Event.REMOVE_CONTAINER,
    }
)
LOCK_SHARE = 0.25  # of the runtime's request timeout: the longest a cgroup lock is waited for
RUNNING = (ContainerState.CONTAINER_RUNNING, ContainerState.CONTAINER_PAUSED)
T = TypeVar("T")
Observe = Callable[[str, float, bool], None]


class Plugin(BaseHandler):
    """The pelagos-bpf NRI handler (runs on the stub's worker thread, one event at a time).

    policy: returns the admin policy in force (the agent's, reloaded on SIGHUP); raises
    PolicyFileError when it cannot be used (every annotated pod is then refused).
    observe(op, seconds, ok): per-event latency, for the agent's status and metrics.
    """

    def __init__(
        self,
        policy: Callable[[], Policy],
        *,
        observe: Observe | None = None,
        cgroup_root: Path | None = None,
        sys_dev: Path = grants.SYS_DEV,
        dev: Path = grants.DEV,
    ) -> None:
        self._policy = policy
        self._observe = observe
        self._root = cgroup_root
        self._sys_dev = sys_dev
        self._dev = dev
        # container id -> (namespace, rule-map entries of our set on it): the policy's quota
        self._entries: dict[str, tuple[str | None, int]] = {}
        self._janitor = _Janitor(self._purge_dead, observe)

    @property
    def root(self) -> Path:
        if self._root is None:
            from ..hierarchy import discover

            self._root = discover().root
        return self._root

    # ------------------------------------------------------------ NRI events

    def configure(self, req: ConfigureRequest) -> Collection[Event]:
        if req.request_timeout > 0:
            from .. import locks

            budget = req.request_timeout / 1000 * LOCK_SHARE
            if budget < locks.LOCK_TIMEOUT:
                log.info(
                    "NRI request timeout %d ms: cgroup lock waits bounded to %g s",
                    req.request_timeout,
                    budget,
                )
                locks.LOCK_TIMEOUT = budget
        return EVENTS

    def synchronize(self, req: SynchronizeRequest) -> SynchronizeResponse:
        """Running containers whose pods asked: put back what is missing, count what is there.
        A container that cannot be covered is logged (it is running: there is nothing to
        fail), and the rest go on."""
        with self._timed("synchronize"):
            self._entries.clear()
            pods = {p.id: p for p in req.pods}
            covered = failed = 0
            for ctr in req.containers:
                pod = pods.get(ctr.pod_sandbox_id)
                if pod is None or ctr.state not in RUNNING:
                    continue
                try:
                    ask = self._ask(pod, ctr)
                    if ask.empty:
                        continue
                    self._restore(pod, ctr, ask)
                    covered += 1
                except (PelagosError, OSError) as e:
                    failed += 1
                    log.error("NRI synchronize: %s: not covered: %s", _who(pod, ctr), _text(e))
            log.info(
                "NRI synchronize: %d containers, %d asked for settings and have them, %d could "
                "not be covered",
                len(req.containers),
                covered,
                failed,
            )
            return SynchronizeResponse()

    def create_container(self, req: CreateContainerRequest) -> CreateContainerResponse:
        """Validate; grants into the adjustment. Attaching waits for StartContainer (no
        cgroup, no pid yet)."""

        def body() -> CreateContainerResponse:
            ask = self._ask(req.pod, req.container, warn=True)
            adjust = grants.adjustment(ask.grants, ask.source(A_DEVICES), self._sys_dev, self._dev)
            if adjust is None:
                return CreateContainerResponse()
            log.info(
                "%s: device grants %s",
                _who(req.pod, req.container),
                ", ".join(f"{d.path} ({d.type} {d.major}:{d.minor})" for d in adjust.linux.devices),
            )
            return CreateContainerResponse(adjust=adjust)

        return self._guard(
            "create_container", req.pod, req.container, body, CreateContainerResponse
        )

    def start_container(self, event: StateChangeEvent) -> None:
        def body() -> None:
            ask = self._ask(event.pod, event.container)
            if not ask.empty:
                self._attach(event.pod, event.container, ask)

        self._guard("start_container", event.pod, event.container, body, lambda: None)

    def post_update_container(self, event: StateChangeEvent) -> None:
        """Keep ours in force after a runtime update (re-attach what it removed)."""

        def body() -> None:
            ask = self._ask(event.pod, event.container)
            if not ask.empty:
                self._restore(event.pod, event.container, ask)

        self._guard("post_update_container", event.pod, event.container, body, lambda: None)

    def remove_container(self, event: StateChangeEvent) -> None:
        """Ours goes: detached as owner "nri" if the cgroup is still there; else the dead
        cgroup's map entries are removed by the janitor, off the runtime's path (the cgroup's
        id, which keys them, died with it: finding them is a walk of the maps). Recomputed
        from the event (annotations, cgroups_path)."""
        pod, ctr = event.pod, event.container

        def body() -> None:
            self._entries.pop(ctr.id, None)
            try:
                ask = request.parse(pod.annotations, ctr.name)
            except ConfigError:
                return  # refused at CreateContainer: nothing was attached
            if ask.empty:
                return
            path = request.cgroup_dir(ctr.linux.cgroups_path, self.root)
            if (path / "cgroup.procs").exists():
                from .. import devices, net
                from ..cgref import Ref

                cg = Ref.of(path)
                net.detach_net(cg, owner=NRI)
                devices.detach_devices(cg, owner=NRI)
                log.info("%s: removed ours from %s", _who(pod, ctr), path)
            elif ask.wants_program or ask.priorities:  # a classid alone lives in the storage
                self._janitor.ask()

        self._guard("remove_container", pod, ctr, body, lambda: None, best_effort=False)

    # ------------------------------------------------------------ the work

    def _ask(self, pod: PodSandbox, ctr: Container, *, warn: bool = False) -> request.Ask:
        """The container's request, checked against the policy (nothing asked: no policy
        read). Warnings (unknown keys) are logged when `warn` (once: at CreateContainer)."""
        ask = request.parse(pod.annotations, ctr.name)
        for w in ask.warnings if warn else ():
            log.warning("%s: %s", _who(pod, ctr), w)
        if ask.claim is not None:
            self._policy().check(request.namespace_of(pod.namespace), ask.claim)
        return ask

    def _cgroup(self, ctr: Container) -> Ref:
        """The container's cgroup (cgroups_path), which must be its process's."""
        from ..cgref import Ref
        from ..ocihook.locate import cgroup_of_pid

        path = request.cgroup_dir(ctr.linux.cgroups_path, self.root)
        if ctr.pid <= 0:
            raise ConfigError("Container.pid", ctr.pid, "the container has no process yet")
        cg = Ref.of(path)
        try:
            line = Path(f"/proc/{ctr.pid}/cgroup").read_text()
        except OSError as e:
            raise ConfigError("Container.pid", ctr.pid, f"the process is gone: {e}") from None
        if f"0::/{path.relative_to(self.root)}\n" in line:
            return cg  # the agent sees the runtime's cgroup tree at the root it mounts
        try:  # another view of the tree (a cgroup namespace, a bind mount): map it
            actual = cgroup_of_pid(ctr.pid)
        except Exception as e:  # HookError: the process is gone
            raise ConfigError("Container.pid", ctr.pid, str(e)) from None
        if os.stat(actual).st_ino != cg.id:
            raise ConfigError(
                "linux.cgroups_path",
                ctr.linux.cgroups_path,
                f"is {path}, but process {ctr.pid} is in {actual}: is the agent in the "
                "runtime's cgroup namespace, with the host's cgroup2 mount?",
            )
        return cg

    def _attach(self, pod: PodSandbox, ctr: Container, ask: request.Ask) -> None:
        """StartContainer: everything the container asked for, or nothing (a failure undoes
        ours and raises)."""
        from .. import devices, net

        cg = self._cgroup(ctr)
        self._check_grants(ctr, ask)
        plan = (
            net.resolve_net(ask.classid, list(ask.priorities), ctr.pid) if ask.wants_net else None
        )
        rules: list[CgroupDeviceRule] = []
        done = []
        if ask.wants_program:
            # The task's process is still the runtime's init (runc init, crun): its executable
            # names the runtime whose reading of the rules the mirror must follow.
            runtime = runtime_of_init(ctr.pid)
            if runtime is None:
                copy: tuple[CgroupDeviceRule, ...] = ()
                log.warning(
                    "%s: process %d is neither runc's nor crun's init: the runtime's device "
                    "rules are not mirrored (its denials are not counted; ours are enforced)",
                    _who(pod, ctr),
                    ctr.pid,
                )
            else:
                copy, warning = _mirror(runtime, request.device_key(ctr.linux))
                if warning:
                    log.warning("%s: %s", _who(pod, ctr), warning)
            rules = [*copy, *request.own_rules(ask.rules)]
            entries = self._reserve(pod, ctr, ask, rules)
            done.append(
                f"device set: {len(copy)} mirrored ({runtime or 'unknown runtime'}) and "
                f"{len(ask.rules)} own rule(s), {entries} entries"
            )
        try:
            if plan is not None:
                net.update_net(cg, plan, owner=NRI)
                done.insert(0, f"net {plan}")
            if rules:
                devices.update_devices(cg, rules, owner=NRI)
        except BaseException as exc:
            self._entries.pop(ctr.id, None)
            for undo in (net.detach_net, devices.detach_devices):
                try:
                    undo(cg, owner=NRI)
                except Exception as e:
                    exc.add_note(f"rollback: {e}")
            raise
        log.info("%s: cgroup %s: %s", _who(pod, ctr), cg.path, "; ".join(done))

    def _check_grants(self, ctr: Container, ask: request.Ask) -> None:
        """Every grant's node is in the container (the CreateContainer adjustment took): a
        container created while the plugin was away would otherwise start without them."""
        have = {(d.type, d.major, d.minor) for d in ctr.linux.devices}
        for g in ask.grants:
            if (g.kind, g.major, g.minor) not in have:
                raise ConfigError(
                    ask.source(A_DEVICES),
                    str(g),
                    "the container has no node for this grant: it was created without the "
                    "plugin's adjustment (was the plugin registered at CreateContainer?)",
                )

    def _reserve(
        self, pod: PodSandbox, ctr: Container, ask: request.Ask, rules: list[CgroupDeviceRule]
    ) -> int:
        """The set's rule-map entries, admitted by the namespace's quota and counted."""
        from ..devices import program

        setting = ask.source(A_DEVICES)
        program.check_size(rules, setting)
        entries = program.prepare(rules).n_entries
        ns = request.namespace_of(pod.namespace)
        in_use = sum(n for cid, (s, n) in self._entries.items() if s == ns and cid != ctr.id)
        self._policy().check_entries(ns, in_use, entries, setting)
        self._entries[ctr.id] = (ns, entries)
        return entries

    def _restore(self, pod: PodSandbox, ctr: Container, ask: request.Ask) -> None:
        """A running container: attach what is missing (after a late install, a restart, a
        runtime update); what is in force stays. Counted for the quota either way."""
        from .. import devices, net

        cg = self._cgroup(ctr)
        if ask.wants_net and net.read_config(cg) is None:  # there: kept (no netns lookups)
            plan = net.resolve_net(ask.classid, list(ask.priorities), ctr.pid)
            net.update_net(cg, plan, owner=NRI)
            log.warning(
                "%s: cgroup %s: our net settings were missing: put on (%s)",
                _who(pod, ctr),
                cg.path,
                plan,
            )
        if not ask.wants_program:
            return
        mine = [o for o in devices.read_state(cg).owners if o.owner == NRI]
        if mine and mine[0].installed:
            from ..devices import program

            ns = request.namespace_of(pod.namespace)
            self._entries[ctr.id] = (ns, program.prepare(list(mine[0].rules)).n_entries)
            return
        # The process is the workload now, not the runtime: the runtime's rules cannot be
        # read the way it reads them, so our set goes on without their copy (its denials
        # are then not counted; ours are enforced the same).
        rules = request.own_rules(ask.rules)
        entries = self._reserve(pod, ctr, ask, rules)
        devices.update_devices(cg, rules, owner=NRI)
        log.warning(
            "%s: cgroup %s: our device set was missing: put on (%d rules, %d entries; the "
            "runtime's rules not mirrored: its denials are not counted)",
            _who(pod, ctr),
            cg.path,
            len(rules),
            entries,
        )

    def _purge_dead(self) -> int:
        """Delete the entries of dead cgroups in this process's maps (O(entries): ~3 us an
        entry here; the janitor's job). A dead cgroup's entries are nobody's any more,
        whichever owner wrote them (gc removes them the same way)."""
        from ..cgref import Liveness
        from ..devices import usage
        from ..feature import Feature
        from ..registry import FEATURES

        removed = 0
        with Liveness(self.root) as live:
            for feat in FEATURES:
                loaded = feat.loaded_if_any()
                if loaded is None:
                    continue
                counts = Feature.purge(loaded.layer, loaded.maps, live.dead)
                if counts.get("dev_rules") and "dev_rules" in loaded.maps:
                    usage.release(loaded.maps["dev_rules"], counts["dev_rules"])
                removed += sum(counts.values())
        return removed

    # ------------------------------------------------------------ errors and timing

    def _guard(
        self,
        op: str,
        pod: PodSandbox,
        ctr: Container,
        body: Callable[[], T],
        fallback: Callable[[], T],
        *,
        best_effort: bool = True,
    ) -> T:
        """Run an event: a refusal becomes an explicit error naming the container (or, under
        io.pelagos-bpf.best-effort, a warning and `fallback()`); the time is observed."""
        with self._timed(op):
            try:
                return body()
            except (PelagosError, OSError) as e:
                if best_effort and _best_effort(pod, ctr):
                    log.warning(
                        "%s: %s (ignored: %s; nothing attached)",
                        _who(pod, ctr),
                        _text(e),
                        A_BEST_EFFORT,
                    )
                    return fallback()
                raise TtrpcError(_code(e), f"pelagos-bpf: {_who(pod, ctr)}: {_text(e)}") from e

    @contextlib.contextmanager
    def _timed(self, op: str) -> Iterator[None]:
        t0 = time.perf_counter()
        ok = False
        try:
            yield
            ok = True
        finally:
            if self._observe is not None:
                self._observe(op, time.perf_counter() - t0, ok)


@functools.lru_cache(maxsize=64)
def _mirror(runtime: Runtime, key: request.DeviceKey) -> tuple[tuple[CgroupDeviceRule, ...], str]:
    """The mirror of a container's device rules (ocihook/mirror.py), once per distinct list:
    a node's containers mostly share their runtime's default list (~0.5 ms each otherwise)."""
    from ..ocihook import mirror

    copy, warning = mirror.mirror(request.oci_linux_of(key), runtime)
    return tuple(copy), warning


def runtime_of_init(pid: int, proc: Path = Path("/proc")) -> Runtime | None:
    """The runtime whose init process `pid` is, at StartContainer (created, not started).

    runc's init names itself "runc:[2:INIT]" (libcontainer/nsenter/nsexec.c) and runs from a
    sealed memfd copy of runc (its exe names no runtime); crun's waits as crun itself."""
    from ..ocihook.runtime import runtime_of_pid

    try:
        comm = (proc / str(pid) / "comm").read_text().strip()
    except OSError:
        return None
    if comm.startswith("runc:["):
        return "runc"
    return runtime_of_pid(pid, proc)


class _Janitor:
    """Removes dead cgroups' map entries on a thread of its own, once for every burst of
    asks (a pod's removal asks once per container): RemoveContainer answers at once instead
    of holding the runtime's NRI lock for a walk of the maps (20,000 entries: ~60 ms on this
    host, seconds under TCG). The agent's periodic gc is the backstop."""

    def __init__(self, purge: Callable[[], int], observe: Observe | None) -> None:
        self._purge = purge
        self._observe = observe
        self._wanted = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def ask(self) -> None:
        self._wanted.set()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="nri-janitor", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            t0 = time.perf_counter()
            ok = False
            try:
                n = self._purge()
                ok = True
                log.info("NRI: %d map entries of removed containers' cgroups deleted", n)
            except Exception:
                log.exception("NRI: deleting the entries of removed containers failed (gc will)")
            finally:
                if self._observe is not None:
                    self._observe("purge", time.perf_counter() - t0, ok)


def _who(pod: PodSandbox, ctr: Container) -> str:
    ns = pod.namespace or "-"
    return f"pod {ns}/{pod.name or pod.id} container {ctr.name or ctr.id}"


def _text(e: BaseException) -> str:
    return str(e) + "".join(f" ({n})" for n in getattr(e, "__notes__", ()))


def _code(e: BaseException) -> int:
    if isinstance(e, PolicyError | PolicyFileError):
        return Code.FAILED_PRECONDITION
    if isinstance(e, ConfigError):
        return Code.INVALID_ARGUMENT
    return Code.INTERNAL


def _best_effort(pod: PodSandbox, ctr: Container) -> bool:
    try:
        values, _, _ = request.effective_annotations(pod.annotations, ctr.name)
    except ConfigError:
        return False
    return values.get(A_BEST_EFFORT, "").strip(" \t").lower() in ("1", "true", "yes", "on")
