"""Load a layer's programs and maps, and open loaded ones again by id.

Why separate from the attach life cycle: loading (create maps, relocate, PROG_LOAD) happens once
per process or once per node (pins), while finding programs again by id (PROG_QUERY ->
GET_FD_BY_ID -> prog info -> map ids, each map's layout checked) is what every other process
does; both produce the same fds the feature runtime works with.
"""

from __future__ import annotations

import errno
import logging
import os
from dataclasses import dataclass

from . import bpfsys, bytecode
from .bpfabi import ProgType
from .errors import BpfError
from .layers import Layer, ProgSpec

log = logging.getLogger(__name__)


@dataclass
class Loaded:
    """This process's programs of one layer (fd and id by func) and their maps: loaded once."""

    layer: Layer
    progs: dict[str, int]
    ids: dict[str, int]
    maps: dict[str, int]

    def close(self) -> None:
        for fd in (*self.progs.values(), *self.maps.values()):
            os.close(fd)


def expected_attach_type(spec: ProgSpec) -> int | None:
    """PROG_LOAD's expected_attach_type: sockopt programs do not load without theirs."""
    return spec.attach_type if spec.prog_type == ProgType.CGROUP_SOCKOPT else None


def compiled(layer: Layer, spec: ProgSpec) -> bytecode.CompiledProgram:
    return bytecode.get_program(layer.source, spec.func, spec.prog_type)


def load_layer(layer: Layer) -> Loaded:
    """Create the layer's maps and load every program against them; all or nothing."""
    maps: dict[str, int] = {}
    progs: dict[str, int] = {}
    try:
        for m in layer.maps:
            maps[m.name] = bpfsys.map_create(
                m.type, m.key_size, m.value_size, m.entries(), name=m.name, flags=m.flags
            )
        for spec in layer.progs:
            progs[spec.func] = bytecode.load_program(
                compiled(layer, spec),
                maps,
                name=spec.name,
                expected_attach_type=expected_attach_type(spec),
            )
    except BaseException:
        for fd in (*progs.values(), *maps.values()):
            os.close(fd)
        raise
    ids = {f: bpfsys.prog_info(fd).id for f, fd in progs.items()}
    log.info("loaded %s v%d: program ids %s, %d maps", layer.feature, layer.version, ids, len(maps))
    return Loaded(layer, progs, ids, maps)


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
