"""validate_config: every field, errors naming the field and the value (pure, no root)."""

from __future__ import annotations

from typing import Any

import pytest

from pelagos_bpf.config import CgroupConfig, CgroupDeviceRule
from pelagos_bpf.errors import ConfigError
from pelagos_bpf.validate import validate_config, validate_cpuset, validate_path

GOOD = CgroupConfig(
    memory_limit=256 << 20,
    memory_swap=512 << 20,
    memory_reservation=128 << 20,
    memory_swappiness=60,
    cpu_shares=1024,
    cpu_quota=(50000, 100000),
    cpuset_cpus="0-1,3",
    cpuset_mems="0",
    pids_limit=64,
    blkio_weight=500,
    blkio_throttle_read_bps=[(8, 0, 1 << 20)],
    blkio_throttle_write_bps=[(8, 0, 1 << 20)],
    blkio_throttle_read_iops=[(8, 16, 100)],
    blkio_throttle_write_iops=[(4095, 1048575, 1)],
    device_rules=[CgroupDeviceRule(False, "a", -1, -1, "rwm"), CgroupDeviceRule(True, "c", 1, 3)],
    net_classid=0x10010,
    net_priorities=[("eth0", 5), ("lo", 0)],
    path="/pelagos/ctr-1",
)


def cfg(**kw: Any) -> CgroupConfig:
    return CgroupConfig(**kw)


def test_a_full_good_config_passes() -> None:
    validate_config(GOOD)
    validate_config(CgroupConfig())


@pytest.mark.parametrize(
    ("kw", "setting", "value"),
    [
        ({"memory_limit": -2}, "memory_limit", -2),
        ({"memory_limit": 0}, "memory_limit", 0),
        ({"memory_limit": "1G"}, "memory_limit", "1G"),
        ({"memory_limit": True}, "memory_limit", True),
        ({"memory_reservation": -7}, "memory_reservation", -7),
        ({"memory_swap": -3, "memory_limit": 100}, "memory_swap", -3),
        ({"memory_swap": 0, "memory_limit": 100}, "memory_swap", 0),
        ({"memory_swap": 50, "memory_limit": 100}, "memory_swap", 50),
        ({"memory_swap": 200}, "memory_swap", 200),
        ({"memory_swappiness": 101}, "memory_swappiness", 101),
        ({"memory_swappiness": -1}, "memory_swappiness", -1),
        ({"cpu_shares": 1}, "cpu_shares", 1),
        ({"cpu_shares": 262145}, "cpu_shares", 262145),
        ({"cpu_quota": (999, 100000)}, "cpu_quota.quota", 999),
        ({"cpu_quota": (0, 100000)}, "cpu_quota.quota", 0),
        ({"cpu_quota": (50000, 999)}, "cpu_quota.period", 999),
        ({"cpu_quota": (50000, 1000001)}, "cpu_quota.period", 1000001),
        ({"cpu_quota": (50000,)}, "cpu_quota", (50000,)),
        ({"cpuset_cpus": "0-"}, "cpuset_cpus", "0-"),
        ({"cpuset_cpus": "3-1"}, "cpuset_cpus", "3-1"),
        ({"cpuset_cpus": "0,,1"}, "cpuset_cpus", "0,,1"),
        ({"cpuset_cpus": ""}, "cpuset_cpus", ""),
        ({"cpuset_mems": "a"}, "cpuset_mems", "a"),
        ({"cpuset_mems": 0}, "cpuset_mems", 0),
        ({"pids_limit": 0}, "pids_limit", 0),
        ({"pids_limit": -2}, "pids_limit", -2),
        ({"blkio_weight": 9}, "blkio_weight", 9),
        ({"blkio_weight": 1001}, "blkio_weight", 1001),
        ({"blkio_throttle_read_bps": [(4096, 0, 1)]}, "blkio_throttle_read_bps[0].major", 4096),
        (
            {"blkio_throttle_write_bps": [(8, 1048576, 1)]},
            "blkio_throttle_write_bps[0].minor",
            1048576,
        ),
        ({"blkio_throttle_read_iops": [(8, 0, 0)]}, "blkio_throttle_read_iops[0].rate", 0),
        ({"blkio_throttle_write_iops": [(8, 0)]}, "blkio_throttle_write_iops[0]", (8, 0)),
        (
            {"blkio_throttle_read_bps": [(8, 0, 1), (8, 0, 2)]},
            "blkio_throttle_read_bps[1]",
            (8, 0, 2),
        ),
        ({"net_classid": -1}, "net_classid", -1),
        ({"net_classid": 1 << 32}, "net_classid", 1 << 32),
        ({"path": "a/../b"}, "path", "a/../b"),
        ({"path": "a//b"}, "path", "a//b"),
        ({"path": "/"}, "path", "/"),
        ({"path": "a/./b"}, "path", "a/./b"),
        ({"path": "a/b/"}, "path", "a/b/"),
    ],
)
def test_bad_values_name_field_and_value(kw: dict[str, Any], setting: str, value: Any) -> None:
    with pytest.raises(ConfigError) as e:
        validate_config(cfg(**kw))
    assert e.value.setting == setting
    assert e.value.value == value
    assert setting in str(e.value)


@pytest.mark.parametrize(
    ("prios", "setting"),
    [
        ([("", 1)], "net_priorities[0]"),
        ([("eth0", 1), ("a" * 16, 1)], "net_priorities[1]"),
        ([("eth 0", 1)], "net_priorities[0]"),
        ([("a/b", 1)], "net_priorities[0]"),
        ([("eth0", -1)], "net_priorities[0]"),
        ([("eth0", 1 << 32)], "net_priorities[0]"),
    ],
)
def test_bad_net_priorities(prios: list[tuple[str, int]], setting: str) -> None:
    with pytest.raises(ConfigError) as e:
        validate_config(cfg(net_priorities=prios))
    assert e.value.setting.startswith(setting)


@pytest.mark.parametrize(
    ("rule", "field"),
    [
        (CgroupDeviceRule(True, "x", 1, 3, "rw"), "kind"),
        (CgroupDeviceRule(True, "c", 1, 3, ""), "access"),
        (CgroupDeviceRule(True, "c", 1, 3, "rx"), "access"),
        (CgroupDeviceRule(True, "c", 4096, 3, "r"), "major"),
        (CgroupDeviceRule(True, "c", 1, -2, "r"), "minor"),
        (CgroupDeviceRule(True, "c", 1, 1048576, "r"), "minor"),
    ],
)
def test_bad_device_rules(rule: CgroupDeviceRule, field: str) -> None:
    with pytest.raises(ConfigError) as e:
        validate_config(cfg(device_rules=[CgroupDeviceRule(True), rule]))
    assert e.value.setting.startswith("device_rules[1]")
    assert field in e.value.setting


@pytest.mark.parametrize("text", ["0", "0-3", "0-3,5", "0-7:2/4", "1,3,5-6", " 0-1 "])
def test_cpuset_syntax_ok(text: str) -> None:
    validate_cpuset("cpuset_cpus", text)


@pytest.mark.parametrize("text", ["-1", "0-3:5/4", "0-3:0/4", "1-", "x", "0;1", "0 1"])
def test_cpuset_syntax_bad(text: str) -> None:
    with pytest.raises(ConfigError):
        validate_cpuset("cpuset_cpus", text)


def test_path_is_relative_after_stripping() -> None:
    assert validate_path("/a/b") == "a/b"
    assert validate_path("pelagos-1") == "pelagos-1"
    assert validate_path("//x") == "x"
