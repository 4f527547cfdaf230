"""Find the cgroup v2 hierarchy: pure v2, hybrid (a cgroup2 mount beside v1), or explicit.

Why mountinfo and not a fixed path: on hybrid hosts cgroup2 lives at e.g. /sys/fs/cgroup/unified,
and inside containers or QEMU guests it may be mounted anywhere.

Why a cache: parsing /proc/self/mountinfo was the largest Python cost of a container start.
`discover()` remembers its answer per process, keyed by everything that can change
it cheaply: the explicit root (argument, else $PELAGOS_CGROUP_ROOT), the process id (a forked
child re-checks) and the mount namespace (a process that unshares or setns's into another mount
namespace re-checks). An explicit root is checked (it must hold cgroup.procs) once per key; if
it goes away later, the next mkdir under it fails with its own clear error. What the key cannot
see is a cgroup2 mount added or removed in the same mount namespace after the first call: call
`clear_cache()` after changing mounts.
"""

from __future__ import annotations

import errno
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import CgroupError

ROOT_ENV = "PELAGOS_CGROUP_ROOT"
MOUNTINFO = "/proc/self/mountinfo"


@dataclass(frozen=True)
class Hierarchy:
    """A cgroup2 directory we create cgroups under, and how it was found."""

    root: Path
    mode: str  # "unified" (pure v2), "hybrid" (cgroup2 beside v1 controllers) or "explicit"


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit() and i + 3 < len(field):
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[tuple[str, str]]:
    """Return (mount point, fstype) pairs from /proc/self/mountinfo text (pure, for tests)."""
    mounts = []
    for line in text.splitlines():
        pre, sep, post = line.partition(" - ")
        if not sep:
            continue
        fields = pre.split()
        fstype = post.split()[0] if post.split() else ""
        if len(fields) >= 5:
            mounts.append((_unescape(fields[4]), fstype))
    return mounts


def choose_root(mounts: list[tuple[str, str]]) -> Hierarchy:
    """Pick the cgroup2 mount: /sys/fs/cgroup itself means pure v2, another cgroup2 mount hybrid."""
    v2 = [mp for mp, fs in mounts if fs == "cgroup2"]
    has_v1 = any(fs == "cgroup" for _, fs in mounts)
    if not v2:
        raise CgroupError(
            errno.ENOENT,
            f"no cgroup2 filesystem is mounted (see {MOUNTINFO})",
            setting="root",
            path=MOUNTINFO,
        )
    if "/sys/fs/cgroup" in v2:
        return Hierarchy(Path("/sys/fs/cgroup"), "hybrid" if has_v1 else "unified")
    # Prefer the conventional hybrid location, then the shortest path.
    chosen = "/sys/fs/cgroup/unified" if "/sys/fs/cgroup/unified" in v2 else min(v2, key=len)
    return Hierarchy(Path(chosen), "hybrid" if has_v1 else "unified")


def _explicit(root: str) -> Hierarchy:
    try:
        os.stat(os.path.join(root, "cgroup.procs"))
    except OSError as e:
        raise CgroupError(
            e.errno,
            f"{root} is not a cgroup v2 directory (no cgroup.procs)",
            setting="root",
            path=root,
        ) from e
    return Hierarchy(Path(root), "explicit")


def _mount_ns() -> str:
    try:
        return os.readlink("/proc/self/ns/mnt")
    except OSError:  # no /proc/self/ns (unusual): the pid still keys the cache
        return ""


# key -> answer. Errors are never cached: a later call may succeed once the cause is fixed.
_cache: dict[tuple[str, int, str], Hierarchy] = {}
_CACHE_MAX = 64


def clear_cache() -> None:
    """Forget discovered hierarchies (after mounting or unmounting cgroup2 in this namespace)."""
    _cache.clear()


def discover(root: str | os.PathLike[str] | None = None) -> Hierarchy:
    """The hierarchy to use: explicit argument, then $PELAGOS_CGROUP_ROOT, then mountinfo."""
    explicit = os.fspath(root) if root is not None else os.environ.get(ROOT_ENV, "")
    key = (explicit, os.getpid(), _mount_ns())
    hier = _cache.get(key)
    if hier is None:
        if explicit:
            hier = _explicit(explicit)
        else:
            with open(MOUNTINFO) as f:
                hier = choose_root(parse_mountinfo(f.read()))
        if len(_cache) >= _CACHE_MAX:  # many explicit roots (tests): stay small
            _cache.clear()
        _cache[key] = hier
    return hier
