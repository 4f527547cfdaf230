"""What setup_cgroup and update_cgroup decide for a scope before they touch anything (pure
but for reading the root's controller list and the node's pins).

A scope's settings take one of three routes, each reported (`Route.via`):
- "systemd": a unit property (properties.plan), or a program systemd attaches (BPFProgram=);
  systemd re-applies these itself at every daemon-reload, set-property and daemon-reexec;
- "file": written inside the delegated scope after start, for what systemd has no property
  for (hugetlb, rdma, cpu.max.burst...); reload-safe when systemd does not manage the file
  (Route.reload_safe), which strict setup requires;
- "scope": our program attached inside the delegated scope by us, when systemd cannot hold it
  (systemd < 249, or pins off); systemd leaves attachments it did not make alone across
  daemon-reload (tests/test_systemd_library.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .. import controllers
from ..cgroupfs import missing_controller_reason, read_text
from ..config import CgroupConfig
from ..controllers import Write
from ..convert import DEFAULT_CFS_PERIOD
from ..errors import ConfigError
from . import programs
from .driver import Scope
from .properties import INFINITY, USEC_PER_SEC, Plan, Route, plan

if TYPE_CHECKING:
    from ..net.plan import NetPlan


@dataclass
class ScopePlan:
    """Everything a scope start (or update) will do, decided before the first D-Bus write."""

    props: Plan
    writes: list[Write] = field(default_factory=list)  # the files whose controller exists
    problems: list[tuple[str, str]] = field(default_factory=list)  # cannot apply at all
    unsafe: list[tuple[str, str]] = field(default_factory=list)  # files systemd rewrites
    programs: list[tuple[str, str]] = field(default_factory=list)  # BPFProgram= entries
    routes: list[Route] = field(default_factory=list)


def _net_settings(cfg: CgroupConfig) -> list[str]:
    out = []
    if cfg.net_classid is not None:
        out.append("net_classid")
    if cfg.net_priorities:
        out.append("net_priorities")
    return out


def plan_scope(
    cfg: CgroupConfig,
    version: int,
    root: Path,
    net_plan: NetPlan | None,
    held: tuple[tuple[str, str], ...] | None = None,
) -> ScopePlan:
    """Routes for every setting of cfg on systemd `version`; the BPFProgram= entries when
    systemd can hold our programs (fetching or pinning the node's set). `held`: a running
    scope's BPFProgram= entries (an update: the programs are fixed, only maps change)."""
    props = plan(cfg, version)
    sp = ScopePlan(props, problems=[(u.setting, u.reason) for u in controllers.unsupported(cfg)])
    available = set(read_text(root / "cgroup.controllers").split()) if props.files else set()
    for w in props.files:
        if w.controller in available:
            sp.writes.append(w)
        elif w.setting not in (s for s, _ in sp.problems):
            sp.problems.append((w.setting, missing_controller_reason(w.controller, root)))
    skipped = {s for s, _ in sp.problems}
    sp.routes = [r for r in props.routes if r.setting not in skipped]
    sp.unsafe = [
        (r.setting, f"systemd {version} rewrites it at every daemon-reload: {r.what}")
        for r in sp.routes
        if not r.reload_safe
    ]
    if held is not None:
        _held_routes(cfg, held, sp)
        return sp
    why_not = programs.why_not_systemd(version)
    if cfg.device_rules:
        sp.routes.append(_bpf_route("device_rules", why_not, sp, lambda: [programs.device_entry()]))
    if net_plan is not None:
        carrier = net_plan.carrier
        for setting in _net_settings(cfg):
            sp.routes.append(
                _bpf_route(setting, why_not, sp, lambda: programs.net_entries(carrier))
            )
    return sp


def _held_routes(cfg: CgroupConfig, held: tuple[tuple[str, str], ...], sp: ScopePlan) -> None:
    """An update's BPF routes: map writes into what systemd attached at start, else ours in
    the scope (attached there now if it was not yet)."""
    wanted = [(s, programs.NET_KINDS) for s in _net_settings(cfg)]
    if cfg.device_rules:
        wanted.insert(0, ("device_rules", frozenset({"device"})))
    for setting, kinds in wanted:
        mine = [f"{k}:{p}" for k, p in held if k in kinds]
        sp.routes.append(
            Route(setting, "systemd", "map writes; BPFProgram=" + ",".join(mine), True)
            if mine
            else Route(setting, "scope", "in the delegated scope (systemd holds none)", True)
        )


def burst_before_quota(cgroup: Path, cfg: CgroupConfig, sp: ScopePlan) -> bool:
    """Whether cpu.max.burst must be lowered (to 0) before systemd writes a new cpu.max: the
    kernel refuses a quota below the burst, and systemd only logs that failure, so the quota
    would silently stay. ConfigError when the update lowers the quota under a burst it does
    not change."""
    props = {p.name: p.value for p in sp.props.properties}
    per_sec = props.get("CPUQuotaPerSecUSec")
    burst_file = cgroup / "cpu.max.burst"
    if per_sec is None or per_sec == INFINITY or not burst_file.exists():
        return False
    period = props.get("CPUQuotaPeriodUSec", DEFAULT_CFS_PERIOD)
    quota = per_sec * period // USEC_PER_SEC
    current = int(read_text(burst_file).strip() or 0)
    if current <= quota:
        return False
    if cfg.cpu_burst is None:
        raise ConfigError(
            "cpu_quota",
            cfg.cpu_quota,
            f"systemd would write cpu.max quota {quota} below the scope's cpu.max.burst "
            f"{current}, which the kernel refuses: give cpu_burst in the same update",
        )
    return True


def _bpf_route(
    setting: str,
    why_not: str | None,
    sp: ScopePlan,
    entries: Callable[[], list[tuple[str, str]]],
) -> Route:
    """The route of a BPF setting; adds the BPFProgram= entries it needs to sp.programs."""
    if why_not is not None:
        return Route(setting, "scope", f"attached in the delegated scope ({why_not})", True)
    got = [e for e in entries() if e not in sp.programs]
    sp.programs += got
    held = [e for e in sp.programs if (e[0] == "device") == (setting == "device_rules")]
    return Route(setting, "systemd", "BPFProgram=" + ",".join(f"{k}:{p}" for k, p in held), True)


def check_carrier(scope: Scope, carrier: str | None) -> None:
    """An update's carrier must keep the net programs systemd attached at start: BPFProgram is
    read-only on a running unit, and a switch would detach systemd's attachments behind its
    back (systemd would re-attach them at the next daemon-reload)."""
    held = {k for k, _ in scope.bpf_programs} & programs.NET_KINDS
    if carrier is None or not held:
        return
    wanted = programs.net_kinds_for("socket" if carrier == "socket" else "priority")
    if held != wanted:
        raise ConfigError(
            "net_carrier",
            carrier,
            f"systemd holds this scope's net programs ({', '.join(sorted(held))}) for its life "
            "(BPFProgram= is read-only on a running unit): a carrier needing other programs "
            "takes a new scope",
        )
