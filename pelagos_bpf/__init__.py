"""pelagos_bpf: put a process under a full-featured cgroup v2 (controller files + cgroup BPF).

`import pelagos_bpf` stays cheap: feature packages (devices, net) and anything that could pull
in bcc or pyroute2 load lazily, on first attribute access.
"""

from __future__ import annotations

from typing import Any

from . import errors
from .cgroup import Cgroup, SetupReport, setup_cgroup, teardown_cgroup, update_cgroup
from .config import CgroupConfig, CgroupDeviceRule
from .errors import (
    BpfError,
    CgroupError,
    ConfigError,
    PelagosError,
    UnsupportedSetting,
    UnsupportedSettings,
)
from .stats import ResourceStats, read_stats

__all__ = [
    "DEFAULT_DEVICE_RULES",
    "BpfError",
    "Cgroup",
    "CgroupConfig",
    "CgroupDeviceRule",
    "CgroupError",
    "ConfigError",
    "PelagosError",
    "ResourceStats",
    "SetupReport",
    "UnsupportedSetting",
    "UnsupportedSettings",
    "errors",
    "read_stats",
    "setup_cgroup",
    "teardown_cgroup",
    "update_cgroup",
]


def __getattr__(name: str) -> Any:
    if name == "DEFAULT_DEVICE_RULES":
        from .devices import DEFAULT_DEVICE_RULES

        return DEFAULT_DEVICE_RULES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
