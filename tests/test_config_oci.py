"""CgroupConfig.from_oci on runtime-spec v1.3 `linux.resources` objects (pure).

Each expectation names the peer (and version) it comes from; docs/OCI.md has the table.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from pelagos_bpf import controllers
from pelagos_bpf.config import CgroupConfig, CgroupDeviceRule
from pelagos_bpf.errors import ConfigError, UnsupportedSettings
from pelagos_bpf.validate import validate_config

DATA = Path(__file__).parent / "data" / "oci"

FULL = {
    "memory": {
        "limit": 268435456,
        "reservation": 134217728,
        "swap": 536870912,
        "kernel": -1,
        "kernelTCP": -1,
        "disableOOMKiller": False,
        "useHierarchy": True,
        "checkBeforeUpdate": True,
    },
    "cpu": {
        "shares": 512,
        "quota": 50000,
        "burst": 10000,
        "period": 100000,
        "realtimeRuntime": 0,
        "realtimePeriod": 0,
        "cpus": "0-1",
        "mems": "0",
        "idle": 1,
    },
    "pids": {"limit": 64},
    "blockIO": {
        "weight": 500,
        "leafWeight": 0,
        "weightDevice": [{"major": 8, "minor": 0, "weight": 300, "leafWeight": 0}],
        "throttleReadBpsDevice": [{"major": 8, "minor": 0, "rate": 1048576}],
        "throttleWriteBpsDevice": [{"major": 8, "minor": 0, "rate": 2097152}],
        "throttleReadIOPSDevice": [{"major": 8, "minor": 16, "rate": 100}],
        "throttleWriteIOPSDevice": [{"major": 8, "minor": 16, "rate": 50}],
    },
    "hugepageLimits": [{"pageSize": "2MB", "limit": 8388608}],
    "rdma": {"mlx5_1": {"hcaHandles": 3, "hcaObjects": 10000}, "rxe3": {"hcaObjects": 7}},
    "unified": {"memory.high": "200000000", "memory.oom.group": "1"},
    "devices": [
        {"allow": False, "access": "rwm"},
        {"allow": True, "type": "c", "major": 1, "minor": 3, "access": "rw"},
    ],
    "network": {"classID": 1048577, "priorities": [{"name": "eth0", "priority": 5}]},
}


def test_full_resources_map_to_every_field() -> None:
    c = CgroupConfig.from_oci(FULL, "/machine/ctr")
    assert (c.memory_limit, c.memory_reservation, c.memory_swap) == (
        256 << 20,
        128 << 20,
        512 << 20,
    )
    assert c.memory_swappiness is None
    assert c.memory_check_before_update is True
    assert c.cpu_shares == 512
    assert c.cpu_quota == (50000, 100000)
    assert (c.cpu_burst, c.cpu_idle) == (10000, 1)
    assert (c.cpuset_cpus, c.cpuset_mems) == ("0-1", "0")
    assert c.pids_limit == 64
    assert c.blkio_weight == 500
    assert c.blkio_weight_device == [(8, 0, 300)]
    assert c.blkio_throttle_read_bps == [(8, 0, 1048576)]
    assert c.blkio_throttle_write_bps == [(8, 0, 2097152)]
    assert c.blkio_throttle_read_iops == [(8, 16, 100)]
    assert c.blkio_throttle_write_iops == [(8, 16, 50)]
    assert c.hugepage_limits == [("2MB", 8388608)]
    assert c.rdma_limits == {"mlx5_1": (3, 10000), "rxe3": (None, 7)}
    assert c.unified == {"memory.high": "200000000", "memory.oom.group": "1"}
    assert c.device_rules == [
        CgroupDeviceRule(False, "a", -1, -1, "rwm"),
        CgroupDeviceRule(True, "c", 1, 3, "rw"),
    ]
    assert c.net_classid == 1048577
    assert c.net_priorities == [("eth0", 5)]
    assert c.path == "/machine/ctr"
    # kernel/kernelTCP -1: accepted, ignored on v2 as runc does, and said so.
    assert [s for s, _ in c.ignored] == [
        "linux.resources.memory.kernel",
        "linux.resources.memory.kernelTCP",
    ]
    validate_config(c)


def test_full_resources_plan_every_file_unified_last() -> None:
    writes = controllers.plan(CgroupConfig.from_oci(FULL))
    files = [(w.filename, w.value) for w in writes]
    assert files[-2:] == [("memory.high", "200000000"), ("memory.oom.group", "1")]
    assert ("cpu.max.burst", "10000") in files
    assert ("cpu.idle", "1") in files
    assert ("rdma.max", "mlx5_1 hca_handle=3 hca_object=10000") in files
    assert ("rdma.max", "rxe3 hca_object=7") in files
    assert ("hugetlb.2MB.max", "8388608") in files
    assert ("io.bfq.weight", "8:0 300") in files
    assert controllers.needed_controllers(writes) == [
        "memory",
        "cpu",
        "cpuset",
        "pids",
        "io",
        "hugetlb",
        "rdma",
    ]


V1 = CgroupConfig(device_semantics="v1")  # from_oci's reading of a device list (the spec's)


def test_empty_resources_are_all_unset() -> None:
    assert CgroupConfig.from_oci({}) == V1
    assert CgroupConfig.from_oci(None) == V1


def test_device_lists_are_read_as_cgroup_v1s_unless_told_otherwise() -> None:
    """runtime-spec defines linux.resources.devices as v1's allowed-device list (runc
    reproduces v1); CgroupConfig's own default stays last-match."""
    hole = {
        "devices": [
            {"allow": False, "access": "rwm"},
            {"allow": True, "type": "c", "major": 240, "access": "rw"},
            {"allow": False, "type": "c", "major": 240, "minor": 1, "access": "w"},
        ]
    }
    assert CgroupConfig().device_semantics == "last-match"
    c = CgroupConfig.from_oci(hole)
    assert c.device_semantics == "v1"
    with pytest.raises(ConfigError) as e:  # v1 would ignore the deny: refused, as runc does
        validate_config(c)
    assert e.value.setting == "device_rules[2]" and "punches a hole" in e.value.reason
    last = CgroupConfig.from_oci(hole, device_semantics="last-match")
    validate_config(last)  # the deny means what it says there
    assert last.device_rules == c.device_rules


def test_moby_zeros_and_empty_containers_are_noops() -> None:
    """moby writes these into every container (issue 9); each must import as 'unset'."""
    r = {
        "memory": {"disableOOMKiller": False, "useHierarchy": True},
        "cpu": {"shares": 0, "idle": None, "realtimeRuntime": 0, "realtimePeriod": 0},
        "blockIO": {"weight": 0, "leafWeight": 0, "weightDevice": []},
        "hugepageLimits": [],
        "unified": {},
        "rdma": {},
        "devices": [],
        "network": {},
    }
    c = CgroupConfig.from_oci(r)
    assert c == V1
    assert controllers.plan(c) == []


def test_quota_and_period() -> None:
    """runc fs2 (opencontainers/cgroups fs2/cpu.go): cpu.max only when quota or period != 0."""
    assert CgroupConfig.from_oci({"cpu": {"quota": 20000}}).cpu_quota == (20000, 100000)
    assert CgroupConfig.from_oci({"cpu": {"quota": -1, "period": 50000}}).cpu_quota == (-1, 50000)
    assert CgroupConfig.from_oci({"cpu": {"period": 50000}}).cpu_quota == (-1, 50000)
    assert CgroupConfig.from_oci({"cpu": {"quota": 0, "period": 0}}).cpu_quota is None


@pytest.mark.parametrize("quota", [-9999, -500, -1])
def test_negative_quota_is_max(quota: int) -> None:
    """youki contest cases -9999/-500: runc fs2, crun and youki all write "max"."""
    c = CgroupConfig.from_oci({"cpu": {"quota": quota, "period": 100000}})
    validate_config(c)
    assert [(w.filename, w.value) for w in controllers.plan(c)] == [("cpu.max", "max 100000")]


@pytest.mark.parametrize(("limit", "pids_max"), [(0, "0"), (-1, "max"), (-5, "max"), (7, "7")])
def test_pids_limit_follows_runtime_spec_1_3(limit: int, pids_max: str) -> None:
    """runtime-spec v1.3 / runc 1.4 (opencontainers/cgroups #48): 0 is a real limit."""
    c = CgroupConfig.from_oci({"pids": {"limit": limit}})
    validate_config(c)
    assert [(w.filename, w.value) for w in controllers.plan(c)] == [("pids.max", pids_max)]


def test_duplicated_throttle_entries_last_wins() -> None:
    """runc tests/integration/update.bats runs a config listing one device twice."""
    r = {
        "blockIO": {
            "throttleReadBpsDevice": [
                {"major": 8, "minor": 0, "rate": 100},
                {"major": 8, "minor": 0, "rate": 200},
            ]
        }
    }
    c = CgroupConfig.from_oci(r)
    validate_config(c)
    assert [(w.filename, w.value) for w in controllers.plan(c)] == [("io.max", "8:0 rbps=200")]


ALL_REFUSED = {
    "memory": {
        "kernel": 1 << 20,
        "kernelTCP": 1 << 20,
        "swappiness": 10,
        "disableOOMKiller": True,
        "useHierarchy": False,
    },
    "cpu": {"realtimeRuntime": 950000, "realtimePeriod": 1000000},
    "blockIO": {
        "leafWeight": 10,
        "weightDevice": [{"major": 8, "minor": 0, "leafWeight": 300}],
        "bogus": 1,
    },
    "intelRdt": {},
}


def test_everything_v2_cannot_express_is_named_in_one_error() -> None:
    with pytest.raises(UnsupportedSettings) as e:
        CgroupConfig.from_oci(ALL_REFUSED)
    named = [s for s, _ in e.value.problems]
    assert sorted(named) == sorted(
        [
            "linux.resources.intelRdt",
            "linux.resources.memory.kernel",
            "linux.resources.memory.kernelTCP",
            "linux.resources.memory.swappiness",
            "linux.resources.memory.disableOOMKiller",
            "linux.resources.memory.useHierarchy",
            "linux.resources.cpu.realtimeRuntime",
            "linux.resources.cpu.realtimePeriod",
            "linux.resources.blockIO.bogus",
            "linux.resources.blockIO.leafWeight",
            "linux.resources.blockIO.weightDevice[0].leafWeight",
        ]
    )
    for setting in named:
        assert setting in str(e.value)
    assert "memory.oom.group" in dict(e.value.problems)["linux.resources.memory.disableOOMKiller"]


def test_not_strict_reports_refusals_as_ignored() -> None:
    c = CgroupConfig.from_oci(ALL_REFUSED, strict=False)
    assert len(c.ignored) == 11
    assert c == CgroupConfig(ignored=c.ignored, device_semantics="v1")  # nothing else was set
    validate_config(c)


@pytest.mark.parametrize(
    ("resources", "setting", "why"),
    [
        ({"pids": {"limit": "64"}}, "linux.resources.pids.limit", "integer"),
        ({"pids": {"limit": 1.5}}, "linux.resources.pids.limit", "integer"),
        ({"memory": {"limit": True}}, "linux.resources.memory.limit", "integer"),
        ({"memory": {"limit": -2}}, "linux.resources.memory.limit", "-1"),
        ({"memory": {"disableOOMKiller": "false"}}, "linux.resources.memory.disableOOMKiller", ""),
        ({"memory": 5}, "linux.resources.memory", "object"),
        ({"cpu": {"shares": -1}}, "linux.resources.cpu.shares", "non-negative"),
        ({"cpu": {"cpus": 3}}, "linux.resources.cpu.cpus", "string"),
        ({"blockIO": {"weight": 70000}}, "linux.resources.blockIO.weight", "65535"),
        (
            {"blockIO": {"throttleReadBpsDevice": [{"major": 8}]}},
            "linux.resources.blockIO.throttleReadBpsDevice[0]",
            "required",
        ),
        (
            {"blockIO": {"throttleReadBpsDevice": [{"major": 8, "minor": 0}]}},
            "linux.resources.blockIO.throttleReadBpsDevice[0].rate",
            "required",
        ),
        ({"devices": [{"type": "c"}]}, "linux.resources.devices[0].allow", "required"),
        ({"devices": [{"allow": "false"}]}, "linux.resources.devices[0].allow", "boolean"),
        ({"devices": [{"allow": 0}]}, "linux.resources.devices[0].allow", "boolean"),
        ({"devices": [{"allow": True, "major": "1"}]}, "linux.resources.devices[0].major", ""),
        ({"devices": {"allow": True}}, "linux.resources.devices", "array"),
        ({"hugepageLimits": [{"limit": 1}]}, "linux.resources.hugepageLimits[0]", "pageSize"),
        ({"rdma": {"mlx5": {"hcaHandles": -1}}}, "linux.resources.rdma.mlx5.hcaHandles", ""),
        ({"unified": {"memory.high": 5}}, "linux.resources.unified.memory.high", "string"),
        ({"network": {"classID": 1 << 32}}, "linux.resources.network.classID", ""),
        (
            {"network": {"priorities": [{"name": "eth0"}]}},
            "linux.resources.network.priorities[0]",
            "required",
        ),
    ],
)
def test_mistyped_values_name_the_json_path(resources: dict, setting: str, why: str) -> None:
    with pytest.raises(ConfigError) as e:
        CgroupConfig.from_oci(resources)
    assert e.value.setting == setting
    assert why in e.value.reason


def test_non_object_is_refused() -> None:
    with pytest.raises(ConfigError) as e:
        CgroupConfig.from_oci([])  # type: ignore[arg-type]
    assert e.value.setting == "linux.resources"


# ---------------------------------------------------------------- configs real tools generate


def _load(name: str) -> dict[str, Any]:
    return json.loads((DATA / name).read_text())


@pytest.mark.parametrize("name", ["runc-1.1.5-spec.json", "crun-1.8.1-spec.json"])
def test_runc_and_crun_spec_output_imports(name: str) -> None:
    """`runc spec` (runc 1.1.5) / `crun spec` (crun 1.8.1), Debian 12, committed verbatim."""
    spec = _load(name)
    c = CgroupConfig.from_oci(spec["linux"]["resources"], spec["linux"].get("cgroupsPath"))
    validate_config(c)
    assert c.device_rules == [CgroupDeviceRule(False, "a", -1, -1, "rwm")]
    assert controllers.plan(c) == []


def test_moby_default_container_imports() -> None:
    c = CgroupConfig.from_oci(_load("moby-default-resources.json")["resources"])
    validate_config(c)
    assert controllers.plan(c) == []  # every resource is a no-op
    assert c.ignored == []
    assert c.device_rules[0] == CgroupDeviceRule(False, "a", -1, -1, "rwm")
    assert c.device_rules[-1] == CgroupDeviceRule(False, "c", 10, 229, "rwm")


def test_moby_limits_import_and_plan() -> None:
    c = CgroupConfig.from_oci(_load("moby-limits-resources.json")["resources"])
    validate_config(c)
    assert [(w.filename, w.value) for w in controllers.plan(c)] == [
        ("memory.swap.max", str(512 << 20)),
        ("memory.max", str(512 << 20)),
        ("cpu.max", "150000 100000"),
        ("pids.max", "100"),
        ("io.bfq.weight", "300"),
        ("io.max", "8:0 rbps=1048576"),
    ]


def test_podman_config_imports() -> None:
    d = _load("podman-4.3-resources.json")
    c = CgroupConfig.from_oci(d["resources"], d["cgroupsPath"])
    validate_config(c)
    assert [(w.filename, w.value) for w in controllers.plan(c)] == [("pids.max", "2048")]
    assert c.path == "/libpod_parent/libpod-0123456789abcdef"


EXAMPLES = _load("runtime-spec-config-linux-examples.json")["examples"]


@pytest.mark.parametrize("name", sorted(EXAMPLES))
def test_every_config_linux_md_example_imports(name: str) -> None:
    """Strict: imports, or names exactly what v2 cannot express; strict=False always imports."""
    ex = EXAMPLES[name]
    if ex["refused"]:
        with pytest.raises(UnsupportedSettings) as e:
            CgroupConfig.from_oci(ex["resources"])
        assert [s for s, _ in e.value.problems] == ex["refused"]
    else:
        validate_config(CgroupConfig.from_oci(ex["resources"]))
    c = CgroupConfig.from_oci(ex["resources"], strict=False)
    validate_config(c)
    refused = [s for s, _ in c.ignored if s in ex["refused"]]
    assert refused == ex["refused"]
    controllers.plan(c)


@pytest.mark.root
def test_setup_reports_what_from_oci_ignored(cg_root: Path) -> None:
    """The notes reach SetupReport.skipped (nothing silent), on any cgroup2 host."""
    from cgtest import rel

    from pelagos_bpf import setup_cgroup, teardown_cgroup

    r = {"memory": {"kernel": -1, "swappiness": 10}, "devices": [{"allow": False}]}
    cfg = CgroupConfig.from_oci(r, rel(cg_root, "notes"), strict=False)
    cg = setup_cgroup(cfg, None)
    try:
        skipped = dict(cg.report.skipped)
        assert "linux.resources.memory.kernel" in skipped
        assert "swappiness" in skipped["linux.resources.memory.swappiness"]
        assert cg.report.applied == ["device_rules"]
    finally:
        teardown_cgroup(cg)
