"""The seed's configuration types, plus a reader for OCI runtime-spec `linux.resources`.

Field names and meanings follow pelagos' `CgroupConfig` so a runtime can port its calls
unchanged; `None` (or an empty list) always means "leave the kernel default".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .errors import ConfigError

Throttle = tuple[int, int, int]
"""(major, minor, rate) for one block device."""


@dataclass(frozen=True)
class CgroupDeviceRule:
    """One device allow/deny rule, as in OCI `linux.resources.devices`.

    kind is 'a' (all), 'b' (block) or 'c' (char); major/minor -1 is a wildcard; access is a
    non-empty subset of "rwm".
    """

    allow: bool
    kind: str = "a"
    major: int = -1
    minor: int = -1
    access: str = "rwm"

    def __str__(self) -> str:
        def num(n: int) -> str:
            return "*" if n == -1 else str(n)

        verb = "allow" if self.allow else "deny"
        return f"{verb} {self.kind} {num(self.major)}:{num(self.minor)} {self.access}"

    @classmethod
    def parse(cls, text: str) -> CgroupDeviceRule:
        """ "allow c 1:3 rw" -> rule (the grammar `str(rule)` prints; ConfigError if bad)."""
        from .devices.rules import parse_rule  # lazy: devices.rules imports this module

        return parse_rule(text)


@dataclass
class CgroupConfig:
    """Resource settings for one container cgroup (the seed's fields, all optional)."""

    memory_limit: int | None = None
    memory_swap: int | None = None
    memory_reservation: int | None = None
    memory_swappiness: int | None = None
    cpu_shares: int | None = None
    cpu_quota: tuple[int, int] | None = None
    cpuset_cpus: str | None = None
    cpuset_mems: str | None = None
    pids_limit: int | None = None
    blkio_weight: int | None = None
    blkio_throttle_read_bps: list[Throttle] = field(default_factory=list)
    blkio_throttle_write_bps: list[Throttle] = field(default_factory=list)
    blkio_throttle_read_iops: list[Throttle] = field(default_factory=list)
    blkio_throttle_write_iops: list[Throttle] = field(default_factory=list)
    device_rules: list[CgroupDeviceRule] = field(default_factory=list)
    net_classid: int | None = None
    net_priorities: list[tuple[str, int]] = field(default_factory=list)
    path: str | None = None

    @classmethod
    def from_oci(
        cls, resources: Mapping[str, Any], cgroups_path: str | None = None
    ) -> CgroupConfig:
        """Read an OCI runtime-spec `linux.resources` object.

        Keys this library cannot honour (e.g. `memory.kernel`, `hugepageLimits`) raise a
        ConfigError naming them instead of being dropped.
        """
        return _OciReader(resources).read(cgroups_path)


_DEFAULT_CFS_PERIOD = 100_000


class _OciReader:
    """Walks one resources object, remembering which keys it consumed."""

    _SUPPORTED: ClassVar[dict[str, set[str]]] = {
        "memory": {"limit", "reservation", "swap", "swappiness"},
        "cpu": {"shares", "quota", "period", "cpus", "mems"},
        "pids": {"limit"},
        "blockIO": {
            "weight",
            "throttleReadBpsDevice",
            "throttleWriteBpsDevice",
            "throttleReadIOPSDevice",
            "throttleWriteIOPSDevice",
        },
        "network": {"classID", "priorities"},
        "devices": set(),
    }

    def __init__(self, resources: Mapping[str, Any]) -> None:
        if not isinstance(resources, Mapping):
            raise ConfigError("linux.resources", resources, "must be a JSON object")
        self.r = resources

    def _section(self, name: str) -> Mapping[str, Any]:
        sec = self.r.get(name)
        if sec is None:
            return {}
        if not isinstance(sec, Mapping):
            raise ConfigError(f"linux.resources.{name}", sec, "must be a JSON object")
        extra = set(sec) - self._SUPPORTED[name]
        if extra:
            key = sorted(extra)[0]
            raise ConfigError(
                f"linux.resources.{name}.{key}",
                sec[key],
                "not supported by pelagos_bpf on cgroup v2 (refusing to drop it silently)",
            )
        return sec

    def read(self, cgroups_path: str | None) -> CgroupConfig:
        extra = set(self.r) - set(self._SUPPORTED)
        if extra:
            key = sorted(extra)[0]
            raise ConfigError(f"linux.resources.{key}", self.r[key], "not supported by pelagos_bpf")
        mem = self._section("memory")
        cpu = self._section("cpu")
        pids = self._section("pids")
        blk = self._section("blockIO")
        net = self._section("network")
        quota: tuple[int, int] | None = None
        if cpu.get("quota") is not None or cpu.get("period") is not None:
            q = cpu.get("quota")
            quota = (
                -1 if q is None or q == 0 else int(q),
                int(cpu.get("period") or _DEFAULT_CFS_PERIOD),
            )
        pids_limit = pids.get("limit")
        if pids_limit is not None and pids_limit <= 0:
            pids_limit = -1  # runtime-spec/runc: 0 or -1 mean unlimited
        return CgroupConfig(
            # runc reads 0 as "unset" for these three; so do we.
            memory_limit=mem.get("limit") or None,
            memory_swap=mem.get("swap") or None,
            memory_reservation=mem.get("reservation") or None,
            memory_swappiness=mem.get("swappiness"),
            cpu_shares=cpu.get("shares") or None,
            cpu_quota=quota,
            cpuset_cpus=cpu.get("cpus") or None,
            cpuset_mems=cpu.get("mems") or None,
            pids_limit=pids_limit,
            blkio_weight=blk.get("weight") or None,
            blkio_throttle_read_bps=_throttles(blk, "throttleReadBpsDevice"),
            blkio_throttle_write_bps=_throttles(blk, "throttleWriteBpsDevice"),
            blkio_throttle_read_iops=_throttles(blk, "throttleReadIOPSDevice"),
            blkio_throttle_write_iops=_throttles(blk, "throttleWriteIOPSDevice"),
            device_rules=[_device(i, d) for i, d in enumerate(self.r.get("devices") or [])],
            net_classid=net.get("classID"),
            net_priorities=[
                (str(p.get("name")), int(p.get("priority", 0))) for p in net.get("priorities") or []
            ],
            path=cgroups_path,
        )


def _throttles(blk: Mapping[str, Any], key: str) -> list[Throttle]:
    out = []
    for i, d in enumerate(blk.get(key) or []):
        try:
            out.append((int(d["major"]), int(d["minor"]), int(d["rate"])))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(
                f"linux.resources.blockIO.{key}[{i}]", d, "needs integer major, minor, rate"
            ) from e
    return out


def _device(i: int, d: Mapping[str, Any]) -> CgroupDeviceRule:
    setting = f"linux.resources.devices[{i}]"
    if not isinstance(d, Mapping) or "allow" not in d:
        raise ConfigError(setting, d, "must be an object with at least 'allow'")
    major = d.get("major")
    minor = d.get("minor")
    return CgroupDeviceRule(
        allow=bool(d["allow"]),
        kind=d.get("type") or "a",
        major=-1 if major is None else int(major),
        minor=-1 if minor is None else int(minor),
        access=d.get("access") or "rwm",
    )
