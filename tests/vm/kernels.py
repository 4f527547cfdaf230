"""Fetch Debian kernels with apt and unpack them into a cache reused between runs.

Why apt and not a URL: the machines this runs on (dev boxes, CI) reach only the package
registries, and `apt-get download` + `dpkg -x` needs no root-owned install. Each kernel is
unpacked once into `<cache>/<package>/` with its modules indexed (`depmod -b`, so the guest's
modprobe works) and the uncompressed vmlinux extracted for a PVH direct boot.
"""

from __future__ import annotations

import fcntl
import lzma
import os
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

CACHE_ENV = "PELAGOS_VM_CACHE"
DEFAULT_CACHE = Path("/var/cache/pelagos-bpf-vm/kernels")

# Short name -> Debian bookworm meta-package whose Depends names the current kernel package.
META_PACKAGES: dict[str, str] = {
    "6.1": "linux-image-amd64",
    "6.12": "linux-image-6.12-amd64",
    "6.1-cloud": "linux-image-cloud-amd64",
    "6.12-cloud": "linux-image-6.12-cloud-amd64",
}
DEFAULT_KERNELS: tuple[str, ...] = ("6.1", "6.12", "6.12-cloud")

# Modules the first stage needs before it can reach the host's root (built in on 6.12).
INITRD_MODULES: tuple[str, ...] = ("virtio_pci", "virtiofs", "overlay")

_APT_TIMEOUT = 600


class KernelError(RuntimeError):
    """A kernel could not be resolved, downloaded or unpacked."""


@dataclass(frozen=True)
class Kernel:
    """An unpacked kernel: what QEMU boots and where its modules are."""

    name: str  # short name given by the user ("6.1") or the package name
    package: str  # linux-image-6.1.0-56-amd64
    root: Path  # the dpkg -x tree
    release: str  # uname -r, e.g. 6.1.0-56-amd64

    @property
    def vmlinux(self) -> Path:
        return self.root / "vmlinux"

    @property
    def bzimage(self) -> Path:
        return self.root / "boot" / f"vmlinuz-{self.release}"

    @property
    def modules_dir(self) -> Path:
        return self.root / "lib" / "modules" / self.release

    @property
    def boot_image(self) -> Path:
        """The uncompressed ELF (PVH entry, ~1 s faster) when extracted, else the bzImage."""
        return self.vmlinux if self.vmlinux.exists() else self.bzimage


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def resolve_package(name: str) -> str:
    """Map a short name to the current package name (via apt-cache), or pass a package through."""
    if name.startswith("linux-image-"):
        return name
    meta = META_PACKAGES.get(name)
    if meta is None:
        known = ", ".join(META_PACKAGES)
        raise KernelError(f"unknown kernel {name!r}: use one of {known} or a linux-image-* package")
    for attempt in (1, 2):
        try:
            out = subprocess.run(
                ["apt-cache", "depends", "--important", meta],
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            ).stdout
        except (OSError, subprocess.SubprocessError) as e:
            out, why = "", f"apt-cache depends {meta} failed: {e}"
        else:
            why = f"apt-cache depends {meta} names no linux-image package"
        for line in out.splitlines():
            line = line.strip()
            if line.startswith("Depends:") and "linux-image-" in line:
                return line.split(":", 1)[1].strip()
        if attempt == 1 and not _apt_update():
            break
    return _cached_fallback(name, why + " (apt lists: run `apt-get update`)")


_updated = False


def _apt_update() -> bool:
    """Refresh apt's lists once per process: a fresh machine may have none or stale ones."""
    global _updated
    if _updated or os.geteuid() != 0:
        return False
    _updated = True
    print("vm: apt-get update (kernel package lists missing or stale)")
    r = subprocess.run(["apt-get", "update", "-qq"], capture_output=True, timeout=_APT_TIMEOUT)
    return r.returncode == 0


def _cached_fallback(name: str, why: str) -> str:
    """Without apt metadata, reuse the newest cached kernel of that flavour (offline runs)."""
    flavour = "-cloud-amd64" if name.endswith("-cloud") else "-amd64"
    series = name.removesuffix("-cloud")
    found = sorted(
        (
            p.name
            for p in cache_dir().glob(f"linux-image-{series}.*")
            if p.name.endswith(flavour)
            and (flavour == "-cloud-amd64" or not p.name.endswith("-cloud-amd64"))
            and (p / ".complete").exists()
        ),
        key=_version_key,
    )
    if not found:
        raise KernelError(f"{why}; and no cached kernel for {name!r} in {cache_dir()}")
    return found[-1]


def _version_key(pkg: str) -> list[int]:
    return [int(x) for x in "".join(c if c.isdigit() else " " for c in pkg).split()]


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def ensure_kernel(name: str, log=print) -> Kernel:
    """Resolve, download and unpack a kernel unless the cache already holds it."""
    cache = cache_dir()
    package = resolve_package(name)
    try:
        _fetch_locked(package, cache, log)
    except KernelError:
        if not _apt_update():  # stale lists name a package the mirror no longer has
            raise
        package = resolve_package(name)
        _fetch_locked(package, cache, log)
    dest = cache / package
    releases = [p.name for p in (dest / "lib" / "modules").iterdir() if p.is_dir()]
    if len(releases) != 1:
        raise KernelError(f"{dest}: expected one lib/modules/<release>, found {releases}")
    return Kernel(name=name, package=package, root=dest, release=releases[0])


def _fetch_locked(package: str, cache: Path, log) -> None:
    dest = cache / package
    with _locked(cache / f".{package}.lock"):
        if not (dest / ".complete").exists():
            log(f"vm: fetching {package} into {cache}")
            _fetch(package, dest)


def _fetch(package: str, dest: Path) -> None:
    cache = dest.parent
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=cache) as tmp:
        t = Path(tmp)
        argv = ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", package]
        r = subprocess.run(argv, cwd=t, timeout=_APT_TIMEOUT, capture_output=True, text=True)
        if r.returncode != 0:
            raise KernelError(f"apt-get download {package} failed: {r.stderr.strip()}")
        debs = list(t.glob("*.deb"))
        if len(debs) != 1:
            raise KernelError(f"apt-get download {package} produced {debs}")
        tree = t / "tree"
        subprocess.run(["dpkg", "-x", str(debs[0]), str(tree)], check=True, timeout=_APT_TIMEOUT)
        debs[0].unlink()
        (release,) = [p.name for p in (tree / "lib" / "modules").iterdir()]
        subprocess.run(["depmod", "-b", str(tree), release], check=True, timeout=300)
        vmlinuz = tree / "boot" / f"vmlinuz-{release}"
        try:
            (tree / "vmlinux").write_bytes(extract_vmlinux(vmlinuz.read_bytes()))
        except KernelError as e:  # bzImage still boots, only slower
            print(f"vm: {package}: no vmlinux ({e}); will boot the bzImage")
        (tree / ".complete").write_text(package + "\n")
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
