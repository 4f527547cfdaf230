"""One runtime for every cgroup-BPF feature: declare programs and maps once, get the life cycle.

Why one runtime: devices and net (and the next feature) all load generic programs once per
process, optionally share them through pins, attach them with BPF_F_ALLOW_MULTI to container
cgroups, find them again from any process (PROG_QUERY -> prog info -> map ids, layout checked),
detach them, and reclaim entries keyed by dead cgroups. A feature is a declaration (`Layer`:
its programs and maps for one LAYOUT VERSION) plus the small map logic only it knows.

Layout versions: a program's kernel name carries its layout version (`pelagos_dev_v2`; the
unsuffixed names of the first release are version 1), so a newer release recognises what an
older one attached, reads it through that version's declaration, and migrates by attaching its
own program first and detaching the old one after (with MULTI both run meanwhile, and a device
access must pass both: nothing is allowed that either denies). See docs/BPF_LAYER.md.

Every fd returned is the caller's to close unless it belongs to this process's `Loaded`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import os
import struct
import threading
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from . import bpfsys, progcache, trust
from .bpfsys import AttachType, MapType, ProgType
from .cgref import CgroupRef, Liveness, opened
from .errors import BpfError

PIN_ENV = "PELAGOS_BPF_PIN_DIR"
DEFAULT_PIN_DIR = "/sys/fs/bpf/pelagos-bpf"
BPF_F_NO_PREALLOC = 1
STORAGE_KEY = struct.Struct("<QI4x")  # struct bpf_cgroup_storage_key {cgroup id, attach type}


# ---------------------------------------------------------------- declarations


@dataclass(frozen=True)
class Layout:
    """A C struct as (field name, struct code) pairs; tests/test_layouts.py checks it against
    the struct of the same name in bpf/*.c, so C and Python cannot drift apart."""

    c_name: str
    fields: tuple[tuple[str, str], ...]

    @cached_property
    def struct(self) -> struct.Struct:
        return struct.Struct("<" + "".join(code for _, code in self.fields))

    @property
    def size(self) -> int:
        return self.struct.size

    def pack(self, *values: int) -> bytes:
        return self.struct.pack(*values)

    def unpack(self, raw: bytes) -> tuple[int, ...]:
        return self.struct.unpack(raw[: self.size])


def union_size(*layouts: Layout) -> int:
    return max(lay.size for lay in layouts)


@dataclass(frozen=True)
class MapSpec:
    """One map: created by the runtime (the C declaration only names it for relocation).

    `cgroup_of(key)` says which cgroup an entry belongs to, for garbage collection and for
    teardown when the program is gone; None for cgroup storage (the kernel frees it).
    """

    name: str
    type: MapType
    key_size: int
    value_size: int
    max_entries: int = 0
    flags: int = 0
    cgroup_of: Callable[[bytes], int] | None = None
    size_env: str | None = None  # a node setting overriding max_entries (read at map create)

    @property
    def layout(self) -> tuple[int, int, int]:
        return (int(self.type), self.key_size, self.value_size)

    def entries(self) -> int:
        """max_entries, or the node setting `size_env` when set (checked: a positive int).

        Read when this process creates the map (its first load): a program already loaded or
        pinned keeps the map it was created with, whatever the setting says now.
        """
        raw = os.environ.get(self.size_env) if self.size_env else None
        if raw is None or raw == "":
            return self.max_entries
        try:
            n = int(raw)
        except ValueError:
            n = 0
        if not 0 < n <= 0xFFFF_FFFF:
            raise BpfError(
                errno.EINVAL,
                self.size_env or self.name,
                f"{raw!r} is not a map size (entries, a positive integer) for map {self.name}",
            )
        return n


@dataclass(frozen=True)
class ProgSpec:
    """One program: C function, kernel name (<= 15 chars, carries the version), types."""

    func: str
    name: str
    prog_type: ProgType
    attach_type: AttachType | None  # None: not a cgroup program (e.g. a tc classifier)


@dataclass(frozen=True)
class Layer:
    """A feature's programs and maps at one layout version."""

    feature: str
    version: int
    source: str  # bpf/<source>.c
    progs: tuple[ProgSpec, ...]
    maps: tuple[MapSpec, ...]

    def map(self, name: str) -> MapSpec:
        return next(m for m in self.maps if m.name == name)

    def prog(self, func: str) -> ProgSpec:
        return next(p for p in self.progs if p.func == func)

    @property
    def cgroup_progs(self) -> tuple[ProgSpec, ...]:
        return tuple(p for p in self.progs if p.attach_type is not None)


def storage_key(cgroup_id: int, attach_type: int) -> bytes:
    return STORAGE_KEY.pack(cgroup_id, int(attach_type))


def u64_prefix(key: bytes) -> int:
    """cgroup_of for keys that start with the cgroup id (u64)."""
    return int.from_bytes(key[:8], "little")


# ---------------------------------------------------------------- handles


@dataclass
class Loaded:
    """This process's programs of one layer (fd by func) and their maps: loaded once."""

    layer: Layer
    progs: dict[str, int]
    ids: dict[str, int]
    maps: dict[str, int]

    def close(self) -> None:
        for fd in (*self.progs.values(), *self.maps.values()):
            os.close(fd)


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


def pin_dir() -> str | None:
    """Where processes share loaded programs: $PELAGOS_BPF_PIN_DIR (set but empty: nowhere);
    else DEFAULT_PIN_DIR when /sys/fs/bpf is a bpffs (systemd mounts one, mode 0700); else
    nowhere. Why by default: a fresh process then fetches the program (~0.1 ms of syscalls)
    instead of creating three maps and loading it (~5-15 ms), see docs/PERFORMANCE.md."""
    d = os.environ.get(PIN_ENV)
    if d is not None:
        return d or None
    return DEFAULT_PIN_DIR if trust.is_bpffs(os.path.dirname(DEFAULT_PIN_DIR)) else None


def _expected(spec: ProgSpec) -> int | None:
    """PROG_LOAD's expected_attach_type: sockopt programs do not load without theirs."""
    return spec.attach_type if spec.prog_type == ProgType.CGROUP_SOCKOPT else None


def _compiled(layer: Layer, spec: ProgSpec) -> progcache.CompiledProgram:
    return progcache.get_program(progcache.bpf_source(layer.source), spec.func, spec.prog_type)


class Feature:
    """The runtime for one feature: `current` is what this release writes; `legacy` layers are
    recognised (found, detached, their entries reclaimed) but never loaded."""

    def __init__(self, current: Layer, legacy: tuple[Layer, ...] = ()) -> None:
        self.current = current
        self.layers = (current, *legacy)
        self._by_name = {
            (p.name, int(p.prog_type)): (lay, p) for lay in self.layers for p in lay.progs
        }
        self._lock = threading.Lock()
        self._loaded: Loaded | None = None
        # The plug-in's "detach ours and drop this cgroup's entries" (set by the plug-in).
        self.teardown: Callable[[Any], None] | None = None

    @property
    def name(self) -> str:
        return self.current.feature

    # ------------------------------------------------------------ load once per process

    def loaded(self) -> Loaded:
        """This process's programs: loaded once (or fetched from $PELAGOS_BPF_PIN_DIR pins)."""
        got = self._loaded
        if got is not None:
            return got
        with self._lock:
            if self._loaded is None:
                self._loaded = self._load_or_fetch()
            return self._loaded

    def loaded_if_any(self) -> Loaded | None:
        return self._loaded

    def idents(self) -> dict[str, progcache.ProgramIdent]:
        """func -> what a pin of it must match (key index: no cache file read when current)."""
        src = progcache.source_file(self.current.source)
        return {
            p.func: progcache.program_ident(src, p.func, p.prog_type) for p in self.current.progs
        }

    def pin_paths(
        self, d: str, idents: dict[str, progcache.ProgramIdent] | None = None
    ) -> dict[str, str]:
        """func -> pin path in `d`. One name suffix per layer, hashing the bytecode of EVERY
        program of the layer and the map sizes: a release that changes any program, adds one,
        or a new `size_env` setting gets a whole new set of pins (and maps), never a mix of its
        programs and an older set's, which would not share maps."""
        idents = idents or self.idents()
        sizes = ",".join(f"{m.name}={m.entries()}" for m in self.current.maps)
        progs = ",".join(f"{p.func}={idents[p.func].digest}" for p in self.current.progs)
        # blake2b: built in, where sha256's first use loads OpenSSL (~60 us in a fresh process)
        suffix = hashlib.blake2b(f"{progs}\0{sizes}".encode(), digest_size=8).hexdigest()
        return {p.func: f"{d.rstrip('/')}/{p.name}_{suffix}" for p in self.current.progs}

    def _load_or_fetch(self) -> Loaded:
        d = pin_dir()
        if d is None:
            return self._load()
        # Walked and checked once; every pin below is opened (or made) through this fd.
        dirfd = trust.check_pin_dir(d, create=d == DEFAULT_PIN_DIR)
        try:
            idents = self.idents()
            return self._load_or_fetch_at(dirfd, self.pin_paths(d, idents), idents)
        finally:
            os.close(dirfd)

    def _load_or_fetch_at(
        self, dirfd: int, pins: dict[str, str], idents: dict[str, progcache.ProgramIdent]
    ) -> Loaded:
        """The pinned set if whole, else load and pin one, under an exclusive flock of the pin
        dir: so two fresh processes never pin halves of two sets, and a set a dead process left
        half pinned (or mixed) is replaced rather than blocking every later process. Nobody can
        be using such a set: _from_pins hands out only whole sets whose programs share maps."""
        fetched = self._from_pins(dirfd, pins, idents)
        if fetched is not None:
            return fetched
        fcntl.flock(dirfd, fcntl.LOCK_EX)
        try:
            fetched = self._from_pins(dirfd, pins, idents)  # pinned while we waited
            if fetched is not None:
                return fetched
            loaded = self._load()
            try:
                for func, path in pins.items():
                    name = os.path.basename(path)
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(name, dir_fd=dirfd)  # part of an unusable set (see above)
                    if not trust.pin_program_at(loaded.progs[func], dirfd, path):
                        raise BpfError(errno.EEXIST, "pin", f"{path} appeared under our lock")
            except BaseException:
                loaded.close()
                raise
            return loaded
        finally:
            fcntl.flock(dirfd, fcntl.LOCK_UN)

    def _load(self) -> Loaded:
        layer = self.current
        maps: dict[str, int] = {}
        progs: dict[str, int] = {}
        try:
            for m in layer.maps:
                maps[m.name] = bpfsys.map_create(
                    m.type, m.key_size, m.value_size, m.entries(), name=m.name, flags=m.flags
                )
            for spec in layer.progs:
                progs[spec.func] = progcache.load_program(
                    _compiled(layer, spec),
                    maps,
                    name=spec.name,
                    expected_attach_type=_expected(spec),
                )
        except BaseException:
            for fd in (*progs.values(), *maps.values()):
                os.close(fd)
            raise
        ids = {f: bpfsys.prog_info(fd).id for f, fd in progs.items()}
        return Loaded(layer, progs, ids, maps)

    def _from_pins(
        self,
        dirfd: int,
        pins: dict[str, str],
        idents: dict[str, progcache.ProgramIdent] | None = None,
    ) -> Loaded | None:
        """Our programs and maps from their pins in the checked pin dir `dirfd` (None: not all
        pinned, or not one set). trust checks each pin (no symlink, root's own, our program type and
        bytecode tag) before we use it; the tags come from `idents` (the key index), so no
        bytecode is read."""
        idents = idents or self.idents()
        progs: dict[str, int] = {}
        ids: dict[str, int] = {}
        maps: dict[str, int] = {}
        map_ids: dict[str, int] = {}
        whole = False
        try:
            for func, path in pins.items():
                spec = self.current.prog(func)
                got = trust.open_pinned_program_at(
                    dirfd, path, tags=idents[func].tags, prog_type=spec.prog_type
                )
                if got is None:
                    return None
                progs[func], info = got
                ids[func] = info.id
                if info.name != spec.name:
                    raise BpfError(errno.EINVAL, "pinned program", f"{path} is not {spec.name}")
                seen: dict[str, int] = {}
                for k, v in open_maps(info, self.current, seen).items():
                    if k in maps:
                        os.close(v)
                    else:
                        maps[k] = v
                if any(map_ids.setdefault(k, i) != i for k, i in seen.items()):
                    # Programs of two loads (a half-pinned set completed by another process):
                    # they do not share maps, so settings written to one would not reach the
                    # other. Not a usable set; the caller replaces it under its lock.
                    return None
            missing = {m.name for m in self.current.maps} - set(maps)
            if missing:
                raise BpfError(errno.EPROTO, "pinned program", f"lacks maps {sorted(missing)}")
            whole = True
        finally:
            if not whole:  # not pinned, not one set, or refused: nothing handed out
                for fd in (*progs.values(), *maps.values()):
                    os.close(fd)
        return Loaded(self.current, progs, ids, maps)

    # ------------------------------------------------------------ find what is attached

    def recognise(self, info: bpfsys.ProgInfo) -> tuple[Layer, ProgSpec] | None:
        return self._by_name.get((info.name, info.type))

    @contextlib.contextmanager
    def find(self, cg_fd: int) -> Iterator[list[Attached]]:
        """Our programs of every known version attached at the cgroup, grouped by shared maps
        (current version first). fds are closed on exit, except this process's own."""
        own = self._loaded
        own_ids = set(own.ids.values()) if own is not None else set()
        with contextlib.ExitStack() as stack:
            groups: list[Attached] = []
            attach_types = {p.attach_type for lay in self.layers for p in lay.cgroup_progs}
            for at in sorted(attach_types):  # type: ignore[type-var]
                for prog_id in bpfsys.prog_query(cg_fd, at):
                    fd = open_prog(prog_id)
                    if fd is None:
                        continue
                    stack.callback(os.close, fd)
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
                                stack.callback(os.close, mfd)
                                group.maps[name] = mfd
                    group.progs[spec.func] = fd
                    group.ids[spec.func] = info.id
                    group.tags[spec.func] = info.tag
            yield sorted(groups, key=lambda g: -g.version)

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
        self, cg: CgroupRef, what: str, detach_group: Callable[[CgroupRef, Attached, int], None]
    ) -> None:
        """Detach ours of every version with the plug-in's `detach_group` (which also drops the
        cgroup's entries), under the writer lock. Idempotent. With nothing attached (detached
        from inside, say), this process's (or the pinned) maps still lose the cgroup's entries;
        other processes' are left to gc."""
        with opened(cg, what, missing_ok=True) as cg_fd:
            if cg_fd is None:
                return
            with self.find(cg_fd) as groups:
                for g in groups:
                    detach_group(cg, g, cg_fd)
                if not groups and (loaded := self._loaded) is not None:
                    self.purge(loaded.layer, loaded.maps, lambda i: i == cg.id)

    # ------------------------------------------------------------ attach / detach

    @staticmethod
    def attach(prog_fd: int, cg_fd: int, spec: ProgSpec, what: str) -> None:
        """PROG_ATTACH with BPF_F_ALLOW_MULTI, with an error that says why it may fail."""
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
                e.errno or errno.EIO, what, f"cannot attach to the cgroup{hint}: {e}"
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
            except BpfError:
                continue  # a foreign program with one of our names: not ours to touch
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
        with Liveness(os.path.dirname(os.fspath(cg.path))) as live:
            self.purge(self.current, maps, live.dead)
        write()

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
            doomed = [k for k in bpfsys.map_keys(fd, spec.key_size) if dead(spec.cgroup_of(k))]
            if doomed:
                counts[spec.name] = bpfsys.map_delete_batch(fd, doomed)
        return counts


def prog_tags(insns: bytes) -> frozenset[str]:
    """The tags (hex, as bpf prog info shows them) a kernel may give this bytecode."""
    return frozenset(t.hex() for t in trust.prog_tags(insns))


def open_prog(prog_id: int) -> int | None:
    """An fd for a program id; None if it went away or belongs to someone we may not touch."""
    try:
        return bpfsys.prog_get_fd_by_id(prog_id)
    except BpfError as e:
        if e.errno in (errno.ENOENT, errno.EPERM):
            return None
        raise


def open_maps(
    info: bpfsys.ProgInfo, layer: Layer, ids: dict[str, int] | None = None
) -> dict[str, int]:
    """fds of the program's maps declared by `layer` (and their ids into `ids`); BpfError
    (EPROTO) when a map's layout differs from its declaration (a program with our name but not
    our layout is refused)."""
    specs = {m.name: m for m in layer.maps}
    fds: dict[str, int] = {}
    try:
        for map_id in info.map_ids:
            fd = bpfsys.map_get_fd_by_id(map_id)
            try:
                mi = bpfsys.map_info(fd)
            except BaseException:
                os.close(fd)
                raise
            spec = specs.get(mi.name)
            if spec is None or mi.name in fds:
                os.close(fd)
                continue
            fds[mi.name] = fd
            if ids is not None:
                ids.setdefault(mi.name, mi.id)
            if (mi.type, mi.key_size, mi.value_size) != spec.layout:
                raise BpfError(
                    errno.EPROTO,
                    f"{info.name} maps",
                    f"map {mi.name!r} of program id {info.id} does not have the layout of "
                    f"{layer.feature} version {layer.version}",
                )
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return fds
