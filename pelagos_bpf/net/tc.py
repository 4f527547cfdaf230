"""Small pyroute2 helpers for the qdisc side of net classification.

The egress program only labels packets (skb->priority or skb->mark); a classful qdisc on the
device does the shaping. These helpers install the minimal HTB tree that honours the labels and
read the per-class counters, for tests, the demo and operators who want a starting point.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from typing import Any

from .layout import MARK_CLS
from .program import mark_classifier

ETH_P_ALL = 0x0003


def classid_str(classid: int) -> str:
    """`major:minor` in tc's hex notation (0x00010010 -> "1:10")."""
    return f"{classid >> 16:x}:{classid & 0xFFFF:x}"


def install_htb(
    ipr: Any,
    index: int,
    *,
    major: int = 1,
    minors: Iterable[int] = (0x10, 0x20),
    default_minor: int = 0x20,
    rate: str = "1gbit",
    ceil: str = "10gbit",
) -> None:
    """Root HTB `major:` with parent class `major:1` and one leaf class per minor.

    HTB classifies a packet whose skb->priority equals `major:minor` straight into that class
    (no filter needed), which is what the priority carrier relies on. Unclassified traffic goes
    to `default_minor`. Rates are generous: the point is classification, not shaping.
    """
    handle = major << 16
    ipr.tc("add", "htb", index=index, handle=handle, default=default_minor)
    ipr.tc("add-class", "htb", index=index, handle=handle | 1, parent=handle, rate=ceil, ceil=ceil)
    for minor in minors:
        ipr.tc(
            "add-class",
            "htb",
            index=index,
            handle=handle | minor,
            parent=handle | 1,
            rate=rate,
            ceil=ceil,
        )


def add_mark_filter(ipr: Any, index: int, *, parent: int = 0x10000, prio: int = 1) -> None:
    """One cls_bpf filter that classifies every packet by its skb->mark read as a classid.

    Same effect as a bare `fw` filter, but works on kernels without CONFIG_NET_CLS_FW (such as
    this project's host); needs CONFIG_NET_CLS_BPF. A mark of 0 or of another qdisc's major
    falls through to the default class.
    """
    ipr.tc(
        "add-filter",
        "bpf",
        index=index,
        parent=parent,
        prio=prio,
        protocol=ETH_P_ALL,
        fd=mark_classifier(),
        name=MARK_CLS.name,
    )


def add_fw_filter(ipr: Any, index: int, *, parent: int = 0x10000, prio: int = 1) -> None:
    """A bare `fw` filter (no handle, no options): classifies by skb->mark read as a classid.

    `tc filter add dev X parent 1: protocol all prio 1 fw`. cls_fw only takes this "old
    method" when the request has no TCA_OPTIONS at all, which `ipr.tc("add-filter", "fw")`
    always sends (EINVAL), so the message is built by hand. Needs CONFIG_NET_CLS_FW
    (ENOENT without it: use add_mark_filter).
    """
    from pyroute2.netlink import NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST
    from pyroute2.netlink.rtnl import RTM_NEWTFILTER
    from pyroute2.netlink.rtnl.tcmsg import tcmsg

    msg = tcmsg()
    msg["family"] = socket.AF_UNSPEC
    msg["index"] = index
    msg["handle"] = 0
    msg["parent"] = parent
    msg["info"] = (prio << 16) | socket.htons(ETH_P_ALL)
    msg["attrs"] = [("TCA_KIND", "fw")]
    msg["header"]["type"] = RTM_NEWTFILTER
    msg["header"]["flags"] = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL
    # (pyroute2 0.9.7's sync nlm_request() raises KeyError 'nlm_generator'; the batch call works)
    ipr.nlm_request_batch([msg])


def class_counters(ipr: Any, index: int) -> dict[int, tuple[int, int]]:
    """{classid: (bytes, packets)} for every class on a device, from TCA_STATS2 basic stats."""
    out: dict[int, tuple[int, int]] = {}
    for msg in ipr.get_classes(index=index):
        stats = msg.get_attr("TCA_STATS2")
        basic = stats.get_attr("TCA_STATS_BASIC") if stats is not None else None
        if basic is None:
            continue
        out[msg["handle"]] = (int(basic["bytes"]), int(basic["packets"]))
    return out
