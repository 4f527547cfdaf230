"""pelagos_bpf: put a process under a full-featured cgroup v2 (controller files + cgroup BPF).

`import pelagos_bpf` stays cheap: it never imports bcc (only `pelagos-bpf compile` and a cache
miss do) or pyroute2 (only the tc helpers' callers do); tests/test_hot_path.py enforces it.
"""

from __future__ import annotations

from . import errors
from .cgref import CgroupRef
from .cgroup import Cgroup, SetupReport, setup_cgroup, teardown_cgroup, update_cgroup
from .config import CgroupConfig, CgroupDeviceRule
from .devices import DEFAULT_DEVICE_RULES
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
    "CgroupRef",
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
