"""net_cls / net_prio semantics on cgroup v2 through cgroup_skb programs, plus IP accounting.

- `net_classid` (major<<16|minor): packets sent by the cgroup's sockets carry the classid in
  skb->priority (HTB classifies priority == classid directly) or, with the "mark" carrier, in
  skb->mark (pair with `tc.add_fw_filter` or nft/iptables `meta mark`).
- `net_priorities` [(ifname, prio)]: per egress interface priority, written only while the
  packet's priority is still 0 (net_prio semantics; an app's SO_PRIORITY is kept). Names are
  resolved once, in the netns of the pid given to setup; an interface created later is not
  covered until `update_net` with a fresh `resolve_net`.
- Accounting: IPv4/IPv6 bytes and packets per cgroup, egress and ingress (`read_net_stats`).

Importing this package is cheap: no bcc, no pyroute2 (tc.py imports nothing from pyroute2
itself: its helpers take an IPRoute the caller made).
"""

from __future__ import annotations

from .plan import CARRIERS, NetPlan, build_plan, choose_carrier, validate_net
from .program import (
    PROGRAMS,
    attach_net,
    detach_net,
    read_config,
    read_net_stats,
    shared_programs,
    unload_shared,
    update_net,
)
from .resolve import interface_table, resolve_net

__all__ = [
    "CARRIERS",
    "PROGRAMS",
    "NetPlan",
    "attach_net",
    "build_plan",
    "choose_carrier",
    "detach_net",
    "interface_table",
    "read_config",
    "read_net_stats",
    "resolve_net",
    "shared_programs",
    "unload_shared",
    "update_net",
    "validate_net",
]
