"""The hook's records: what create attached, for poststop and for per-namespace quotas.

Poststop cannot find the cgroup from the pid (the process is dead, and the runtime may have
removed the cgroup), so create leaves a record under $PELAGOS_BPF_HOOK_STATE (default
/run/pelagos-bpf/oci-hook), named by the container id: the cgroup's path and id, the pod's
namespace and how many rule-map entries the hook's device set holds (the policy's
per-namespace total is the sum over the namespace's records).

Trust: a record tells poststop which cgroup to detach from, so records are read only from a
directory root alone can write (it and every ancestor root-owned, not group/world writable, no
symlinks: pelagos_bpf.trust, as for pins), and a record only if it is a regular file owned by
root and not writable by others. A directory others can write is refused as a whole: anyone
could have planted or swapped names in it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import os
import re
import threading
from collections.abc import Iterator
from pathlib import Path

from .. import trust  # file checks only: loads neither bpfsys nor hashlib
from ..errors import PelagosError
from .request import HookError

STATE_DIR_ENV = "PELAGOS_BPF_HOOK_STATE"
DEFAULT_STATE_DIR = "/run/pelagos-bpf/oci-hook"
MAX_RECORD = 64 << 10  # a record is ~200 bytes
SUFFIX = ".json"


_CACHE: dict[tuple[str, str], tuple[tuple[int, int, int], Record]] = {}
_CACHE_LOCK = threading.Lock()


def state_dir() -> Path:
    return Path(_state_dir())


def _state_dir() -> str:
    return os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_+-][A-Za-z0-9_.+-]{0,200}")


def record_name(container_id: str) -> str:
    """The record's file name; ids that are not plain file names are hashed."""
    if _PLAIN_NAME.fullmatch(container_id):
        return f"{container_id}{SUFFIX}"
    import hashlib  # here: it loads OpenSSL, which every hook exec would pay otherwise

    return f"sha256-{hashlib.sha256(container_id.encode()).hexdigest()}{SUFFIX}"


def record_path(container_id: str, directory: Path | None = None) -> Path:
    return (directory or state_dir()) / record_name(container_id)


@dataclasses.dataclass(frozen=True)
class Record:
    """One container's record. `namespace` None: no Kubernetes namespace (podman, runc)."""

    id: str
    cgroup: str
    cgroup_id: int
    namespace: str | None = None
    entries: int = 0

    def to_json(self) -> bytes:
        # Not dataclasses.asdict: its deep copy was a tenth of a create. Every field is a str,
        # an int or None.
        return json.dumps({name: getattr(self, name) for name in _RECORD_FIELDS}).encode()

    @classmethod
    def from_json(cls, raw: bytes, where: str) -> Record:
        """HookError naming the record and the field when it is not one of ours (a record of
        an older release has no namespace and no entries)."""
        try:
            doc = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise HookError(f"record {where}: not JSON ({e})") from None
        if not isinstance(doc, dict):
            raise HookError(f"record {where}: not a JSON object")
        want = {"id": str, "cgroup": str, "cgroup_id": int, "entries": int}
        for key, typ in want.items():
            v = doc.get(key, 0 if key == "entries" else None)
            if not isinstance(v, typ) or isinstance(v, bool):
                raise HookError(f"record {where}: {key}={v!r} is not a {typ.__name__}")
        ns = doc.get("namespace")
        if ns is not None and not isinstance(ns, str):
            raise HookError(f"record {where}: namespace={ns!r} is not a string")
        if not doc["cgroup"].startswith("/"):
            raise HookError(f"record {where}: cgroup={doc['cgroup']!r} is not an absolute path")
        return cls(doc["id"], doc["cgroup"], doc["cgroup_id"], ns, doc.get("entries", 0))

    def alive(self) -> bool:
        """Does the cgroup still exist, as the same directory (not a new one of that name)?"""
        try:
            return os.stat(self.cgroup).st_ino == self.cgroup_id
        except OSError:
            return False


_RECORD_FIELDS = tuple(f.name for f in dataclasses.fields(Record))


class Records:
    """The record directory, opened once and trust-checked (a context manager)."""

    def __init__(self, directory: Path | None = None, *, create: bool = False) -> None:
        self.path = str(directory) if directory else _state_dir()
        # held and shared, never closed here: the agent opens it for every container (a fresh
        # hook process walks it once)
        self.fd = trust.open_trusted_dir_held(self.path, "hook state dir", create=create)

    @classmethod
    def open_existing(cls, directory: Path | None = None) -> Records | None:
        """The directory if it exists (None: no create ever left a record here)."""
        try:
            return cls(directory)
        except PelagosError as e:
            if isinstance(e, OSError) and e.errno == errno.ENOENT:
                return None
            raise

    def __enter__(self) -> Records:
        return self

    def __exit__(self, *_: object) -> None:
        pass  # the fd is held by trust.open_trusted_dir_held

    def write(self, rec: Record) -> str:
        """Atomically (re)place the container's record; its path."""
        name = record_name(rec.id)
        # /run is a tmpfs (no fsync), and only root reads a record (no fchmod: see trust)
        trust.write_trusted_file(self.fd, name, rec.to_json(), durable=False, exact_mode=False)
        return f"{self.path}/{name}"

    def _read(self, name: str) -> Record | None:
        raw = trust.read_trusted_file(self.fd, name, self.path, "hook record")
        if raw is None:
            return None
        if len(raw) > MAX_RECORD:
            raise HookError(f"record {self.path}/{name}: {len(raw)} bytes, not a record of ours")
        return Record.from_json(raw, f"{self.path}/{name}")

    def read(self, container_id: str) -> Record | None:
        """The container's record (None: create left none); HookError or an untrusted-file
        error naming it when it cannot be used."""
        rec = self._read(record_name(container_id))
        if rec is not None and rec.id != container_id:
            raise HookError(f"record {self.path}/{record_name(container_id)}: of {rec.id!r}")
        return rec

    def remove(self, container_id: str) -> None:
        self._unlink(record_name(container_id))

    def _unlink(self, name: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=self.fd)

    def _names(self) -> list[str]:
        # A listing needs an open file of its own: the held fd is shared by the threads, and
        # os.listdir reads through a dup, which would share (and race on) its offset.
        fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=self.fd)
        try:
            names = os.listdir(fd)
        finally:
            os.close(fd)
        return [n for n in names if n.endswith(SUFFIX) and not n.startswith(".")]

    def each(self) -> Iterator[tuple[str, Record]]:
        """(file name, record) of every usable record; others are skipped (being written,
        malformed, untrusted: prune and poststop name them when they meet them)."""
        for name in self._names():
            try:
                rec = self._read(name)
            except (HookError, PelagosError, OSError):
                continue
            if rec is not None:
                yield name, rec

    def each_cached(self) -> Iterator[Record]:
        """each()'s records, re-read only when their file changed since this process last read
        it (one fstatat per record): a resident agent sums a namespace's records on every
        create that holds rule-map entries, under a node-wide lock. A record is replaced by
        rename (a new inode) or not at all, so (inode, ctime, size) tells a change; the trust
        check runs on every stat (a chmod or chown changes the ctime as well)."""
        seen = set()
        for name in self._names():
            seen.add(name)
            try:
                st = os.stat(name, dir_fd=self.fd, follow_symlinks=False)
            except OSError:
                continue
            key = (self.path, name)
            stamp = (st.st_ino, st.st_ctime_ns, st.st_size)
            with _CACHE_LOCK:
                hit = _CACHE.get(key)
            if hit is not None and hit[0] == stamp:
                if trust.trusted_file_stat(st):
                    yield hit[1]
                continue
            try:
                rec = self._read(name)
            except (HookError, PelagosError, OSError):
                continue
            if rec is not None:
                with _CACHE_LOCK:
                    _CACHE[key] = (stamp, rec)
                yield rec
        with _CACHE_LOCK:
            for key in [k for k in _CACHE if k[0] == self.path and k[1] not in seen]:
                del _CACHE[key]

    def prune(self) -> int:
        """Delete records whose cgroup is gone: a create that failed after the hook ran gets
        no poststop (runc), and the kernel freed its attachments with the cgroup."""
        n = 0
        for name, rec in self.each():
            if not rec.alive():
                self._unlink(name)
                n += 1
        return n

    def entries_by_namespace(self) -> dict[str | None, int]:
        """Rule-map entries the hook's device sets hold, per namespace, over live cgroups."""
        out: dict[str | None, int] = {}
        for _, rec in self.each():
            if rec.entries and rec.alive():
                out[rec.namespace] = out.get(rec.namespace, 0) + rec.entries
        return out

    def entries_of(self, namespace: str | None) -> int:
        """entries_by_namespace()[namespace], from the cached records, stat-ing only the
        cgroups of that namespace's records (the quota check's sum, under the node lock)."""
        return sum(
            rec.entries
            for rec in self.each_cached()
            if rec.entries and rec.namespace == namespace and rec.alive()
        )
