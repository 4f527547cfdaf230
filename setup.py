"""Build steps pyproject.toml cannot declare: the BPF bytecode and the two native pieces.

- The bytecode (package data `pelagos_bpf/bytecode/*.json`) is compiled with bcc from bpf/*.c
  before the package is built (sdist, wheel, editable), unless the tree already holds bytecode
  compiled from today's sources: so an sdist (which carries it) builds a wheel with no bcc, and
  a checkout builds once. bcc is Debian's python3-bpfcc, not on PyPI: build a fresh checkout
  with `pip install --no-build-isolation` (or `python -m build --no-isolation`) as root.
- pelagos_bpf._sys (C extension): bpf(2) and statfs(2) without ctypes (pelagos_bpf/_sys.c).
  optional=True: without a C compiler or Python headers the install still succeeds and
  pelagos_bpf.bpfsys uses ctypes (`bpfsys.BACKEND` says which).
- pelagos_bpf/_bin/pelagos-bpf-hook (hook/pelagos-bpf-hook.c): the thin OCI hook, a static
  executable (`gcc -O2 -static`), built here so a wheel carries it and no node compiles at
  install; an editable install builds it in the source tree. Without gcc or static glibc the
  build warns and goes on: `pelagos-bpf hook-path` then says the hook is missing.

The wheel is CPython- and architecture-specific (the extension and the hook are native).
"""

from __future__ import annotations

import importlib.util
import os
import shlex
import subprocess
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py
from setuptools.command.sdist import sdist

HERE = os.path.dirname(os.path.abspath(__file__))
HOOK_SOURCE = os.path.join("hook", "pelagos-bpf-hook.c")
HOOK_BINARY = os.path.join("pelagos_bpf", "_bin", "pelagos-bpf-hook")


def _this_tree_package() -> None:
    """Import pelagos_bpf from THIS tree, whatever else the interpreter could find (a developer's
    venv may hold an editable install of another checkout, whose finder would win)."""
    pkg = os.path.join(HERE, "pelagos_bpf")
    spec = importlib.util.spec_from_file_location(
        "pelagos_bpf", os.path.join(pkg, "__init__.py"), submodule_search_locations=[pkg]
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["pelagos_bpf"] = module
    spec.loader.exec_module(module)


def ensure_bytecode() -> None:
    _this_tree_package()
    from pelagos_bpf import bytecode, compiler
    from pelagos_bpf.registry import all_programs

    assert bytecode.PACKAGED_DIR.startswith(HERE), bytecode.PACKAGED_DIR
    programs = all_programs()
    stale = [p for p in programs if not compiler.is_current(bytecode.PACKAGED_DIR, *p)]
    if not stale:
        return
    names = ", ".join(f"{s}.{f}" for s, f, _ in stale)
    if os.geteuid() != 0:
        raise SystemExit(f"BPF bytecode missing or stale ({names}): build as root with bcc")
    print(f"compiling BPF bytecode with bcc: {names}", flush=True)
    compiler.build(bytecode.PACKAGED_DIR, stale)


class BuildPy(build_py):
    def run(self) -> None:
        ensure_bytecode()
        super().run()


class Sdist(sdist):
    def run(self) -> None:
        ensure_bytecode()
        super().run()


class BuildExtAndHook(build_ext):
    """build_ext, then the thin hook beside the extension (in place for editable installs)."""

    def run(self) -> None:
        super().run()
        out = HOOK_BINARY if self.inplace else os.path.join(self.build_lib, HOOK_BINARY)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        cc = shlex.split(os.environ.get("CC", "gcc"))
        argv = [*cc, "-O2", "-static", "-Wall", "-Wextra", "-o", out, HOOK_SOURCE]
        try:
            subprocess.run(argv, check=True)
        except (OSError, subprocess.CalledProcessError) as e:
            print(f"warning: the thin OCI hook was not built ({' '.join(argv)}: {e})")
            return
        self._hook = out

    def get_outputs(self) -> list[str]:
        return [*super().get_outputs(), *([self._hook] if getattr(self, "_hook", None) else [])]


setup(
    cmdclass={"build_py": BuildPy, "sdist": Sdist, "build_ext": BuildExtAndHook},
    ext_modules=[Extension("pelagos_bpf._sys", ["pelagos_bpf/_sys.c"], optional=True)],
)
