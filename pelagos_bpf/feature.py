"""The attach life cycle every cgroup-BPF feature shares: load once, find, attach, detach, GC.

Why one runtime: devices and net (and the next feature) all load generic programs once per
process (or fetch them from the node's pins), attach them with BPF_F_ALLOW_MULTI to container
cgroups, find them again from any process (PROG_QUERY -> prog info -> map ids, layout checked),
detach them, and reclaim entries keyed by dead cgroups. A feature is a declaration (`Layer`, in
layers.py: its programs and maps for one LAYOUT VERSION) plus the small map logic only it knows.

Layout versions: a program's kernel name carries its layout version (`pelagos_dev_v3`; the
unsuffixed names of the first release are version 1), so a newer release recognises what an
older one attached, reads it through that version's declaration, and migrates by attaching its
own program first and detaching the old one after (with MULTI both run meanwhile, and a device
access must pass both: nothing is allowed that either denies). See docs/BPF_LAYER.md.

Every fd returned is the caller's to close unless it belongs to this process's `Loaded`.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import threading
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from typing import Any

from . import bpfsys, pins
from .cgref import CgroupRef, Liveness, opened
from .errors import BpfError
from .layers import Layer, ProgSpec
from .loader import Loaded, open_maps, open_prog

log = logging.getLogger(__name__)


@dataclass
class Attached:
    """Programs of one layer found on a cgroup, grouped by the maps they share."""

    layer: Layer
    progs: dict[str, int] = field(default_factory=dict)  # func -> fd
    ids: dict[str, int] = field(default_factory=dict)  # func -> prog id
    tags: dict[str, str] = field(default_factory=dict)  # func -> kernel tag
    maps: dict[str, int] = field(default_factory=dict)
    map_ids: set[int] = field(default_factory=set)

    @property
    def version(self) -> int:
        return self.layer.version


class Feature:
    """The runtime for one feature: `current` is what this release writes; `legacy` layers are
    recognised (found, detached, their entries reclaimed) but never loaded."""

    def __init__(self, current: Layer, legacy: tuple[Layer, ...] = ()) -> None:
        self.current = current
        self.layers = (current, *legacy)
        self._by_name = {
            (p.name, int(p.prog_type)): (lay, p) for lay in self.layers for p in lay.progs
        }
        # Every attach type our programs of any version use, queried on each find.
        self._attach_types = sorted(
            {p.attach_type for lay in self.layers for p in lay.progs if p.attach_type is not None}
        )
        self._lock = threading.Lock()
        self._loaded: Loaded | None = None
        # The plug-in's "detach ours and drop this cgroup's entries" (set by the plug-in).
        self.teardown: Callable[[Any], None] | None = None
        # The plug-in's own garbage collection on a layer's maps, after the dead cgroups'
        # entries are gone (set by the plug-in): entries removed, by what.
        self.collect: Callable[[Layer, dict[str, int], Liveness], dict[str, int]] | None = None

    @property
    def name(self) -> str:
        return self.current.feature

    # ------------------------------------------------------------ load once per process

    def loaded(self) -> Loaded:
        """This process's programs: loaded once (or fetched from the node's pins)."""
        got = self._loaded
        if got is not None:
            return got
        with self._lock:
            if self._loaded is None:
                self._loaded = pins.load_or_fetch(self.current)
            return self._loaded

    def loaded_if_any(self) -> Loaded | None:
        return self._loaded

    def forget_loaded(self) -> None:
        """Close this process's programs and maps (tests that switch pin or bytecode dirs)."""
        with self._lock:
            if self._loaded is not None:
                self._loaded.close()
                self._loaded = None

    # ------------------------------------------------------------ find what is attached

    def recognise(self, info: bpfsys.ProgInfo) -> tuple[Layer, ProgSpec] | None:
        return self._by_name.get((info.name, info.type))

    @contextlib.contextmanager
    def find(self, cg_fd: int) -> Iterator[list[Attached]]:
        """Our programs of every known version attached at the cgroup, grouped by shared maps
        (current version first). fds are closed on exit, except this process's own."""
        own = self._loaded
        own_ids = set(own.ids.values()) if own is not None else set()
        opened: list[int] = []  # not an ExitStack: find runs on every container start
        try:
            groups: list[Attached] = []
            for at in self._attach_types:
                for prog_id in bpfsys.prog_query(cg_fd, at):
                    fd = open_prog(prog_id)
                    if fd is None:
                        continue
                    opened.append(fd)
                    info = bpfsys.prog_info(fd)
                    hit = self.recognise(info)
                    if hit is None or hit[1].attach_type != at:
                        continue
                    layer, spec = hit
                    # Programs loaded together share maps (egress and ingress share net_acct).
                    group = next(
                        (
                            g
                            for g in groups
                            if g.version == layer.version and g.map_ids & set(info.map_ids)
                        ),
                        None,
                    )
                    if group is None:
                        group = Attached(layer)
                        groups.append(group)
                    if not set(info.map_ids) <= group.map_ids:
                        group.map_ids |= set(info.map_ids)
                        if own is not None and info.id in own_ids:
                            group.maps = dict(own.maps)
                        else:
                            for name, mfd in open_maps(info, layer).items():
                                if name in group.maps:
                                    os.close(mfd)
                                    continue
                                opened.append(mfd)
                                group.maps[name] = mfd
                    group.progs[spec.func] = fd
                    group.ids[spec.func] = info.id
                    group.tags[spec.func] = info.tag
            yield sorted(groups, key=lambda g: -g.version)
        finally:
            for fd in reversed(opened):
                os.close(fd)

    @contextlib.contextmanager
    def find_at(self, cg: CgroupRef) -> Iterator[list[Attached]]:
        """`find` for readers: by handle, no lock; [] when the cgroup is gone."""
        try:
            cg_fd = cg.open_fd()
        except FileNotFoundError:
            yield []
            return
        try:
            with self.find(cg_fd) as groups:
                yield groups
        finally:
            os.close(cg_fd)

    def detach_cgroup(
        self,
        cg: CgroupRef,
        what: str,
        detach_group: Callable[[CgroupRef, Attached, int], None],
        *,
        purge_when_gone: bool = True,
    ) -> None:
        """Detach ours of every version with the plug-in's `detach_group` (which also drops the
        cgroup's entries), under the writer lock. Idempotent. With nothing attached (detached
        from inside, say) and purge_when_gone, this process's (or the pinned) maps still lose
        the cgroup's entries; other processes' are left to gc. A caller removing only part of
        what is there (one owner's) passes purge_when_gone=False."""
        with opened(cg, what, missing_ok=True) as cg_fd:
            if cg_fd is None:
                return
            with self.find(cg_fd) as groups:
                for g in groups:
                    detach_group(cg, g, cg_fd)
                if not groups and purge_when_gone and (loaded := self._loaded) is not None:
                    self.purge(loaded.layer, loaded.maps, lambda i: i == cg.id)

    # ------------------------------------------------------------ attach / detach

    @staticmethod
    def attach(
        prog_fd: int, cg_fd: int, spec: ProgSpec, what: str, path: str | None = None
    ) -> None:
        """PROG_ATTACH with BPF_F_ALLOW_MULTI, with an error that says why it may fail
        (`what`: the setting it is for; `path`: the cgroup's)."""
        assert spec.attach_type is not None
        try:
            bpfsys.prog_attach(prog_fd, cg_fd, spec.attach_type, bpfsys.BPF_F_ALLOW_MULTI)
        except BpfError as e:
            hint = (
                " (a program attached without BPF_F_ALLOW_MULTI on this cgroup or an ancestor "
                "forbids more)"
                if e.errno == errno.EPERM
                else ""
            )
            raise BpfError(
                e.errno or errno.EIO,
                what,
                f"cannot attach to the cgroup{hint}: {e}",
                setting=what,
                path=path,
            ) from e

    @staticmethod
    def detach(group: Attached, cg_fd: int, keep: Collection[str] = ()) -> None:
        """Detach every program of the group but those of the functions in `keep`; one
        detached concurrently is fine (idempotent)."""
        for func, fd in group.progs.items():
            if func in keep:
                continue
            at = group.layer.prog(func).attach_type
            assert at is not None
            try:
                bpfsys.prog_detach(fd, cg_fd, at)
            except BpfError as e:
                if e.errno != errno.ENOENT:
                    raise

    # ------------------------------------------------------------ entries keyed by cgroup

    def reachable_maps(self) -> list[tuple[Layer, dict[str, int]]]:
        """fds of the maps of every program of ours the kernel holds (any version, any process),
        found through BPF_PROG_GET_NEXT_ID; caller closes. Used by GC and by teardown when the
        cgroup's program is already gone."""
        out: list[tuple[Layer, dict[str, int]]] = []
        seen: set[tuple[int, ...]] = set()
        for prog_id in bpfsys.prog_ids():
            fd = open_prog(prog_id)
            if fd is None:
                continue
            try:
                info = bpfsys.prog_info(fd)
            finally:
                os.close(fd)
            hit = self.recognise(info)
            key = tuple(sorted(info.map_ids))
            if hit is None or key in seen:
                continue
            seen.add(key)
            try:
                out.append((hit[0], open_maps(info, hit[0])))
            except BpfError as e:
                # a foreign program with one of our names: not ours to touch
                log.info("program id %d (%s) skipped: %s", prog_id, info.name, e)
                continue
        return out

    def retry_when_full(
        self, cg: CgroupRef, maps: dict[str, int], write: Callable[[], None]
    ) -> None:
        """Run `write`; if a map is full (E2BIG), reclaim the entries of dead cgroups in these
        maps (GC, off the hot path: only a full map pays it) and run it once more."""
        try:
            write()
            return
        except BpfError as e:
            if e.errno != errno.E2BIG:
                raise
        log.info("%s: a map is full: reclaiming dead cgroups' entries, then one retry", cg.path)
        self.purge_dead(cg, maps)
        write()

    def purge_dead(self, cg: CgroupRef, maps: dict[str, int]) -> dict[str, int]:
        """Delete the entries of dead cgroups in these maps (`cg` names the hierarchy)."""
        with Liveness(os.path.dirname(os.fspath(cg.path))) as live:
            return self.purge(self.current, maps, live.dead)

    @staticmethod
    def purge(layer: Layer, maps: dict[str, int], dead: Callable[[int], bool]) -> dict[str, int]:
        """Delete every entry whose cgroup `dead(id)` says is gone; returns counts per map.

        O(entries): for GC and rare paths only, never for a normal update or teardown.
        """
        counts: dict[str, int] = {}
        dead = functools.cache(dead)  # one liveness check per cgroup, not per entry
        for spec in layer.maps:
            if spec.cgroup_of is None or spec.name not in maps:
                continue
            fd = maps[spec.name]
            # cgroup id 0 is no cgroup: a feature's bookkeeping entry (devices' fill level)
            doomed = [
                k
                for k in bpfsys.map_keys(fd, spec.key_size)
                if (i := spec.cgroup_of(k)) and dead(i)
            ]
            if doomed:
                counts[spec.name] = bpfsys.map_delete_batch(fd, doomed)
                log.debug(
                    "%s v%d %s: deleted %d entries of gone cgroups",
                    layer.feature,
                    layer.version,
                    spec.name,
                    counts[spec.name],
                )
        return counts
