"""OCI `unified`: raw cgroup v2 files ("controller.key" -> value), written after typed settings.

Why last: runc writes `unified` after the typed settings so a raw value overrides a converted
one (e.g. "cpu.weight" beats cpu_shares). Why validated: a key is a file name inside the new
cgroup, so "/" or ".." would write elsewhere, and "cgroup.*" files (procs, kill,
subtree_control) belong to the library's own life cycle, not to a resource config.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ..config import CgroupConfig
from ..errors import ConfigError
from .base import Unsupported, Write

# cgroup v2 controllers a key may name (Documentation/admin-guide/cgroup-v2.rst).
CONTROLLERS = ("cpu", "cpuset", "io", "memory", "pids", "hugetlb", "rdma", "misc")
_KEY = re.compile(r"^([a-z]+)\.[A-Za-z0-9_.]+$")


def validate_unified(unified: Any) -> None:
    """Keys "controller.file" of a known controller, no "/" or ".."; string values, no NUL."""
    if not isinstance(unified, Mapping):
        raise ConfigError("unified", unified, 'must be a dict like {"memory.high": "1G"}')
    for key, value in unified.items():
        setting = f"unified[{key!r}]"
        m = _KEY.match(key) if isinstance(key, str) else None
        if m is None or ".." in key:
            raise ConfigError(setting, key, 'key must be "controller.file" (no "/" or "..")')
        if m.group(1) not in CONTROLLERS:
            raise ConfigError(
                setting,
                key,
                f"{m.group(1)!r} is not a cgroup v2 controller ({', '.join(CONTROLLERS)})",
            )
        if not isinstance(value, str) or "\0" in value:
            raise ConfigError(setting, value, "value must be a string without NUL")


def plan(cfg: CgroupConfig) -> list[Write]:
    """One write per non-empty line: cgroupfs parses one value (one io.max device) per write."""
    out: list[Write] = []
    for key, value in cfg.unified.items():
        lines = [ln for ln in value.split("\n") if ln.strip()] or [value]
        controller = key.split(".", 1)[0]
        out.extend(Write(f"unified[{key!r}]", controller, key, ln) for ln in lines)
    return out


def unsupported(cfg: CgroupConfig) -> list[Unsupported]:
    return []
