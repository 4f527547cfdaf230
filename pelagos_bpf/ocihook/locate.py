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
from pathlib import Path

from .request import HookError


def v2_path(proc_cgroup: str) -> str:
    """The `0::/path` line of /proc/<pid>/cgroup text -> "/path"; HookError when absent."""
    for line in proc_cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:]
    raise HookError("the process is in no cgroup v2 hierarchy (no '0::' line in its cgroup file)")


def cgroup2_mounts(mountinfo: str) -> list[tuple[str, Path]]:
    """(root inside the hierarchy, mount point) of every cgroup2 mount in mountinfo text."""

    def unescape(s: str) -> str:
        return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m[1], 8)), s)

    out = []
    for line in mountinfo.splitlines():
        pre, sep, post = line.partition(" - ")
        fields = pre.split()
        if sep and post.split()[:1] == ["cgroup2"] and len(fields) >= 5:
            out.append((unescape(fields[3]), Path(unescape(fields[4]))))
    return out


def map_to_mount(path: str, mounts: list[tuple[str, Path]]) -> Path:
    """Map a cgroup path (relative to our cgroup namespace) to a directory we can open."""
    if path.startswith("/.."):
        raise HookError(
            f"cgroup {path} is outside this process's cgroup namespace: run the hook in the "
            "runtime's cgroup namespace"
        )
    best: tuple[str, Path] | None = None
    for root, mp in mounts:
        r = root.rstrip("/")
        if (path == r or path.startswith(r + "/")) and (best is None or len(r) > len(best[0])):
            best = (r, mp)
    if best is None:
        seen = ", ".join(f"{mp} (root {root})" for root, mp in mounts) or "none"
        raise HookError(f"no cgroup2 mount here shows cgroup {path} (cgroup2 mounts: {seen})")
    return best[1] / path[len(best[0]) :].lstrip("/")


def cgroup_of_pid(pid: int, proc: Path = Path("/proc")) -> Path:
    """The cgroup v2 directory of `pid` in this mount namespace; HookError when it is gone."""
    try:
        fd = os.open(f"{proc}/{pid}/cgroup", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise HookError(f"process {pid} is gone (did the container exit first?)") from None
    try:
        rel = v2_path(os.read(fd, 1 << 16).decode(errors="surrogateescape"))
    finally:
        os.close(fd)
    path = map_to_mount(rel, _mounts(proc, fresh=False))
    if not os.path.exists(f"{path}/cgroup.procs"):  # the mounts may have moved: ask again
        path = map_to_mount(rel, _mounts(proc, fresh=True))
        if not os.path.exists(f"{path}/cgroup.procs"):
            raise HookError(f"cgroup {path} of process {pid} does not exist (exited?)")
    return path


_MOUNTS: dict[Path, list[tuple[str, Path]]] = {}


def _mounts(proc: Path, fresh: bool) -> list[tuple[str, Path]]:
    """This process's cgroup2 mounts, read from mountinfo once and again only when a mapped
    path does not exist (a long-lived agent maps a pid per container; mountinfo is the
    largest read of it). A stale table can only yield a path that is not there: then a fresh
    read decides."""
    if fresh or proc not in _MOUNTS:
        _MOUNTS[proc] = cgroup2_mounts((proc / "self" / "mountinfo").read_text())
    return _MOUNTS[proc]
