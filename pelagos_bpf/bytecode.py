"""The BPF programs' bytecode: built with the package, loaded with plain bpf(2).

Why built with the package: the programs are generic (rules and settings live in maps), so their
bytecode is fixed per release and architecture. The package build compiles bpf/*.c with bcc once
(`pelagos_bpf.compiler`, run by setup.py) into package data, `pelagos_bpf/bytecode/<source>.
<function>.json`; a node needs no bcc, LLVM or kernel headers. `pelagos-bpf compile --out DIR`
makes a custom set (another bcc, patched sources) that `$PELAGOS_BPF_BYTECODE=DIR` selects.

Trust: what these files hold is loaded into the kernel as root, so they are read like any file
of a root-owned install must be: through `trust` (every directory from / owned by root and not
writable by others, no symlink, a regular file owned by root and not writable by others), and
each file is validated completely (format, function, program type, architecture, whole
instructions, relocations matching the map loads). See docs/TRUST.md.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import struct
from dataclasses import dataclass
from functools import cache
from typing import NamedTuple

from . import bpfsys, trust
from .errors import BpfError, about

BYTECODE_ENV = "PELAGOS_BPF_BYTECODE"
PACKAGED_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "bytecode")
FORMAT = 2
LD_IMM64 = 0x18
PSEUDO_MAP_FD = 1
MAX_INSNS = 1_000_000  # BPF_COMPLEXITY_LIMIT_INSNS: the kernel loads nothing longer
_HEX_INSNS = re.compile(r"(?:[0-9a-f]{16})+")
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class CompiledProgram:
    """One program's relocatable bytecode and where it came from."""

    source: str  # bpf/<source>.c
    func: str
    prog_type: int
    insns: bytes
    relocs: tuple[tuple[int, str], ...]  # (instruction index, map name)
    inputs_hash: str  # sha256 over the C source and the stub headers it was compiled from
    machine: str  # `uname -m` of the build

    @property
    def insn_count(self) -> int:
        return len(self.insns) // 8


class ProgramIdent(NamedTuple):
    """What a pin of this program must match: pin names hash the digest, and a pinned
    program's kernel tag must be one of `tags` (SHA-256 or SHA-1 flavour)."""

    digest: str  # sha256 of the instructions, hex
    tags: frozenset[bytes]


def bytecode_dir() -> str:
    """$PELAGOS_BPF_BYTECODE (a `pelagos-bpf compile --out` directory), else the package's."""
    return os.environ.get(BYTECODE_ENV) or PACKAGED_DIR


def file_name(source: str, func: str) -> str:
    return f"{source}.{func}.json"


def get_program(source: str, func: str, prog_type: int) -> CompiledProgram:
    """The bytecode of bpf/<source>.c's `func` (read and checked once per process and dir)."""
    return _read(bytecode_dir(), source, func, int(prog_type))


@cache
def _read(directory: str, source: str, func: str, prog_type: int) -> CompiledProgram:
    name = file_name(source, func)
    path = f"{directory}/{name}"
    try:
        with about(BYTECODE_ENV, directory):
            dirfd = trust.open_trusted_dir(directory, "bytecode dir")
    except BpfError as e:
        if e.errno != errno.ENOENT:
            raise
        raise BpfError(
            errno.ENOENT,
            "bytecode",
            f"{directory} is missing: {_HOW}",
            setting=BYTECODE_ENV,
            path=directory,
        ) from None
    try:
        with about(BYTECODE_ENV, path):
            data = trust.read_trusted_file(dirfd, name, directory, "bytecode file")
    finally:
        os.close(dirfd)
    if data is None:
        raise BpfError(
            errno.ENOENT, "bytecode", f"{path} is missing: {_HOW}", setting=BYTECODE_ENV, path=path
        )
    try:
        return parse(data, source, func, prog_type)
    except ValueError as e:
        raise BpfError(
            errno.EINVAL,
            "bytecode",
            f"{path} is unusable ({e}): {_HOW}",
            setting=BYTECODE_ENV,
            path=path,
        ) from None


_HOW = (
    "reinstall pelagos-bpf (its wheel carries the bytecode), or build it with `pelagos-bpf "
    "compile` where bcc is installed"
)


@cache
def ident(source: str, func: str, prog_type: int) -> ProgramIdent:
    """The program's ProgramIdent (memoized: pins are named by it in every attach)."""
    insns = get_program(source, func, prog_type).insns
    return ProgramIdent(hashlib.sha256(insns).hexdigest(), trust.prog_tags(insns))


def reset_process_state() -> None:
    """Forget what this process read (tests that switch $PELAGOS_BPF_BYTECODE)."""
    _read.cache_clear()
    ident.cache_clear()


# ---------------------------------------------------------------- the file format


def to_json(p: CompiledProgram) -> bytes:
    return json.dumps(
        {
            "format": FORMAT,
            "source": p.source,
            "func": p.func,
            "prog_type": p.prog_type,
            "machine": p.machine,
            "inputs_hash": p.inputs_hash,
            "insns": p.insns.hex(),
            "relocs": [list(r) for r in p.relocs],
        },
        indent=1,
    ).encode()


def _want(d: dict[str, object], key: str, typ: type) -> object:
    v = d.get(key)
    if type(v) is not typ:  # exact: a bool is not an int here
        raise ValueError(f"{key!r} is not a {typ.__name__}")
    return v


def parse(data: bytes, source: str, func: str, prog_type: int) -> CompiledProgram:
    """Validate a bytecode file completely: it must describe exactly the requested program,
    for this machine. Raises ValueError saying what is wrong."""
    try:
        d = json.loads(data)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError("not a JSON object")
    if _want(d, "format", int) != FORMAT:
        raise ValueError(f"format {d['format']}, want {FORMAT}")
    got = (_want(d, "source", str), _want(d, "func", str), _want(d, "prog_type", int))
    if got != (source, func, int(prog_type)):
        raise ValueError(f"describes {got}, not {(source, func, int(prog_type))}")
    machine = str(_want(d, "machine", str))
    if machine != os.uname().machine:
        raise ValueError(f"built for {machine}, this is {os.uname().machine}")
    inputs_hash = str(_want(d, "inputs_hash", str))
    if not _HEX64.fullmatch(inputs_hash):
        raise ValueError("inputs_hash is not a sha256 hex digest")
    hexed = str(_want(d, "insns", str))
    if not _HEX_INSNS.fullmatch(hexed):
        raise ValueError("insns is not whole instructions in lower-case hex")
    insns = bytes.fromhex(hexed)
    if len(insns) > MAX_INSNS * 8:
        raise ValueError(f"{len(insns) // 8} instructions")
    relocs = []
    raw_relocs = _want(d, "relocs", list)
    assert isinstance(raw_relocs, list)
    for r in raw_relocs:
        if not (isinstance(r, list) and len(r) == 2 and type(r[0]) is int and type(r[1]) is str):
            raise ValueError(f"bad reloc {r!r}")
        relocs.append((r[0], r[1]))
    if sorted(i for i, _ in relocs) != map_load_indexes(insns):
        raise ValueError("relocs do not match the map loads in insns")
    return CompiledProgram(source, func, int(prog_type), insns, tuple(relocs), inputs_hash, machine)


def map_load_indexes(insns: bytes) -> list[int]:
    """Indexes of the BPF_LD_IMM64 map-fd loads (the instructions relocate() rewrites)."""
    ops, last = insns[0::8], len(insns) // 8 - 1
    out = []
    i = ops.find(LD_IMM64)
    while i != -1:
        if i < last and (insns[i * 8 + 1] >> 4) == PSEUDO_MAP_FD:
            out.append(i)
        i = ops.find(LD_IMM64, i + 1)
    return out


# ---------------------------------------------------------------- loading


def relocate(prog: CompiledProgram, map_fds: dict[str, int]) -> bytes:
    """Bytecode with every map reference pointing at the caller's map fds."""
    code = bytearray(prog.insns)
    for idx, name in prog.relocs:
        if name not in map_fds:
            raise BpfError(errno.EINVAL, "relocate", f"{prog.func}: no fd given for map {name!r}")
        struct.pack_into("<i", code, idx * 8 + 4, map_fds[name])
    return bytes(code)


def load_program(
    prog: CompiledProgram,
    map_fds: dict[str, int],
    *,
    name: str = "",
    expected_attach_type: int | None = None,
) -> int:
    """PROG_LOAD the bytecode against the given maps; returns the program fd."""
    return bpfsys.prog_load(
        prog.prog_type,
        relocate(prog, map_fds),
        name=name or prog.func,
        expected_attach_type=expected_attach_type,
    )
