"""Reader for OCI runtime-spec v1.3 `linux.resources`: every field typed, mapped or named.

Why a reader of its own: runtimes pass the object their config already holds, so every key the
spec defines must either land in a CgroupConfig field, be a documented no-op on cgroup v2 (noted
in `CgroupConfig.ignored`), or be refused by JSON path. Refusals are collected so one
UnsupportedSettings names all of them (strict), or they become `ignored` notes (strict=False).
Type errors raise ConfigError at once, naming the JSON path. docs/OCI.md has the table.

This module imports no config types (config.py imports it): it returns plain keyword arguments.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .errors import ConfigError, UnsupportedSettings

ROOT = "linux.resources"
INT64 = (-(1 << 63), (1 << 63) - 1)
UINT64 = (0, (1 << 64) - 1)
UINT32 = (0, (1 << 32) - 1)
UINT16 = (0, (1 << 16) - 1)

# The spec's keys per section (runtime-spec v1.3 schema/config-linux.json).
KEYS: dict[str, frozenset[str]] = {
    "memory": frozenset(
        {
            "limit",
            "reservation",
            "swap",
            "kernel",
            "kernelTCP",
            "swappiness",
            "disableOOMKiller",
            "useHierarchy",
            "checkBeforeUpdate",
        }
    ),
    "cpu": frozenset(
        {
            "shares",
            "quota",
            "burst",
            "period",
            "realtimeRuntime",
            "realtimePeriod",
            "cpus",
            "mems",
            "idle",
        }
    ),
    "pids": frozenset({"limit"}),
    "blockIO": frozenset(
        {
            "weight",
            "leafWeight",
            "weightDevice",
            "throttleReadBpsDevice",
            "throttleWriteBpsDevice",
            "throttleReadIOPSDevice",
            "throttleWriteIOPSDevice",
        }
    ),
    "network": frozenset({"classID", "priorities"}),
}
TOP_KEYS = frozenset({*KEYS, "devices", "hugepageLimits", "rdma", "unified"})
THROTTLES = (
    ("throttleReadBpsDevice", "blkio_throttle_read_bps"),
    ("throttleWriteBpsDevice", "blkio_throttle_write_bps"),
    ("throttleReadIOPSDevice", "blkio_throttle_read_iops"),
    ("throttleWriteIOPSDevice", "blkio_throttle_write_iops"),
)


class Reader:
    """Walks one resources object; `refused` and `notes` collect (JSON path, reason)."""

    def __init__(self, resources: Any) -> None:
        if resources is None:
            resources = {}
        if not isinstance(resources, Mapping):
            raise ConfigError(ROOT, resources, "must be a JSON object")
        self.r = resources
        self.refused: list[tuple[str, str]] = []
        self.notes: list[tuple[str, str]] = []

    # ------------------------------------------------------------ typed access

    @staticmethod
    def _typed(path: str, v: Any, ok: bool, want: str) -> Any:
        if v is not None and not ok:
            raise ConfigError(path, v, want)
        return v

    def obj(self, path: str, v: Any) -> Mapping[str, Any]:
        return self._typed(path, v, isinstance(v, Mapping), "must be a JSON object") or {}

    def arr(self, path: str, v: Any) -> list[Any]:
        return list(self._typed(path, v, isinstance(v, list | tuple), "must be a JSON array") or [])

    def int_(self, path: str, v: Any, bounds: tuple[int, int]) -> int | None:
        if v is None:
            return None
        if not isinstance(v, int) or isinstance(v, bool):
            raise ConfigError(path, v, "must be an integer")
        lo, hi = bounds
        if not lo <= v <= hi:
            kind = "a non-negative integer" if lo == 0 else "an integer"
            raise ConfigError(path, v, f"must be {kind} in {lo}..{hi}")
        return v

    def str_(self, path: str, v: Any) -> str | None:
        if v is None or isinstance(v, str):
            return v
        raise ConfigError(path, v, "must be a string")

    def bool_(self, path: str, v: Any) -> bool | None:
        if v is None or isinstance(v, bool):
            return v
        raise ConfigError(path, v, "must be true or false (a JSON boolean)")

    def objects(self, path: str, v: Any) -> list[tuple[str, Mapping[str, Any]]]:
        """(JSON path, object) for each element of an array of objects."""
        return [
            (f"{path}[{i}]", self.obj(f"{path}[{i}]", e)) for i, e in enumerate(self.arr(path, v))
        ]

    @staticmethod
    def need(path: str, e: Mapping[str, Any], names: str, *values: Any) -> None:
        if any(v is None for v in values):
            raise Reader.missing(path, e, names)

    @staticmethod
    def missing(path: str, e: Mapping[str, Any], names: str) -> ConfigError:
        """The error for an entry lacking required keys (`need`; raised where the caller also
        wants the values narrowed to not-None)."""
        return ConfigError(path, dict(e), f"{names} are required")

    def section(self, name: str) -> Mapping[str, Any]:
        path = f"{ROOT}.{name}"
        sec = self.obj(path, self.r.get(name))
        for key in sorted(set(sec) - KEYS[name]):
            self.refused.append((f"{path}.{key}", "not a runtime-spec v1.3 key"))
        return sec

    def refuse_unless(self, path: str, value: Any, noop: bool, reason: str) -> None:
        if value is not None and not noop:
            self.refused.append((path, reason))

    # ------------------------------------------------------------ sections

    def read(self, strict: bool) -> dict[str, Any]:
        for key in sorted(set(self.r) - TOP_KEYS):
            self.refused.append((f"{ROOT}.{key}", "not a runtime-spec v1.3 linux.resources key"))
        kw: dict[str, Any] = {}
        kw.update(self.memory())
        kw.update(self.cpu())
        kw.update(self.pids())
        kw.update(self.block_io())
        kw.update(self.network())
        kw["hugepage_limits"] = self.hugepages()
        kw["rdma_limits"] = self.rdma()
        kw["unified"] = self.unified()
        kw["device_rules"] = self.devices()
        if self.refused and strict:
            raise UnsupportedSettings(self.refused)
        kw["ignored"] = [*self.notes, *self.refused]
        return kw

    def memory(self) -> dict[str, Any]:
        p = f"{ROOT}.memory"
        m = self.section("memory")
        out: dict[str, Any] = {}
        for key, field in (
            ("limit", "memory_limit"),
            ("reservation", "memory_reservation"),
            ("swap", "memory_swap"),
        ):
            v = self.int_(f"{p}.{key}", m.get(key), INT64)
            if v is not None and v < -1:
                raise ConfigError(f"{p}.{key}", v, "must be -1 (unlimited) or a byte count")
            out[field] = v or None  # runc: 0 means unset
        for key in ("kernel", "kernelTCP"):
            v = self.int_(f"{p}.{key}", m.get(key), INT64)
            if v is None or v in (-1, 0):
                if v is not None:
                    self.notes.append(
                        (f"{p}.{key}", f"{v} ignored: cgroup v2 has no separate kernel limit")
                    )
                continue
            self.refused.append(
                (
                    f"{p}.{key}",
                    "cgroup v2 has no separate kernel memory limit (kernel memory counts "
                    "against memory.max); use memory.limit",
                )
            )
        swappiness = self.int_(f"{p}.swappiness", m.get("swappiness"), UINT64)
        self.refuse_unless(
            f"{p}.swappiness",
            swappiness,
            False,
            "cgroup v2 has no per-cgroup swappiness (memory.swappiness is v1 only)",
        )
        oom = self.bool_(f"{p}.disableOOMKiller", m.get("disableOOMKiller"))
        self.refuse_unless(
            f"{p}.disableOOMKiller",
            oom,
            oom is False,
            "cgroup v2 cannot disable the OOM killer; to kill the whole container on OOM "
            'instead, set unified {"memory.oom.group": "1"}',
        )
        hier = self.bool_(f"{p}.useHierarchy", m.get("useHierarchy"))
        self.refuse_unless(
            f"{p}.useHierarchy",
            hier,
            hier is True,
            "cgroup v2 accounting is always hierarchical",
        )
        check = self.bool_(f"{p}.checkBeforeUpdate", m.get("checkBeforeUpdate"))
        out["memory_check_before_update"] = bool(check)
        return out

    def cpu(self) -> dict[str, Any]:
        p = f"{ROOT}.cpu"
        c = self.section("cpu")
        out: dict[str, Any] = {}
        shares = self.int_(f"{p}.shares", c.get("shares"), UINT64)
        out["cpu_shares"] = shares or None  # moby writes 0: unset
        quota = self.int_(f"{p}.quota", c.get("quota"), INT64)
        period = self.int_(f"{p}.period", c.get("period"), UINT64)
        if quota or period:  # runc fs2: cpu.max only when either is non-zero
            q = -1 if quota is None or quota <= 0 else quota  # negative: "max" (runc/crun/youki)
            out["cpu_quota"] = (q, period or 100_000)
        # 0 is each knob's kernel default: unset, as shares 0, so a config that names the
        # default imports on kernels without the file (cpu.max.burst 5.14+, cpu.idle 5.15+).
        out["cpu_burst"] = self.int_(f"{p}.burst", c.get("burst"), UINT64) or None
        out["cpu_idle"] = self.int_(f"{p}.idle", c.get("idle"), INT64) or None
        for key, bounds in (("realtimeRuntime", INT64), ("realtimePeriod", UINT64)):
            v = self.int_(f"{p}.{key}", c.get(key), bounds)
            self.refuse_unless(
                f"{p}.{key}",
                v,
                v == 0,
                "cgroup v2 has no realtime group scheduling (cpu.rt_* are v1 only)",
            )
        out["cpuset_cpus"] = self.str_(f"{p}.cpus", c.get("cpus")) or None
        out["cpuset_mems"] = self.str_(f"{p}.mems", c.get("mems")) or None
        return out

    def pids(self) -> dict[str, Any]:
        limit = self.int_(f"{ROOT}.pids.limit", self.section("pids").get("limit"), INT64)
        if limit is not None and limit < 0:
            limit = -1
        return {"pids_limit": limit}  # 0 is a real limit (runtime-spec v1.3, runc 1.4)

    def block_io(self) -> dict[str, Any]:
        p = f"{ROOT}.blockIO"
        b = self.section("blockIO")
        out: dict[str, Any] = {}
        out["blkio_weight"] = self.int_(f"{p}.weight", b.get("weight"), UINT16) or None
        leaf = self.int_(f"{p}.leafWeight", b.get("leafWeight"), UINT16)
        self.refuse_unless(f"{p}.leafWeight", leaf, leaf == 0, _LEAF)
        devices = []
        for q, d in self.objects(f"{p}.weightDevice", b.get("weightDevice")):
            major, minor = self._dev(q, d)
            weight = self.int_(f"{q}.weight", d.get("weight"), UINT16)
            leaf = self.int_(f"{q}.leafWeight", d.get("leafWeight"), UINT16)
            self.refuse_unless(f"{q}.leafWeight", leaf, leaf == 0, _LEAF)
            if weight:
                devices.append((major, minor, weight))
        out["blkio_weight_device"] = devices
        for key, field in THROTTLES:
            items = []
            for q, d in self.objects(f"{p}.{key}", b.get(key)):
                major, minor = self._dev(q, d)
                rate = self.int_(f"{q}.rate", d.get("rate"), UINT64)
                if rate is None:
                    raise ConfigError(f"{q}.rate", None, "is required")
                items.append((major, minor, rate))
            out[field] = items
        return out

    def _dev(self, q: str, d: Mapping[str, Any]) -> tuple[int, int]:
        major = self.int_(f"{q}.major", d.get("major"), INT64)
        minor = self.int_(f"{q}.minor", d.get("minor"), INT64)
        if major is None or minor is None:
            raise self.missing(q, d, "major and minor")
        return major, minor

    def network(self) -> dict[str, Any]:
        p = f"{ROOT}.network"
        n = self.section("network")
        prios = []
        for q, e in self.objects(f"{p}.priorities", n.get("priorities")):
            name = self.str_(f"{q}.name", e.get("name"))
            prio = self.int_(f"{q}.priority", e.get("priority"), UINT32)
            self.need(q, e, "name and priority", name, prio)
            prios.append((name, prio))
        return {
            "net_classid": self.int_(f"{p}.classID", n.get("classID"), UINT32),
            "net_priorities": prios,
        }

    def hugepages(self) -> list[tuple[str, int]]:
        p = f"{ROOT}.hugepageLimits"
        out = []
        for q, e in self.objects(p, self.r.get("hugepageLimits")):
            size = self.str_(f"{q}.pageSize", e.get("pageSize"))
            limit = self.int_(f"{q}.limit", e.get("limit"), UINT64)
            if size is None or limit is None:
                raise self.missing(q, e, "pageSize and limit")
            out.append((size, limit))
        return out

    def rdma(self) -> dict[str, tuple[int | None, int | None]]:
        p = f"{ROOT}.rdma"
        out = {}
        for name, e in self.obj(p, self.r.get("rdma")).items():
            q = f"{p}.{name}"
            e = self.obj(q, e)
            handles = self.int_(f"{q}.hcaHandles", e.get("hcaHandles"), UINT32)
            objects = self.int_(f"{q}.hcaObjects", e.get("hcaObjects"), UINT32)
            out[name] = (handles, objects)
        return out

    def unified(self) -> dict[str, str]:
        p = f"{ROOT}.unified"
        u = self.obj(p, self.r.get("unified"))
        for k, v in u.items():
            self.str_(f"{p}.{k}", v)
        return dict(u)

    def devices(self) -> list[tuple[bool, str, int, int, str]]:
        p = f"{ROOT}.devices"
        out = []
        for q, d in self.objects(p, self.r.get("devices")):
            allow = self.bool_(f"{q}.allow", d.get("allow"))
            if allow is None:
                raise ConfigError(f"{q}.allow", None, "is required (true or false)")
            kind = self.str_(f"{q}.type", d.get("type")) or "a"
            major = self.int_(f"{q}.major", d.get("major"), INT64)
            minor = self.int_(f"{q}.minor", d.get("minor"), INT64)
            access = self.str_(f"{q}.access", d.get("access")) or "rwm"
            out.append((allow, kind, _wild(major), _wild(minor), access))
        return out


_LEAF = "cgroup v2 io has no leaf weight (a CFQ knob, gone since kernel 5.0)"


def _wild(v: int | None) -> int:
    """OCI: an unset major or minor means every one (-1, `*`)."""
    return -1 if v is None else v


def read_resources(resources: Any, *, strict: bool = True) -> dict[str, Any]:
    """CgroupConfig keyword arguments for one `linux.resources` object (device rules as tuples)."""
    return Reader(resources).read(strict)
