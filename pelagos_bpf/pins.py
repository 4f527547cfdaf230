"""Pins: share one load of a layer's programs and maps between every process of the node.

Why: without pins each process creates its own maps and loads its own programs (a few ms), and
a cgroup set up by one process is found by others only through its attached programs. With
pins, a fresh process fetches the loaded set (a few syscalls) and every process writes the same
maps. By default under /sys/fs/bpf/pelagos-bpf when /sys/fs/bpf is a bpffs (systemd mounts one);
`$PELAGOS_BPF_PIN_DIR` names another bpffs directory, or, set but empty, turns pins off.

A set's pin names carry one suffix per layer, a hash of every program's bytecode digest and the
map sizes: a new release or size setting gets a whole new set (never a mix of programs that do
not share maps); `gc` removes sets this release would not fetch. Every pin is trust-checked
before use (root's own, not a symlink, our program type and bytecode tag: docs/TRUST.md).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import logging
import os

from . import bytecode, loader, trust
from .errors import BpfError, about
from .layers import Layer
from .loader import Loaded

PIN_ENV = "PELAGOS_BPF_PIN_DIR"
DEFAULT_PIN_DIR = "/sys/fs/bpf/pelagos-bpf"

log = logging.getLogger(__name__)


def pin_dir() -> str | None:
    """Where processes share loaded programs: $PELAGOS_BPF_PIN_DIR (set but empty: nowhere);
    else DEFAULT_PIN_DIR when /sys/fs/bpf is a bpffs; else nowhere."""
    d = os.environ.get(PIN_ENV)
    if d is not None:
        return d or None
    return DEFAULT_PIN_DIR if trust.is_bpffs(os.path.dirname(DEFAULT_PIN_DIR)) else None


def idents(layer: Layer) -> dict[str, bytecode.ProgramIdent]:
    """func -> what a pin of it must match."""
    return {p.func: bytecode.ident(layer.source, p.func, p.prog_type) for p in layer.progs}


def pin_paths(
    layer: Layer, d: str, ids: dict[str, bytecode.ProgramIdent] | None = None
) -> dict[str, str]:
    """func -> pin path in `d`: one suffix for the whole layer over every program's bytecode and
    the map sizes, so a changed program or size setting makes a whole new set."""
    ids = ids or idents(layer)
    sizes = ",".join(f"{m.name}={m.entries()}" for m in layer.maps)
    progs = ",".join(f"{p.func}={ids[p.func].digest}" for p in layer.progs)
    suffix = hashlib.blake2b(f"{progs}\0{sizes}".encode(), digest_size=8).hexdigest()
    return {p.func: f"{d.rstrip('/')}/{p.name}_{suffix}" for p in layer.progs}


def load_or_fetch(layer: Layer) -> Loaded:
    """The layer's programs and maps: fetched from the node's pins when a whole set is pinned,
    else loaded (and pinned, when pins are on)."""
    d = pin_dir()
    if d is None:
        log.info("pins off: %s v%d loaded for this process only", layer.feature, layer.version)
        return loader.load_layer(layer)
    # Walked and checked once; every pin below is opened (or made) through this fd.
    with about(PIN_ENV, d):
        dirfd = trust.check_pin_dir(d, create=d == DEFAULT_PIN_DIR)
    try:
        return _load_or_fetch_at(layer, dirfd, pin_paths(layer, d))
    finally:
        os.close(dirfd)


def _load_or_fetch_at(layer: Layer, dirfd: int, pins: dict[str, str]) -> Loaded:
    """The pinned set if whole, else load and pin one, under an exclusive flock of the pin
    dir: so two fresh processes never pin halves of two sets, and a set a dead process left
    half pinned (or mixed) is replaced rather than blocking every later process. Nobody can
    be using such a set: from_pins hands out only whole sets whose programs share maps."""
    fetched = from_pins(layer, dirfd, pins)
    if fetched is not None:
        log.info("pin hit: %s v%d fetched from %s", layer.feature, layer.version, pins)
        return fetched
    fcntl.flock(dirfd, fcntl.LOCK_EX)
    try:
        fetched = from_pins(layer, dirfd, pins)  # pinned while we waited
        if fetched is not None:
            log.info(
                "pin hit: %s v%d fetched from %s (pinned while we waited)",
                layer.feature,
                layer.version,
                pins,
            )
            return fetched
        log.info("pin miss: %s v%d loaded and pinned at %s", layer.feature, layer.version, pins)
        loaded = loader.load_layer(layer)
        try:
            for func, path in pins.items():
                name = os.path.basename(path)
                try:
                    os.unlink(name, dir_fd=dirfd)  # part of an unusable set (see above)
                    log.info("pin replaced: %s (part of an unusable set)", path)
                except FileNotFoundError:
                    pass
                if not trust.pin_program_at(loaded.progs[func], dirfd, path):
                    raise BpfError(
                        errno.EEXIST,
                        "pin",
                        f"{path} appeared under our lock",
                        setting=PIN_ENV,
                        path=path,
                    )
        except BaseException:
            loaded.close()
            raise
        return loaded
    finally:
        fcntl.flock(dirfd, fcntl.LOCK_UN)


def from_pins(layer: Layer, dirfd: int, pins: dict[str, str]) -> Loaded | None:
    """The layer's programs and maps from their pins in the checked pin dir `dirfd` (None: not
    all pinned, or not one set). trust checks each pin (no symlink, root's own, our program type
    and bytecode tag) before we use it."""
    ids_of = idents(layer)
    progs: dict[str, int] = {}
    ids: dict[str, int] = {}
    maps: dict[str, int] = {}
    map_ids: dict[str, int] = {}
    whole = False
    try:
        for func, path in pins.items():
            spec = layer.prog(func)
            with about(PIN_ENV, path):
                got = trust.open_pinned_program_at(
                    dirfd, path, tags=ids_of[func].tags, prog_type=spec.prog_type
                )
            if got is None:
                log.debug("no pin at %s", path)
                return None
            progs[func], info = got
            ids[func] = info.id
            if info.name != spec.name:
                raise BpfError(
                    errno.EINVAL,
                    "pinned program",
                    f"{path} is not {spec.name}",
                    setting=PIN_ENV,
                    path=path,
                )
            seen: dict[str, int] = {}
            for k, v in loader.open_maps(info, layer, seen).items():
                if k in maps:
                    os.close(v)
                else:
                    maps[k] = v
            if any(map_ids.setdefault(k, i) != i for k, i in seen.items()):
                # Programs of two loads (a half-pinned set completed by another process):
                # they do not share maps, so settings written to one would not reach the
                # other. Not a usable set; the caller replaces it under its lock.
                log.info(
                    "pins of %s v%d are not one set (maps differ)", layer.feature, layer.version
                )
                return None
        missing = {m.name for m in layer.maps} - set(maps)
        if missing:
            raise BpfError(
                errno.EPROTO,
                "pinned program",
                f"{next(iter(pins.values()), '')} lacks maps {sorted(missing)}",
                setting=PIN_ENV,
                path=next(iter(pins.values()), None),
            )
        whole = True
    finally:
        if not whole:  # not pinned, not one set, or refused: nothing handed out
            for fd in (*progs.values(), *maps.values()):
                os.close(fd)
    return Loaded(layer, progs, ids, maps)
