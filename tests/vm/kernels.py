"""Fetch Debian kernels with apt and unpack them into a cache reused between runs.

Why apt and not a URL: the machines this runs on (dev boxes, CI) reach only the package
registries, and `apt-get download` + `dpkg -x` needs no root-owned install. Kernels of other
Debian releases (bullseye's 5.10, sid's newest) come from PRIVATE apt lists kept in the cache
(`apt.py`); the system's sources are never touched. Each kernel is unpacked once into
`<cache>/<package>/` with its modules indexed (`depmod -b`, so the guest's modprobe works) and
the uncompressed vmlinux extracted for a PVH direct boot. Two package layouts exist: the classic
one (one package: /lib/modules, /boot/vmlinuz-*) and sid's split merged-/usr one (linux-image-X
depends on linux-binary-X with /usr/lib/modules/<rel>/vmlinuz, linux-modules-X, linux-base-X).
"""

from __future__ import annotations

import lzma
import os
import re
import shutil
import struct
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from .apt import Apt, AptError, apt_for, locked

CACHE_ENV = "PELAGOS_VM_CACHE"
DEFAULT_CACHE = Path("/var/cache/pelagos-bpf-vm/kernels")


@dataclass(frozen=True)
class Source:
    """Where a short name's kernel comes from: a meta-package whose Depends names the kernel
    package, in the system's apt lists (suite None: Debian 12 here) or a private suite's."""

    meta: str
    suite: str | None = None


KERNELS: dict[str, Source] = {
    "5.10": Source("linux-image-amd64", "bullseye"),
    "5.10-cloud": Source("linux-image-cloud-amd64", "bullseye"),
    "6.1": Source("linux-image-amd64"),
    "6.1-cloud": Source("linux-image-cloud-amd64"),
    "6.12": Source("linux-image-6.12-amd64"),
    "6.12-cloud": Source("linux-image-6.12-cloud-amd64"),
    "trixie": Source("linux-image-amd64", "trixie"),  # 6.12 again, built by Debian 13
    "sid": Source("linux-image-amd64", "sid"),
    "sid-cloud": Source("linux-image-cloud-amd64", "sid"),
}
DEFAULT_KERNELS: tuple[str, ...] = ("5.10", "6.1", "6.12", "sid")

# Modules the first stage needs before it can reach the host's root (built in on 6.12).
INITRD_MODULES: tuple[str, ...] = ("virtio_pci", "virtiofs", "overlay")

_TIMEOUT = 600


class KernelError(RuntimeError):
    """A kernel could not be resolved, downloaded or unpacked (the message says why)."""


class DownloadError(KernelError):
    """apt could not download a package it listed: stale lists, worth one refresh."""


@dataclass(frozen=True)
class Kernel:
    """An unpacked kernel: what QEMU boots and where its modules are."""

    name: str  # short name given by the user ("6.1") or the package name
    package: str  # linux-image-6.1.0-56-amd64
    root: Path  # the dpkg -x tree (a split kernel's packages unpacked together)
    release: str  # uname -r, e.g. 6.1.0-56-amd64

    @property
    def vmlinux(self) -> Path:
        return self.root / "vmlinux"

    @property
    def bzimage(self) -> Path:
        return _vmlinuz(self.root, self.release)

    @property
    def modules_dir(self) -> Path:
        return self.root / "lib" / "modules" / self.release

    @property
    def boot_image(self) -> Path:
        """The uncompressed ELF (PVH entry, ~1 s faster) when extracted, else the bzImage."""
        return self.vmlinux if self.vmlinux.exists() else self.bzimage


def _vmlinuz(tree: Path, release: str) -> Path:
    """Classic: /boot/vmlinuz-<rel>; split merged-/usr: /usr/lib/modules/<rel>/vmlinuz."""
    classic = tree / "boot" / f"vmlinuz-{release}"
    return classic if classic.exists() else tree / "lib" / "modules" / release / "vmlinuz"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def _apt(suite: str | None) -> Apt:
    return Apt(suite, cache_dir() / ".apt")


def resolve(name: str, log=print) -> tuple[str, Apt]:
    """Map a short name to (kernel package, apt that has it); pass linux-image-* through."""
    if name.startswith("linux-image-"):
        try:
            return name, apt_for(name, [_apt(s) for s in _suites()], log)
        except AptError as e:
            raise KernelError(str(e)) from None
    src = KERNELS.get(name)
    if src is None:
        known = ", ".join(KERNELS)
        raise KernelError(f"unknown kernel {name!r}: use one of {known} or a linux-image-* package")
    apt = _apt(src.suite)
    remembered = cache_dir() / ".resolved" / name
    try:
        apt.ensure_lists(log)
        package = _meta_target(apt, src.meta)
        if package is None and apt.update(log, why="names no kernel"):
            package = _meta_target(apt, src.meta)
        if package is None:
            raise AptError(f"{apt}: {src.meta} names no linux-image package")
    except AptError as e:  # offline: the kernel this name resolved to last time, if unpacked
        last = remembered.read_text().strip() if remembered.exists() else ""
        if last and (cache_dir() / last / ".complete").exists():
            log(f"vm: {e}; using the cached {last}")
            return last, apt
        raise KernelError(f"{e}; and no cached kernel for {name!r} in {cache_dir()}") from None
    remembered.parent.mkdir(parents=True, exist_ok=True)
    remembered.write_text(package + "\n")
    return package, apt


def resolve_package(name: str) -> str:
    return resolve(name)[0]


def _suites() -> list[str | None]:
    """The system's configuration first, then each private suite."""
    return list(dict.fromkeys([None, *(s.suite for s in KERNELS.values())]))


def _meta_target(apt: Apt, meta: str) -> str | None:
    return next((d for d in apt.depends(meta) if d.startswith("linux-image-")), None)


def split_parts(package: str, depends: list[str]) -> list[str]:
    """The packages a split image needs unpacked with it: its Depends on linux-*-<same suffix>
    (linux-binary-X, linux-modules-X, linux-base-X); [] for a classic one-package kernel."""
    suffix = package.removeprefix("linux-image-")
    pat = re.compile(r"linux-[a-z]+-" + re.escape(suffix))
    return [d for d in depends if d != package and pat.fullmatch(d)]


def ensure_kernel(name: str, log=print) -> Kernel:
    """Resolve, download and unpack a kernel unless the cache already holds it.

    Every failure is a KernelError with a message (the runner prints it; no traceback).
    """
    cache = cache_dir()
    package, apt = resolve(name, log)
    try:
        _fetch_locked(package, apt, cache, log)
    except DownloadError as e:
        # stale lists name a package the mirror no longer has: refresh once and retry
        if not apt.update(log, why=f"download failed ({e})"):
            raise
        package, apt = resolve(name, log)
        _fetch_locked(package, apt, cache, log)
    dest = cache / package
    release = _release(dest, package)
    return Kernel(name=name, package=package, root=dest, release=release)


def _release(tree: Path, package: str) -> str:
    mods = tree / "lib" / "modules"
    releases = [p.name for p in mods.iterdir() if p.is_dir()] if mods.is_dir() else []
    if len(releases) != 1:
        raise KernelError(
            f"{package}: expected one lib/modules/<release> (a kernel image package), "
            f"found {releases or 'none'}"
        )
    return releases[0]


def _fetch_locked(package: str, apt: Apt, cache: Path, log) -> None:
    dest = cache / package
    with locked(cache / f".{package}.lock"):
        if not (dest / ".complete").exists():
            log(f"vm: fetching {package} ({apt}) into {cache}")
            try:
                _fetch(package, apt, dest, log)
            except AptError as e:
                raise DownloadError(str(e)) from None
            except (OSError, subprocess.SubprocessError) as e:
                raise KernelError(f"cannot unpack {package}: {e}") from None


def _fetch(package: str, apt: Apt, dest: Path, log) -> None:
    cache = dest.parent
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=cache) as tmp:
        t = Path(tmp)
        parts = split_parts(package, apt.depends(package, important=False))
        debs = apt.download([package, *parts], t)
        tree = t / "tree"
        for deb in debs:
            subprocess.run(["dpkg", "-x", str(deb), str(tree)], check=True, timeout=_TIMEOUT)
            deb.unlink()
        usr_mods = tree / "usr" / "lib" / "modules"
        if not (tree / "lib").exists() and usr_mods.is_dir():
            # merged-/usr: depmod (kmod 30) and the guest's bind mount expect <root>/lib/modules
            (tree / "lib").symlink_to("usr/lib")
        release = _release(tree, package)
        vmlinuz = _vmlinuz(tree, release)
        if not vmlinuz.is_file():
            raise KernelError(f"{package} (+{parts}): no kernel image for {release}")
        subprocess.run(
            ["depmod", "-b", str(tree), release], check=True, timeout=300, capture_output=True
        )
        try:
            (tree / "vmlinux").write_bytes(extract_vmlinux(vmlinuz.read_bytes()))
        except KernelError as e:  # bzImage still boots, only slower
            log(f"vm: {package}: no vmlinux ({e}); will boot the bzImage")
        (tree / ".complete").write_text(" ".join([package, *parts]) + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        tree.rename(dest)


def extract_vmlinux(bzimage: bytes) -> bytes:
    """The ELF inside a bzImage, found through the boot protocol's payload_offset/length.

    Why not scan for magic bytes like scripts/extract-vmlinux: the setup header says exactly
    where the compressed payload is (boot protocol >= 2.08), so no guessing is needed.
    """
    if bzimage[0x202:0x206] != b"HdrS":
        raise KernelError("not a bzImage (no HdrS)")
    setup_sects = bzimage[0x1F1] or 4
    payload_offset, payload_length = struct.unpack_from("<II", bzimage, 0x248)
    start = (setup_sects + 1) * 512 + payload_offset
    payload = bzimage[start : start + payload_length]
    elf = _decompress(payload)
    if not elf.startswith(b"\x7fELF"):
        raise KernelError("decompressed payload is not an ELF")
    return elf


def _decompress(data: bytes) -> bytes:
    if data.startswith(b"\xfd7zXZ\x00"):
        return lzma.LZMADecompressor(format=lzma.FORMAT_XZ).decompress(data)
    if data.startswith(b"\x5d\x00\x00"):
        return lzma.LZMADecompressor(format=lzma.FORMAT_ALONE).decompress(data)
    if data.startswith(b"\x1f\x8b"):
        import zlib

        return zlib.decompressobj(wbits=31).decompress(data)
    tools = {b"\x28\xb5\x2f\xfd": "zstd", b"\x02\x21\x4c\x18": "lz4", b"BZh": "bzip2"}
    for magic, tool in tools.items():
        if data.startswith(magic):
            if shutil.which(tool) is None:
                raise KernelError(f"payload is {tool}-compressed and {tool} is not installed")
            # The kernel build appends the 4-byte uncompressed size; the tools stop before it.
            r = subprocess.run([tool, "-dc"], input=data, capture_output=True, timeout=120)
            if not r.stdout.startswith(b"\x7fELF"):
                raise KernelError(f"{tool} -dc failed: {r.stderr.decode(errors='replace')[:200]}")
            return r.stdout
    raise KernelError(f"unknown payload compression (magic {data[:4].hex()})")


def module_files(kernel: Kernel, wanted: tuple[str, ...] = INITRD_MODULES) -> list[Path]:
    """The .ko files (dependencies first) the first stage must insmod; [] where built in."""
    mdir = kernel.modules_dir
    builtin = {
        Path(line.strip()).name.split(".ko")[0].replace("-", "_")
        for line in (mdir / "modules.builtin").read_text().splitlines()
    }
    deps: dict[str, list[str]] = {}
    paths: dict[str, str] = {}
    for line in (mdir / "modules.dep").read_text().splitlines():
        mod, _, rest = line.partition(":")
        key = _modname(mod)
        paths[key] = mod
        deps[key] = [_modname(d) for d in rest.split()]
    order: list[str] = []

    def visit(m: str) -> None:
        if m in order or m in builtin:
            return
        if m not in paths:
            raise KernelError(f"{kernel.package}: module {m} neither built in nor in modules.dep")
        for d in reversed(deps[m]):
            visit(d)
        order.append(m)

    for m in wanted:
        visit(m)
    return [mdir / paths[m] for m in order]


def _modname(path: str) -> str:
    return Path(path).name.split(".ko")[0].replace("-", "_")


def read_module(path: Path) -> bytes:
    """A module's ELF bytes (Debian 6.12 xz-compresses them; busybox insmod can't load that)."""
    data = path.read_bytes()
    if path.name.endswith(".xz"):
        return lzma.decompress(data)
    if path.name.endswith(".zst"):
        return subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=True).stdout
    return data
