"""What the BPF features have in force on a cgroup, read back from the kernel, for `inspect`.

The CLI's one adapter to the features' readers (`devices.read_state`, `net.read_state`): it
turns them into plain JSON-ready dicts, or None when nothing of ours is attached.
"""

from __future__ import annotations

from typing import Any

from ..bpfabi import AttachType
from ..cgroup import Cgroup
from ..devices import program as devices_program
from ..feature import Feature
from ..net import program as net_program
from ..net.tc import classid_str

_ATTACH_NAMES = {
    AttachType.CGROUP_DEVICE: "device",
    AttachType.CGROUP_INET_EGRESS: "egress",
    AttachType.CGROUP_INET_INGRESS: "ingress",
    AttachType.CGROUP_INET_SOCK_CREATE: "sock_create",
    AttachType.CGROUP_SETSOCKOPT: "setsockopt",
}


def _programs(feature: Feature, cg: Cgroup) -> list[dict[str, Any]]:
    """{id, tag, name, attach, version} of every program of `feature` attached at cg."""
    out: list[dict[str, Any]] = []
    with feature.find_at(cg) as groups:
        for g in groups:
            for func, prog_id in g.ids.items():
                spec = g.layer.prog(func)
                attach = None if spec.attach_type is None else _ATTACH_NAMES.get(spec.attach_type)
                out.append(
                    {
                        "id": prog_id,
                        "tag": g.tags.get(func),
                        "name": spec.name,
                        "attach": attach,
                        "version": g.version,
                    }
                )
    return out


def device_state(cg: Cgroup) -> dict[str, Any] | None:
    """programs, and per owner: trusted, installed, generation and the rules in force; None: no
    program of ours."""
    st = devices_program.read_state(cg)
    if not st.attached:
        return None
    return {
        "programs": _programs(devices_program.FEATURE, cg),
        "owners": {
            o.owner: {
                "program": o.program_id,
                "trusted": o.trusted,
                "installed": o.installed,
                "generation": o.generation,
                "rules": [{"index": i, "rule": str(r)} for i, r in enumerate(o.rules)],
            }
            for o in st.owners
        },
        "legacy_programs": list(st.legacy_program_ids),
        "denials_not_itemised": st.denials_not_itemised,
    }


def net_state(cg: Cgroup) -> dict[str, Any] | None:
    """programs, classid, carrier, priorities [{ifindex, ifname, priority}]; None: no program."""
    st = net_program.read_state(cg)
    if not st.attached:
        return None
    return {
        "programs": _programs(net_program.FEATURE, cg),
        "trusted": st.trusted,
        "classid": st.classid or None,
        "classid_tc": classid_str(st.classid) if st.classid else None,
        "carrier": st.carrier,
        "priorities": [
            {"ifindex": idx, "ifname": name, "priority": prio} for idx, name, prio in st.priorities
        ],
    }
