"""Build the guest's tiny initramfs: static busybox, the PID 1 script and a few modules.

Why written in Python (newc format) instead of `find | cpio`: it is 30 lines, needs no staging
directory and is byte-for-byte deterministic. It stays uncompressed: decompressing under TCG
costs more than reading ~3 MB through QEMU.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from .kernels import Kernel, module_files, read_module

INIT_SCRIPT = Path(__file__).with_name("init.sh")
APPLETS = ("sh", "cat", "echo", "mount", "umount", "mkdir", "insmod", "chroot", "env", "poweroff",
           "reboot", "sleep", "sync", "ip", "hostname", "printf", "chmod", "uname",
           "switch_root")  # fmt: skip


def busybox_path() -> Path:
    """A static busybox (a dynamic one would need the host's libc inside the initramfs)."""
    for p in ("/bin/busybox", "/usr/bin/busybox", "/usr/lib/initramfs-tools/bin/busybox"):
        if Path(p).exists():
            return Path(p)
    found = shutil.which("busybox")
    if not found:
        raise FileNotFoundError("busybox not found: apt-get install busybox-static")
    return Path(found)


class _Newc:
    """Minimal writer for the kernel's initramfs cpio format ("newc", no checksums)."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.ino = 1

    def _entry(self, name: str, mode: int, data: bytes = b"") -> None:
        fields = [self.ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(name) + 1, 0]
        hdr = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.ino += 1
        self.buf += hdr + name.encode() + b"\0"
        self.buf += b"\0" * (-len(self.buf) % 4)
        self.buf += data
        self.buf += b"\0" * (-len(self.buf) % 4)

    def dir(self, name: str) -> None:
        self._entry(name, 0o040755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, 0o100000 | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, 0o120777, target.encode())

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return bytes(self.buf)


def build(kernel: Kernel, dest: Path) -> Path:
    """Write the initramfs for `kernel` to dest and return it."""
    w = _Newc()
    for d in ("bin", "dev", "proc", "sys", "modules"):
        w.dir(d)
    w.file("bin/busybox", busybox_path().read_bytes(), 0o755)
    for a in APPLETS:
        w.symlink(f"bin/{a}", "busybox")
    w.file("init", INIT_SCRIPT.read_bytes(), 0o755)
    names = []
    for ko in module_files(kernel):
        name = ko.name.split(".ko")[0] + ".ko"
        w.file(f"modules/{name}", read_module(ko))
        names.append(name)
    w.file("modules.order", "".join(n + "\n" for n in names).encode())
    dest.write_bytes(w.finish())
    return dest
