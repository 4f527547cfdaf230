"""The systemd cgroup driver: `slice:prefix:name` paths become transient scopes systemd owns.

Why: on most cgroup v2 hosts the tree belongs to systemd (runc --systemd-cgroup, podman, CRI-O
default to it). Without this, `system.slice:docker:abc` would be taken as a literal directory
name, a cgroup systemd does not know about, outside the slice the caller meant.

Modules: `names` (pure: the path form, systemd's unit and slice rules), `properties` (pure:
CgroupConfig -> unit properties as runc's genV2ResourcesProperties, and the file writes systemd
cannot carry), `dbus` (systemd's Manager over jeepney, optional dependency), `driver` (start,
update and stop a scope). Importing this package imports no D-Bus library.

`resolve` is what validate_config calls (pure: the form and systemd's name rules); setup_cgroup
takes a path in this form to the driver (`slice:prefix:name` never becomes a directory name).
`programs` picks the pinned programs systemd attaches through BPFProgram=; `units` reads a
unit back (inspect) and finds our failed scopes (gc).
"""

from __future__ import annotations

import os
from pathlib import Path

from .names import SystemdPath, expand_slice, is_systemd_form, parse

__all__ = [
    "BUS_SOCKETS",
    "SYSTEMD_RUN_DIR",
    "SystemdPath",
    "expand_slice",
    "is_systemd_form",
    "parse",
    "resolve",
    "systemd_reachable",
]

SYSTEMD_RUN_DIR = Path("/run/systemd/system")  # sd_booted(): exists iff systemd is PID 1
BUS_SOCKETS = (Path("/run/dbus/system_bus_socket"), Path("/run/systemd/private"))


def systemd_reachable() -> str | None:
    """None when systemd runs as PID 1 with a bus socket; else why not (for the error)."""
    if not SYSTEMD_RUN_DIR.is_dir():
        return f"systemd is not PID 1 here ({SYSTEMD_RUN_DIR} is missing)"
    if not any(os.path.exists(s) for s in BUS_SOCKETS):
        return "no D-Bus socket to reach systemd (" + ", ".join(map(str, BUS_SOCKETS)) + ")"
    return None


def resolve(path: str) -> SystemdPath:
    """The parsed systemd path; ConfigError naming `path` if systemd would not accept it.

    Pure: whether systemd is reachable is the driver's question, asked at setup (a
    `SystemdUnavailable` naming the driver), not at validation.
    """
    return parse(path)
