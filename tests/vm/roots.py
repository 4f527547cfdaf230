"""Guest roots other than the host's: small Debian trees built with mmdebstrap, cached like kernels.

Why: the host root carries bcc, LLVM, gcc and the project's venv, so a guest booted on it can
never show that something works WITHOUT them (an installed wheel on a node with no compiler).
A root here is built once per package list with `mmdebstrap` (apt underneath, from the same
Debian archive the system's sources name, signed by its keyring), kept in
`<cache>/roots/<name>-<key>/` next to the kernel cache, and shared read-only into the guest in
place of the host root (the guest still writes to a tmpfs overlay). Build and reuse take an
flock, so parallel runners build a root once; a changed package list is a new key, hence a
fresh build; builds unused for a week are pruned.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .apt import KEYRING, archive_uri, locked
from .kernels import cache_dir
from .qemu import die_with_parent

ROOTS_ENV = "PELAGOS_VM_ROOTS"
HOST = "host"  # the default: the host's own root, shared read-only
PRUNE_SECONDS = 7 * 24 * 3600
_TIMEOUT = 1200
# Bumped when the build recipe (mmdebstrap options below) changes, so cached roots are rebuilt.
RECIPE = 1


@dataclass(frozen=True)
class RootSpec:
    """A Debian root: suite, the packages on top of the Essential set, and packages it must
    not contain (checked after the build: a dependency must not drag a compiler in)."""

    suite: str
    packages: tuple[str, ...]
    forbidden: str  # a regex matched against each installed package name
    why: str

    def key(self) -> str:
        doc = {"suite": self.suite, "packages": sorted(self.packages), "recipe": RECIPE}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:12]


# A compiler, LLVM or bcc in any form; runtime libraries (libgcc-s1, gcc-12-base) are allowed.
NO_TOOLCHAIN = (
    r"(gcc|g\+\+|cpp|clang|lld|llvm)(-\d+)?|(clang|llvm|lld)-.*|libllvm.*|libclang.*|"
    r"libgcc-\d+-dev|python3-bpfcc|bpfcc-.*|bpftrace|libbpf.*|linux-headers-.*|libc6-dev|"
    r"python3-dev|python3\.\d+-dev"
)

ROOTS: dict[str, RootSpec] = {
    "minimal": RootSpec(
        suite="bookworm",
        # python3-venv: a fresh venv for an offline wheel install; kmod: the guest's modprobe;
        # busybox: a shell toolbox (its `ip` too: Debian's iproute2 depends on libbpf1). No
        # libbpf: the library issues bpf(2) itself (its C extension, or ctypes on the libc).
        packages=("python3", "python3-venv", "busybox", "kmod"),
        forbidden=NO_TOOLCHAIN,
        why="Debian 12 with python3 and no compiler, LLVM, bcc or libbpf",
    ),
}


class RootError(RuntimeError):
    """A root could not be built or is not what its spec says (the message says why)."""


def roots_dir() -> Path:
    """$PELAGOS_VM_ROOTS, else `roots/` beside the kernel cache."""
    return Path(os.environ.get(ROOTS_ENV) or cache_dir().parent / "roots")


def mmdebstrap_argv(spec: RootSpec, target: Path, mirror: str) -> list[str]:
    """The build command: Essential packages plus the spec's, merged /usr without the usrmerge
    package (which pulls perl), no docs, man pages or locales (half the size)."""
    source = f"deb [signed-by={KEYRING}] {mirror} {spec.suite} main"
    # Root mode mounts /proc, /sys and /dev nodes inside the target: in private mount and pid
    # namespaces (killed with their first process), an interrupted build leaves no mount for
    # the clean-up to descend into and no apt or dpkg running.
    argv = ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child"]
    argv += ["mmdebstrap", "--variant=essential", "--mode=root"]
    argv += [f"--include={','.join(spec.packages)}"]
    argv += ["--hook-dir=/usr/share/mmdebstrap/hooks/merged-usr"]
    for path in ("/usr/share/man/*", "/usr/share/locale/*", "/usr/share/doc/*"):
        argv += [f"--dpkgopt=path-exclude={path}"]
    argv += ["--dpkgopt=path-include=/usr/share/doc/*/copyright"]
    # the system's own apt configuration accepts its archive's Release files as they are
    argv += ['--aptopt=Acquire::Check-Valid-Until "false"']
    return [*argv, spec.suite, str(target), source]


def installed_packages(status: str) -> list[str]:
    """Names of the installed packages in a dpkg status file's text."""
    out, name = [], None
    for line in status.splitlines():
        if line.startswith("Package: "):
            name = line.split(":", 1)[1].strip()
        elif line.startswith("Status: ") and line.split()[-1] == "installed" and name:
            out.append(name)
    return out


def forbidden_in(packages: list[str], pattern: str) -> list[str]:
    rx = re.compile(pattern)
    return sorted(p for p in packages if rx.fullmatch(p.split(":")[0]))


def ensure_root(name: str, log: Callable[[str], None] = print) -> Path:
    """The directory of root `name`, built now unless the cache holds it (HOST: `/`)."""
    if name == HOST:
        return Path("/")
    spec = ROOTS.get(name)
    if spec is None:
        raise RootError(f"unknown root {name!r}: use {HOST} or one of {', '.join(ROOTS)}")
    base = roots_dir()
    dest = base / f"{name}-{spec.key()}"
    with locked(base / f".{name}.lock"):
        if not (dest / ".complete").exists():
            _build(name, spec, dest, log)
        (dest / ".complete").touch()  # last use, for pruning
        _prune(base, name, keep=dest, log=log)
    return dest / "root"


def _build(name: str, spec: RootSpec, dest: Path, log: Callable[[str], None]) -> None:
    if shutil.which("mmdebstrap") is None:
        raise RootError("mmdebstrap is not installed (apt-get install mmdebstrap)")
    mirror = archive_uri()
    for old in dest.parent.glob(f".build-{name}-*"):  # a dead runner's (we hold the lock)
        shutil.rmtree(old, ignore_errors=True)
    log(f"vm: building root {name} ({spec.why}) from {mirror} into {dest}")
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix=f".build-{name}-", dir=dest.parent) as tmp:
        build = Path(tmp) / "build"
        build.mkdir()
        tree = build / "root"
        argv = mmdebstrap_argv(spec, tree, mirror)
        try:  # the build dies with the runner (unshare --kill-child: all of it)
            r = subprocess.run(
                argv,
                capture_output=True,
                text=True,
                timeout=_TIMEOUT,
                preexec_fn=die_with_parent(),
            )
        except (OSError, subprocess.SubprocessError) as e:
            raise RootError(f"mmdebstrap for root {name}: {e}") from None
        if r.returncode != 0:
            why = " | ".join(r.stderr.strip().splitlines()[-4:])
            raise RootError(f"mmdebstrap for root {name} failed: {why}")
        pkgs = installed_packages((tree / "var/lib/dpkg/status").read_text())
        bad = forbidden_in(pkgs, spec.forbidden)
        if bad:
            raise RootError(f"root {name} must not contain {', '.join(bad)} (a dependency?)")
        (build / "packages").write_text("".join(p + "\n" for p in sorted(pkgs)))
        (build / "argv").write_text(json.dumps(argv) + "\n")
        (build / ".complete").write_text(f"{len(pkgs)} packages\n")
        if dest.exists():  # an interrupted build's leftovers
            shutil.rmtree(dest)
        build.rename(dest)
    size = _du(dest / "root")
    log(
        f"vm: root {name}: {len(pkgs)} packages, {size / 2**20:.0f} MiB, "
        f"built in {time.monotonic() - t0:.0f}s"
    )


def _prune(base: Path, name: str, keep: Path, log: Callable[[str], None]) -> None:
    """Remove builds of `name` for other package lists unused for PRUNE_SECONDS (a checkout
    with another list may still boot its own; a week of disuse means it is gone)."""
    now = time.time()
    for d in base.glob(f"{name}-*"):
        stamp = d / ".complete"
        if d == keep or not stamp.exists() or now - stamp.stat().st_mtime < PRUNE_SECONDS:
            continue
        log(f"vm: removing unused root {d}")
        shutil.rmtree(d, ignore_errors=True)


def _du(p: Path) -> int:
    return sum(
        os.lstat(os.path.join(dirpath, f)).st_size
        for dirpath, _dirs, files in os.walk(p)
        for f in files
    )
