"""pelagos_bpf: put a process under a full-featured cgroup v2 (controller files + cgroup BPF).

`import pelagos_bpf` stays cheap: it never imports bcc (only `pelagos-bpf compile` and a cache
miss do) or pyroute2 (only the tc helpers' callers do); tests/test_hot_path.py enforces it.
"""

from __future__ import annotations

import logging
from typing import Any

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

# The library logs (logging.getLogger("pelagos_bpf.*")) but prints nothing unless the
# application configures logging (the CLI does with -v).
logging.getLogger(__name__).addHandler(logging.NullHandler())

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
    "__version__",
    "errors",
    "read_stats",
    "setup_cgroup",
    "teardown_cgroup",
    "update_cgroup",
]


def _version() -> str:
    """The installed distribution's version; from pyproject.toml when run from a source tree."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pelagos-bpf")
    except PackageNotFoundError:
        import tomllib
        from pathlib import Path

        try:
            with open(Path(__file__).resolve().parent.parent / "pyproject.toml", "rb") as f:
                return str(tomllib.load(f)["project"]["version"]) + "+source"
        except (OSError, KeyError, tomllib.TOMLDecodeError):
            return "0+unknown"


def __getattr__(name: str) -> Any:
    if name == "__version__":  # lazy: importlib.metadata costs a few ms at import
        return _version()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
