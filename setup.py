"""The two native pieces built with the package; everything else is in pyproject.toml.

- pelagos_bpf._sys (C extension): bpf(2) and statfs(2) without ctypes (faster first and later
  calls, see pelagos_bpf/_sys.c). optional=True: without a C compiler or Python headers the
  install still succeeds and pelagos_bpf.bpfsys uses ctypes (`bpfsys.BACKEND` says which).
- pelagos_bpf/_bin/pelagos-bpf-hook (hook/pelagos-bpf-hook.c): the thin OCI hook, a static
  executable (`gcc -O2 -static`), built here so a wheel carries it and no node compiles at
  install; an editable install builds it in the source tree. Without gcc or static glibc the
  build warns and goes on: `pelagos-bpf hook-path` then says the hook is missing.
"""

import os
import shlex
import subprocess

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HOOK_SOURCE = os.path.join("hook", "pelagos-bpf-hook.c")
HOOK_BINARY = os.path.join("pelagos_bpf", "_bin", "pelagos-bpf-hook")


class build_ext_and_hook(build_ext):
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
    ext_modules=[Extension("pelagos_bpf._sys", ["pelagos_bpf/_sys.c"], optional=True)],
    cmdclass={"build_ext": build_ext_and_hook},
)
