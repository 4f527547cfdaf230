"""Compile BPF C with bcc once; load the cached bytecode with plain bpf(2) ever after.

Why: a bcc compile costs ~0.3 s and ~125 MB (it dlopens LLVM), a PROG_LOAD of ready bytecode
~50 us. So bcc is imported only inside `compile_program`, and the container-start path reads a
small JSON file from the cache. Programs are generic (rules live in maps), so one compile per
program serves every rule set.

Cache: `$PELAGOS_BPF_CACHE` or `/var/cache/pelagos-bpf`, one JSON file per program named by a
key over the C source, the stub headers, the bcc version, the function and the program type; any
change to those makes a new key (stale files are simply never read again). The kernel release is
deliberately not in the key: the programs use only uapi types and stable helpers, so the same
bytecode loads on every kernel, and a kernel that rejects it says so at PROG_LOAD.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import sys
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from . import bpfsys
from .errors import BpfError

CACHE_ENV = "PELAGOS_BPF_CACHE"
DEFAULT_CACHE = Path("/var/cache/pelagos-bpf")
_FORMAT = 1
_LD_IMM64 = 0x18
_PSEUDO_MAP_FD = 1


@dataclass(frozen=True)
class CompiledProgram:
    func: str
    prog_type: int
    insns: bytes
    relocs: tuple[tuple[int, str], ...]  # (instruction index, map name)
    source_hash: str

    @property
    def insn_count(self) -> int:
        return len(self.insns) // 8


def project_bpf_dir() -> Path:
    """The `bpf/` directory: beside the package in a checkout, under <prefix>/share installed."""
    here = Path(__file__).resolve().parent
    installed = Path(sys.prefix) / "share" / "pelagos-bpf" / "bpf"
    for cand in (here.parent / "bpf", installed):
        if cand.is_dir():
            return cand
    raise BpfError(2, "find bpf/ sources", f"no bpf/ directory near {here}")


def bpf_source(name: str) -> Path:
    """Path of bpf/<name>.c."""
    return project_bpf_dir() / f"{name}.c"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


@cache
def _stub_files() -> list[Path]:
    inc = project_bpf_dir() / "include"
    return sorted(p for p in inc.rglob("*") if p.is_file())


@cache
def _bcc_version() -> str:
    # Locate bcc without importing it (importing loads LLVM) and read its version file.
    import importlib.util

    spec = importlib.util.find_spec("bcc")
    if spec is None or spec.origin is None:
        return "none"
    try:
        return (Path(spec.origin).parent / "version.py").read_text().strip()
    except OSError:
        return "unknown"


def _fingerprint(paths: list[Path]) -> tuple[tuple[str, int, int], ...]:
    out = []
    for p in paths:
        st = p.stat()
        out.append((str(p), st.st_mtime_ns, st.st_size))
    return tuple(out)


def cache_key(source: Path, func: str, prog_type: int) -> str:
    """Key over the C source, stub headers, bcc version, function and type (memoized per
    process on the files' mtimes and sizes: stat is ~10x cheaper than re-hashing)."""
    return _cache_key(func, int(prog_type), _fingerprint([source, *_stub_files()]))


@cache
def _cache_key(func: str, prog_type: int, files: tuple[tuple[str, int, int], ...]) -> str:
    h = hashlib.sha256()
    h.update(f"fmt={_FORMAT} func={func} type={prog_type} bcc={_bcc_version()}\n".encode())
    source, *stubs = (Path(f) for f, _, _ in files)
    h.update(source.read_bytes())
    for f in stubs:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:32]


def get_program(
    source: str | os.PathLike[str],
    func: str,
    prog_type: int,
    *,
    compile_if_missing: bool = True,
) -> CompiledProgram:
    """The compiled program from the cache, compiling (and storing) it on a miss."""
    src = Path(source)
    key = cache_key(src, func, prog_type)
    return _get_cached(str(src), func, int(prog_type), key, compile_if_missing)


@cache
def _get_cached(
    src: str, func: str, prog_type: int, key: str, compile_if_missing: bool
) -> CompiledProgram:
    path = cache_dir() / f"{Path(src).stem}-{func}-{key}.json"
    try:
        return _from_json(json.loads(path.read_text()))
    except (OSError, ValueError, KeyError):
        pass
    if not compile_if_missing:
        raise BpfError(
            2, "bytecode cache", f"{path} missing: run `pelagos-bpf compile` (needs bcc) first"
        )
    prog = compile_program(src, func, prog_type)
    _store(path, prog)
    return prog


def _to_json(p: CompiledProgram) -> dict[str, object]:
    return {
        "format": _FORMAT,
        "func": p.func,
        "prog_type": p.prog_type,
        "insns": p.insns.hex(),
        "relocs": [list(r) for r in p.relocs],
        "source_hash": p.source_hash,
    }


def _from_json(d: dict[str, object]) -> CompiledProgram:
    if d["format"] != _FORMAT:
        raise ValueError("cache format")
    return CompiledProgram(
        func=str(d["func"]),
        prog_type=int(d["prog_type"]),  # type: ignore[call-overload]
        insns=bytes.fromhex(str(d["insns"])),
        relocs=tuple((int(i), str(n)) for i, n in d["relocs"]),  # type: ignore[attr-defined]
        source_hash=str(d["source_hash"]),
    )


def _store(path: Path, prog: CompiledProgram) -> None:
    """Write atomically (tmp + rename) so concurrent starts never read half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    os.fchmod(fd, 0o644)  # bytecode is not secret; let unprivileged inspect/check read it
    with os.fdopen(fd, "w") as f:
        json.dump(_to_json(prog), f)
    os.replace(tmp, path)


def _kernel_source_tree(dest: Path) -> None:
    """Lay out the minimal tree bcc wants as BCC_KERNEL_SOURCE: our stubs plus uapi links."""
    stub = project_bpf_dir() / "include"
    (dest / "include").mkdir(parents=True)
    for sub in ("linux", "asm"):
        (dest / "include" / sub).symlink_to(stub / sub)
    (dest / "include" / "uapi").symlink_to("/usr/include")
    arch = dest / "arch" / "x86" / "include" / "uapi"
    arch.mkdir(parents=True)
    (arch / "asm").symlink_to("/usr/include/x86_64-linux-gnu/asm")


def compile_program(source: str | os.PathLike[str], func: str, prog_type: int) -> CompiledProgram:
    """Run bcc (imports LLVM: ~0.3 s, ~125 MB) and return relocatable bytecode."""
    import ctypes as ct

    src = Path(source)
    text = src.read_text()
    with tempfile.TemporaryDirectory(prefix="pelagos-bcc-") as tmp:
        _kernel_source_tree(Path(tmp))
        old = os.environ.get("BCC_KERNEL_SOURCE")
        os.environ["BCC_KERNEL_SOURCE"] = tmp
        try:
            from bcc import BPF  # lazy: the only place bcc/LLVM is imported
            from bcc.libbcc import lib

            b = BPF(text=text, cflags=[f"-I{src.parent}"])
            try:
                insns = b.dump_func(func)
                lib.bpf_num_tables.argtypes = [ct.c_void_p]
                lib.bpf_num_tables.restype = ct.c_size_t
                lib.bpf_table_name.argtypes = [ct.c_void_p, ct.c_size_t]
                lib.bpf_table_name.restype = ct.c_char_p
                lib.bpf_table_fd_id.argtypes = [ct.c_void_p, ct.c_size_t]
                lib.bpf_table_fd_id.restype = ct.c_int
                fd_names = {
                    lib.bpf_table_fd_id(b.module, i): lib.bpf_table_name(b.module, i).decode()
                    for i in range(lib.bpf_num_tables(b.module))
                }
            finally:
                b.cleanup()
        except ImportError as e:
            raise BpfError(2, "compile", "bcc is not installed (Debian: python3-bpfcc)") from e
        except Exception as e:
            if isinstance(e, BpfError):
                raise
            raise BpfError(22, "compile", f"bcc failed on {src.name}:{func}: {e}") from e
        finally:
            if old is None:
                os.environ.pop("BCC_KERNEL_SOURCE", None)
            else:
                os.environ["BCC_KERNEL_SOURCE"] = old
    relocs = []
    for i in range(0, len(insns), 8):
        op, regs, _off, imm = struct.unpack_from("<BBhi", insns, i)
        if op == _LD_IMM64 and (regs >> 4) == _PSEUDO_MAP_FD:
            if imm not in fd_names:
                raise BpfError(22, "compile", f"insn {i // 8} references unknown map fd {imm}")
            relocs.append((i // 8, fd_names[imm]))
    return CompiledProgram(
        func=func,
        prog_type=int(prog_type),
        insns=bytes(insns),
        relocs=tuple(relocs),
        source_hash=hashlib.sha256(text.encode()).hexdigest(),
    )


def relocate(prog: CompiledProgram, map_fds: dict[str, int]) -> bytes:
    """Bytecode with every map reference pointing at the caller's map fds."""
    code = bytearray(prog.insns)
    for idx, name in prog.relocs:
        if name not in map_fds:
            raise BpfError(22, "relocate", f"{prog.func}: no fd given for map {name!r}")
        struct.pack_into("<i", code, idx * 8 + 4, map_fds[name])
    return bytes(code)


def load_program(
    prog: CompiledProgram,
    map_fds: dict[str, int],
    *,
    name: str = "",
    expected_attach_type: int | None = None,
) -> int:
    """PROG_LOAD the cached bytecode against the given maps; returns the program fd."""
    return bpfsys.prog_load(
        prog.prog_type,
        relocate(prog, map_fds),
        name=name or prog.func,
        expected_attach_type=expected_attach_type,
    )
