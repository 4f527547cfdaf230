"""Start, update and stop a container's transient scope, as runc's systemd driver does.

start_scope: StartTransientUnit of `<prefix>-<name>.scope` in the slice with Delegate=yes,
PIDs=[pid], Description, DefaultDependencies=no, the accounting switches, the caller's
properties (properties.plan) and `BPFProgram=` entries for the caller's pinned programs, so
systemd owns those attachments; the job must end "done"; UnitExists -> ResetFailedUnit and one
retry (runc). Each BPFProgram is then checked attached: systemd 252 logs and ignores an attach
failure, which would otherwise leave the scope without its device program, silently.
stop_scope: StopUnit and wait, then ResetFailedUnit; nothing of the unit or its cgroup stays.

What systemd 252 does here (measured in a guest with systemd as PID 1, see docs/SYSTEMD.md):
a scope needs a process (no PIDs: refused); BPFProgram= entries are attached with
BPF_F_ALLOW_MULTI and kept, with the cgroup storage of the program, across daemon-reload and
set-property; BPFProgram cannot be changed on a running unit (PropertyReadOnly), so the
program is fixed at start and rule updates are map writes.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .. import bpfsys
from ..cgref import open_dir
from ..cgroupfs import read_text, subtree_dirs, write_file
from ..controllers import Write, needed_controllers
from ..errors import BpfError, CgroupError, ConfigError
from ..hierarchy import discover
from . import names
from .dbus import DEADLINE, NO_SUCH_UNIT, SCOPE_IFACE, Manager, Property, SystemdError
from .properties import SINCE, Plan

ACCOUNTING = ("MemoryAccounting", "CPUAccounting", "IOAccounting", "TasksAccounting")
# BPFProgram= types (systemd.resource-control(5)) -> the kernel's bpf_attach_type.
BPF_ATTACH_TYPES: dict[str, int] = {
    "ingress": 0,
    "egress": 1,
    "sock_create": 2,
    "sock_ops": 3,
    "device": 6,
    "bind4": 8,
    "bind6": 9,
    "connect4": 10,
    "connect6": 11,
    "post_bind4": 12,
    "post_bind6": 13,
    "sendmsg4": 14,
    "sendmsg6": 15,
    "sysctl": 18,
    "recvmsg4": 19,
    "recvmsg6": 20,
    "getsockopt": 21,
    "setsockopt": 22,
}
# Every scope the driver starts has a Description beginning with this: how gc tells our failed
# scopes from anyone else's (units.failed_scopes_of_ours); nothing else marks a transient unit.
MARK = "pelagos-bpf container"
NO_PID = (
    "systemd refuses a scope without a process ('Scope has no PIDs', measured on 252): start "
    "the container's process first (e.g. stopped in a pipe) and give its pid"
)


@dataclass(frozen=True)
class ScopeSpec:
    """The unit to create: its slice, its name, its Description."""

    slice: str
    unit: str
    description: str = ""

    @classmethod
    def from_path(cls, path: str, description: str = "") -> ScopeSpec:
        """From runc's `slice:prefix:name`; ConfigError naming `path` if it is not a scope
        systemd would accept (checked before any D-Bus call). The Description always starts
        with MARK (gc's proof that the unit is ours); `description` is added after it."""
        parsed = names.parse(path)
        if not parsed.is_scope:
            raise ConfigError(
                "path", path, f"{parsed.unit} is a slice: the driver creates scopes only"
            )
        text = f"{MARK} {path}" + (f": {description}" if description else "")
        return cls(parsed.slice, parsed.unit, text)

    @property
    def cgroup_path(self) -> str:
        """Below the cgroup2 root: "system.slice/pelagos-t1.scope"."""
        return names.SystemdPath(self.slice, self.unit).cgroup_path


@dataclass
class Scope:
    """A started scope. A CgroupRef (path, id, open_fd), so the device and net features take
    it as they take a Cgroup: their map writes address this cgroup's id."""

    spec: ScopeSpec
    path: Path
    id: int
    version: int
    bpf_programs: tuple[tuple[str, str], ...] = ()
    properties: tuple[Property, ...] = field(default=(), compare=False)

    @property
    def unit(self) -> str:
        return self.spec.unit

    def open_fd(self) -> int:
        return open_dir(self.path)


@contextmanager
def _manager(manager: Manager | None) -> Iterator[Manager]:
    if manager is not None:
        yield manager
        return
    with Manager.connect() as m:
        yield m


def check_bpf_programs(entries: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """(type, pin path) pairs as BPFProgram= takes them; ConfigError naming `bpf_programs`
    unless each type is one systemd knows and each path is a pinned program."""
    out = []
    for kind, path in entries:
        if kind not in BPF_ATTACH_TYPES:
            known = ", ".join(BPF_ATTACH_TYPES)
            raise ConfigError("bpf_programs", kind, f"not a BPFProgram= type ({known})")
        if not os.path.isabs(path) or os.path.normpath(path) != path:
            raise ConfigError("bpf_programs", path, "must be an absolute, normalized pin path")
        try:
            os.close(bpfsys.obj_get(path))
        except BpfError as e:
            raise ConfigError("bpf_programs", path, f"not a pinned BPF program: {e}") from None
        out.append((kind, path))
    return tuple(out)


def scope_properties(
    spec: ScopeSpec,
    pid: int,
    properties: Sequence[Property] = (),
    bpf_programs: Sequence[tuple[str, str]] = (),
) -> list[Property]:
    """Everything StartTransientUnit gets, runc's base set first."""
    props = [
        Property("Description", "s", spec.description or spec.unit),
        Property("Slice", "s", spec.slice),
        Property("Delegate", "b", True),
        Property("PIDs", "au", [pid]),
        *(Property(a, "b", True) for a in ACCOUNTING),
        Property("DefaultDependencies", "b", False),
        *properties,
    ]
    if bpf_programs:
        props.append(Property("BPFProgram", "a(ss)", list(bpf_programs)))
    return props


def start_scope(
    spec: ScopeSpec,
    pid: int | None,
    properties: Sequence[Property] = (),
    bpf_programs: Sequence[tuple[str, str]] = (),
    *,
    manager: Manager | None = None,
    deadline: float = DEADLINE,
) -> Scope:
    """Create the scope with `pid` in it; SystemdError (naming the unit and systemd's words)
    if systemd refuses or the job ends other than "done": then no unit and no cgroup stay."""
    if pid is None:
        raise ConfigError("pid", None, NO_PID)
    if isinstance(pid, bool) or not isinstance(pid, int) or pid < 1:
        raise ConfigError("pid", pid, "must be a process id >= 1")
    names.check_unit_name(spec.unit, ".scope")
    names.expand_slice(spec.slice)
    programs = check_bpf_programs(bpf_programs)
    props = scope_properties(spec, pid, properties, programs)
    with _manager(manager) as m:
        version = m.version()
        if programs and version < SINCE["BPFProgram"]:
            raise SystemdError(
                spec.unit, "BPFProgram", "unsupported", f"systemd {version} < 249 lacks it"
            )
        origin = cgroup_of(pid)
        _start(m, spec.unit, props, deadline)
        try:
            scope = _opened(m, spec, version, programs, tuple(properties))
            _check_attached(scope)
        except BaseException as e:
            move_back(pid, origin, e)
            _stop(m, spec.unit, deadline, e)
            raise
        return scope


def cgroup_of(pid: int) -> Path:
    """The cgroup2 directory `pid` is in now (its `0::` line; the root when the process is
    gone, which systemd then refuses to put in a scope anyway)."""
    text = read_text(Path(f"/proc/{pid}/cgroup"))
    rel = next((ln[3:] for ln in text.splitlines() if ln.startswith("0::")), "/")
    return discover().root / rel.lstrip("/")


def move_back(pid: int, origin: Path, during: BaseException) -> None:
    """A failed start gives the caller's process back to the cgroup it came from before the
    scope is stopped (StopUnit would kill it): a failure leaves the caller as it was."""
    try:
        write_file(origin / "cgroup.procs", str(pid), "rollback")
    except CgroupError as e:
        during.add_note(f"rollback: pid {pid} stays in the scope and is stopped with it: {e}")


def _start(m: Manager, unit: str, props: list[Property], deadline: float) -> None:
    for attempt in (1, 2):
        try:
            result = m.start_transient_unit(unit, props, deadline)
        except SystemdError as e:
            if e.name != "org.freedesktop.systemd1.UnitExists" or attempt == 2:
                raise
            m.reset_failed_unit(unit)  # a failed leftover goes; a live one stays and we fail
            continue
        if result != "done":
            _reset(m, unit)
            raise SystemdError(unit, "StartTransientUnit", "job result", result)
        return


def _opened(
    m: Manager,
    spec: ScopeSpec,
    version: int,
    programs: tuple[tuple[str, str], ...],
    properties: tuple[Property, ...],
) -> Scope:
    """The scope's cgroup as systemd reports it (ControlGroup), under the cgroup2 root."""
    cgroup = str(m.unit_property(spec.unit, "ControlGroup", SCOPE_IFACE))
    path = discover().root / cgroup.lstrip("/")
    return Scope(spec, path, os.stat(path).st_ino, version, programs, properties)


def _check_attached(scope: Scope) -> None:
    """Each BPFProgram entry is attached at the scope (systemd ignores attach failures)."""
    if not scope.bpf_programs:
        return
    cgfd = scope.open_fd()
    try:
        for kind, path in scope.bpf_programs:
            fd = bpfsys.obj_get(path)
            try:
                prog_id = bpfsys.prog_info(fd).id
            finally:
                os.close(fd)
            if prog_id not in bpfsys.prog_query(cgfd, BPF_ATTACH_TYPES[kind]):
                raise SystemdError(
                    scope.unit,
                    "BPFProgram",
                    "not attached",
                    f"{kind}:{path} (program {prog_id}) is not attached to {scope.path}; "
                    "see `journalctl -u " + scope.unit + "`",
                )
    finally:
        os.close(cgfd)


def open_scope(unit_or_path: str, *, manager: Manager | None = None) -> Scope | None:
    """The running scope (for a process other than the one that started it); None when
    systemd has no such unit. BPFProgram entries and the version are read from systemd."""
    spec = (
        ScopeSpec.from_path(unit_or_path)
        if names.is_systemd_form(unit_or_path)
        else ScopeSpec("", names.check_unit_name(unit_or_path, ".scope"))
    )
    with _manager(manager) as m:
        if m.unit_path(spec.unit) is None:
            return None
        slice_ = str(m.unit_property(spec.unit, "Slice", SCOPE_IFACE))
        spec = ScopeSpec(slice_, spec.unit, spec.description)
        programs = tuple(
            (str(k), str(p)) for k, p in m.unit_property(spec.unit, "BPFProgram", SCOPE_IFACE)
        )
        return _opened(m, spec, m.version(), programs, ())


_CGROUP_UNIT_IFACES = {
    ".scope": "Scope",
    ".service": "Service",
    ".slice": "Slice",
    ".socket": "Socket",
    ".mount": "Mount",
    ".swap": "Swap",
}


def referenced_pins(*, manager: Manager | None = None) -> dict[str, list[str]]:
    """pin path -> the loaded units whose BPFProgram= names it. For gc: systemd re-opens these
    paths at daemon-reload and daemon-reexec, and DETACHES a program whose pin is gone (measured
    on 252: the scope is then left with no device program at all), so a referenced pin must
    stay while its unit exists."""
    out: dict[str, list[str]] = {}
    with _manager(manager) as m:
        (units,) = m.call("ListUnits", "", ())
        for name, *_rest in units:
            iface = next((i for s, i in _CGROUP_UNIT_IFACES.items() if name.endswith(s)), None)
            if iface is None:
                continue
            path = str(_rest[5])  # the unit's object path
            try:
                programs = m.get(path, f"org.freedesktop.systemd1.{iface}", "BPFProgram", name)
            except SystemdError:
                continue  # gone meanwhile
            for _kind, pin in programs:
                out.setdefault(str(pin), []).append(str(name))
    return out


def set_properties(
    scope: Scope | str, properties: Sequence[Property], *, manager: Manager | None = None
) -> None:
    """SetUnitProperties(runtime=True) as runc's Set: the running unit changes, no drop-in is
    written. SystemdError naming the unit and the property systemd refused."""
    if not properties:
        return
    unit = scope if isinstance(scope, str) else scope.unit
    with _manager(manager) as m:
        m.set_unit_properties(unit, properties, runtime=True)


def write_files(scope: Scope, writes: Sequence[Write]) -> list[tuple[str, str]]:
    """Write the settings systemd cannot carry (properties.Plan.files) inside the delegated
    scope, enabling what controllers they need in the ancestors systemd does not (hugetlb,
    rdma, misc), as runc's CreateCgroupPath; returns (file, value) written. CgroupError names
    the setting; a file the kernel lacks is an error too."""
    root = discover().root
    parts = scope.path.relative_to(root).parts
    ancestors = [root.joinpath(*parts[:i]) for i in range(len(parts))]  # root .. the slice
    for c in needed_controllers(list(writes)):
        for d in ancestors:
            if c not in read_text(d / "cgroup.subtree_control").split():
                write_file(d / "cgroup.subtree_control", f"+{c}", f"controllers (+{c} in {d})")
    written = []
    for w in writes:
        chosen = next(((f, v) for f, v in w.files() if (scope.path / f).exists()), None)
        if chosen is None:
            names_ = " or ".join(f for f, _ in w.files())
            raise CgroupError(errno.ENOENT, f"{w.setting}: {names_} missing in {scope.path}")
        write_file(scope.path / chosen[0], chosen[1], w.setting)
        written.append(chosen)
    return written


def update_scope(
    scope: Scope, plan: Plan, *, manager: Manager | None = None
) -> list[tuple[str, str]]:
    """Apply a properties.plan to a running scope: SetUnitProperties, then the file writes.
    A cpu.max.burst larger than a new quota would make systemd's cpu.max write fail (the
    kernel refuses burst > quota, and systemd only logs it), so the burst is zeroed first."""
    quota = any(p.name == "CPUQuotaPerSecUSec" for p in plan.properties)
    if quota and any(w.filename == "cpu.max.burst" for w in plan.files):
        write_file(scope.path / "cpu.max.burst", "0", "cpu_burst")
    set_properties(scope, plan.properties, manager=manager)
    return write_files(scope, plan.files)


def stop_scope(
    scope: Scope | str,
    *,
    manager: Manager | None = None,
    deadline: float = DEADLINE,
    kill: bool = True,
) -> None:
    """StopUnit and wait, then ResetFailedUnit; the cgroup (with any sub-cgroups the delegate
    made) is gone after. kill: SIGKILL everything first (cgroup.kill), as teardown_cgroup does,
    so the stop does not wait out systemd's SIGTERM timeout. Idempotent: a unit systemd no
    longer has is fine."""
    unit = scope if isinstance(scope, str) else scope.unit
    path = None if isinstance(scope, str) else scope.path
    if kill and path is not None and (path / "cgroup.kill").exists():
        try:
            write_file(path / "cgroup.kill", "1", "teardown")
        except CgroupError as e:
            if e.errno != errno.ENOENT:
                raise
    with _manager(manager) as m:
        _stop(m, unit, deadline, None)
    if path is not None:
        _remove_tree(path)


def _stop(m: Manager, unit: str, deadline: float, during: BaseException | None) -> None:
    try:
        try:
            result = m.stop_unit(unit, deadline)
        except SystemdError as e:  # gone already: emptied by the kill and collected
            if e.name != NO_SUCH_UNIT:
                raise
            result = "done"
        if result not in ("done", "canceled"):  # canceled: gone on its own meanwhile
            raise SystemdError(unit, "StopUnit", "job result", result)
        _reset(m, unit)
    except SystemdError as e:
        if during is None:
            raise
        during.add_note(f"rollback: {e}")


def _reset(m: Manager, unit: str) -> None:
    try:
        m.reset_failed_unit(unit)
    except SystemdError as e:
        if e.name != NO_SUCH_UNIT:
            raise


def _remove_tree(path: Path) -> None:
    """systemd removes the scope's cgroup; sub-cgroups a delegate made may stay (systemd 239
    did not remove them, runc's Destroy removes them too)."""
    if not path.exists():
        return
    for d in [*subtree_dirs(path)]:
        try:
            os.rmdir(d)
        except FileNotFoundError:
            pass
        except OSError as e:
            raise CgroupError(e.errno, f"teardown: rmdir {d} failed: {e.strerror}") from e
