"""The device feature's declaration: programs and map layouts, per layout version.

Written once here; tests/test_layouts.py checks the structs of bpf/device.c against these
layouts, and the runtime (pelagos_bpf/feature.py) creates, finds and checks maps from them.
Version 1 is the first release's layout (program `pelagos_dev`): recognised so that a newer
release can migrate and tear down cgroups an older one set up, never loaded.
"""

from __future__ import annotations

from ..bpfabi import AttachType, MapType, ProgType
from ..layers import (
    BPF_F_NO_PREALLOC,
    STORAGE_KEY,
    Layer,
    Layout,
    MapSpec,
    ProgSpec,
    u64_prefix,
    union_size,
)

VERSION = 2
SOURCE = "device"
FUNC = "pelagos_dev"
PROG_NAME = "pelagos_dev_v2"
ATTACH = AttachType.CGROUP_DEVICE
PROG_TYPE = ProgType.CGROUP_DEVICE
RULES_MAX = 262144  # shared by all cgroups: 13-20 entries per container (~13,000-20,000)
RULES_ENV = "PELAGOS_BPF_RULES_MAX"  # node setting: dev_rules size, read at map creation
DENIALS_MAX = 16384

CUR = Layout("dev_cur", (("cgroup", "Q"), ("gen", "I"), ("pad", "I")))
KEY = Layout(
    "dev_key", (("cgroup", "Q"), ("gen", "I"), ("type", "I"), ("major", "I"), ("minor", "I"))
)
RULE = Layout("dev_rule", (("bit", "3I"), ("final", "I")))
INDEX = Layout("dev_index", (("pattern", "16Q"),))
VAL_SIZE = union_size(RULE, INDEX)  # struct dev_val: union { dev_rule; dev_index; }
DENY_KEY = Layout(
    "deny_key", (("cgroup", "Q"), ("type", "I"), ("major", "I"), ("minor", "I"), ("access", "I"))
)
DENY_VAL = Layout("u64", (("count", "Q"),))

LAYER = Layer(
    feature="devices",
    version=VERSION,
    source=SOURCE,
    progs=(ProgSpec(FUNC, PROG_NAME, ProgType.CGROUP_DEVICE, ATTACH),),
    maps=(
        MapSpec("dev_cur", MapType.CGROUP_STORAGE, STORAGE_KEY.size, CUR.size),
        # No prealloc: 64 Ki preallocated 128-byte values would pin 8 MB per process.
        MapSpec(
            "dev_rules",
            MapType.HASH,
            KEY.size,
            VAL_SIZE,
            RULES_MAX,
            BPF_F_NO_PREALLOC,
            u64_prefix,
            RULES_ENV,
        ),
        MapSpec(
            "dev_denials",
            MapType.HASH,
            DENY_KEY.size,
            DENY_VAL.size,
            DENIALS_MAX,
            BPF_F_NO_PREALLOC,
            u64_prefix,
        ),
    ),
)


def _v1_rules_cgroup(key: bytes) -> int:
    return u64_prefix(key) >> 1  # v1 dev_key.rs = cgroup id << 1 | generation (0 or 1)


LAYER_V1 = Layer(
    feature="devices",
    version=1,
    source=SOURCE,
    progs=(ProgSpec(FUNC, "pelagos_dev", ProgType.CGROUP_DEVICE, ATTACH),),
    maps=(
        MapSpec("dev_cur", MapType.CGROUP_STORAGE, STORAGE_KEY.size, 8),
        MapSpec("dev_rules", MapType.HASH, 24, 128, RULES_MAX, BPF_F_NO_PREALLOC, _v1_rules_cgroup),
        MapSpec("dev_denials", MapType.HASH, 24, 8, DENIALS_MAX, BPF_F_NO_PREALLOC, u64_prefix),
    ),
)
