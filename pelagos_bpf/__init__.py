"""pelagos_bpf: put a process under a full-featured cgroup v2 (controller files + cgroup BPF).

`import pelagos_bpf` stays cheap: it never imports bcc (only the package build and `pelagos-bpf
compile` do) or pyroute2 (only the tc helpers' callers do); tests/test_hot_path.py enforces it.
The API below loads on first use (PEP 562): importing any submodule imports this package first,
and the OCI hook's in-process fallback must not pay for the whole library (most of a fresh
process's import time) on the paths that need none of it (a container that asks nothing, a
poststop after the runtime removed the cgroup); tests/test_oci_hook_parse.py enforces it.
"""

from __future__ import annotations

import importlib
import logging
from typing import TYPE_CHECKING, Any

from . import errors, lazy
from .errors import (
    BpfError,
    CgroupError,
    ConfigError,
    PelagosError,
    UnsupportedSetting,
    UnsupportedSettings,
)

if TYPE_CHECKING:
    from .cgref import CgroupRef
    from .cgroup import Cgroup, SetupReport, setup_cgroup, teardown_cgroup, update_cgroup
    from .config import CgroupConfig
    from .devices.rules import DEFAULT_DEVICE_RULES, CgroupDeviceRule
    from .stats import ResourceStats, read_stats

# name -> the submodule defining it, imported on first access
_LAZY = {
    "CgroupRef": "cgref",
    "Cgroup": "cgroup",
    "SetupReport": "cgroup",
    "setup_cgroup": "cgroup",
    "teardown_cgroup": "cgroup",
    "update_cgroup": "cgroup",
    "CgroupConfig": "config",
    "CgroupDeviceRule": "devices.rules",
    "DEFAULT_DEVICE_RULES": "devices.rules",
    "ResourceStats": "stats",
    "read_stats": "stats",
}
# Submodules docs/LIBRARY.md names as `pelagos_bpf.<module>.<function>`: usable after a bare
# `import pelagos_bpf` (before, only those __init__ happened to import were).
_SUBMODULES = frozenset({"cgroup", "config", "devices", "events", "freezer", "gc", "net", "stats"})

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
    if name == "__version__":  # lazy: importlib.metadata is a costly import for a fresh process
        return _version()
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)  # (import binds the attribute)
    return lazy.load(__name__, globals(), _LAZY, name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY, *_SUBMODULES, "__version__"})
