"""Find a container's cgroup v2 directory from its pid, as the hook sees the filesystem.

Why not config.json's cgroupsPath: runtimes rewrite it (systemd driver `slice:prefix:name`,
podman's libpod_parent, relative paths under the runtime's own cgroup). The kernel's answer is
/proc/<pid>/cgroup, whose `0::` path is relative to the READER's cgroup namespace. The hook runs
in the runtime's namespaces, so that path is mapped onto the cgroup2 mount the hook sees: the
mount whose mountinfo `root` field is a prefix of it (a cgroup2 mounted inside a cgroup
namespace has root "/"; a bind mount of a sub-tree has that sub-tree as root).
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from .request import HookError


def v2_path(proc_cgroup: str) -> str:
    """The `0::/path` line of /proc/<pid>/cgroup text -> "/path"; HookError when absent."""
    for line in proc_cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise HookError("the process is in no cgroup v2 hierarchy (no '0::' line in its cgroup file)")


Mount = tuple[str, str, int]
"""A cgroup2 mount: (root inside the hierarchy, mount point, st_dev of its filesystem)."""


def cgroup2_mounts(mountinfo: str) -> list[Mount]:
    """Every cgroup2 mount in mountinfo text (st_dev from its MAJ:MIN field; -1 if unreadable)."""

    def unescape(s: str) -> str:
        return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), s)

    out = []
    for line in mountinfo.splitlines():
        pre, sep, post = line.partition(" - ")
        fields = pre.split()
        if sep and post.split()[:1] == ["cgroup2"] and len(fields) >= 5:
            major, _, minor = fields[2].partition(":")
            dev = os.makedev(int(major), int(minor)) if major.isdigit() and minor.isdigit() else -1
            out.append((unescape(fields[3]), unescape(fields[4]), dev))
    return out


def map_to_mount(path: str, mounts: list[Mount]) -> str:
    """Map a cgroup path (relative to our cgroup namespace) to a directory we can open.
    Plain strings, not pathlib: the agent maps one per container start."""
    if path.startswith("/.."):
        raise HookError(
            f"cgroup {path} is outside this process's cgroup namespace: run the hook in the "
            "runtime's cgroup namespace"
        )
    best: tuple[str, str] | None = None
    for root, mp, _ in mounts:
        r = root.rstrip("/")
        if (path == r or path.startswith(r + "/")) and (best is None or len(r) > len(best[0])):
            best = (r, mp)
    if best is None:
        seen = ", ".join(f"{mp} (root {root})" for root, mp, _ in mounts) or "none"
        raise HookError(f"no cgroup2 mount here shows cgroup {path} (cgroup2 mounts: {seen})")
    rest = path[len(best[0]) :].lstrip("/")
    return f"{best[1].rstrip('/')}/{rest}" if rest else best[1]


def cgroup_of_pid(pid: int, proc: Path = Path("/proc")) -> Path:
    """The cgroup v2 directory of `pid` in this mount namespace; HookError when it is gone."""
    return Path(cgroup_dir_of_pid(pid, str(proc))[0])


def cgroup_dir_of_pid(pid: int, proc: str = "/proc") -> tuple[str, int]:
    """cgroup_of_pid as a string, and the cgroup's id (its inode), for the hook's create: one
    stat, which also proves the dir is a cgroup (it is on a cgroup2 mount's filesystem)."""
    try:
        fd = os.open(f"{proc}/{pid}/cgroup", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise HookError(f"process {pid} is gone (did the container exit first?)") from None
    try:
        rel = v2_path(os.read(fd, 1 << 16).decode(errors="surrogateescape"))
    finally:
        os.close(fd)
    for fresh in (False, True):  # the mounts may have moved: ask again
        mounts = _mounts(proc, fresh)
        path = map_to_mount(rel, mounts)
        try:
            st = os.stat(path)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and any(st.st_dev == dev for _, _, dev in mounts):
            return path, st.st_ino
    raise HookError(f"cgroup {path} of process {pid} does not exist (exited?)")


_MOUNTS: dict[str, list[Mount]] = {}


def _mounts(proc: str, fresh: bool) -> list[Mount]:
    """This process's cgroup2 mounts, read from mountinfo once and again only when a mapped
    path does not exist (a long-lived agent maps a pid per container; mountinfo is the
    largest read of it). A stale table can only yield a path that is not there, or not on a
    cgroup2 filesystem: then a fresh read decides."""
    if fresh or proc not in _MOUNTS:
        with open(f"{proc}/self/mountinfo") as f:
            _MOUNTS[proc] = cgroup2_mounts(f.read())
    return _MOUNTS[proc]
