"""Pure semantics of net_classid / net_priorities: validation, carrier choice, the plan.

No I/O here, so every rule is unit-tested directly; resolve.py feeds in the interface table of
the target netns and program.py turns a plan into map values.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError

U32_MAX = 0xFFFFFFFF
IFNAMSIZ = 16
CARRIERS = ("auto", "priority", "mark", "socket")

# Flag bits of struct net_cfg.flags in bpf/net.c.
F_MARK = 1
F_PRIOS = 2
F_SOCKET = 4
SOCKET_NO_PRIOS = (
    "a socket is classified once, at creation, before it has an egress interface: "
    "net_priorities need a per-packet carrier ('mark' or 'auto')"
)


def _u32(setting: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(setting, value, "must be an integer")
    if not 0 <= value <= U32_MAX:
        raise ConfigError(setting, value, f"must be 0..{U32_MAX:#x} (u32)")
    return value


def validate_ifname(setting: str, name: Any) -> None:
    """Linux dev_valid_name: 1..15 bytes, not '.'/'..', no '/', ':', whitespace or control
    characters; UTF-8 encodable (a lone surrogate or a NUL is a ConfigError, not a crash)."""
    if not isinstance(name, str):
        raise ConfigError(setting, name, "interface name must be a string")
    try:
        raw = name.encode()
    except UnicodeEncodeError:
        raise ConfigError(setting, name, "interface name is not valid UTF-8") from None
    if not raw or len(raw) >= IFNAMSIZ:
        raise ConfigError(setting, name, f"interface name must be 1..{IFNAMSIZ - 1} bytes")
    if any(c < 0x21 or c == 0x7F for c in raw) or any(c.isspace() for c in name):
        raise ConfigError(setting, name, "interface name has a NUL, control or space character")
    if name in (".", "..") or any(c in name for c in "/:"):
        raise ConfigError(setting, name, "not a valid interface name")


def validate_classid(classid: Any) -> None:
    """None/0 = no class; else major<<16|minor with a real major (1..0xfffe) and minor (!= 0).

    Why stricter than net_cls (any u32): a major of 0 is read by HTB as a plain priority and
    never reaches a class, 0xffff is the ingress/root major, and minor 0 names the qdisc itself
    (HTB sends such packets to its unshaped direct queue). Each would be a silent no-op.
    """
    if classid is None:
        return
    v = _u32("net_classid", classid)
    if v == 0:
        return
    major, minor = v >> 16, v & 0xFFFF
    if major in (0, 0xFFFF):
        raise ConfigError(
            "net_classid", classid, f"major {major:#x} is not a qdisc handle (major<<16|minor)"
        )
    if minor == 0:
        raise ConfigError(
            "net_classid", classid, f"minor 0 names the qdisc {major:x}:, not a class"
        )


PRIO_MAX = 0xFFFF  # a plain priority; above, skb->priority names a class major:minor


def validate_priority(setting: str, prio: Any) -> int:
    """A u32 priority that does not name a qdisc itself.

    Why: a priority above 0xffff reaches HTB as a classid (major:minor). Library callers are
    trusted to pick classes (pod input passes the admin policy first, pelagos_bpf.policy), but
    a value that names no class is refused as validate_classid refuses it: minor 0 is the qdisc
    `major:` itself, which HTB sends to its unshaped direct queue, and major 0xffff is the
    root/ingress handle.
    """
    v = _u32(setting, prio)
    major, minor = v >> 16, v & 0xFFFF
    if major == 0xFFFF:
        raise ConfigError(
            setting, prio, f"priority {v:#x}: major 0xffff is the root/ingress handle"
        )
    if major and not minor:
        raise ConfigError(
            setting,
            prio,
            f"priority {v:#x} names the qdisc {major:x}: itself (HTB's unshaped direct queue), "
            "not a class",
        )
    return v


def validate_priorities(priorities: Any) -> None:
    """A list of (ifname, prio) pairs with valid, distinct names and priorities
    (validate_priority)."""
    if not isinstance(priorities, list | tuple):
        raise ConfigError("net_priorities", priorities, "must be a list of (ifname, prio)")
    seen: dict[str, int] = {}
    for i, p in enumerate(priorities):
        setting = f"net_priorities[{i}]"
        if not isinstance(p, list | tuple) or len(p) != 2:
            raise ConfigError(setting, p, "must be an (ifname, prio) pair")
        name, prio = p
        validate_ifname(setting, name)
        validate_priority(setting, prio)
        if name in seen:
            raise ConfigError(
                setting, p, f"interface {name!r} already in net_priorities[{seen[name]}]"
            )
        seen[name] = i


def validate_carrier(carrier: Any, has_priorities: bool) -> None:
    if carrier not in CARRIERS:
        raise ConfigError("net_carrier", carrier, f"must be one of {', '.join(CARRIERS)}")
    if carrier == "priority" and has_priorities:
        raise ConfigError(
            "net_carrier",
            carrier,
            "net_priorities also write skb->priority; carry net_classid in skb->mark "
            "('mark' or 'auto')",
        )
    if carrier == "socket" and has_priorities:
        raise ConfigError("net_carrier", carrier, SOCKET_NO_PRIOS)


def validate_net(classid: Any, priorities: Any, carrier: Any = "auto") -> None:
    """Raise ConfigError naming the first bad setting; no side effects.

    This module imports nothing of the library but errors, so validate.py can call it without
    an import cycle.
    """
    validate_classid(classid)
    validate_priorities(priorities if priorities is not None else [])
    validate_carrier(carrier, bool(priorities))


def carried_in(carrier: str | None) -> str:
    """Where a carrier puts the classid, for messages ("skb->priority", ...)."""
    if carrier == "socket":
        return "sk->sk_priority (set at socket creation)"
    return f"skb->{carrier}"


def choose_carrier(carrier: str, has_priorities: bool) -> str:
    """'auto' carries the classid in skb->priority unless priorities need that field."""
    if carrier == "auto":
        return "mark" if has_priorities else "priority"
    return carrier


@dataclass(frozen=True)
class NetPlan:
    """What attach_net writes for one cgroup: resolved, validated, ready for the maps.

    `priorities` holds (ifname, ifindex, prio); ifindexes were resolved once, in the netns whose
    inode is `netns_inode` (an interface created later is not covered until update_net).
    """

    classid: int = 0
    carrier: str = "priority"
    priorities: tuple[tuple[str, int, int], ...] = ()
    netns_inode: int | None = None

    @property
    def flags(self) -> int:
        carrier = {"mark": F_MARK, "socket": F_SOCKET}.get(self.carrier, 0)
        return carrier | (F_PRIOS if self.priorities else 0)

    @property
    def empty(self) -> bool:
        """Nothing to classify (the programs then only count traffic)."""
        return self.classid == 0 and not self.priorities

    def prio_by_ifindex(self) -> dict[int, int]:
        return {idx: prio for _, idx, prio in self.priorities}

    def __str__(self) -> str:
        """As an operator writes it (logs): "classid 1:10, carrier priority, priorities -"."""
        prios = ", ".join(f"{name or idx}={prio:#x}" for name, idx, prio in self.priorities)
        classid = f"{self.classid >> 16:x}:{self.classid & 0xFFFF:x}" if self.classid else "-"
        return f"classid {classid}, carrier {self.carrier}, priorities {prios or '-'}"


def build_plan(
    classid: int | None,
    priorities: Sequence[tuple[str, int]] | None,
    carrier: str,
    interfaces: Mapping[str, int],
    where: str = "this network namespace",
    netns_inode: int | None = None,
) -> NetPlan:
    """Validate and resolve names through `interfaces` ({ifname: ifindex}); pure."""
    prios = list(priorities or [])
    validate_net(classid, prios, carrier)
    resolved = []
    for i, (name, prio) in enumerate(prios):
        if name not in interfaces:
            known = ", ".join(sorted(interfaces)) or "none"
            raise ConfigError(
                f"net_priorities[{i}]",
                (name, prio),
                f"no interface {name!r} in {where} (has: {known})",
            )
        resolved.append((name, interfaces[name], prio))
    return NetPlan(
        classid=classid or 0,
        carrier=choose_carrier(carrier, bool(prios)),
        priorities=tuple(resolved),
        netns_inode=netns_inode,
    )
