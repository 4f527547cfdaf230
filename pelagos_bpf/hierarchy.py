"""Find the cgroup v2 hierarchy: pure v2, hybrid (a cgroup2 mount beside v1), or explicit.

Why mountinfo and not a fixed path: on hybrid hosts cgroup2 lives at e.g. /sys/fs/cgroup/unified,
and inside containers or QEMU guests it may be mounted anywhere.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import CgroupError

ROOT_ENV = "PELAGOS_CGROUP_ROOT"


@dataclass(frozen=True)
class Hierarchy:
    """A cgroup2 directory we create cgroups under, and how it was found."""

    root: Path
    mode: str  # "unified" (pure v2), "hybrid" (cgroup2 beside v1 controllers) or "explicit"

    def controllers(self) -> set[str]:
        """Controllers the root offers to its children (from `cgroup.controllers`)."""
        try:
            return set((self.root / "cgroup.controllers").read_text().split())
        except FileNotFoundError:
            return set()


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
        raise CgroupError("no cgroup2 filesystem is mounted (see /proc/self/mountinfo)")
    if "/sys/fs/cgroup" in v2:
        return Hierarchy(Path("/sys/fs/cgroup"), "hybrid" if has_v1 else "unified")
    # Prefer the conventional hybrid location, then the shortest path.
    chosen = "/sys/fs/cgroup/unified" if "/sys/fs/cgroup/unified" in v2 else min(v2, key=len)
    return Hierarchy(Path(chosen), "hybrid" if has_v1 else "unified")


def discover(root: str | os.PathLike[str] | None = None) -> Hierarchy:
    """The hierarchy to use: explicit argument, then $PELAGOS_CGROUP_ROOT, then mountinfo."""
    explicit = root if root is not None else os.environ.get(ROOT_ENV)
    if explicit:
        p = Path(explicit)
        if not (p / "cgroup.procs").exists():
            raise CgroupError(f"{p} is not a cgroup v2 directory (no cgroup.procs)")
        return Hierarchy(p, "explicit")
    with open("/proc/self/mountinfo") as f:
        return choose_root(parse_mountinfo(f.read()))
