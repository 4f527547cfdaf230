"""What the BPF features have in force on a cgroup, read back from the kernel, for `inspect`.

This is the CLI's one adapter to the features' readers: `device_state` and `net_state` return
plain dicts (JSON-ready) or None when nothing of ours is attached. When the features grow
richer readers (`devices.read_state(cg)`, `net.read_state(cg)`), only this module changes.
"""

from __future__ import annotations

import os
from typing import Any

from ..cgroup import Cgroup
from ..config import CgroupDeviceRule
from ..devices import encode as enc
from ..devices.encode import ANY, BIT_SLOT, TYPE_NAMES


def rules_from_table(table: dict[enc.Pattern, enc.Entry]) -> list[tuple[int, CgroupDeviceRule]]:
    """The rules in force, as (index in the original list, rule), from a stored rule table.

    Each winner in the table is `(rule index + 1) << 1 | allow`; a rule's own pattern is the
    most general one it appears in (resolve() only copies wildcard winners into narrower
    entries). A rule shows the access bits it still decides; one overridden in every bit is
    gone, as it is for the kernel. A kind 'a' rule is stored under both 'b' and 'c'."""
    seen: dict[int, dict[enc.Pattern, str]] = {}
    for pattern, (wins, _final) in table.items():
        for bit, slot in BIT_SLOT.items():
            w = wins[slot]
            if w:
                bits = seen.setdefault(w, {}).setdefault(pattern, "")
                seen[w][pattern] = bits + bit
    out: list[tuple[int, CgroupDeviceRule]] = []
    for w in sorted(seen):
        pats = seen[w]
        wild = max((ma == ANY) + (mi == ANY) for _t, ma, mi in pats)
        own = {p: bits for p, bits in pats.items() if (p[1] == ANY) + (p[2] == ANY) == wild}
        by_num: dict[tuple[int, int, str], list[int]] = {}
        for (t, ma, mi), bits in own.items():
            acc = "".join(ch for ch in "rwm" if ch in bits)
            by_num.setdefault((ma, mi, acc), []).append(t)
        for (ma, mi, acc), types in by_num.items():
            kind = "a" if len(types) == 2 else TYPE_NAMES[types[0]]
            num = (-1 if ma == ANY else ma, -1 if mi == ANY else mi)
            out.append(((w >> 1) - 1, CgroupDeviceRule(bool(w & 1), kind, *num, acc)))
    return out


def _programs(cg: Cgroup, attach_type: int, name: str, prog_type: int) -> list[dict[str, Any]]:
    from .. import progfind

    fd = cg.open_fd()
    try:
        found = progfind.open_attached(fd, attach_type, name, prog_type)
    finally:
        os.close(fd)
    for pfd, _ in found:
        os.close(pfd)
    return [{"id": info.id, "tag": info.tag, "name": info.name} for _, info in found]


def device_state(cg: Cgroup) -> dict[str, Any] | None:
    """{"programs": [{id, tag, name}], "rules": [{index, rule}]}; None: no device program."""
    from ..devices import program as dp

    progs = _programs(cg, dp.ATTACH, dp.PROG_NAME, dp.ProgType.CGROUP_DEVICE)
    if not progs:
        return None
    table = dp.ruleset_table(cg.path, cg.id) or {}
    rules = [{"index": i, "rule": str(r)} for i, r in rules_from_table(table)]
    return {"programs": progs, "rules": rules}


def net_state(cg: Cgroup) -> dict[str, Any] | None:
    """{"programs", "classid", "classid_hex", "carrier", "priorities": [{ifindex, priority}]};
    None: no net program attached."""
    from .. import net
    from ..net import program as npg
    from ..net.tc import classid_str

    progs = [
        {**p, "attach": where}
        for where, atype, name in (
            ("egress", npg.EGRESS, npg.EG_PROG),
            ("ingress", npg.INGRESS, npg.IN_PROG),
        )
        for p in _programs(cg, atype, name, npg.ProgType.CGROUP_SKB)
    ]
    plan = net.read_config(cg)
    if not progs and plan is None:
        return None
    return {
        "programs": progs,
        "classid": plan.classid if plan else None,
        "classid_tc": classid_str(plan.classid) if plan and plan.classid else None,
        "carrier": plan.carrier if plan else None,
        "priorities": [
            {"ifindex": idx, "priority": prio}
            for _n, idx, prio in (plan.priorities if plan else ())
        ],
    }
