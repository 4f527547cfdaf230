"""net_cls / net_prio semantics on cgroup v2 through cgroup BPF programs, plus IP accounting.

Settings (CgroupConfig.net_classid / net_priorities / net_carrier):

- `net_classid` (major<<16|minor, e.g. 0x00010010 = 1:10): packets sent by sockets of the
  cgroup and its descendants carry the classid. Carrier "priority" (default) writes
  skb->priority, which HTB (and other classful qdiscs) map straight to class major:minor when
  the major is the qdisc's handle: no filter needed. Carrier "mark" writes skb->mark instead;
  pair it with `tc.add_mark_filter` (one cls_bpf filter: mark read as a classid, the bare-`fw`
  equivalent, works without CONFIG_NET_CLS_FW), `tc.add_fw_filter`, or an nft `netdev egress`
  rule. Not iptables/nft POSTROUTING: the kernel runs those before the cgroup egress hook.
  "auto" = "mark" when net_priorities is set (both cannot share skb->priority), else
  "priority" ("socket" is chosen only by name). The priority carrier replaces plain
  SO_PRIORITY values (0..0xffff, not classids) but keeps a classid-valued one; the mark
  carrier keeps a non-zero mark (SO_MARK, netfilter).
- Carrier "socket" (opt-in, never chosen by "auto"): no per-packet program at all (a cgroup_skb
  egress program, even an empty one, adds CPU to every packet, and the packet carriers' own work
  adds more: bench/bench_net.py prints both; this one costs nothing per packet). The classid goes
  into the socket's priority once, when an AF_INET/AF_INET6 socket is created by a process of the
  cgroup or a descendant (cgroup/sock_create); the kernel copies it into skb->priority of every
  packet the socket sends, so HTB picks the class exactly as with "priority". A cgroup/setsockopt
  program guards it: a plain SO_PRIORITY (major 0) on a classified socket is swallowed (the call
  succeeds, the socket keeps its class; rewriting the value instead would fail with EPERM for apps
  without CAP_NET_ADMIN), a classid-valued one goes to the kernel as usual. What differs from the
  packet carriers: a classid update reaches sockets created AFTER it only (existing sockets keep
  their class; v1 net_cls updated them: a classid write rewrote the sockets its tasks held); an IPv4
  socket's IP_TOS makes the kernel reset its priority (rt_tos2priority), which takes it out of its
  class (known gap, tested); no net_priorities (ConfigError naming net_carrier: they need each
  packet's egress interface); no accounting (`read_net_stats` returns NOT_ACCOUNTED,
  `{"not_accounted": 1}`, never zeros; an ancestor with a packet carrier still counts the subtree).
  Nesting works across carriers: the nearest cgroup with a classid wins. A carrier switch attaches
  the new carrier's programs before it detaches the old ones; if the switching process dies in
  between, the next update or attach attaches only what is missing and detaches what its carrier
  does not use (tested), and detach_net removes both.
- Every carrier: a TCP connection's last ACK, when the kernel sends it for a FIN_WAIT2
  timewait socket (the app closed first), leaves from the kernel's control socket without the
  socket's priority and outside the cgroup, so it lands in the default class (the same with a
  plain SO_PRIORITY and no program at all; tests/net_helpers.py TcpSend.wait_eof).
- `net_priorities` [(ifname, prio)]: per egress interface priority, written only while the
  packet's priority is still 0 (net_prio semantics: an app's SO_PRIORITY is kept).
- Nesting: a child cgroup's program runs before its parent's and the parent keeps what the
  child set, so the nearest cgroup with a setting wins (as with net_cls); a descendant without
  its own settings inherits the ancestor's.
- Interface names resolve ONCE, to ifindexes in the netns of the pid given to setup_cgroup
  (ours when None); an unknown name is a ConfigError naming net_priorities[i] before anything
  is created. An interface created (or re-created, new ifindex) later is not covered: call
  `update_cgroup` (or `update_net(cg, resolve_net(...))`) again. Processes of the cgroup in
  another netns are matched by ifindex too, which there may name another interface.
- Updates change what they name: `update_cgroup` with only net_priorities keeps the classid
  and the carrier, with only net_classid keeps the priorities and the carrier.
- Sockets created outside the cgroup and passed in are not classified, by any carrier: all
  go by the cgroup the socket was created in.
- Switching carriers is an update (`update_net(..., carrier=...)`, `update_cgroup` with
  net_carrier): the new carrier's programs are attached first, then the old ones detached.
- Labels act on the devices of the sender's netns: crossing into another netns (veth) clears
  skb->mark, and forwarding resets skb->priority, like net_cls whose socket lookup fails for
  forwarded packets. Shape a container's traffic on its own eth0 (or use the host-side veth
  with other means).
- Accounting (`read_net_stats`): IPv4/IPv6 egress and ingress bytes and packets of the
  cgroup's sockets, subtree included. Bytes are IP-level (IP header + payload, no link layer;
  a GSO/GRO skb counts its headers once); packets count wire segments (gso_segs).

Cost: one egress, one ingress, one sock_create and one setsockopt program (plus their maps)
are loaded once per process from the packaged bytecode (or fetched from the node's pins); a
container start is 2 PROG_ATTACH + map writes (egress + ingress, or sock_create + setsockopt),
a live update is map writes. `PROGRAMS` lists the programs the package build compiles.

Importing this package is cheap: no pyroute2 (tc.py takes its IPRoute from the caller), and the
names below load on first use (PEP 562), so the hook's input checks (`plan`) never load the BPF
runtime (`program`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .. import lazy

if TYPE_CHECKING:
    from .plan import CARRIERS, NetPlan, build_plan, choose_carrier, validate_net
    from .program import (
        PROGRAMS,
        NetState,
        attach_net,
        detach_net,
        read_config,
        read_net_stats,
        read_state,
        shared_programs,
        update_net,
    )
    from .resolve import interface_table, resolve_net

_LAZY = {
    **dict.fromkeys(
        ("CARRIERS", "NetPlan", "build_plan", "choose_carrier", "validate_net"), "plan"
    ),
    **dict.fromkeys(
        (
            "PROGRAMS",
            "NetState",
            "attach_net",
            "detach_net",
            "read_config",
            "read_net_stats",
            "read_state",
            "shared_programs",
            "update_net",
        ),
        "program",
    ),
    **dict.fromkeys(("interface_table", "resolve_net"), "resolve"),
}

__all__ = [
    "CARRIERS",
    "PROGRAMS",
    "NetPlan",
    "NetState",
    "attach_net",
    "build_plan",
    "choose_carrier",
    "detach_net",
    "interface_table",
    "read_config",
    "read_net_stats",
    "read_state",
    "resolve_net",
    "shared_programs",
    "update_net",
    "validate_net",
]


def __getattr__(name: str) -> Any:
    return lazy.load(__name__, globals(), _LAZY, name)


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
