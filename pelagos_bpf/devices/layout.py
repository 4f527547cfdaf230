"""The device feature's declaration: programs and map layouts, per layout version.

Written once here; tests/test_layouts.py checks the structs of bpf/device.c against these
layouts, and the runtime (pelagos_bpf/feature.py) creates, finds and checks maps from them.
Version 3 has one program per owner (runtime, hook, NRI plugin) sharing the maps. Versions 2
(`pelagos_dev_v2`) and 1 (`pelagos_dev`) are earlier releases' layouts, with one program and no
owners: recognised so that this release migrates and tears down cgroups they set up (their
rule sets belong to the runtime, the only writer they knew), never loaded.
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
from ..owners import OWNER_IDS, Owner

VERSION = 3
SOURCE = "device"
ATTACH = AttachType.CGROUP_DEVICE
PROG_TYPE = ProgType.CGROUP_DEVICE
RULES_MAX = 262144  # shared by all cgroups: 13-20 entries per container with the defaults
RULES_ENV = "PELAGOS_BPF_RULES_MAX"  # node setting: dev_rules size, read at map creation
DENIALS_MAX = 65536  # distinct (cgroup, owner, device, access) counters, node-wide
AUDIT_ITEMS = 64  # distinct counters one cgroup may create (dev_cur.audit_cap spreads it on CPUs)

# Per owner: the C function and the kernel name (<= 15 chars, carries the layout version).
FUNCS: dict[Owner, str] = {
    "runtime": "pelagos_dev_rt",
    "hook": "pelagos_dev_hk",
    "nri": "pelagos_dev_nr",
}
PROG_NAMES: dict[Owner, str] = {o: f"pelagos_d{f[-2:]}_v{VERSION}" for o, f in FUNCS.items()}
OWNER_OF_FUNC: dict[str, Owner] = {f: o for o, f in FUNCS.items()}
SLOTS = 4  # dev_cur.gen[]: index = owner id (1..3), 0 unused

CUR = Layout(
    "dev_cur",
    (("cgroup", "Q"), ("gen", f"{SLOTS}I"), ("audit_cap", "I"), ("pad", "I")),
)
AUDIT = Layout("dev_audit", (("itemised", "Q"), ("overflow", "Q")))
KEY = Layout(
    "dev_key",
    (
        ("cgroup", "Q"),
        ("gen", "I"),
        ("owner", "H"),
        ("type", "H"),
        ("major", "I"),
        ("minor", "I"),
    ),
)
RULE = Layout("dev_rule", (("bit", "3I"), ("final", "I")))
INDEX = Layout("dev_index", (("pattern", "16Q"),))
VAL_SIZE = union_size(RULE, INDEX)  # struct dev_val: union { dev_rule; dev_index; }
DENY_KEY = Layout(
    "deny_key",
    (
        ("cgroup", "Q"),
        ("owner", "H"),
        ("type", "H"),
        ("major", "I"),
        ("minor", "I"),
        ("access", "I"),
    ),
)
DENY_VAL = Layout("u64", (("count", "Q"),))
assert set(OWNER_IDS.values()) == set(range(1, SLOTS))

LAYER = Layer(
    feature="devices",
    version=VERSION,
    source=SOURCE,
    progs=tuple(ProgSpec(FUNCS[o], PROG_NAMES[o], PROG_TYPE, ATTACH) for o in FUNCS),
    maps=(
        MapSpec("dev_cur", MapType.CGROUP_STORAGE, STORAGE_KEY.size, CUR.size),
        MapSpec("dev_audit", MapType.PERCPU_CGROUP_STORAGE, STORAGE_KEY.size, AUDIT.size),
        # No prealloc: 256 Ki preallocated 128-byte values would pin 32 MB per node.
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

LAYER_V2 = Layer(
    feature="devices",
    version=2,
    source=SOURCE,
    progs=(ProgSpec("pelagos_dev", "pelagos_dev_v2", PROG_TYPE, ATTACH),),
    maps=(
        MapSpec("dev_cur", MapType.CGROUP_STORAGE, STORAGE_KEY.size, 16),
        MapSpec("dev_rules", MapType.HASH, 24, 128, RULES_MAX, BPF_F_NO_PREALLOC, u64_prefix),
        MapSpec("dev_denials", MapType.HASH, 24, 8, 16384, BPF_F_NO_PREALLOC, u64_prefix),
    ),
)


def _v1_rules_cgroup(key: bytes) -> int:
    return u64_prefix(key) >> 1  # v1 dev_key.rs = cgroup id << 1 | generation (0 or 1)


LAYER_V1 = Layer(
    feature="devices",
    version=1,
    source=SOURCE,
    progs=(ProgSpec("pelagos_dev", "pelagos_dev", PROG_TYPE, ATTACH),),
    maps=(
        MapSpec("dev_cur", MapType.CGROUP_STORAGE, STORAGE_KEY.size, 8),
        MapSpec("dev_rules", MapType.HASH, 24, 128, RULES_MAX, BPF_F_NO_PREALLOC, _v1_rules_cgroup),
        MapSpec("dev_denials", MapType.HASH, 24, 8, 16384, BPF_F_NO_PREALLOC, u64_prefix),
    ),
)
