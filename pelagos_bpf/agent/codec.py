"""JSON forms of what crosses the agent's socket: `CgroupConfig` and the library's errors.

Why its own module: the client encodes and the server decodes with the same table, so a field
added to CgroupConfig is one line here, and an error raised in the agent reaches the client as
the same exception type with the same message (a runtime's error handling does not change when
it moves its calls from the library to `pelagos_bpf.agent.Client`).
"""

from __future__ import annotations

import dataclasses
from errno import EIO
from typing import Any

from ..config import CgroupConfig
from ..devices.rules import CgroupDeviceRule
from ..errors import (
    BpfError,
    CgroupError,
    ConfigError,
    PelagosError,
    UnsupportedSetting,
    UnsupportedSettings,
)
from .protocol import error_doc

_FIELDS = {f.name: f for f in dataclasses.fields(CgroupConfig)}
_PAIR_LISTS = {
    "blkio_throttle_read_bps",
    "blkio_throttle_write_bps",
    "blkio_throttle_read_iops",
    "blkio_throttle_write_iops",
    "net_priorities",
    "blkio_weight_device",
    "hugepage_limits",
    "ignored",
}
"""Fields that are lists of tuples in Python and lists of lists in JSON."""


def config_to_json(cfg: CgroupConfig) -> dict[str, Any]:
    """The fields that differ from the defaults; device rules in the rule grammar."""
    default = CgroupConfig()
    out: dict[str, Any] = {}
    for name in _FIELDS:
        value = getattr(cfg, name)
        if value == getattr(default, name):
            continue
        if name == "device_rules":
            value = [str(r) for r in value]
        out[name] = value
    return out


def config_from_json(doc: Any) -> CgroupConfig:
    """The CgroupConfig a JSON object names; ConfigError names a bad key before anything is
    done (the values themselves are checked by the library's validate_config)."""
    if not isinstance(doc, dict):
        raise ConfigError("config", doc, "want a JSON object of CgroupConfig fields")
    kw: dict[str, Any] = {}
    for name, value in doc.items():
        if name not in _FIELDS:
            raise ConfigError(f"config.{name}", value, "not a CgroupConfig field")
        kw[name] = _field(name, value)
    return CgroupConfig(**kw)


def _field(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name == "device_rules":
        if not isinstance(value, list) or not all(isinstance(r, str) for r in value):
            raise ConfigError(name, value, "want a list of rules 'allow|deny KIND MAJ:MIN ACCESS'")
        rules = []
        for i, text in enumerate(value):
            try:
                rules.append(CgroupDeviceRule.parse(text))
            except ConfigError as e:
                raise ConfigError(f"{name}[{i}]", text, e.reason) from None
        return rules
    if name == "cpu_quota" and isinstance(value, list):
        return tuple(value)
    if name in _PAIR_LISTS:
        if not isinstance(value, list) or not all(isinstance(v, list) for v in value):
            raise ConfigError(name, value, "want a list of lists")
        return [tuple(v) for v in value]
    if name == "rdma_limits":
        if not isinstance(value, dict) or not all(isinstance(v, list) for v in value.values()):
            raise ConfigError(name, value, "want an object of [handles, objects] pairs")
        return {k: tuple(v) for k, v in value.items()}
    return value


# ---------------------------------------------------------------- errors


class AgentError(PelagosError):
    """The agent refused or could not serve a request (not running, overloaded, shutting down,
    a protocol error, or a failure that is not one of the library's own errors)."""

    def __init__(self, message: str, errno: int | None = None) -> None:
        super().__init__(message)
        self.errno = EIO if errno is None else errno  # errors.py: every error carries one


_TYPES: dict[str, type[PelagosError]] = {
    t.__name__: t
    for t in (
        ConfigError,
        UnsupportedSetting,
        UnsupportedSettings,
        CgroupError,
        BpfError,
        PelagosError,
        AgentError,
    )
}


def error_to_doc(e: BaseException) -> dict[str, Any]:
    """The reply's error object: the library's type name, errno, setting, path and message."""
    name = type(e).__name__ if type(e).__name__ in _TYPES else "AgentError"
    if isinstance(e, OSError) and not isinstance(e, PelagosError):
        name = "CgroupError"  # a plain OSError from the library: a cgroupfs or /proc failure
    errno = getattr(e, "errno", None)
    message = str(e) + "".join(f" ({n})" for n in getattr(e, "__notes__", ()))
    return error_doc(
        name,
        message,
        errno=errno if isinstance(errno, int) else None,
        setting=getattr(e, "setting", None),
        path=_path_of(e),
    )


def _path_of(e: BaseException) -> str | None:
    path = getattr(e, "path", None) or getattr(e, "filename", None)
    return str(path) if path is not None else None


def error_from_doc(doc: dict[str, Any]) -> PelagosError:
    """The exception an error object stands for, of the library's own type, whose str() is the
    agent's message, with its errno and setting (an OSError's filename is left unset: it would
    change str())."""
    cls = _TYPES.get(str(doc.get("type")), AgentError)
    message = str(doc.get("message", "agent error"))
    e = cls.__new__(cls)
    e.args = (message,)
    setting = str(doc.get("setting"))
    if isinstance(e, ConfigError):
        e.setting, e.reason, e.value = setting, message, None
    elif isinstance(e, UnsupportedSetting):
        e.setting, e.reason = setting, message
    if isinstance(e, UnsupportedSettings):
        e.problems = [(setting, message)]
    # Every library error carries errno, setting and path (errors.py): so do these.
    errno = doc.get("errno")
    # (an OSError's errno is a slot; ConfigError and UnsupportedSetting set an attribute)
    setattr(e, "errno", errno if isinstance(errno, int) else EIO)  # noqa: B010
    if not isinstance(e, ConfigError | UnsupportedSetting):
        e.setting = doc.get("setting")
    e.path = doc.get("path")
    if isinstance(e, BpfError):
        e.log = ""
    return e
