"""Exception types: every failure names the setting it is about, so a runtime can report it."""

from __future__ import annotations

import errno


class PelagosError(Exception):
    """Base class for every error this library raises on purpose."""


class ConfigError(PelagosError, ValueError):
    """A setting's value is invalid; raised before anything is written."""

    def __init__(self, setting: str, value: object, reason: str) -> None:
        self.setting = setting
        self.value = value
        self.reason = reason
        super().__init__(f"{setting}={value!r}: {reason}")


class UnsupportedSetting(PelagosError):
    """A valid setting that cannot be applied on this host (strict mode); raised before creation."""

    def __init__(self, setting: str, reason: str) -> None:
        self.setting = setting
        self.reason = reason
        super().__init__(f"{setting}: {reason}")


class UnsupportedSettings(UnsupportedSetting):
    """Several settings cannot be applied; carries them all so the caller sees the full list."""

    def __init__(self, problems: list[tuple[str, str]]) -> None:
        self.problems = problems
        first_setting, first_reason = problems[0]
        super().__init__(first_setting, first_reason)
        self.args = ("; ".join(f"{s}: {r}" for s, r in problems),)


class CgroupError(PelagosError, OSError):
    """A cgroupfs operation failed; carries the path and the errno."""


class BpfError(PelagosError, OSError):
    """A bpf(2) operation failed; carries the errno and, for loads, the verifier log."""

    def __init__(self, errno_: int, op: str, detail: str = "", log: str = "") -> None:
        self.log = log
        msg = f"{op} failed: {detail}" if detail else f"{op} failed"
        if log:
            msg += "\n" + log[-4000:]
        super().__init__(errno_, msg)


class OwnerConflict(PelagosError, PermissionError):
    """A role asked to change a setting another role owns on the cgroup (pelagos_bpf.owners).

    Never resolved by overwriting: the holder's settings stay, the request is refused."""

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
