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

Trust: what this cache holds is loaded into the kernel as root, so it is read only from a dir
that nobody but root could have written (checked by `trust`, sshd StrictModes style), created
with mode 0755 whatever the umask; each file is validated completely and must describe the
requested function and program type (docs/TRUST.md).

Sources: the C files and stub headers are package data (`pelagos_bpf/bpfsrc`, a symlink to the
top-level `bpf/` in a checkout), found with importlib.resources in every kind of install.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import struct
import threading
import time
import zlib
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import NamedTuple

from . import bpfsys, trust
from .errors import BpfError

CACHE_ENV = "PELAGOS_BPF_CACHE"
DEFAULT_CACHE = Path("/var/cache/pelagos-bpf")
_DEFAULT_CACHE_STR = str(DEFAULT_CACHE)
_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = "bpfsrc"  # package data: a symlink to the top-level bpf/ in a checkout, files installed
_FORMAT = 1
_LD_IMM64 = 0x18
_PSEUDO_MAP_FD = 1
_MAX_INSNS = 1_000_000  # BPF_COMPLEXITY_LIMIT_INSNS: the kernel loads nothing longer
_HEX_INSNS = re.compile(r"(?:[0-9a-f]{16})+")
_HEX_DIGITS = frozenset("0123456789abcdef")


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


@cache
def _bpf_dir() -> str:
    """The BPF C sources and stub headers, found as package data (every kind of install).

    Beside this module first: importlib.resources costs ~4 ms on its first call in a process
    (it imports its readers), which a fresh process's first attach cannot afford; it is the
    fallback for loaders that do not keep packages as directories. A str, not a Path: pathlib's
    first use costs a fresh process ~0.1 ms."""
    d = f"{_HERE}/{SOURCES}"
    if not os.path.isdir(d + "/include"):
        from importlib import resources

        d = str(resources.files(__package__) / SOURCES)
        if not os.path.isdir(d + "/include"):
            raise BpfError(errno.ENOENT, "find BPF sources", f"{d} is missing (broken install?)")
    return d


def project_bpf_dir() -> Path:
    return Path(_bpf_dir())


def bpf_source(name: str) -> Path:
    """Path of the packaged bpf/<name>.c."""
    return Path(source_file(name))


def source_file(name: str) -> str:
    """bpf_source as a str (the first-attach path avoids pathlib)."""
    return f"{_bpf_dir()}/{name}.c"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


# The stub kernel headers under bpf/include (tests/test_progcache.py checks this is the tree):
# a fixed list, because walking the tree costs a fresh process ~0.3 ms of its first attach.
STUB_HEADERS = (
    "asm/page.h",
    "linux/kconfig.h",
    "linux/log2.h",
    "linux/types.h",
    "linux/version.h",
)


@cache
def _stub_files() -> list[str]:
    return [f"{_bpf_dir()}/include/{h}" for h in STUB_HEADERS]


@cache
def _bcc_version_file() -> str | None:
    """bcc's version.py, located without importing bcc (importing loads LLVM)."""
    import importlib.util

    spec = importlib.util.find_spec("bcc")
    if spec is None or spec.origin is None:
        return None
    return os.path.join(os.path.dirname(spec.origin), "version.py")


def _bcc_version(version_file: str | None) -> str:
    if version_file is None:
        return "none"
    try:
        return Path(version_file).read_text().strip()
    except OSError:
        return "unknown"


# (path, inode, mtime_ns, size): what a file looked like when hashed. An edit moves the mtime,
# a package upgrade's rename-into-place the inode.
Stamp = tuple[str, int, int, int]


def _stamp(path: str | os.PathLike[str]) -> Stamp | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (os.fspath(path), st.st_ino, st.st_mtime_ns, st.st_size)


def _fingerprint(paths: list[str | os.PathLike[str]]) -> tuple[Stamp, ...]:
    out = []
    for p in paths:
        stamp = _stamp(p)
        if stamp is None:
            raise BpfError(errno.ENOENT, "find BPF sources", f"{p} is missing (broken install?)")
        out.append(stamp)
    return tuple(out)


def cache_key(source: Path, func: str, prog_type: int) -> str:
    """Key over the C source, stub headers, bcc version, function and type.

    Hashing reads every input and locates bcc (~0.5 ms in a fresh process), so the key is
    remembered by the inputs' stamps (path, inode, mtime, size): per process, and across
    processes in the cache dir's key index (see _KeyIndex). A stamp that moved: hash again."""
    files = _fingerprint([source, *_stub_files()])
    return _cache_key(func, int(prog_type), files)


@cache
def _cache_key(func: str, prog_type: int, files: tuple[Stamp, ...]) -> str:
    index = _KeyIndex.shared()
    slot = f"{files[0][0]}|{func}|{prog_type}"
    known = index.get(slot, files)
    if known is not None:
        return known
    bcc_file = _bcc_version_file()
    key = hash_key(func, prog_type, files, _bcc_version(bcc_file))
    index.put(slot, files, bcc_file, key)
    return key


def hash_key(func: str, prog_type: int, files: tuple[Stamp, ...], bcc_version: str) -> str:
    """The content key itself: a hash of the format, function, type, bcc version, the source
    and the stub headers' names and bytes (read from the files the stamps name)."""
    h = hashlib.sha256()
    h.update(f"fmt={_FORMAT} func={func} type={prog_type} bcc={bcc_version}\n".encode())
    source, *stubs = (Path(f[0]) for f in files)
    h.update(source.read_bytes())
    for f in stubs:
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:32]


class _KeyIndex:
    """The key index: one small file per program slot (source path, function, type) in the
    cache dir, `keys-<func>-<type>-<crc of the slot>.json`, holding the input stamps, bcc's
    version.py stamp, the key and, once known, the ProgramIdent.

    Why: a fresh process's first attach has ~1 ms; the index turns the key into a dozen stats
    and spares reading the cache file when the program is pinned. One file per slot keeps the
    read small (a shared index of every checkout's slots cost ~0.1 ms to parse) and writers of
    different slots independent. Read and written like the cache files (trust checks, atomic
    rename), so it is as trustworthy as what it points at; an entry whose stamps moved, or that
    names another slot (a crc collision), is ignored and rewritten."""

    PREFIX = "keys-"
    _instance: _KeyIndex | None = None

    def __init__(self, cdir: str) -> None:
        self.cdir = cdir
        self.entries: dict[str, dict[str, object] | None] = {}

    @classmethod
    def shared(cls) -> _KeyIndex:
        cdir = os.environ.get(CACHE_ENV) or _DEFAULT_CACHE_STR
        if cls._instance is None or cls._instance.cdir != cdir:
            cls._instance = cls(cdir)
        return cls._instance

    @classmethod
    def file_name(cls, slot: str) -> str:
        _, func, prog_type = slot.rsplit("|", 2)
        return f"{cls.PREFIX}{func}-{prog_type}-{zlib.crc32(slot.encode()):08x}.json"

    def _dirfd(self) -> int | None:
        """The cache dir's fd; None when absent or untrusted (refused where a cache file is
        read: the index alone can only cost time)."""
        try:
            return _open_cache_dir(self.cdir, create=False)
        except BpfError:
            return None

    @staticmethod
    def read(dirfd: int, name: str, cdir: str) -> dict[str, object] | None:
        """An index file's entry (trust-checked, of this format, naming a slot); None when
        absent, refused or malformed."""
        try:
            data = trust.read_trusted_file(dirfd, name, cdir, "cache key index")
            d = json.loads(data) if data else None
        except (BpfError, ValueError):
            return None
        if isinstance(d, dict) and d.get("format") == _FORMAT and isinstance(d.get("slot"), str):
            return d
        return None

    def _load(self, slot: str) -> dict[str, object] | None:
        if slot in self.entries:
            return self.entries[slot]
        entry = None
        dirfd = self._dirfd()
        if dirfd is not None:
            try:
                entry = self.read(dirfd, self.file_name(slot), self.cdir)
            finally:
                os.close(dirfd)
            if entry is not None and entry["slot"] != slot:
                entry = None
        self.entries[slot] = entry
        return entry

    def _entry(self, slot: str, files: tuple[Stamp, ...]) -> dict[str, object] | None:
        """The slot's entry if its stamps (inputs and bcc) still hold and its key is sane."""
        e = self._load(slot)
        if e is None or e.get("files") != [list(f) for f in files]:
            return None
        key, bcc = e.get("key"), e.get("bcc")
        if not (isinstance(key, str) and len(key) == 32 and set(key) <= _HEX_DIGITS):
            return None
        if bcc is None:  # recorded "no bcc": still true only if bcc is still not importable
            return e if _bcc_version_file() is None else None
        if not (isinstance(bcc, list) and len(bcc) == 4 and isinstance(bcc[0], str)):
            return None
        found = _stamp(bcc[0])
        return e if found is not None and list(found) == bcc else None

    def get(self, slot: str, files: tuple[Stamp, ...]) -> str | None:
        e = self._entry(slot, files)
        return None if e is None else str(e["key"])

    def ident(self, slot: str, files: tuple[Stamp, ...]) -> ProgramIdent | None:
        """The slot's recorded ProgramIdent (None: not recorded, stale or malformed)."""
        e = self._entry(slot, files)
        if e is None:
            return None
        digest, tags = e.get("digest"), e.get("tags")
        if not (isinstance(digest, str) and len(digest) == 64 and set(digest) <= _HEX_DIGITS):
            return None
        if not (isinstance(tags, list) and tags and all(_is_tag(t) for t in tags)):
            return None
        return ProgramIdent(str(e["key"]), digest, frozenset(bytes.fromhex(t) for t in tags))

    def put(
        self,
        slot: str,
        files: tuple[Stamp, ...],
        bcc_file: str | None,
        key: str,
        ident: ProgramIdent | None = None,
    ) -> None:
        bcc = None if bcc_file is None else _stamp(bcc_file)
        entry: dict[str, object] = {
            "format": _FORMAT,
            "slot": slot,
            "files": [list(f) for f in files],
            "bcc": None if bcc is None else list(bcc),
            "key": key,
        }
        if ident is not None:
            entry["digest"] = ident.digest
            entry["tags"] = sorted(t.hex() for t in ident.tags)
        self.entries[slot] = entry
        dirfd = self._dirfd()
        if dirfd is None:
            return
        try:
            trust.write_trusted_file(dirfd, self.file_name(slot), json.dumps(entry).encode())
        except OSError:
            pass  # read-only or not ours to write: the key is only recomputed next time
        finally:
            os.close(dirfd)


TMP_MAX_AGE = 600.0  # s: a write takes milliseconds; an older temporary file's writer died


def prune_cache(now: float | None = None) -> list[str]:
    """Remove what can never be used again from the cache dir (for `pelagos-bpf gc`): temporary
    files of writers killed mid-write (older than TMP_MAX_AGE) and key index files whose slot's
    source file is gone (a removed checkout or install). Returns the names removed.

    Cache files themselves stay: they are named by content, and any install with the same
    sources and bcc may still want one. Unreadable or malformed index files stay too.
    """
    cdir = str(cache_dir())
    try:
        dirfd = _open_cache_dir(cdir, create=False)
    except BpfError:
        return []  # untrusted: not ours to clean (get_program refuses it with the fix)
    if dirfd is None:
        return []
    now = time.time() if now is None else now
    removed: list[str] = []
    try:
        for name in sorted(os.listdir(dirfd)):
            if name.startswith(trust.TMP_PREFIX):
                try:
                    st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
                except FileNotFoundError:
                    continue
                doomed = now - st.st_mtime > TMP_MAX_AGE
            elif name.startswith(_KeyIndex.PREFIX):
                entry = _KeyIndex.read(dirfd, name, cdir)
                source = str(entry["slot"]).rsplit("|", 2)[0] if entry else ""
                doomed = source.startswith("/") and not os.path.exists(source)
            else:
                doomed = False
            if doomed:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(name, dir_fd=dirfd)
                    removed.append(name)
    finally:
        os.close(dirfd)
    return removed


def _is_tag(t: object) -> bool:
    return isinstance(t, str) and len(t) == 16 and set(t) <= _HEX_DIGITS


class ProgramIdent(NamedTuple):
    """What identifies a cached program without its bytecode: the cache key, a digest of the
    instructions (pin names hash it) and the tags a kernel may give them (a pin must carry
    one). Recorded in the key index beside the key, so a process that fetches pinned programs
    never reads a cache file (docs/PERFORMANCE.md: first attach)."""

    key: str
    digest: str  # sha256 of the instructions, hex
    tags: frozenset[bytes]

    @classmethod
    def of(cls, key: str, insns: bytes) -> ProgramIdent:
        return cls(key, hashlib.sha256(insns).hexdigest(), trust.prog_tags(insns))


def program_ident(source: str | os.PathLike[str], func: str, prog_type: int) -> ProgramIdent:
    """The program's ProgramIdent: from the key index when its input stamps hold (a dozen
    stats, no file read beyond the index), else from the cache file (compiled if missing),
    and then recorded in the index for the next process."""
    files = _fingerprint([source, *_stub_files()])
    return _program_ident(os.fspath(source), func, int(prog_type), files)


@cache
def _program_ident(src: str, func: str, prog_type: int, files: tuple[Stamp, ...]) -> ProgramIdent:
    index = _KeyIndex.shared()
    slot = f"{files[0][0]}|{func}|{prog_type}"
    known = index.ident(slot, files)
    if known is not None:
        return known
    key = _cache_key(func, prog_type, files)
    ident = ProgramIdent.of(key, get_program(src, func, prog_type).insns)
    index.put(slot, files, _bcc_version_file(), key, ident)
    return ident


def cache_file_name(source: str | os.PathLike[str], func: str, prog_type: int) -> str:
    """The name of this program's file in the cache dir."""
    src = Path(source)
    return f"{src.stem}-{func}-{cache_key(src, func, prog_type)}.json"


def get_program(
    source: str | os.PathLike[str],
    func: str,
    prog_type: int,
    *,
    compile_if_missing: bool = True,
) -> CompiledProgram:
    """The compiled program from the (trusted) cache, compiling and storing it on a miss.

    A cache dir, ancestor or file that others could write raises BpfError naming it; a file
    that does not parse, or describes another function or type, is a miss."""
    name = cache_file_name(source, func, prog_type)
    return _get_cached(
        str(source), func, int(prog_type), name, str(cache_dir()), compile_if_missing
    )


@cache
def _get_cached(
    src: str, func: str, prog_type: int, name: str, cdir: str, compile_if_missing: bool
) -> CompiledProgram:
    path = f"{cdir.rstrip('/')}/{name}"
    dirfd = _open_cache_dir(cdir, create=compile_if_missing)
    try:
        data = None if dirfd is None else trust.read_trusted_file(dirfd, name, cdir, "cache file")
        why = "missing" if data is None else None
        if data is not None:
            try:
                return parse_cached(data, func, prog_type)
            except ValueError as e:
                why = f"unusable ({e})"
        if not compile_if_missing:
            raise BpfError(
                errno.ENOENT, "bytecode cache", f"{path} {why}: run `pelagos-bpf compile` first"
            )
        prog = compile_program(src, func, prog_type)
        assert dirfd is not None
        trust.write_trusted_file(dirfd, name, json.dumps(_to_json(prog)).encode())
        return prog
    finally:
        if dirfd is not None:
            os.close(dirfd)


_DIR_FDS: dict[str, int] = {}  # cache dir -> an fd opened (and checked) once per process
_DIR_LOCK = threading.Lock()


def _open_cache_dir(cdir: str, *, create: bool) -> int | None:
    """A fd of the checked cache dir (the caller closes it); None if absent and not created.

    The walk from / (one open and fstat per component) runs once per process: later calls
    dup the fd after two cheap checks, that `cdir` still names the same live directory and
    that it is still trusted (owner, mode). A moved, removed or re-created dir is walked again."""
    with _DIR_LOCK:
        return _open_cache_dir_locked(cdir, create)


def _open_cache_dir_locked(cdir: str, create: bool) -> int | None:
    held = _DIR_FDS.get(cdir)
    if held is not None:
        try:
            st, fst = os.stat(cdir), os.fstat(held)
            same = (st.st_dev, st.st_ino) == (fst.st_dev, fst.st_ino) and fst.st_nlink > 0
        except OSError:
            same = False
        if same:
            trust.check_dir_stat(fst, cdir, "cache dir")
            return os.dup(held)
        del _DIR_FDS[cdir]
        os.close(held)
    try:
        fd = trust.open_trusted_dir(cdir, "cache dir", create=create)
    except BpfError as e:
        if e.errno == errno.ENOENT and not create:
            return None
        raise
    _DIR_FDS[cdir] = fd
    return os.dup(fd)


def reset_process_state() -> None:
    """Forget what this process memoized (keys, idents, programs read, the key index, the cache
    dir's fd): what a fresh process starts with. For tests and bench/probe_first_attach.py."""
    for memo in (_cache_key, _program_ident, _get_cached):
        getattr(memo, "cache_clear", lambda: None)()  # a test may have swapped one out
    _KeyIndex._instance = None
    with _DIR_LOCK:
        for fd in _DIR_FDS.values():
            os.close(fd)
        _DIR_FDS.clear()


def _to_json(p: CompiledProgram) -> dict[str, object]:
    return {
        "format": _FORMAT,
        "func": p.func,
        "prog_type": p.prog_type,
        "insns": p.insns.hex(),
        "relocs": [list(r) for r in p.relocs],
        "source_hash": p.source_hash,
    }


def _want(d: dict[str, object], key: str, typ: type) -> object:
    v = d.get(key)
    if type(v) is not typ:  # exact: a bool is not an int here
        raise ValueError(f"{key!r} is not a {typ.__name__}")
    return v


def parse_cached(data: bytes, func: str, prog_type: int) -> CompiledProgram:
    """Validate a cache file completely; the program type and function are the request's, a
    file describing others is refused. Raises ValueError (a cache miss) on anything odd."""
    try:
        d = json.loads(data)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ValueError(f"not JSON: {e}") from None
    if not isinstance(d, dict):
        raise ValueError("not a JSON object")
    if _want(d, "format", int) != _FORMAT:
        raise ValueError(f"format {d['format']}, want {_FORMAT}")
    if _want(d, "func", str) != func or _want(d, "prog_type", int) != int(prog_type):
        raise ValueError(
            f"describes {d.get('func')} type {d.get('prog_type')}, not {func} type {prog_type}"
        )
    hexed = str(_want(d, "insns", str))
    if not _HEX_INSNS.fullmatch(hexed):
        raise ValueError("insns is not whole instructions in lower-case hex")
    insns = bytes.fromhex(hexed)
    if len(insns) > _MAX_INSNS * 8:
        raise ValueError(f"{len(insns) // 8} instructions")
    relocs = []
    for r in _want(d, "relocs", list):  # type: ignore[attr-defined]
        if not (isinstance(r, list) and len(r) == 2 and type(r[0]) is int and type(r[1]) is str):
            raise ValueError(f"bad reloc {r!r}")
        relocs.append((r[0], r[1]))
    if sorted(i for i, _ in relocs) != map_load_indexes(insns):
        raise ValueError("relocs do not match the map loads in insns")
    return CompiledProgram(
        func=func,
        prog_type=int(prog_type),
        insns=insns,
        relocs=tuple(relocs),
        source_hash=str(_want(d, "source_hash", str)),
    )


def map_load_indexes(insns: bytes) -> list[int]:
    """Indexes of the BPF_LD_IMM64 map-fd loads (the instructions relocate() rewrites)."""
    ops, last = insns[0::8], len(insns) // 8 - 1
    out = []
    i = ops.find(_LD_IMM64)
    while i != -1:
        if i < last and (insns[i * 8 + 1] >> 4) == _PSEUDO_MAP_FD:
            out.append(i)
        i = ops.find(_LD_IMM64, i + 1)
    return out


def _kernel_arch(machine: str) -> str:
    """The kernel's arch/ directory name for a uname machine (what bcc's kbuild uses)."""
    for prefix, arch in (
        ("x86_64", "x86"),
        ("i386", "x86"),
        ("i686", "x86"),
        ("aarch64", "arm64"),
        ("arm", "arm"),
        ("ppc", "powerpc"),
        ("s390", "s390"),
        ("riscv", "riscv"),
        ("mips", "mips"),
        ("loongarch", "loongarch"),
    ):
        if machine.startswith(prefix):
            return arch
    return machine


def _uapi_asm_dir() -> Path:
    """This machine's uapi <asm/...> headers: /usr/include/<multiarch>/asm on Debian, else
    /usr/include/asm."""
    import subprocess  # compile-time only: these imports cost every hook process ~18 ms
    import sysconfig

    multiarch = sysconfig.get_config_var("MULTIARCH")
    if not multiarch:
        try:
            r = subprocess.run(["gcc", "-print-multiarch"], capture_output=True, text=True)
            multiarch = r.stdout.strip()
        except OSError:
            multiarch = ""
    cands = [Path("/usr/include") / multiarch / "asm"] if multiarch else []
    for cand in (*cands, Path("/usr/include/asm")):
        if cand.is_dir():
            return cand
    raise BpfError(errno.ENOENT, "compile", "no uapi <asm/*.h> headers (Debian: linux-libc-dev)")


def _kernel_source_tree(dest: Path) -> None:
    """Lay out the minimal tree bcc wants as BCC_KERNEL_SOURCE: our stubs plus uapi links."""
    stub = project_bpf_dir() / "include"
    (dest / "include").mkdir(parents=True)
    for sub in ("linux", "asm"):
        (dest / "include" / sub).symlink_to(stub / sub)
    (dest / "include" / "uapi").symlink_to("/usr/include")
    arch = dest / "arch" / _kernel_arch(os.uname().machine) / "include" / "uapi"
    arch.mkdir(parents=True)
    (arch / "asm").symlink_to(_uapi_asm_dir())


def compile_program(source: str | os.PathLike[str], func: str, prog_type: int) -> CompiledProgram:
    """Run bcc (imports LLVM: ~0.3 s, ~125 MB) and return relocatable bytecode."""
    import ctypes as ct
    import tempfile

    src = Path(source)
    text = src.read_text()
    with tempfile.TemporaryDirectory(prefix="pelagos-bcc-") as tmp:
        _kernel_source_tree(Path(tmp))
        old = os.environ.get("BCC_KERNEL_SOURCE")
        os.environ["BCC_KERNEL_SOURCE"] = tmp
        try:
            from bcc import BPF  # lazy: the only place bcc/LLVM is imported
            from bcc.libbcc import lib

            # bytes: bcc's Python API takes str with a DeprecationWarning per call
            b = BPF(text=text.encode(), cflags=[f"-I{src.parent}"])
            try:
                insns = b.dump_func(func.encode())
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
    for idx in map_load_indexes(insns):
        imm = struct.unpack_from("<i", insns, idx * 8 + 4)[0]
        if imm not in fd_names:
            raise BpfError(22, "compile", f"insn {idx} references unknown map fd {imm}")
        relocs.append((idx, fd_names[imm]))
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
