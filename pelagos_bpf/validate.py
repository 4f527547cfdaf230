"""Pure validation of every CgroupConfig field: bad input fails here, before anything is written.

Each error is a ConfigError naming the field (with an index for list items) and the value.
Device rules and net settings are checked by their feature packages. Imports go one way:
validate -> devices.rules / net.plan, never back (net.plan imports only errors).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from . import convert, systemd
from .config import CgroupConfig
from .controllers.unified import validate_unified
from .devices.rules import validate_device_rules
from .devices.v1emulator import SEMANTICS, to_last_match
from .errors import ConfigError
from .net.plan import validate_net

MAJOR_MAX = 4095  # Linux dev_t: 12-bit major
MINOR_MAX = 1_048_575  # 20-bit minor
CPU_QUOTA_MIN = 1000  # kernel: quota >= 1 ms
CPU_PERIOD_MIN = 1000
CPU_PERIOD_MAX = 1_000_000
PATH_MAX = 4096  # bytes, including the terminating NUL
NAME_MAX = 255  # bytes per path component
INT_MAX = (1 << 31) - 1


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


def _tuples(setting: str, items: Any, shape: str, n: int) -> list[tuple[str, Any]]:
    """(name, item) per item of a list of n-tuples; ConfigError naming the bad list or item."""
    if not isinstance(items, list | tuple):
        raise ConfigError(setting, items, f"must be a list of {shape}")
    for i, t in enumerate(items):
        if not isinstance(t, list | tuple) or len(t) != n:
            raise ConfigError(f"{setting}[{i}]", t, f"must be a {shape} tuple")
    return [(f"{setting}[{i}]", t) for i, t in enumerate(items)]


def _throttles(setting: str, items: Any) -> None:
    for name, (major, minor, rate) in _tuples(setting, items, "(major, minor, rate)", 3):
        _range(f"{name}.major", major, 0, MAJOR_MAX)
        _range(f"{name}.minor", minor, 0, MINOR_MAX)
        if _int(f"{name}.rate", rate) < 1:
            raise ConfigError(f"{name}.rate", rate, "must be >= 1")
        # A device listed twice: the last rate wins (convert.io_max_lines), as runc accepts.


_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def validate_path(value: Any) -> str:
    """Return the path relative to the cgroup root (for runc's systemd form `slice:prefix:name`,
    the cgroup systemd will make for that unit, checked against systemd's name rules).

    Rejects what the kernel would refuse with a raw OSError or a runtime would print badly:
    '..', '.', empty components, control characters (NUL, tab, CR, newline, DEL), text that is
    not UTF-8 (lone surrogates), components over NAME_MAX bytes, paths of PATH_MAX bytes or more.
    """
    if not isinstance(value, str):
        raise ConfigError("path", value, "must be a string")
    if systemd.is_systemd_form(value):  # "slice:prefix:name" is a unit, never a directory name
        return systemd.resolve(value).cgroup_path
    try:
        raw = value.encode()
    except UnicodeEncodeError:
        raise ConfigError("path", value, "is not valid UTF-8 (lone surrogate)") from None
    if len(raw) >= PATH_MAX:
        raise ConfigError("path", value, f"is {len(raw)} bytes; PATH_MAX is {PATH_MAX}")
    rel = value.lstrip("/")
    if not rel:
        raise ConfigError("path", value, "names the cgroup root itself")
    if m := _CONTROL.search(rel):
        raise ConfigError("path", value, f"contains the control character {m.group()!r}")
    for part in rel.split("/"):
        if part in ("", ".", ".."):
            raise ConfigError("path", value, f"has a {part or 'empty'!r} component")
        if len(part.encode()) > NAME_MAX:
            raise ConfigError("path", value, f"has a component over {NAME_MAX} bytes")
    return rel


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
        if v < -1:
            raise ConfigError("pids_limit", v, "must be -1 (unlimited) or >= 0 (0: no forks)")
    if cfg.blkio_weight is not None:
        _range("blkio_weight", cfg.blkio_weight, convert.BLKIO_WEIGHT_MIN, convert.BLKIO_WEIGHT_MAX)
    for setting, _key in convert.IO_MAX_KEYS:
        _throttles(setting, getattr(cfg, setting))
    _v2_knobs(cfg)
    if cfg.device_semantics not in SEMANTICS:
        raise ConfigError(
            "device_semantics", cfg.device_semantics, f"must be one of {', '.join(SEMANTICS)}"
        )
    if cfg.device_rules:
        validate_device_rules(cfg.device_rules)
        if cfg.device_semantics == "v1":
            to_last_match(cfg.device_rules)  # refuses what cgroup v1 would silently ignore
    if cfg.net_classid is not None or cfg.net_priorities or cfg.net_carrier is not None:
        carrier = "auto" if cfg.net_carrier is None else cfg.net_carrier
        validate_net(cfg.net_classid, cfg.net_priorities, carrier)
    if cfg.path is not None:
        validate_path(cfg.path)


def _v2_knobs(cfg: CgroupConfig) -> None:
    """The cgroup v2 knobs added for runtime-spec v1.3 (docs/OCI.md)."""
    if cfg.memory_high is not None:
        _size("memory_high", cfg.memory_high)
    for name in ("memory_oom_group", "memory_check_before_update"):
        v = getattr(cfg, name)
        if v is not None and not isinstance(v, bool):
            raise ConfigError(name, v, "must be True or False")
    if cfg.cpu_idle is not None:
        _range("cpu_idle", cfg.cpu_idle, 0, 1)
    if cfg.cpu_burst is not None:
        _range("cpu_burst", cfg.cpu_burst, 0, (1 << 63) - 1)
        quota = cfg.cpu_quota[0] if cfg.cpu_quota else -1
        if quota > 0 and cfg.cpu_burst > quota:
            raise ConfigError(
                "cpu_burst", cfg.cpu_burst, f"must not exceed the cpu quota ({quota} us)"
            )
    _weight_devices(cfg.blkio_weight_device)
    _hugepages(cfg.hugepage_limits)
    _rdma(cfg.rdma_limits)
    validate_unified(cfg.unified)


def _weight_devices(items: Any) -> None:
    for name, t in _tuples("blkio_weight_device", items, "(major, minor, weight)", 3):
        _range(f"{name}.major", t[0], 0, MAJOR_MAX)
        _range(f"{name}.minor", t[1], 0, MINOR_MAX)
        _range(f"{name}.weight", t[2], convert.BLKIO_WEIGHT_MIN, convert.BLKIO_WEIGHT_MAX)


def _hugepages(items: Any) -> None:
    for name, t in _tuples("hugepage_limits", items, "(page size, limit)", 2):
        try:
            convert.hugepage_size(t[0])
        except ValueError as e:
            raise ConfigError(f"{name}.pagesize", t[0], str(e)) from None
        _size(f"{name}.limit", t[1])


def _rdma(limits: Any) -> None:
    if not isinstance(limits, Mapping):
        raise ConfigError(
            "rdma_limits", limits, "must be a dict {device: (hca_handles, hca_objects)}"
        )
    for dev, pair in limits.items():
        name = f"rdma_limits[{dev!r}]"
        if (
            not isinstance(dev, str)
            or not dev
            or _CONTROL.search(dev)
            or any(c in dev for c in " =/")
        ):
            raise ConfigError(name, dev, "device name must be a non-empty word (e.g. mlx5_0)")
        if not isinstance(pair, list | tuple) or len(pair) != 2 or all(v is None for v in pair):
            raise ConfigError(name, pair, "must be (hca_handles, hca_objects), at least one set")
        for label, v in zip(("hca_handles", "hca_objects"), pair, strict=True):
            if v is not None:
                _range(f"{name}.{label}", v, 0, INT_MAX)


def _cpu_quota(value: Any) -> None:
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise ConfigError("cpu_quota", value, "must be a (quota_us, period_us) pair")
    quota, period = value
    q = _int("cpu_quota.quota", quota)
    if q != -1 and q < CPU_QUOTA_MIN:
        raise ConfigError("cpu_quota.quota", q, f"must be -1 (no limit) or >= {CPU_QUOTA_MIN} us")
    _range("cpu_quota.period", period, CPU_PERIOD_MIN, CPU_PERIOD_MAX)
