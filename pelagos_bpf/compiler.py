"""Compile bpf/*.c with bcc into the bytecode files `pelagos_bpf.bytecode` loads.

Run when the package is built (setup.py) and by `pelagos-bpf compile [--out DIR]`; never on a
container's path: importing bcc dlopens LLVM, and a compile takes a large share of a second
and of memory per program. bcc is Debian's `python3-bpfcc` (not on PyPI), so a build runs with
`--no-isolation` where it is importable; a tree that already holds current bytecode (an
sdist) builds without it.

No kernel headers either: the programs use uapi types only, and bcc gets a minimal kernel
source tree (`BCC_KERNEL_SOURCE`) made of our stub headers (bpf/include) and the system's uapi
headers (Debian: linux-libc-dev).
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
from collections.abc import Iterable
from pathlib import Path

from . import bytecode, trust
from .bytecode import CompiledProgram
from .errors import BpfError

SOURCES_DIR = Path(__file__).resolve().parent / "bpfsrc"  # package data: bpf/ of the checkout
# The stub kernel headers under bpf/include (tests/test_bytecode.py checks this is the tree).
STUB_HEADERS = (
    "asm/page.h",
    "linux/kconfig.h",
    "linux/log2.h",
    "linux/types.h",
    "linux/version.h",
)


def source_path(source: str) -> Path:
    return SOURCES_DIR / f"{source}.c"


def inputs_hash(source: str) -> str:
    """sha256 over everything a compile reads of ours: the C source and the stub headers (names
    and bytes). The build recompiles when it moved; a test checks the shipped bytecode is
    current."""
    h = hashlib.sha256(source_path(source).read_bytes())
    for name in STUB_HEADERS:
        h.update(b"\0" + name.encode() + b"\0" + (SOURCES_DIR / "include" / name).read_bytes())
    return h.hexdigest()


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
    import subprocess
    import sysconfig

    multiarch = str(sysconfig.get_config_var("MULTIARCH") or "")
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
    stub = SOURCES_DIR / "include"
    (dest / "include").mkdir(parents=True)
    for sub in ("linux", "asm"):
        (dest / "include" / sub).symlink_to(stub / sub)
    (dest / "include" / "uapi").symlink_to("/usr/include")
    arch = dest / "arch" / _kernel_arch(os.uname().machine) / "include" / "uapi"
    arch.mkdir(parents=True)
    (arch / "asm").symlink_to(_uapi_asm_dir())


def compile_program(source: str, func: str, prog_type: int) -> CompiledProgram:
    """Run bcc on bpf/<source>.c and return `func`'s relocatable bytecode."""
    import ctypes as ct
    import tempfile

    src = source_path(source)
    text = src.read_bytes()
    with tempfile.TemporaryDirectory(prefix="pelagos-bcc-") as tmp:
        _kernel_source_tree(Path(tmp))
        old = os.environ.get("BCC_KERNEL_SOURCE")
        os.environ["BCC_KERNEL_SOURCE"] = tmp
        try:
            from bcc import BPF  # the only place bcc/LLVM is imported
            from bcc.libbcc import lib

            # bytes: bcc's Python API takes str with a DeprecationWarning per call
            b = BPF(text=text, cflags=[f"-I{src.parent}"])
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
            raise BpfError(
                errno.ENOENT, "compile", "bcc is not installed (Debian: python3-bpfcc)"
            ) from e
        except Exception as e:
            if isinstance(e, BpfError):
                raise
            raise BpfError(
                errno.EINVAL, "compile", f"bcc failed on {src.name}:{func}: {e}", path=src
            ) from e
        finally:
            if old is None:
                os.environ.pop("BCC_KERNEL_SOURCE", None)
            else:
                os.environ["BCC_KERNEL_SOURCE"] = old
    relocs = []
    for idx in bytecode.map_load_indexes(insns):
        imm = struct.unpack_from("<i", insns, idx * 8 + 4)[0]
        if imm not in fd_names:
            raise BpfError(
                errno.EINVAL,
                "compile",
                f"{src.name}:{func}: insn {idx} references unknown map fd {imm}",
                path=src,
            )
        relocs.append((idx, fd_names[imm]))
    return CompiledProgram(
        source=source,
        func=func,
        prog_type=int(prog_type),
        insns=bytes(insns),
        relocs=tuple(relocs),
        inputs_hash=inputs_hash(source),
        machine=os.uname().machine,
    )


def is_current(directory: str | os.PathLike[str], source: str, func: str, prog_type: int) -> bool:
    """Does `directory` hold this program's bytecode, compiled from today's sources?"""
    try:
        data = (Path(directory) / bytecode.file_name(source, func)).read_bytes()
        prog = bytecode.parse(data, source, func, prog_type)
    except (OSError, ValueError):
        return False
    return prog.inputs_hash == inputs_hash(source)


def build(
    out: str | os.PathLike[str],
    programs: Iterable[tuple[str, str, int]],
    *,
    force: bool = False,
) -> list[CompiledProgram | str]:
    """Compile each (source, func, prog_type) into `out` (a trusted dir, created 0755); a
    program whose file is current is kept (its file name is returned instead) unless `force`.
    Bytecode files of programs no longer listed are removed (a wheel must not ship them)."""
    out = os.fspath(out)
    programs = list(programs)
    dirfd = trust.open_trusted_dir(out, "bytecode dir", create=True)
    done: list[CompiledProgram | str] = []
    try:
        wanted = {bytecode.file_name(s, f) for s, f, _ in programs}
        for name in os.listdir(dirfd):
            if name.endswith(".json") and name not in wanted:
                os.unlink(name, dir_fd=dirfd)
        for source, func, prog_type in programs:
            if not force and is_current(out, source, func, prog_type):
                done.append(bytecode.file_name(source, func))
                continue
            prog = compile_program(source, func, prog_type)
            trust.write_trusted_file(
                dirfd, bytecode.file_name(source, func), bytecode.to_json(prog)
            )
            done.append(prog)
    finally:
        os.close(dirfd)
    return done
