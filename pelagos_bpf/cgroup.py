"""The Cgroup handle, `setup_cgroup` and `teardown_cgroup`.

Setup order (docs/ARCHITECTURE.md): validate -> plan (controller writes, controller
availability, device/net feature resolution; no side effects) -> mkdir -> enable controllers in
ancestors -> controller writes -> attach devices -> attach net -> move the pid in. Any failure
undoes what was done, in reverse, and re-raises: a runtime never sees a half-built cgroup.

runc's systemd form, `path="slice:prefix:name"` (what `--systemd-cgroup` takes), selects the
systemd driver instead (docs/SYSTEMD.md): validate -> plan every setting's route (a unit
property, a file inside the delegated scope, or a program systemd attaches through
BPFProgram=) -> StartTransientUnit of the scope with the process in it -> file writes -> rule
sets and net settings as map writes into the programs systemd attached. A failure stops the
scope. A plain path never goes to systemd.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from . import controllers, devices, net
from .cgref import open_dir
from .cgroupfs import missing_controller_reason, read_at, read_text, subtree_dirs, write_file
from .config import CgroupConfig
from .controllers import Write
from .devices import program as devprog
from .devices.v1emulator import effective_rules
from .errors import CgroupError, ConfigError, UnsupportedSetting, UnsupportedSettings
from .hierarchy import discover
from .net import program as netprog
from .owner import creating, mark
from .owners import RUNTIME, Owner
from .systemd.names import is_systemd_form
from .validate import validate_config

if TYPE_CHECKING:
    from .systemd.driver import Scope
    from .systemd.properties import Route

log = logging.getLogger(__name__)

TEARDOWN_TIMEOUT = 10.0
KILL_FILE = "cgroup.kill"  # a module constant so tests can force the pre-5.14 fallback


@dataclass
class SetupReport:
    """What setup applied and, in best-effort mode, what it skipped and why."""

    applied: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    written: list[tuple[str, str]] = field(default_factory=list)  # (filename, value)
    # systemd driver only: the path each setting took (a unit property, a file in the
    # scope, or a program systemd attaches), and whether daemon-reload keeps it.
    routes: list[Route] = field(default_factory=list)

    def _applied(self, setting: str) -> None:
        if setting not in self.applied:
            self.applied.append(setting)


@dataclass
class Cgroup:
    """A cgroup created (or opened) by this library.

    `path` is the absolute cgroupfs directory; `id` is the kernel's cgroup id (the directory's
    inode number on cgroup2), which BPF programs and maps use as the key for this cgroup.
    """

    path: Path
    id: int
    root: Path
    created: list[Path] = field(default_factory=list)
    report: SetupReport = field(default_factory=SetupReport)
    torn_down: bool = field(default=False, compare=False)
    # BPF features this process attached (set by setup/update); None: unknown (an opened
    # handle), so teardown asks the kernel what is attached.
    features: set[str] | None = field(default=None, compare=False)
    # The systemd scope that owns this cgroup (the systemd driver); None: a cgroupfs cgroup.
    scope: Scope | None = field(default=None, compare=False)

    @classmethod
    def open(
        cls, path: str | os.PathLike[str], root: str | os.PathLike[str] | None = None
    ) -> Cgroup:
        """A handle for an existing cgroup directory (e.g. in another process than setup's),
        or, for runc's `slice:prefix:name`, of the running scope systemd has for it (then
        update and teardown go through systemd); CgroupError ENOENT if there is none."""
        if isinstance(path, str) and is_systemd_form(path):
            return _open_scope(path)
        p = Path(path)
        return cls(path=p, id=os.stat(p).st_ino, root=Path(root) if root else p.parent)

    @property
    def unit(self) -> str | None:
        """The systemd unit owning the cgroup (systemd driver), else None."""
        return self.scope.unit if self.scope is not None else None

    def open_fd(self) -> int:
        """An O_RDONLY|O_DIRECTORY|O_CLOEXEC fd of the cgroup dir; the caller closes it.

        For bpf(2) attach calls, and for CLONE_INTO_CGROUP: `setup_cgroup(cfg, pid=None)` then
        clone3 with `clone_args.cgroup = cg.open_fd()` (flag 0x200000000, Linux 5.7+) starts the
        process inside the cgroup, so the cgroup.procs write (and the RCU grace period the
        kernel waits for in it) disappears from the start path (docs/PERFORMANCE.md).
        """
        return open_dir(self.path)

    def __enter__(self) -> Cgroup:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        teardown_cgroup(self)


# ---------------------------------------------------------------- planning (no side effects)


@dataclass
class _Plan:
    writes: list[Write]
    controllers: list[str]
    problems: list[tuple[str, str]]
    devices: bool = False
    net_plan: Any = None  # a net.NetPlan when net settings are given


def _plan(cfg: CgroupConfig, pid: int | None, root: Path, net_carrier: str) -> _Plan:
    problems = [(u.setting, u.reason) for u in controllers.unsupported(cfg)]
    planned = controllers.plan(cfg)
    # Read only when there is something to check (a devices-only start skips a file read).
    available = set(read_text(root / "cgroup.controllers").split()) if planned else set()
    writes = []
    for w in planned:
        if w.controller in available:
            writes.append(w)
        elif w.setting not in (s for s, _ in problems):
            problems.append((w.setting, missing_controller_reason(w.controller, root)))
    plan = _Plan(writes, controllers.needed_controllers(writes), problems)
    plan.devices = bool(cfg.device_rules)
    if cfg.net_classid is not None or cfg.net_priorities:
        plan.net_plan = net.resolve_net(cfg.net_classid, list(cfg.net_priorities), pid, net_carrier)
    return plan


# ---------------------------------------------------------------- setup


def setup_cgroup(
    cfg: CgroupConfig,
    pid: int | None,
    *,
    strict: bool = True,
    root: str | os.PathLike[str] | None = None,
    net_carrier: str | None = None,
) -> Cgroup:
    """Create the cgroup for cfg, apply every setting, move `pid` in; return the handle.

    strict (default): any setting that cannot be applied on this host raises
    UnsupportedSettings listing all of them, before anything is created. strict=False applies
    what it can and records the rest in `cg.report.skipped`. `pid=None` creates the cgroup
    without moving a process (then cfg.path is required). `net_carrier` overrides
    cfg.net_carrier (default "auto").

    `path="slice:prefix:name"` (runc's --systemd-cgroup form): a transient scope systemd owns,
    `pelagos-bpf container ...` in its Description; the process is required (systemd refuses
    a scope without one) and `root` must be None (systemd's tree is where systemd has it). In
    strict mode a setting that would be written as a file systemd rewrites at daemon-reload is
    refused too; `cg.report.routes` says which path each setting took.
    """
    validate_config(cfg)
    if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int) or pid < 1):
        raise ConfigError("pid", pid, "must be a process id >= 1")
    if cfg.path is not None and is_systemd_form(cfg.path):
        return _setup_scope(cfg, pid, strict, root, net_carrier or cfg.net_carrier or "auto")
    if cfg.path is not None:
        rel = cfg.path.lstrip("/")  # validate_config checked it (validate_path)
    elif pid is not None:
        rel = f"pelagos-{pid}"
    else:
        raise ConfigError("path", None, "required when no pid is given")
    hier = discover(root)
    target = hier.root / rel
    plan = _plan(cfg, pid, hier.root, net_carrier or cfg.net_carrier or "auto")
    if plan.problems and strict:
        log.info("setup of %s refused: %s", target, plan.problems)
        raise UnsupportedSettings(plan.problems)
    log.debug(
        "setup of %s planned: writes %s, controllers %s, devices %s, net %s",
        target,
        plan.writes,
        plan.controllers,
        plan.devices,
        plan.net_plan,
    )

    report = SetupReport(skipped=[*cfg.ignored, *plan.problems])
    created: list[Path] = []
    attached: list[Callable[[Cgroup], object]] = []  # the detach of each feature we attached
    cfd = -1
    try:
        # Through dir fds: the new cgroup is created and opened once, its id read with fstat,
        # its features attached and its cgroup.procs written through that one fd.
        cfd = _mkdir_open(hier.root, target, created)
        cg = Cgroup(target, os.fstat(cfd).st_ino, hier.root, created, report)
        _enable_controllers(hier.root, target, plan.controllers)
        _apply_writes(target, plan.writes, strict, report)
        cg.features = set()
        if plan.devices:
            attached.append(devices.detach_devices)  # the runtime's set: setup's own
            cg.features.add("devices")
            rules = effective_rules(cfg.device_rules, cfg.device_semantics)
            devprog.attach_fresh(cg, cfd, rules, validated=True)  # by validate_config
            report._applied("device_rules")
        if plan.net_plan is not None:
            attached.append(net.detach_net)
            cg.features.add("net")
            net.attach_net(cg, plan.net_plan)
            _net_applied(cfg, report)
        if pid is not None:
            write_file(target / "cgroup.procs", str(pid), "pid", dir_fd=cfd)
    except BaseException as e:
        _rollback(target, created, attached, e)
        raise
    finally:
        if cfd >= 0:
            os.close(cfd)
    log.info(
        "set up %s (id %d, pid %s): applied %s; skipped %s",
        target,
        cg.id,
        pid,
        report.applied,
        report.skipped,
    )
    return cg


# ---------------------------------------------------------------- the systemd driver

_BPF_SETTINGS = frozenset({"device_rules", "net_classid", "net_priorities"})


def _setup_scope(
    cfg: CgroupConfig,
    pid: int | None,
    strict: bool,
    root: str | os.PathLike[str] | None,
    carrier: str,
) -> Cgroup:
    """setup_cgroup for `slice:prefix:name`: the scope with every setting, or nothing."""
    from .systemd import driver, lifecycle, systemd_reachable
    from .systemd.dbus import Manager, SystemdUnavailable

    assert cfg.path is not None
    spec = driver.ScopeSpec.from_path(cfg.path)  # ConfigError("path") before the bus
    if pid is None:
        raise ConfigError("pid", None, driver.NO_PID)
    if root is not None:
        raise ConfigError(
            "root", os.fspath(root), "the systemd driver puts the scope where systemd's tree is"
        )
    if (why := systemd_reachable()) is not None:
        raise SystemdUnavailable(why)
    hier = discover()
    net_plan = None
    if cfg.net_classid is not None or cfg.net_priorities:
        net_plan = net.resolve_net(cfg.net_classid, list(cfg.net_priorities), pid, carrier)
    with Manager.connect() as m:
        sp = lifecycle.plan_scope(cfg, m.version(), hier.root, net_plan)
        if strict and (sp.problems or sp.unsafe):
            raise UnsupportedSettings(sp.problems + sp.unsafe)
        report = SetupReport(skipped=[*cfg.ignored, *sp.problems], routes=sp.routes)
        origin = driver.cgroup_of(pid)
        scope = driver.start_scope(spec, pid, sp.props.properties, sp.programs, manager=m)
    cg = Cgroup(scope.path, scope.id, hier.root, [], report, features=set(), scope=scope)
    try:
        for r in sp.routes:
            if r.via == "systemd" and r.setting not in _BPF_SETTINGS:  # held since the start
                report._applied(r.setting)
        _enable_controllers(hier.root, scope.path, controllers.needed_controllers(sp.writes))
        _apply_writes(scope.path, sp.writes, strict, report)
        skipped = {s for s, _ in report.skipped}
        report.routes = [r for r in report.routes if r.setting not in skipped]
        if cfg.device_rules:
            cg.features = {"devices"}
            # Map writes into the program systemd attached (or an attach in the scope)
            devprog.apply(cg, effective_rules(cfg.device_rules, cfg.device_semantics))
            report._applied("device_rules")
        if net_plan is not None:
            cg.features = {*(cg.features or ()), "net"}
            net.attach_net(cg, net_plan)
            _net_applied(cfg, report)
    except BaseException as e:
        # The caller's process goes back where it was (the cgroupfs path moves it in last, so
        # a failure never kills it); then the scope is torn down.
        driver.move_back(pid, origin, e)
        try:
            teardown_cgroup(cg)
        except Exception as undo:
            e.add_note(f"rollback: {undo}")
        raise
    return cg


def _open_scope(path: str) -> Cgroup:
    from .systemd import driver

    scope = driver.open_scope(path)
    if scope is None:
        unit = driver.ScopeSpec.from_path(path).unit
        raise CgroupError(errno.ENOENT, f"path: systemd has no unit {unit} (from {path})")
    root = discover().root
    return Cgroup(scope.path, scope.id, root, scope=scope)


def _stop_unit(cg: Cgroup) -> None:
    """StopUnit and wait (the scope is empty by now: systemd may have collected it already),
    then the sub-cgroups a delegate made, which systemd may leave."""
    from .systemd import driver

    assert cg.scope is not None
    driver.stop_scope(cg.scope.unit, kill=False)
    _rmdir_tree(cg.path)


def _net_applied(cfg: CgroupConfig, report: SetupReport) -> None:
    skipped = {s for s, _ in report.skipped}
    if cfg.net_classid is not None and "net_classid" not in skipped:
        report._applied("net_classid")
    if cfg.net_priorities and "net_priorities" not in skipped:
        report._applied("net_priorities")


def _mkdirs(root: Path, parent: Path, created: list[Path]) -> None:
    """mkdir the missing dirs from root down to `parent` (the new cgroup's), appending each
    dir we made to `created`."""
    cur = root
    for part in parent.relative_to(root).parts:
        cur = cur / part
        if os.path.isdir(cur):
            continue
        try:
            with creating(os.fspath(cur.parent), part):  # marks it ours, for gc after a crash
                os.mkdir(cur)
                mark(os.fspath(cur))
        except FileExistsError:
            continue
        except OSError as e:
            raise CgroupError(
                e.errno, f"path: mkdir {cur} failed: {e.strerror}", setting="path", path=cur
            ) from e
        created.append(cur)


def _mkdir_open(root: Path, target: Path, created: list[Path]) -> int:
    """mkdir the cgroup through its parent's dir fd (making missing ancestors first), open it
    and mark it ours through its own fd; returns the new dir's fd."""
    try:
        pfd = open_dir(target.parent)
    except FileNotFoundError:
        _mkdirs(root, target.parent, created)
        pfd = open_dir(target.parent)
    try:
        with creating(pfd, target.name):
            try:
                os.mkdir(target.name, dir_fd=pfd)
            except FileExistsError:
                raise CgroupError(
                    errno.EEXIST,
                    f"path: cgroup {target} already exists",
                    setting="path",
                    path=target,
                ) from None
            except OSError as e:
                raise CgroupError(
                    e.errno,
                    f"path: mkdir {target} failed: {e.strerror}",
                    setting="path",
                    path=target,
                ) from e
            created.append(target)
            cfd = os.open(target.name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=pfd)
            mark(cfd)
            return cfd
    finally:
        os.close(pfd)


def _enable_controllers(root: Path, target: Path, needed: list[str]) -> None:
    """Enable `needed` in cgroup.subtree_control of root and every dir between it and target."""
    if not needed:
        return
    parts = target.relative_to(root).parts
    for d in [root] + [root.joinpath(*parts[:i]) for i in range(1, len(parts))]:
        ctl = d / "cgroup.subtree_control"
        missing = [c for c in needed if c not in read_text(ctl).split()]
        if not missing:
            continue
        try:
            write_file(ctl, " ".join(f"+{c}" for c in missing), "controllers")
        except CgroupError:
            for c in missing:  # one at a time, so the error names the culprit (as runc)
                write_file(ctl, f"+{c}", "controllers")  # the message names c and d


def _apply_writes(target: Path, writes: list[Write], strict: bool, report: SetupReport) -> None:
    for w in writes:
        chosen = next(((f, v) for f, v in w.files() if (target / f).exists()), None)
        if chosen is None:
            names = " or ".join(f for f, _ in w.files())
            reason = f"{names} does not exist in {target} (kernel lacks this {w.controller} knob)"
            if strict:
                raise UnsupportedSetting(w.setting, reason)
            report.skipped.append((w.setting, reason))
            continue
        fname, value = chosen
        try:
            write_file(target / fname, value, w.setting)
        except CgroupError as e:
            if strict:
                raise
            report.skipped.append((w.setting, str(e)))
            log.info("%s skipped (best effort): %s", w.setting, e)
            continue
        log.debug("%s: wrote %r to %s", w.setting, value, fname)
        report._applied(w.setting)
        report.written.append((fname, value))


def _rollback(
    target: Path,
    created: list[Path],
    attached: list[Callable[[Cgroup], object]],
    exc: BaseException,
) -> None:
    """Undo a half-done setup in reverse; failures of the undo are noted on the original error."""
    log.info("setup of %s failed (%s): rolling back", target, exc)
    for detach in reversed(attached):
        if not target.exists():
            break
        try:
            detach(Cgroup.open(target))
        except Exception as undo:
            exc.add_note(f"rollback: detach failed: {undo}")
            log.warning("rollback of %s: detach failed: %s", target, undo)
    for d in reversed(created):
        try:
            os.rmdir(d)
            log.info("rollback: removed %s", d)
        except FileNotFoundError:
            pass
        except OSError as undo:
            exc.add_note(f"rollback: rmdir {d} failed: {undo}")
            log.warning("rollback: rmdir %s failed: %s", d, undo)


# ---------------------------------------------------------------- teardown


def teardown_cgroup(cg: Cgroup, *, timeout: float = TEARDOWN_TIMEOUT) -> None:
    """Kill what is left inside, wait until empty, rmdir (children first), drop BPF entries.

    Removes the cgroup, its sub-cgroups, and the ancestors setup created (if now empty).
    Idempotent: a second call is a no-op.

    Why no PROG_DETACH: rmdir frees the cgroup's attachments and its cgroup storage. What this
    process's programs keep for the cgroup (device rule sets, net priorities) is located
    before the rmdir (from the storage: the generation, then the index entries) and deleted
    after it, when no task can run the programs for this cgroup any more. A cgroup this
    process's programs do not serve (set up by another process, or detached from inside)
    takes the general path: find ours of every version, detach, delete.

    A systemd scope (the systemd driver) is stopped instead of removed: StopUnit and wait,
    once everything in it is killed; its programs' entries go as above.
    """
    if cg.torn_down:
        return
    errors: list[BaseException] = []
    try:
        cfd = open_dir(cg.path)
    except FileNotFoundError:
        cfd = -1
    if cfd >= 0:
        try:
            # Read before the kill: systemd removes a scope's cgroup (and its storage) by
            # itself once it is empty.
            dev_keys = devprog.removal_keys(cg)
            prio_key = netprog.removal_key(cg)
            if _kill_all(cfd, cg.path, timeout):
                _wait_unpopulated(cfd, cg.path, timeout)
        finally:
            os.close(cfd)
        for name, fast, detach in (
            ("net", prio_key, netprog.detach_net_any),
            ("devices", dev_keys, devprog.detach_all),
        ):
            if fast is not None or (cg.features is not None and name not in cg.features):
                continue  # rmdir frees it; another process's entries are gc's
            try:
                detach(cg)
            except Exception as e:
                errors.append(e)
        if cg.scope is not None:
            _stop_unit(cg)
        else:
            _rmdir_tree(cg.path)
        if prio_key is not None:
            netprog.remove_entries(cg.id, prio_key)
        if dev_keys is not None:
            devprog.remove_entries(dev_keys)
    elif cg.scope is not None:  # the cgroup is gone; the unit may still be loaded
        _stop_unit(cg)
    for d in reversed(cg.created):
        if d == cg.path or not d.exists():
            continue
        try:
            os.rmdir(d)
        except OSError as e:
            if e.errno not in (errno.EBUSY, errno.ENOTEMPTY):  # now shared with another cgroup
                raise CgroupError(
                    e.errno, f"rmdir {d} failed: {e.strerror}", setting="teardown", path=d
                ) from e
    cg.torn_down = True
    log.info("tore down %s (id %d); errors: %s", cg.path, cg.id, errors)
    if errors:
        raise errors[0]


def _rmdir_tree(path: Path) -> None:
    """rmdir the cgroup; if it has sub-cgroups (EBUSY), them first, deepest first. A leaf (the
    usual container) costs one rmdir and no directory listing."""
    try:
        os.rmdir(path)
        return
    except FileNotFoundError:
        return
    except OSError as e:
        if e.errno not in (errno.EBUSY, errno.ENOTEMPTY):
            raise CgroupError(
                e.errno, f"rmdir {path} failed: {e.strerror}", setting="teardown", path=path
            ) from e
    for d in subtree_dirs(path):
        try:
            os.rmdir(d)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise CgroupError(
                e.errno, f"rmdir {d} failed: {e.strerror}", setting="teardown", path=d
            ) from e


def _kill_all(cfd: int, path: Path, timeout: float) -> bool:
    """cgroup.kill (5.14+) kills the whole subtree at once; else SIGKILL each listed pid.

    False when the cgroup was already empty (the caller need not wait)."""
    if not read_at(cfd, "cgroup.events").count("populated 1"):
        return False
    kill_file = path / KILL_FILE
    if kill_file.exists():
        write_file(kill_file, "1", "teardown")
        return True
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pids = [int(p) for d in subtree_dirs(path) for p in read_text(d / "cgroup.procs").split()]
        if not pids:
            return True
        for p in pids:  # these are the container's own processes: the cgroup is ours
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, signal.SIGKILL)
        time.sleep(0.005)
    return True


def _wait_unpopulated(cfd: int, path: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while "populated 1" in read_at(cfd, "cgroup.events"):
        if time.monotonic() >= deadline:
            raise CgroupError(
                errno.EBUSY,
                f"{path} still has processes after {timeout}s",
                setting="teardown",
                path=path,
            )
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


# ---------------------------------------------------------------- update


def update_cgroup(cg: Cgroup, cfg: CgroupConfig, *, owner: Owner = RUNTIME) -> SetupReport:
    """Re-apply the settings cfg names to a live cgroup (strict); the others keep their values.

    Controller files are rewritten, device rules replaced with `update_devices`. Net: only the
    named parts change (net_classid, net_priorities, net_carrier): a priorities-only update
    keeps the classid and carrier. Interface names resolve in the cgroup's first process's netns.
    `owner` (pelagos_bpf.owners): whose device set and net settings change; controller settings
    are the runtime's alone, another owner naming one is refused before anything is written.
    """
    validate_config(cfg)
    if owner != RUNTIME:
        for setting in controllers.named_settings(cfg):
            reason = f"controller settings are the runtime's, not the {owner}'s"
            raise ConfigError(setting, getattr(cfg, setting, None), reason)
    if cg.scope is not None:
        return _update_scope(cg, cfg, owner)
    procs = read_text(cg.path / "cgroup.procs").split()
    carrier = cfg.net_carrier
    # A cgroup's own cgroup.controllers says which controller files it has: plan against it.
    plan = _plan(cfg, int(procs[0]) if procs else None, cg.path, carrier or "auto")
    if plan.problems:
        raise UnsupportedSettings(plan.problems)
    controllers.preflight(cg.path, cfg)
    report = SetupReport(skipped=list(cfg.ignored))
    _apply_writes(cg.path, plan.writes, True, report)
    if plan.devices:
        rules = effective_rules(cfg.device_rules, cfg.device_semantics)
        devices.update_devices(cg, rules, owner=owner)
        report._applied("device_rules")
        if cg.features is not None:
            cg.features.add("devices")
    _update_net(cg, cfg, plan.net_plan, report, owner)
    log.info("updated %s as the %s: applied %s", cg.path, owner, report.applied)
    return report


def _update_net(
    cg: Cgroup, cfg: CgroupConfig, plan: Any, report: SetupReport, owner: Owner
) -> None:
    carrier = cfg.net_carrier
    if plan is None and carrier is None:
        return
    named = frozenset(
        n
        for n, given in (
            ("classid", cfg.net_classid is not None),
            ("priorities", cfg.net_priorities),
        )
        if given
    )
    net.update_net(cg, plan or net.NetPlan(), named, carrier, owner=owner)
    _net_applied(cfg, report)
    if cg.features is not None:
        cg.features.add("net")


def _update_scope(cg: Cgroup, cfg: CgroupConfig, owner: Owner) -> SetupReport:
    """update_cgroup of a systemd scope: SetUnitProperties for what systemd holds, files for the
    rest, map writes for rule sets and net settings (the programs systemd attached stay)."""
    from .systemd import lifecycle
    from .systemd.dbus import Manager

    assert cg.scope is not None
    procs = read_text(cg.path / "cgroup.procs").split()
    net_plan = None
    if cfg.net_classid is not None or cfg.net_priorities:
        pid = int(procs[0]) if procs else None
        carrier = cfg.net_carrier or "auto"
        net_plan = net.resolve_net(cfg.net_classid, list(cfg.net_priorities), pid, carrier)
    lifecycle.check_carrier(cg.scope, cfg.net_carrier)
    with Manager.connect() as m:
        sp = lifecycle.plan_scope(cfg, m.version(), cg.root, net_plan, cg.scope.bpf_programs)
        if sp.problems or sp.unsafe:
            raise UnsupportedSettings(sp.problems + sp.unsafe)
        controllers.preflight(cg.path, cfg)
        if lifecycle.burst_before_quota(cg.path, cfg, sp):
            write_file(cg.path / "cpu.max.burst", "0", "cpu_burst")
        report = SetupReport(skipped=list(cfg.ignored), routes=sp.routes)
        if sp.props.properties:
            m.set_unit_properties(cg.scope.unit, sp.props.properties, runtime=True)
    for r in sp.routes:
        if r.via == "systemd" and r.setting not in _BPF_SETTINGS:
            report._applied(r.setting)
    _enable_controllers(cg.root, cg.path, controllers.needed_controllers(sp.writes))
    _apply_writes(cg.path, sp.writes, True, report)
    if cfg.device_rules:
        rules = effective_rules(cfg.device_rules, cfg.device_semantics)
        devices.update_devices(cg, rules, owner=owner)
        report._applied("device_rules")
        if cg.features is not None:
            cg.features.add("devices")
    _update_net(cg, cfg, net_plan, report, owner)
    return report
