"""Garbage collection: reclaim what dead cgroups and crashed setups left behind.

Why it is needed: the maps are shared by every container and keyed by cgroup id. An entry
outlives its cgroup when someone else removes the cgroup (a runtime, an admin), when the
program was detached from inside before teardown, or when a process dies mid-setup. The maps
are bounded (a node setting sizes the rule map), so leaks would eventually block every new
container.

`collect()` deletes, in every map of every program of ours the kernel holds (any version, any
process), the entries whose cgroup no longer exists, and the stale rule-set generations of
live cgroups that killed writers left (never the current or the previous one, never while a
writer holds the cgroup's lock). The dead cgroups' part also runs by itself when a rule map is
full (then the write is retried once); all of it from `pelagos-bpf gc` and the agent's
periodic gc. With a prefix it first tears down the empty cgroups under it that this library
created, and no other (docs/DEVICES.md, "What gc removes"). It also unpins programs this
release would not fetch. With `-v` (logging at INFO) every
decision is logged with its reason: what was removed, what was kept.

Under systemd (PID 1) two more rules: a pin a unit's `BPFProgram=` names is never removed
(systemd re-opens it at daemon-reload and detaches the program if it is gone: the scope would
fail open), and when the units cannot be asked (no D-Bus, no jeepney) no pin is removed at all;
and failed scopes of ours (driver.MARK in their Description) are reset, so systemd unloads them.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass, field

from .cgref import Liveness, Ref
from .cgroupfs import read_text, subtree_dirs
from .feature import Feature
from .hierarchy import discover
from .owner import forget_pending, is_ours
from .pins import pin_dir, pin_paths
from .registry import FEATURES

__all__ = ["GcReport", "collect"]

log = logging.getLogger(__name__)


@dataclass
class GcReport:
    """What one collection removed (printable)."""

    dead_cgroups: int = 0  # distinct dead cgroup ids that still had entries
    entries_removed: dict[str, int] = field(default_factory=dict)  # "devices v2 dev_rules": n
    cgroups_removed: list[str] = field(default_factory=list)
    programs_detached: int = 0
    pins_removed: list[str] = field(default_factory=list)
    pins_kept: dict[str, list[str]] = field(default_factory=dict)  # stale pin -> its units
    units_reset: list[str] = field(default_factory=list)  # failed scopes of ours, reset
    notes: list[str] = field(default_factory=list)  # what gc left alone, and why
    errors: list[str] = field(default_factory=list)

    @property
    def total_entries(self) -> int:
        return sum(self.entries_removed.values())

    def __str__(self) -> str:
        kept = self.pins_kept.items()
        lines = [
            f"cgroups removed: {len(self.cgroups_removed)}",
            *(f"  {p}" for p in self.cgroups_removed),
            f"programs detached: {self.programs_detached}",
            f"stale pins removed: {len(self.pins_removed)}",
            *(f"  {p}" for p in self.pins_removed),
            *(f"stale pin kept: {p} (in BPFProgram= of {', '.join(u)})" for p, u in kept),
            *([f"failed scopes reset: {', '.join(self.units_reset)}"] if self.units_reset else []),
            f"map entries removed: {self.total_entries} (of {self.dead_cgroups} dead cgroups)",
            *(f"  {k}: {n}" for k, n in sorted(self.entries_removed.items())),
        ]
        lines += [f"note: {n}" for n in self.notes]
        if self.errors:
            lines += ["errors:", *(f"  {e}" for e in self.errors)]
        return "\n".join(lines)


def collect(prefix: str | os.PathLike[str] | None = None) -> GcReport:
    """Reclaim entries of dead cgroups; with `prefix`, first remove abandoned cgroups under it."""
    report = GcReport()
    units = _Units(report)
    units.reset_failed()
    if prefix is not None:
        _remove_abandoned(os.fspath(prefix), report)
    dead_ids: set[int] = set()
    with Liveness(discover().root) as live:

        def dead(cgroup_id: int) -> bool:
            if live.dead(cgroup_id):
                if cgroup_id not in dead_ids:
                    log.debug("gc: cgroup id %d is gone: its entries go", cgroup_id)
                dead_ids.add(cgroup_id)
                return True
            return False

        for feat in FEATURES:
            for layer, maps in feat.reachable_maps():
                try:
                    counts = Feature.purge(layer, maps, dead)
                    if feat.collect is not None:
                        counts.update(feat.collect(layer, maps, live))
                    for name, n in counts.items():
                        key = f"{layer.feature} v{layer.version} {name}"
                        report.entries_removed[key] = report.entries_removed.get(key, 0) + n
                        log.info("gc: %s: removed %d entries", key, n)
                except OSError as e:
                    report.errors.append(f"{layer.feature} v{layer.version}: {e}")
                    log.warning("gc: %s v%d: %s", layer.feature, layer.version, e)
                finally:
                    for fd in maps.values():
                        os.close(fd)
    report.dead_cgroups = len(dead_ids)
    _remove_stale_pins(report, units)
    return report


class _Units:
    """gc's questions to systemd, asked only where systemd is PID 1; fail safe without D-Bus."""

    def __init__(self, report: GcReport) -> None:
        from .systemd import SYSTEMD_RUN_DIR

        self.report = report
        self.systemd = SYSTEMD_RUN_DIR.is_dir()  # sd_booted(): only then can units exist

    def reset_failed(self) -> None:
        if not self.systemd:
            return
        from .systemd import units
        from .systemd.dbus import SystemdError, SystemdUnavailable

        try:
            self.report.units_reset = units.reset_failed_ours()
        except SystemdUnavailable as e:
            self.report.notes.append(f"failed scopes not collected: {e}")
        except SystemdError as e:
            self.report.errors.append(str(e))

    def referenced_pins(self) -> dict[str, list[str]] | None:
        """pin -> units whose BPFProgram= names it; {} without systemd; None: not known."""
        if not self.systemd:
            return {}
        from .systemd import driver
        from .systemd.dbus import SystemdError, SystemdUnavailable

        try:
            return driver.referenced_pins()
        except (SystemdUnavailable, SystemdError) as e:
            self.report.notes.append(
                f"no pin removed: cannot ask systemd which pins its units' BPFProgram= name "
                f"({e}); a unit's pin removed now would make systemd detach its program at "
                "the next daemon-reload"
            )
            return None


def _remove_stale_pins(report: GcReport, units: _Units) -> None:
    """Unpin our programs that this release would not fetch (an older bytecode, another map
    size setting): a pin keeps its program and maps loaded for as long as it exists. A process
    still using one holds its own fds; a process wanting one pins it again. A pin a systemd
    unit references stays (its scope's program depends on it at the next daemon-reload)."""
    d = pin_dir()
    if d is None:
        return
    ours = {p.name for feat in FEATURES for lay in feat.layers for p in lay.progs}
    try:
        current = {
            os.path.basename(p) for feat in FEATURES for p in pin_paths(feat.current, d).values()
        }
        names = os.listdir(d)
    except OSError as e:
        report.errors.append(f"pins in {d}: {e}")
        return
    stale = []
    for name in sorted(names):
        prog, _, digest = name.rpartition("_")
        if prog not in ours or len(digest) != 16:
            log.debug("gc: pin %s/%s kept: not one of ours", d, name)
            continue
        if name in current:
            log.debug("gc: pin %s/%s kept: this release fetches it", d, name)
            continue
        stale.append(name)
    if not stale:
        return
    referenced = units.referenced_pins()
    if referenced is None:
        return
    for name in stale:
        path = os.path.join(d, name)
        users = referenced.get(path) or referenced.get(os.path.realpath(path))
        if users:
            report.pins_kept[path] = users
            log.info("gc: pin %s kept: units %s name it in BPFProgram=", path, ", ".join(users))
            continue
        try:
            os.unlink(path)
            report.pins_removed.append(path)
            log.info("gc: unpinned %s: a set this release would not fetch", path)
        except FileNotFoundError:
            continue
        except OSError as e:
            report.errors.append(f"{path}: {e}")


def _remove_abandoned(prefix: str, report: GcReport) -> None:
    """Tear down empty cgroups under prefix (not prefix itself) that this library CREATED: the
    creation mark (owner.py) is the proof. A cgroup we merely attached to (a runtime's or a
    person's, where the hook or `pelagos-bpf update` added a classid or a rule) is never
    removed. The prefix is resolved first, so `a/../b` or a symlink cannot widen it."""
    from pathlib import Path

    root = os.path.realpath(prefix)
    for d in subtree_dirs(Path(root)):
        path = os.fspath(d)
        if path == root:
            continue
        try:
            if "populated 1" in read_text(d / "cgroup.events"):
                log.info("gc: kept %s: it has processes", path)
                continue
            if not is_ours(path):
                log.info("gc: kept %s: not created by pelagos-bpf (no creation mark)", path)
                continue
            ref = Ref.of(path)
            for feat in FEATURES:
                report.programs_detached += _detach_all(feat, ref)
            os.rmdir(path)
            forget_pending(path)
            report.cgroups_removed.append(path)
            log.info("gc: removed %s: empty, and created by pelagos-bpf", path)
        except FileNotFoundError:
            continue
        except OSError as e:
            if e.errno not in (errno.EBUSY, errno.ENOTEMPTY):
                report.errors.append(f"{path}: {e}")
            log.info("gc: kept %s: %s", path, e)


def _detach_all(feat: Feature, ref: Ref) -> int:
    fd = ref.open_fd()
    try:
        with feat.find(fd) as groups:
            n = sum(len(g.progs) for g in groups)
    finally:
        os.close(fd)
    if n and feat.teardown is not None:
        feat.teardown(ref)
    return n
