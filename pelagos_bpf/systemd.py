"""cgroupsPath in the systemd driver's form, `slice:prefix:name` (runc --systemd-cgroup).

Why here: without this, `system.slice:docker:abc` would be taken as a literal directory name
under the cgroup root, i.e. a cgroup systemd does not know about, outside the slice the caller
meant. The path systemd would use is computed the way runc does (ExpandSlice + unit name);
creating it is systemd's job (a transient scope started over D-Bus with Delegate=yes and the
pid), so without a reachable systemd the colon form is a ConfigError, never a directory.

Pure parsing plus one probe of the filesystem; no D-Bus library is imported here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError

SYSTEMD_RUN_DIR = Path("/run/systemd/system")  # sd_booted(): exists iff systemd is PID 1
BUS_SOCKETS = (Path("/run/systemd/private"), Path("/run/dbus/system_bus_socket"))


@dataclass(frozen=True)
class SystemdPath:
    """A parsed `slice:prefix:name`: the unit systemd would create and its cgroup path."""

    slice: str
    unit: str

    @property
    def cgroup_path(self) -> str:
        """Path below the cgroup2 root, e.g. "system.slice/docker-abc.scope"."""
        return f"{expand_slice(self.slice).lstrip('/')}/{self.unit}"


def is_systemd_form(path: str) -> bool:
    """True for `slice:prefix:name` (exactly two colons, no '/'), the systemd driver's form."""
    return isinstance(path, str) and path.count(":") == 2 and "/" not in path


def expand_slice(slice_: str) -> str:
    """ "a-b-c.slice" -> "/a.slice/a-b.slice/a-b-c.slice" (systemd's slice nesting, as runc)."""
    if not slice_.endswith(".slice") or "/" in slice_:
        raise ConfigError("path", slice_, "a systemd slice name ends in .slice and has no '/'")
    stem = slice_[: -len(".slice")]
    if stem == "-":
        return "/"
    if not stem or stem.startswith("-") or stem.endswith("-") or "--" in stem:
        raise ConfigError("path", slice_, "not a valid systemd slice name")
    out, acc = [], ""
    for part in stem.split("-"):
        acc = f"{acc}-{part}" if acc else part
        out.append(f"{acc}.slice")
    return "/" + "/".join(out)


def parse(path: str) -> SystemdPath:
    """Parse `slice:prefix:name`; an empty slice means system.slice (runc's default)."""
    if not is_systemd_form(path):
        raise ConfigError("path", path, "not in the systemd form slice:prefix:name")
    slice_, prefix, name = path.split(":")
    if not name:
        raise ConfigError("path", path, "the name part of slice:prefix:name is empty")
    slice_ = slice_ or "system.slice"
    expand_slice(slice_)  # validates
    unit = (
        name if name.endswith(".slice") else f"{prefix}-{name}.scope" if prefix else f"{name}.scope"
    )
    return SystemdPath(slice_, unit)


def systemd_reachable() -> str | None:
    """None when systemd runs as PID 1 with a bus socket; else why not (for the error)."""
    if not SYSTEMD_RUN_DIR.is_dir():
        return f"systemd is not PID 1 here ({SYSTEMD_RUN_DIR} is missing)"
    if not any(os.path.exists(s) for s in BUS_SOCKETS):
        return "no D-Bus socket to reach systemd (" + ", ".join(map(str, BUS_SOCKETS)) + ")"
    return None


def resolve(path: str) -> SystemdPath:
    """The parsed systemd path, or a ConfigError saying why it cannot be honoured here.

    Until the transient-scope creation lands (StartTransientUnit over D-Bus, Delegate=yes, the
    pid; see docs/OCI_HOOK.md), a reachable systemd also gets an error rather than a cgroup made
    behind its back.
    """
    parsed = parse(path)
    why = systemd_reachable() or "creating systemd scopes is not implemented yet"
    raise ConfigError(
        "path",
        path,
        f"systemd cgroup driver form (would be {parsed.cgroup_path}); {why}: "
        "give a cgroupfs path such as 'mygroup/ctr1'",
    )
