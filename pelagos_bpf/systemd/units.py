"""Units read back: which unit holds a cgroup and what it holds (inspect), our failed scopes (gc).

"Ours" for gc: a scope whose Description starts with driver.MARK, which every scope the driver
starts carries and nothing else sets. A transient unit has no other place for such a mark
(no custom properties over D-Bus), and the unit name's prefix is the caller's choice (runc's
`slice:prefix:name`), so the name proves nothing. gc resets only failed units with the mark,
never another's.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import bpfsys
from ..errors import BpfError
from .dbus import NO_SUCH_UNIT, Manager, SystemdError
from .driver import BPF_ATTACH_TYPES, MARK, _manager
from .properties import INFINITY

# Unit type suffix -> its D-Bus interface (the one with the resource-control properties).
UNIT_IFACES = {
    ".scope": "org.freedesktop.systemd1.Scope",
    ".service": "org.freedesktop.systemd1.Service",
    ".slice": "org.freedesktop.systemd1.Slice",
}

# Properties that govern cgroup files, with the file each one writes (properties.plan's map).
HELD: tuple[tuple[str, str], ...] = (
    ("MemoryMin", "memory.min"),
    ("MemoryLow", "memory.low"),
    ("MemoryHigh", "memory.high"),
    ("MemoryMax", "memory.max"),
    ("MemorySwapMax", "memory.swap.max"),
    ("OOMPolicy", "memory.oom.group"),
    ("CPUWeight", "cpu.weight"),
    ("CPUQuotaPerSecUSec", "cpu.max"),
    ("CPUQuotaPeriodUSec", "cpu.max"),
    ("AllowedCPUs", "cpuset.cpus"),
    ("AllowedMemoryNodes", "cpuset.mems"),
    ("TasksMax", "pids.max"),
    ("IOWeight", "io.weight"),
    ("IODeviceWeight", "io.weight"),
    ("IOReadBandwidthMax", "io.max"),
    ("IOWriteBandwidthMax", "io.max"),
    ("IOReadIOPSMax", "io.max"),
    ("IOWriteIOPSMax", "io.max"),
)


def failed_scopes_of_ours(m: Manager) -> list[str]:
    """Failed scopes whose Description carries our mark."""
    (units,) = m.call("ListUnitsFiltered", "as", (["failed"],))
    return sorted(
        str(name)
        for name, description, *_ in units
        if str(name).endswith(".scope") and str(description).startswith(MARK + " ")
    )


def reset_failed_ours(*, manager: Manager | None = None) -> list[str]:
    """ResetFailedUnit on each of our failed scopes (systemd then unloads them and their
    cgroups are gone); returns the units reset."""
    done = []
    with _manager(manager) as m:
        for unit in failed_scopes_of_ours(m):
            try:
                m.reset_failed_unit(unit)
            except SystemdError as e:
                if e.name != NO_SUCH_UNIT:  # gone meanwhile: nothing to reset
                    raise
                continue
            done.append(unit)
    return done


@dataclass(frozen=True)
class HeldProgram:
    """A BPFProgram= entry: its pin, whether the pin is still there and whether the program is
    attached (None: not known, e.g. without root)."""

    kind: str
    pin: str
    pin_present: bool | None
    attached: bool | None


@dataclass(frozen=True)
class UnitInfo:
    """The unit that owns a cgroup and the settings it holds (`properties`: name -> value shown,
    with the cgroup file it governs in `files`)."""

    unit: str
    cgroup: str  # the unit's ControlGroup
    inside: bool  # the cgroup asked about is below the unit's (a delegated sub-cgroup)
    active: str
    delegate: bool
    slice: str
    description: str
    programs: tuple[HeldProgram, ...] = ()
    properties: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)


def unit_of_cgroup(path: Path, root: Path) -> tuple[str, str] | None:
    """(unit name, its cgroup below root) for the nearest ancestor-or-self of `path` named like
    a cgroup unit (".scope", ".service", ".slice"); None if there is none."""
    rel = path.relative_to(root)
    parts = rel.parts
    for i in range(len(parts), 0, -1):
        name = parts[i - 1]
        if any(name.endswith(s) for s in UNIT_IFACES):
            return name, "/" + "/".join(parts[:i])
    return None


def show_value(value: Any) -> str:
    """A property value as `systemctl show` would say it, roughly: infinity, CPU lists, pairs."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return "infinity" if value == INFINITY else str(value)
    if isinstance(value, bytes):
        return mask_to_list(value)
    if isinstance(value, list):
        return ", ".join(" ".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in value)
    return str(value)


def mask_to_list(mask: bytes) -> str:
    """AllowedCPUs' byte mask (byte i bit j = CPU 8i+j) -> "0-2,5"."""
    bits = [i * 8 + j for i, b in enumerate(mask) for j in range(8) if b >> j & 1]
    runs: list[list[int]] = []
    for b in bits:
        if runs and runs[-1][1] == b - 1:
            runs[-1][1] = b
        else:
            runs.append([b, b])
    return ",".join(str(lo) if lo == hi else f"{lo}-{hi}" for lo, hi in runs)


def _held_program(kind: str, pin: str, cgroup_dir: Path) -> HeldProgram:
    try:
        fd = bpfsys.obj_get(pin)
    except BpfError as e:
        return HeldProgram(kind, pin, False if e.errno == errno.ENOENT else None, None)
    try:
        prog_id = bpfsys.prog_info(fd).id
        cgfd = os.open(cgroup_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            attached = prog_id in bpfsys.prog_query(cgfd, BPF_ATTACH_TYPES[kind])
        finally:
            os.close(cgfd)
    except (OSError, KeyError):
        return HeldProgram(kind, pin, True, None)
    finally:
        os.close(fd)
    return HeldProgram(kind, pin, True, attached)


def unit_info(path: Path, root: Path, *, manager: Manager | None = None) -> UnitInfo | None:
    """What systemd says about the unit owning the cgroup `path` (below the cgroup2 `root`);
    None when no unit owns it (not a unit's cgroup, or systemd has no such unit loaded)."""
    found = unit_of_cgroup(path, root)
    if found is None:
        return None
    unit, cgroup = found
    iface = next(i for s, i in UNIT_IFACES.items() if unit.endswith(s))
    with _manager(manager) as m:
        obj = m.unit_path(unit)
        if obj is None:
            return None
        (props,) = m.call(
            "GetAll",
            "s",
            (iface,),
            unit=unit,
            path=obj,
            interface="org.freedesktop.DBus.Properties",
        )
        (unit_props,) = m.call(
            "GetAll",
            "s",
            ("org.freedesktop.systemd1.Unit",),
            unit=unit,
            path=obj,
            interface="org.freedesktop.DBus.Properties",
        )
    values = {k: v[1] for k, v in props.items()}
    uvals = {k: v[1] for k, v in unit_props.items()}
    if str(values.get("ControlGroup", "")) != cgroup:
        return None  # a unit of that name with another cgroup: not this one's owner
    shown = {}
    files = {}
    for name, file in HELD:
        if name not in values:
            continue
        value = values[name]
        if value in ([], b"") or (name in ("CPUWeight", "IOWeight") and value == INFINITY):
            continue  # unset: systemd leaves the file at the kernel's default
        shown[name] = show_value(value)
        files[name] = file
    programs = tuple(
        _held_program(str(k), str(p), root / cgroup.lstrip("/"))
        for k, p in values.get("BPFProgram", [])
    )
    return UnitInfo(
        unit=unit,
        cgroup=cgroup,
        inside=path != root / cgroup.lstrip("/"),
        active=f"{uvals.get('ActiveState', '?')} ({uvals.get('SubState', '?')})",
        delegate=bool(values.get("Delegate", False)),
        slice=str(values.get("Slice", "")),
        description=str(uvals.get("Description", "")),
        programs=programs,
        properties=shown,
        files=files,
    )
