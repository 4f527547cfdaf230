"""Declarations of a cgroup-BPF feature: C struct layouts, maps, programs, per layout version.

Why declarations: a feature's programs and maps are declared once (in `<feature>/layout.py`)
and everything else derives from them: the loader creates maps and
relocates programs by them, `Feature.find` recognises attached programs and checks their maps'
layouts against them, gc knows which cgroup an entry belongs to, and tests/test_layouts.py
checks the C structs of bpf/*.c against them.
"""

from __future__ import annotations

import errno
import struct
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

from .bpfabi import AttachType, MapType, ProgType
from .errors import BpfError, ConfigError
from .numbers import env_int

BPF_F_NO_PREALLOC = 1
STORAGE_KEY = struct.Struct("<QI4x")  # struct bpf_cgroup_storage_key {cgroup id, attach type}


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
        if self.size_env is None:
            return self.max_entries
        try:
            return env_int(self.size_env, self.max_entries)
        except ConfigError as e:
            raise BpfError(
                errno.EINVAL,
                self.size_env,
                f"{e.value!r} is not a map size (entries, a positive integer) for map {self.name}",
                setting=self.size_env,
            ) from None


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
