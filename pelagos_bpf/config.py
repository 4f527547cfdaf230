"""The seed's configuration type, plus a reader for OCI runtime-spec `linux.resources`.

Field names and meanings follow pelagos' `CgroupConfig` so a runtime can port its calls
unchanged; `None` (or an empty list) always means "leave the kernel default".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .devices.rules import CgroupDeviceRule
from .oci import read_resources

Throttle = tuple[int, int, int]
"""(major, minor, rate) for one block device."""
WeightDevice = tuple[int, int, int]
"""(major, minor, weight) for one block device, blkio scale 10..1000."""


@dataclass
class CgroupConfig:
    """Resource settings for one container cgroup (pelagos' fields plus OCI's; all optional).

    `ignored` lists (setting, reason) pairs a reader accepted but does not apply (e.g. OCI
    `memory.kernel: -1`); setup copies them into `SetupReport.skipped`. `device_semantics`
    is "last-match" (per access bit, the last matching rule decides; the default here) or "v1"
    (rules replayed as cgroup v1's exception list, what `from_oci` chooses: the spec's meaning;
    docs/DEVICE_SEMANTICS.md).
    """

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
    # Added for OCI runtime-spec v1.3 / cgroup v2 knobs (docs/OCI.md); all optional.
    memory_high: int | None = None
    memory_oom_group: bool | None = None
    memory_check_before_update: bool = False
    cpu_burst: int | None = None
    cpu_idle: int | None = None
    blkio_weight_device: list[WeightDevice] = field(default_factory=list)
    hugepage_limits: list[tuple[str, int]] = field(default_factory=list)
    rdma_limits: dict[str, tuple[int | None, int | None]] = field(default_factory=dict)
    unified: dict[str, str] = field(default_factory=dict)
    net_carrier: str | None = None
    device_semantics: str = "last-match"
    ignored: list[tuple[str, str]] = field(default_factory=list)

    @classmethod
    def from_oci(
        cls,
        resources: Mapping[str, Any] | None,
        cgroups_path: str | None = None,
        *,
        strict: bool = True,
        device_semantics: str = "v1",
    ) -> CgroupConfig:
        """Read an OCI runtime-spec v1.3 `linux.resources` object (docs/OCI.md).

        Every spec key is mapped, accepted as a v2 no-op (noted in `ignored`), or refused:
        strict (default) raises one UnsupportedSettings naming every refused JSON path;
        strict=False records them in `ignored` instead. A mistyped value raises ConfigError
        naming its JSON path (e.g. `linux.resources.pids.limit`).

        `linux.resources.devices` is read with `device_semantics="v1"` unless told otherwise:
        runtime-spec defines that list as cgroup v1's allowed-device list, applied in order,
        and runc reproduces v1. Lists v1 would silently misread (a hole punched in a wildcard,
        r and w of one device granted by different rules) are refused by validation, as runc
        refuses them (docs/DEVICE_SEMANTICS.md).
        """
        kw = read_resources(resources, strict=strict)
        kw["device_rules"] = [CgroupDeviceRule(*t) for t in kw["device_rules"]]
        return cls(**kw, path=cgroups_path, device_semantics=device_semantics)
