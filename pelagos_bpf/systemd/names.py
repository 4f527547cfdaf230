"""`slice:prefix:name` (runc --systemd-cgroup) to a unit name and cgroup path; systemd's rules.

Why checked here and not left to systemd: a bad name must fail before any D-Bus call, with an
error naming `path` (the caller's setting), not a bus error. The rules are systemd's own
(src/basic/unit-name.c: unit_name_is_valid, slice_name_is_valid), so a name that passes is one
systemd accepts. Pure: no I/O.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ..errors import ConfigError

UNIT_NAME_MAX = 255  # systemd's UNIT_NAME_MAX is 256 with the NUL
# VALID_CHARS of unit-name.c; '@' only in template instances, which a scope never is.
_UNIT_CHARS = re.compile(r"[A-Za-z0-9:_.\\-]+")


@dataclass(frozen=True)
class SystemdPath:
    """A parsed `slice:prefix:name`: the unit systemd would create and its cgroup path."""

    slice: str
    unit: str

    @property
    def cgroup_path(self) -> str:
        """Path below the cgroup2 root, e.g. "system.slice/docker-abc.scope"."""
        return f"{expand_slice(self.slice).lstrip('/')}/{self.unit}"

    @property
    def is_scope(self) -> bool:
        return self.unit.endswith(".scope")


def is_systemd_form(path: str) -> bool:
    """True for `slice:prefix:name` (exactly two colons, no '/'), the systemd driver's form."""
    return isinstance(path, str) and path.count(":") == 2 and "/" not in path


def check_unit_name(unit: str, suffix: str, setting: str = "path") -> str:
    """`unit` if systemd would accept it as a unit of type `suffix` (".scope", ".slice")."""
    stem = unit[: -len(suffix)] if unit.endswith(suffix) else ""
    if not stem:
        raise ConfigError(setting, unit, f"a systemd unit name here ends in {suffix}")
    if len(unit.encode()) > UNIT_NAME_MAX:
        raise ConfigError(setting, unit, f"longer than systemd's {UNIT_NAME_MAX} bytes")
    if not _UNIT_CHARS.fullmatch(unit):
        raise ConfigError(
            setting, unit, r"systemd unit names use only A-Z a-z 0-9 : _ . - \ (no '@')"
        )
    return unit


def expand_slice(slice_: str) -> str:
    """ "a-b-c.slice" -> "/a.slice/a-b.slice/a-b-c.slice" (systemd's slice nesting, as runc)."""
    if not slice_.endswith(".slice") or "/" in slice_:
        raise ConfigError("path", slice_, "a systemd slice name ends in .slice and has no '/'")
    stem = slice_[: -len(".slice")]
    if stem == "-":
        return "/"
    if not stem or stem.startswith("-") or stem.endswith("-") or "--" in stem:
        raise ConfigError("path", slice_, "not a valid systemd slice name")
    check_unit_name(slice_, ".slice")
    out, acc = [], ""
    for part in stem.split("-"):
        acc = f"{acc}-{part}" if acc else part
        out.append(f"{acc}.slice")
    return "/" + "/".join(out)


def parse(path: str) -> SystemdPath:
    """Parse `slice:prefix:name`; an empty slice means system.slice (runc's default).

    The unit is "<prefix>-<name>.scope" ("<name>.scope" without a prefix), or `name` itself
    when it ends in ".slice" (runc creates a slice then); both checked against systemd's rules.
    """
    if not is_systemd_form(path):
        raise ConfigError("path", path, "not in the systemd form slice:prefix:name")
    slice_, prefix, name = path.split(":")
    if not name:
        raise ConfigError("path", path, "the name part of slice:prefix:name is empty")
    slice_ = slice_ or "system.slice"
    expand_slice(slice_)  # validates
    if name.endswith(".slice"):
        return SystemdPath(slice_, check_unit_name(name, ".slice"))
    unit = f"{prefix}-{name}.scope" if prefix else f"{name}.scope"
    return SystemdPath(slice_, check_unit_name(unit, ".scope"))
