"""Which cgroups this library created: an xattr on each, so gc can tell ours from others'.

Why an xattr: it lives and dies with the cgroup, needs no state file, and any process can read
it. `trusted.*` so only CAP_SYS_ADMIN can set or forge it. The marker is set right after mkdir;
the parent carries a "pending" marker for the child's name across the mkdir, so even a process
killed between mkdir and the child's marker leaves a directory gc recognises.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterator

MARK = "trusted.pelagos_bpf"
_PENDING = "trusted.pelagos_bpf.mk."


def _pending_key(name: str) -> str:
    return _PENDING + hashlib.sha1(os.fsencode(name)).hexdigest()[:16]


@contextlib.contextmanager
def creating(parent: str | int, name: str) -> Iterator[None]:
    """Wrap one mkdir of `name` in `parent` (a path, or a dir fd: no path walk): a pending
    marker on the parent for as long as the block runs. The block marks the child (`mark`)
    once it exists, so no moment leaves an unmarked directory of ours.

    Markers are best effort (a kernel without xattrs on cgroupfs only makes gc more careful).
    """
    key = _pending_key(name)
    with contextlib.suppress(OSError):
        os.setxattr(parent, key, b"")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.removexattr(parent, key)


def mark(cgroup: str | int) -> None:
    """Mark a cgroup we created (a path or a dir fd) as ours."""
    with contextlib.suppress(OSError):
        os.setxattr(cgroup, MARK, b"1")


def is_ours(path: str) -> bool:
    """Created by this library: marked, or pending on the parent (a setup killed between its
    mkdir and the mark). Nothing else counts: an attached program of ours only means someone
    asked us to enforce something on a cgroup they own."""
    try:
        os.getxattr(path, MARK)
        return True
    except OSError:
        pass
    parent, name = os.path.split(path)
    try:
        os.getxattr(parent, _pending_key(name))
        return True
    except OSError:
        return False


def forget_pending(path: str) -> None:
    """Drop the parent's pending marker of a removed child (left by a killed setup)."""
    parent, name = os.path.split(path)
    with contextlib.suppress(OSError):
        os.removexattr(parent, _pending_key(name))
