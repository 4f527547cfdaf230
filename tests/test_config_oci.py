"""CgroupConfig.from_oci on runtime-spec `linux.resources` objects (pure)."""

from __future__ import annotations

import pytest

from pelagos_bpf.config import CgroupConfig, CgroupDeviceRule
from pelagos_bpf.errors import ConfigError
from pelagos_bpf.validate import validate_config

FULL = {
    "memory": {"limit": 268435456, "reservation": 134217728, "swap": 536870912, "swappiness": 0},
    "cpu": {"shares": 512, "quota": 50000, "period": 100000, "cpus": "0-1", "mems": "0"},
    "pids": {"limit": 64},
    "blockIO": {
        "weight": 500,
        "throttleReadBpsDevice": [{"major": 8, "minor": 0, "rate": 1048576}],
        "throttleWriteBpsDevice": [{"major": 8, "minor": 0, "rate": 2097152}],
        "throttleReadIOPSDevice": [{"major": 8, "minor": 16, "rate": 100}],
        "throttleWriteIOPSDevice": [{"major": 8, "minor": 16, "rate": 50}],
    },
    "devices": [
        {"allow": False, "access": "rwm"},
        {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rw"},
    ],
    "network": {"classID": 1048577, "priorities": [{"name": "eth0", "priority": 5}]},
}


def test_full_resources_map_to_every_field() -> None:
    c = CgroupConfig.from_oci(FULL, "/machine/ctr")
    assert c.memory_limit == 268435456
    assert c.memory_reservation == 134217728
    assert c.memory_swap == 536870912
    assert c.memory_swappiness == 0
    assert c.cpu_shares == 512
    assert c.cpu_quota == (50000, 100000)
    assert (c.cpuset_cpus, c.cpuset_mems) == ("0-1", "0")
    assert c.pids_limit == 64
    assert c.blkio_weight == 500
    assert c.blkio_throttle_read_bps == [(8, 0, 1048576)]
    assert c.blkio_throttle_write_bps == [(8, 0, 2097152)]
    assert c.blkio_throttle_read_iops == [(8, 16, 100)]
    assert c.blkio_throttle_write_iops == [(8, 16, 50)]
    assert c.device_rules == [
        CgroupDeviceRule(False, "a", -1, -1, "rwm"),
        CgroupDeviceRule(True, "c", 1, 3, "rw"),
    ]
    assert c.net_classid == 1048577
    assert c.net_priorities == [("eth0", 5)]
    assert c.path == "/machine/ctr"
    validate_config(c)


def test_empty_resources_are_all_unset() -> None:
    assert CgroupConfig.from_oci({}) == CgroupConfig()


def test_quota_without_period_uses_default_and_minus_one_means_max() -> None:
    assert CgroupConfig.from_oci({"cpu": {"quota": 20000}}).cpu_quota == (20000, 100000)
    assert CgroupConfig.from_oci({"cpu": {"quota": -1, "period": 50000}}).cpu_quota == (-1, 50000)
    assert CgroupConfig.from_oci({"cpu": {"period": 50000}}).cpu_quota == (-1, 50000)


@pytest.mark.parametrize("limit", [0, -1])
def test_pids_zero_or_negative_is_unlimited(limit: int) -> None:
    c = CgroupConfig.from_oci({"pids": {"limit": limit}})
    assert c.pids_limit == -1
    validate_config(c)


@pytest.mark.parametrize(
    ("resources", "setting"),
    [
        ({"hugepageLimits": []}, "linux.resources.hugepageLimits"),
        ({"memory": {"kernel": 1}}, "linux.resources.memory.kernel"),
        ({"cpu": {"realtimeRuntime": 1}}, "linux.resources.cpu.realtimeRuntime"),
        ({"memory": 5}, "linux.resources.memory"),
        (
            {"blockIO": {"throttleReadBpsDevice": [{"major": 8}]}},
            "linux.resources.blockIO.throttleReadBpsDevice[0]",
        ),
        ({"devices": [{"type": "c"}]}, "linux.resources.devices[0]"),
    ],
)
def test_unknown_or_malformed_keys_are_refused_by_name(resources: dict, setting: str) -> None:
    with pytest.raises(ConfigError) as e:
        CgroupConfig.from_oci(resources)
    assert e.value.setting == setting


def test_non_object_is_refused() -> None:
    with pytest.raises(ConfigError):
        CgroupConfig.from_oci([])  # type: ignore[arg-type]
