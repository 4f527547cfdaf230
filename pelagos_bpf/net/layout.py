"""The net feature's declaration: programs and map layouts (layout version 1).

Written once here; tests/test_layouts.py checks the structs of bpf/net.c against it. The layout
has not changed since the first release, so its programs keep their unsuffixed names; the next
layout change gets version 2 and names such as `pelagos_neteg_v2` (15 chars at most).
"""

from __future__ import annotations

from ..bpfabi import AttachType, MapType, ProgType
from ..layers import BPF_F_NO_PREALLOC, STORAGE_KEY, Layer, Layout, MapSpec, ProgSpec, u64_prefix

VERSION = 1
SOURCE = "net"
EGRESS = AttachType.CGROUP_INET_EGRESS
INGRESS = AttachType.CGROUP_INET_INGRESS
EG = ProgSpec("pelagos_net_eg", "pelagos_net_eg", ProgType.CGROUP_SKB, EGRESS)
IN = ProgSpec("pelagos_net_in", "pelagos_net_in", ProgType.CGROUP_SKB, INGRESS)
# Carrier "socket": classify once at socket creation, guard SO_PRIORITY; no per-packet program.
# Same layer (version 1) and maps: the layout of net_cfg is unchanged (one more flag bit), so
# programs attached by the previous release are still recognised and read as before.
SOCK_CREATE = AttachType.CGROUP_INET_SOCK_CREATE
SETSOCKOPT = AttachType.CGROUP_SETSOCKOPT
SK = ProgSpec("pelagos_net_sk", "pelagos_net_sk", ProgType.CGROUP_SOCK, SOCK_CREATE)
SO = ProgSpec("pelagos_net_so", "pelagos_net_so", ProgType.CGROUP_SOCKOPT, SETSOCKOPT)
PACKET_PROGS = (EG, IN)
SOCKET_PROGS = (SK, SO)
# The tc classifier of the "mark" carrier: no maps, loaded only when a mark filter is installed.
MARK_CLS = ProgSpec("pelagos_mark_cls", "pelagos_mark_cls", ProgType.SCHED_CLS, None)
PRIOS_MAX = 65536

CFG = Layout("net_cfg", (("classid", "I"), ("flags", "I"), ("prio_key", "Q")))
ACCT = Layout("net_acct", (("bytes", "Q"), ("packets", "Q")))
PRIO_KEY = Layout("prio_key", (("cgroup", "Q"), ("ifindex", "I"), ("pad", "I")))
PRIO_VAL = Layout("u32", (("prio", "I"),))

LAYER = Layer(
    feature="net",
    version=VERSION,
    source=SOURCE,
    progs=(*PACKET_PROGS, *SOCKET_PROGS),
    maps=(
        MapSpec("net_cfg", MapType.CGROUP_STORAGE, STORAGE_KEY.size, CFG.size),
        MapSpec("net_acct", MapType.PERCPU_CGROUP_STORAGE, STORAGE_KEY.size, ACCT.size),
        # No prealloc: 64 Ki preallocated entries would pin megabytes per process for a map
        # that holds a few entries per container.
        MapSpec(
            "net_prios",
            MapType.HASH,
            PRIO_KEY.size,
            PRIO_VAL.size,
            PRIOS_MAX,
            BPF_F_NO_PREALLOC,
            u64_prefix,
        ),
    ),
)
