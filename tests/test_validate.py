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
        ({"net_classid": -1}, "net_classid", -1),
        ({"net_classid": 1 << 32}, "net_classid", 1 << 32),
        ({"path": "a/../b"}, "path", "a/../b"),
        ({"path": "a//b"}, "path", "a//b"),
        ({"path": "/"}, "path", "/"),
        ({"path": "a/./b"}, "path", "a/./b"),
        ({"path": "a/b/"}, "path", "a/b/"),
        # issue 8: every bad path is a ConfigError, not an OSError/UnicodeEncodeError later
        ({"path": "a\tb"}, "path", "a\tb"),
        ({"path": "a/b\r"}, "path", "a/b\r"),
        ({"path": "a\x00b"}, "path", "a\x00b"),
        ({"path": "a\x7fb"}, "path", "a\x7fb"),
        ({"path": "a\nb"}, "path", "a\nb"),
        ({"path": "a/" + "x" * 256}, "path", "a/" + "x" * 256),
        ({"path": "/".join(["x" * 200] * 21)}, "path", "/".join(["x" * 200] * 21)),
        ({"path": "a\ud800b"}, "path", "a\ud800b"),
        ({"path": "a\udcffb"}, "path", "a\udcffb"),
        ({"pids_limit": -2}, "pids_limit", -2),
        ({"memory_high": -2}, "memory_high", -2),
        ({"memory_oom_group": 1}, "memory_oom_group", 1),
        ({"memory_check_before_update": "yes"}, "memory_check_before_update", "yes"),
        ({"cpu_idle": 2}, "cpu_idle", 2),
        ({"cpu_burst": -1}, "cpu_burst", -1),
        ({"cpu_burst": 60000, "cpu_quota": (50000, 100000)}, "cpu_burst", 60000),
        ({"blkio_weight_device": [(8, 0, 5)]}, "blkio_weight_device[0].weight", 5),
        ({"blkio_weight_device": [(8, 0)]}, "blkio_weight_device[0]", (8, 0)),
        ({"blkio_weight_device": [(4096, 0, 10)]}, "blkio_weight_device[0].major", 4096),
        ({"hugepage_limits": [("2M", 1)]}, "hugepage_limits[0].pagesize", "2M"),
        ({"hugepage_limits": [("0MB", 1)]}, "hugepage_limits[0].pagesize", "0MB"),
        ({"hugepage_limits": [("2MB", -3)]}, "hugepage_limits[0].limit", -3),
        ({"hugepage_limits": [("2MB",)]}, "hugepage_limits[0]", ("2MB",)),
        ({"rdma_limits": {"mlx5": (None, None)}}, "rdma_limits['mlx5']", (None, None)),
        ({"rdma_limits": {"mlx5": (1 << 31, None)}}, "rdma_limits['mlx5'].hca_handles", 1 << 31),
        ({"rdma_limits": {"a b": (1, 1)}}, "rdma_limits['a b']", "a b"),
        ({"unified": {"memory/../x.max": "1"}}, "unified['memory/../x.max']", "memory/../x.max"),
        ({"unified": {"memory..max": "1"}}, "unified['memory..max']", "memory..max"),
        ({"unified": {"cgroup.procs": "1"}}, "unified['cgroup.procs']", "cgroup.procs"),
        ({"unified": {"net_cls.classid": "1"}}, "unified['net_cls.classid']", "net_cls.classid"),
        ({"unified": {"memorymax": "1"}}, "unified['memorymax']", "memorymax"),
        ({"unified": {"memory.max": 5}}, "unified['memory.max']", 5),
        ({"unified": {"memory.max": "1\x00"}}, "unified['memory.max']", "1\x00"),
        ({"net_carrier": "skb"}, "net_carrier", "skb"),
        ({"net_carrier": "priority", "net_priorities": [("lo", 1)]}, "net_carrier", "priority"),
        ({"device_semantics": "first-match"}, "device_semantics", "first-match"),
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
        ([("eth\x000", 1)], "net_priorities[0]"),  # NUL: ConfigError, not ValueError
        ([("eth\ud800", 1)], "net_priorities[0]"),  # lone surrogate, not UnicodeEncodeError
        ([("eth\x01", 1)], "net_priorities[0]"),
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


def test_new_v2_knobs_accept_good_values() -> None:
    validate_config(
        cfg(
            memory_high=-1,
            memory_oom_group=True,
            memory_check_before_update=True,
            cpu_idle=0,
            cpu_burst=50000,
            cpu_quota=(50000, 100000),
            blkio_weight_device=[(8, 0, 10), (8, 0, 1000)],
            hugepage_limits=[("2MB", 0), ("1GB", -1), ("64KB", 1 << 20)],
            rdma_limits={"mlx5_0": (3, None)},
            unified={"memory.high": "1G", "io.max": "8:0 rbps=1\n8:16 wbps=2", "misc.max": ""},
            net_carrier="mark",
            pids_limit=0,
        )
    )


def test_path_at_the_limits_passes() -> None:
    assert validate_path("a/" + "x" * 255) == "a/" + "x" * 255
    validate_path("/".join(["x" * 200] * 20))  # 4019 bytes < PATH_MAX


def test_net_carrier_validated_without_net_settings() -> None:
    validate_config(cfg(net_carrier="auto"))
    with pytest.raises(ConfigError):
        validate_config(cfg(net_carrier=""))


def test_validate_reaches_net_only_through_the_leaf_plan_module() -> None:
    """No cycle: validate.py imports nothing of net but net.plan, and net.plan nothing of the
    library but errors (the import graph of every module is checked in test_hot_path.py)."""
    import ast
    from pathlib import Path

    import pelagos_bpf.net.plan as plan_mod
    import pelagos_bpf.validate as validate_mod

    def imported(mod: object) -> set[str]:
        tree = ast.parse(Path(mod.__file__).read_text())  # type: ignore[attr-defined]
        out: set[str] = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level:
                out.add("." * node.level + (node.module or ""))
        return out

    assert {m for m in imported(validate_mod) if m.startswith(".net")} == {".net.plan"}
    assert imported(plan_mod) == {"..errors"}


def test_systemd_driver_path_is_a_unit_not_a_directory() -> None:
    """runc's --systemd-cgroup form is a unit, not a directory name: validation gives the cgroup
    systemd will make for it, and refuses a name systemd would refuse."""
    assert validate_path("system.slice:docker:abc") == "system.slice/docker-abc.scope"
    assert validate_path("system.slice/docker-abc.scope") == "system.slice/docker-abc.scope"
    with pytest.raises(ConfigError) as e:
        validate_path("a--b.slice:docker:abc")
    assert e.value.setting == "path"
