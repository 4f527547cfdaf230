"""The containerd guest's two images, built locally as one OCI image-layout tarball.

Why: the guest reaches no registry, so both the pod sandbox ("pause") image and the container
image are made here from the host's static busybox and imported with `ctr images import`. Both
share one layer (busybox plus its applet symlinks and a minimal /etc); they differ only in
their config. The tarball is byte-for-byte deterministic (sorted entries, zero mtimes, gzip
without a timestamp), so it is cached on the host under a name derived from its inputs.
Layout: OCI image-layout 1.0 (`oci-layout`, `index.json`, `blobs/sha256/...`); each index entry
carries `io.containerd.image.name`, the full reference ctr gives the image.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
import tempfile
from collections.abc import Callable
from pathlib import Path

from .apt import locked
from .initramfs import busybox_path

PAUSE_IMAGE = "localhost/pelagos-bpf/pause:1"
BUSYBOX_IMAGE = "localhost/pelagos-bpf/busybox:1"
# The sandbox holds the pod's namespaces and does nothing. containerd stops it with SIGKILL, so
# busybox `sleep inf` (no signal handling as PID 1) is as good as the real pause binary.
CONFIGS: dict[str, dict[str, object]] = {
    PAUSE_IMAGE: {"Entrypoint": ["/bin/sleep", "inf"]},
    BUSYBOX_IMAGE: {"Cmd": ["/bin/sh"]},
}
Log = Callable[[str], object]
FORMAT = 1  # bump when the layout below changes: it is part of the cache key

MT_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
MT_CONFIG = "application/vnd.oci.image.config.v1+json"
MT_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MT_INDEX = "application/vnd.oci.image.index.v1+json"
ETC_FILES = {
    "etc/passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n",
    "etc/group": "root:x:0:\nnogroup:x:65534:\n",
}


def applets(busybox: Path) -> list[str]:
    """The applet names this busybox provides (`busybox --list`)."""
    out = subprocess.run(
        [str(busybox), "--list"], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    return sorted(a for a in out.split() if a and "/" not in a and a != "busybox")


class _Tar:
    """A deterministic tar writer: fixed owner, mode and mtime; entries in the order given."""

    def __init__(self) -> None:
        self.buf = io.BytesIO()
        self.tar = tarfile.TarFile(fileobj=self.buf, mode="w", format=tarfile.PAX_FORMAT)

    def _info(self, name: str, kind: bytes, mode: int) -> tarfile.TarInfo:
        ti = tarfile.TarInfo(name)
        ti.type, ti.mode, ti.mtime, ti.uid, ti.gid = kind, mode, 0, 0, 0
        return ti

    def dir(self, name: str, mode: int = 0o755) -> None:
        self.tar.addfile(self._info(name, tarfile.DIRTYPE, mode))

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        ti = self._info(name, tarfile.REGTYPE, mode)
        ti.size = len(data)
        self.tar.addfile(ti, io.BytesIO(data))

    def symlink(self, name: str, target: str) -> None:
        ti = self._info(name, tarfile.SYMTYPE, 0o777)
        ti.linkname = target
        self.tar.addfile(ti)

    def finish(self) -> bytes:
        self.tar.close()
        return self.buf.getvalue()


def layer_tar(busybox: bytes, names: list[str]) -> bytes:
    """The root filesystem: /bin/busybox, a symlink per applet, /etc/{passwd,group}."""
    t = _Tar()
    for d in ("bin", "dev", "etc", "proc", "root", "sys", "tmp", "var"):
        t.dir(d, 0o1777 if d == "tmp" else 0o755)
    t.file("bin/busybox", busybox, 0o755)
    for a in names:
        t.symlink(f"bin/{a}", "busybox")
    for name, text in ETC_FILES.items():
        t.file(name, text.encode())
    return t.finish()


def _blob(blobs: dict[str, bytes], data: bytes, media_type: str) -> dict[str, object]:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    blobs[digest] = data
    return {"mediaType": media_type, "digest": digest, "size": len(data)}


def _json(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def oci_archive(layer: bytes, configs: dict[str, dict[str, object]]) -> bytes:
    """An OCI image-layout tarball holding one image per `configs` entry, all on `layer`."""
    blobs: dict[str, bytes] = {}
    gz = gzip.compress(layer, compresslevel=9, mtime=0)
    layer_desc = _blob(blobs, gz, MT_LAYER)
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    manifests = []
    for ref, cfg in configs.items():
        config = {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Env": ["PATH=/bin"], "WorkingDir": "/", **cfg},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        }
        manifest = {
            "schemaVersion": 2,
            "mediaType": MT_MANIFEST,
            "config": _blob(blobs, _json(config), MT_CONFIG),
            "layers": [layer_desc],
        }
        desc = _blob(blobs, _json(manifest), MT_MANIFEST)
        desc["platform"] = {"architecture": "amd64", "os": "linux"}
        desc["annotations"] = {
            "io.containerd.image.name": ref,
            "org.opencontainers.image.ref.name": ref.rpartition(":")[2],
        }
        manifests.append(desc)
    index = {"schemaVersion": 2, "mediaType": MT_INDEX, "manifests": manifests}
    t = _Tar()
    t.file("oci-layout", _json({"imageLayoutVersion": "1.0.0"}))
    t.file("index.json", _json(index))
    t.dir("blobs")
    t.dir("blobs/sha256")
    for digest in sorted(blobs):
        t.file(f"blobs/sha256/{digest.removeprefix('sha256:')}", blobs[digest])
    return t.finish()


def ensure_archive(cache: Path, log: Log = print) -> Path:
    """The images tarball for this host's busybox, built once into `cache` (flock'd)."""
    bb = busybox_path()
    data = bb.read_bytes()
    key = hashlib.sha256(data + _json(CONFIGS) + str(FORMAT).encode()).hexdigest()[:16]
    dest = cache / f"images-{key}.tar"
    with locked(cache / ".images.lock"):
        if not dest.exists():
            archive = oci_archive(layer_tar(data, applets(bb)), CONFIGS)
            fd, tmp = tempfile.mkstemp(dir=cache, prefix=".images-")
            with os.fdopen(fd, "wb") as f:
                f.write(archive)
            os.replace(tmp, dest)
            log(f"vm: built the guest images ({len(archive) // 1024} KiB) into {dest}")
    return dest
