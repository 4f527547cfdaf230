"""Exception types: every failure names what it is about, so a runtime can act on it.

Every `PelagosError` carries `.setting` and `.path` (None where they do not apply), and the
classes below (and `locks.LockTimeout`) an `.errno` too, so a caller never parses a message:
- `.setting`: what the failure is about. A `CgroupConfig` field ("device_rules", "path",
  "pids_limit", "net_classid") when the container's own configuration is involved; a node
  setting, named by its environment variable ("PELAGOS_BPF_BYTECODE", "PELAGOS_BPF_PIN_DIR",
  "PELAGOS_BPF_RULES_MAX"), when the node's is; the operation otherwise ("teardown", "freeze",
  "root"); None when the raiser could not know (a bare bpf(2) call).
- `.path`: the cgroup directory, file, pin or bytecode file involved, or None.
- `.errno`: an errno value, never None; compare with the names (`errno.ENOENT`, `errno.E2BIG`):
  the kernel's for the OSErrors (EIO where the cause had none), EINVAL for a ConfigError,
  EOPNOTSUPP for an UnsupportedSetting.

`str(e)` stays the sentence for people, worded as before these attributes existed.
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Iterator

PathArg = str | os.PathLike[str] | None


def _path(path: PathArg) -> str | None:
    return None if path is None else os.fspath(path)


class PelagosError(Exception):
    """Base class for every error this library raises on purpose."""

    setting: str | None = None
    path: str | None = None


class ConfigError(PelagosError, ValueError):
    """A setting's value is invalid; raised before anything is written."""

    setting: str

    def __init__(self, setting: str, value: object, reason: str) -> None:
        self.setting = setting
        self.value = value
        self.reason = reason
        self.errno = errno.EINVAL
        super().__init__(f"{setting}={value!r}: {reason}")


class UnsupportedSetting(PelagosError):
    """A valid setting that cannot be applied on this host (strict mode); raised before creation."""

    setting: str

    def __init__(self, setting: str, reason: str) -> None:
        self.setting = setting
        self.reason = reason
        self.errno = errno.EOPNOTSUPP
        super().__init__(f"{setting}: {reason}")


class UnsupportedSettings(UnsupportedSetting):
    """Several settings cannot be applied; carries them all so the caller sees the full list
    (`.setting` is the first of them)."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        first_setting, first_reason = problems[0]
        super().__init__(first_setting, first_reason)
        self.args = ("; ".join(f"{s}: {r}" for s, r in problems),)


class CgroupError(PelagosError, OSError):
    """A cgroupfs operation failed: `.errno`, `.setting` and `.path` (the cgroup dir or file)."""

    def __init__(
        self, errno_: int | None, message: str, *, setting: str | None = None, path: PathArg = None
    ) -> None:
        super().__init__(errno.EIO if errno_ is None else errno_, message)
        self.setting = setting
        self.path = _path(path)


class BpfError(PelagosError, OSError):
    """A bpf(2) operation, or what feeds it (bytecode, pins, map space), failed: `.errno`,
    `.op` (the call or step), `.setting`, `.path` and, for loads, the verifier `.log`."""

    def __init__(
        self,
        errno_: int | None,
        op: str,
        detail: str = "",
        log: str = "",
        *,
        setting: str | None = None,
        path: PathArg = None,
    ) -> None:
        self.op = op
        self.log = log
        msg = f"{op} failed: {detail}" if detail else f"{op} failed"
        if log:
            msg += "\n" + log[-4000:]
        super().__init__(errno.EIO if errno_ is None else errno_, msg)
        self.setting = setting
        self.path = _path(path)


@contextlib.contextmanager
def about(setting: str | None = None, path: PathArg = None) -> Iterator[None]:
    """Fill in `.setting` / `.path` of a CgroupError or BpfError raised inside, where the
    raiser (a trust check, a bare bpf(2) call) could not know them; never overwrites.
    Off the per-container path only (a generator frame per use)."""
    try:
        yield
    except (CgroupError, BpfError) as e:
        if e.setting is None:
            e.setting = setting
        if e.path is None:
            e.path = _path(path)
        raise


class OwnerConflict(PelagosError, PermissionError):
    """A role asked to change a setting another role owns on the cgroup (pelagos_bpf.owners).

    Never resolved by overwriting: the holder's settings stay, the request is refused."""

    setting: str
    path: str

    def __init__(self, setting: str, path: str, holder: str, requester: str) -> None:
        self.setting = setting
        self.path = path
        self.holder = holder
        self.requester = requester
        super().__init__(
            errno.EACCES,
            f"{setting}: cgroup {path}: its net settings belong to the {holder}; the "
            f"{requester} may not change them (one owner per cgroup)",
        )
