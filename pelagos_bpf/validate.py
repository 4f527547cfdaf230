"""Pure validation of every CgroupConfig field: bad input fails here, before anything is written.

Each error is a ConfigError naming the field (with an index for list items) and the value.
Device rules and net settings are checked by their feature packages when those exist.
"""

from __future__ import annotations

import re
from typing import Any

from . import convert
from .config import CgroupConfig
from .errors import ConfigError

U32_MAX = 0xFFFF_FFFF
MAJOR_MAX = 4095  # Linux dev_t: 12-bit major
MINOR_MAX = 1_048_575  # 20-bit minor
CPU_QUOTA_MIN = 1000  # kernel: quota >= 1 ms
CPU_PERIOD_MIN = 1000
CPU_PERIOD_MAX = 1_000_000
IFNAMSIZ = 16


def _int(setting: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(setting, value, "must be an integer")
    return value


def _size(setting: str, value: Any, *, allow_zero: bool = True) -> None:
    v = _int(setting, value)
    if v == -1:
        return
    if v < 0:
        raise ConfigError(setting, value, "must be -1 (unlimited) or a non-negative byte count")
    if v == 0 and not allow_zero:
        raise ConfigError(
            setting, value, "0 would leave no memory at all; use None (unset) or -1 (unlimited)"
        )


def _range(setting: str, value: Any, lo: int, hi: int) -> None:
    v = _int(setting, value)
    if not lo <= v <= hi:
        raise ConfigError(setting, value, f"must be in {lo}..{hi}")


_CPU_ITEM = re.compile(r"^(\d+)(?:-(\d+)(?::(\d+)/(\d+))?)?$")


def validate_cpuset(setting: str, value: Any) -> None:
    """Kernel list syntax: "0-3,5", "0-7:2/4" (ranges with used/group stride); no empty items."""
    if not isinstance(value, str):
        raise ConfigError(setting, value, "must be a string like '0-3,5'")
    text = value.strip()
    if not text:
        raise ConfigError(setting, value, "is empty; use None to inherit the parent's set")
    for item in text.split(","):
        m = _CPU_ITEM.match(item)
        if not m:
            raise ConfigError(setting, value, f"bad list item {item!r} (want N, N-M or N-M:U/G)")
        lo, hi, used, group = m.groups()
        if hi is not None and int(hi) < int(lo):
            raise ConfigError(setting, value, f"range {item!r} is descending")
        if group is not None and not 0 < int(used) <= int(group):
            raise ConfigError(setting, value, f"stride {item!r} needs 0 < used <= group")


def _throttles(setting: str, items: Any) -> None:
    if not isinstance(items, list | tuple):
        raise ConfigError(setting, items, "must be a list of (major, minor, rate)")
    seen: set[tuple[int, int]] = set()
    for i, t in enumerate(items):
        name = f"{setting}[{i}]"
        if not isinstance(t, list | tuple) or len(t) != 3:
            raise ConfigError(name, t, "must be a (major, minor, rate) triple")
        major, minor, rate = t
        _range(f"{name}.major", major, 0, MAJOR_MAX)
        _range(f"{name}.minor", minor, 0, MINOR_MAX)
        if _int(f"{name}.rate", rate) < 1:
            raise ConfigError(f"{name}.rate", rate, "must be >= 1")
        if (major, minor) in seen:
            raise ConfigError(name, t, f"device {major}:{minor} is listed twice")
        seen.add((major, minor))


def validate_path(value: Any) -> str:
    """Return the path relative to the cgroup root; reject '..', '.', empty components, NUL."""
    if not isinstance(value, str):
        raise ConfigError("path", value, "must be a string")
    rel = value.lstrip("/")
    if not rel:
        raise ConfigError("path", value, "names the cgroup root itself")
    if "\0" in rel or "\n" in rel:
        raise ConfigError("path", value, "contains a NUL or newline")
    for part in rel.split("/"):
        if part in ("", ".", ".."):
            raise ConfigError("path", value, f"has a {part or 'empty'!r} component")
    return rel


def validate_ifname(setting: str, name: Any) -> None:
    """Linux dev_valid_name: 1..15 bytes, not '.'/'..', no '/', ':' or whitespace."""
    if not isinstance(name, str):
        raise ConfigError(setting, name, "interface name must be a string")
    if not name or len(name.encode()) >= IFNAMSIZ:
        raise ConfigError(setting, name, f"interface name must be 1..{IFNAMSIZ - 1} bytes")
    if name in (".", "..") or any(c in name for c in "/:") or any(c.isspace() for c in name):
        raise ConfigError(setting, name, "not a valid interface name")


def validate_config(cfg: CgroupConfig) -> None:
    """Raise ConfigError for the first invalid field; no side effects."""
    if cfg.memory_limit is not None:
        _size("memory_limit", cfg.memory_limit, allow_zero=False)
    if cfg.memory_reservation is not None:
        _size("memory_reservation", cfg.memory_reservation)
    if cfg.memory_swap is not None:
        _size("memory_swap", cfg.memory_swap)
        if cfg.memory_swap == 0:
            raise ConfigError(
                "memory_swap",
                0,
                "0 is ambiguous (runc reads it as unset); use None to leave swap alone or "
                "memory_limit's value to disable swap",
            )
        convert.swap_to_v2(cfg.memory_swap, cfg.memory_limit)
    if cfg.memory_swappiness is not None:
        _range("memory_swappiness", cfg.memory_swappiness, 0, 100)
    if cfg.cpu_shares is not None:
        _range("cpu_shares", cfg.cpu_shares, convert.SHARES_MIN, convert.SHARES_MAX)
    if cfg.cpu_quota is not None:
        _cpu_quota(cfg.cpu_quota)
    if cfg.cpuset_cpus is not None:
        validate_cpuset("cpuset_cpus", cfg.cpuset_cpus)
    if cfg.cpuset_mems is not None:
        validate_cpuset("cpuset_mems", cfg.cpuset_mems)
    if cfg.pids_limit is not None:
        v = _int("pids_limit", cfg.pids_limit)
        if v != -1 and v < 1:
            raise ConfigError("pids_limit", v, "must be -1 (unlimited) or >= 1")
    if cfg.blkio_weight is not None:
        _range("blkio_weight", cfg.blkio_weight, convert.BLKIO_WEIGHT_MIN, convert.BLKIO_WEIGHT_MAX)
    for setting, _key in convert.IO_MAX_KEYS:
        _throttles(setting, getattr(cfg, setting))
    if cfg.device_rules:
        from .devices import validate_device_rules  # lazy: the rule semantics live there

        validate_device_rules(cfg.device_rules)
    if cfg.net_classid is not None or cfg.net_priorities:
        from .net import validate_net

        validate_net(cfg.net_classid, cfg.net_priorities)
    if cfg.path is not None:
        validate_path(cfg.path)


def _cpu_quota(value: Any) -> None:
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise ConfigError("cpu_quota", value, "must be a (quota_us, period_us) pair")
    quota, period = value
    q = _int("cpu_quota.quota", quota)
    if q != -1 and q < CPU_QUOTA_MIN:
        raise ConfigError("cpu_quota.quota", q, f"must be -1 (no limit) or >= {CPU_QUOTA_MIN} us")
    _range("cpu_quota.period", period, CPU_PERIOD_MIN, CPU_PERIOD_MAX)
