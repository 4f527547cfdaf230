"""Freeze and thaw a cgroup (cgroup v2 `cgroup.freeze`), waiting until the kernel says it is done.

Why wait: writing 1 to `cgroup.freeze` only asks; the tasks stop as each reaches a safe point,
and the kernel reports `frozen 1` in `cgroup.events` once all have (for the whole subtree).
A runtime that checkpoints, inspects or pauses a container must not go on before that. The
wait sleeps on an inotify watch of `cgroup.events` (see events.py), not a polling loop.
`cgroup.freeze` is core cgroup v2 (no controller to enable): it exists in every non-root cgroup,
on hybrid hosts too.
"""

from __future__ import annotations

import errno
import logging

from .cgroupfs import read_text, write_file
from .errors import CgroupError
from .events import CgroupLike, cgroup_path, wait_for

log = logging.getLogger(__name__)

FREEZE_TIMEOUT = 10.0


def _frozen(events_text: str) -> bool | None:
    for line in events_text.splitlines():
        key, _, value = line.partition(" ")
        if key == "frozen":
            return value.strip() == "1"
    return None


def state(cg: CgroupLike) -> str:
    """ "frozen", "thawed", "freezing" (asked, not settled) or "thawing"."""
    p = cgroup_path(cg)
    wanted = read_text(p / "cgroup.freeze").strip()
    frozen = _frozen(read_text(p / "cgroup.events"))
    if wanted == "" or frozen is None:
        raise CgroupError(
            errno.ENOENT,
            f"{p} has no cgroup.freeze (not a non-root cgroup v2)",
            setting="freeze",
            path=p,
        )
    if wanted == "1":
        return "frozen" if frozen else "freezing"
    return "thawing" if frozen else "thawed"


def _set(cg: CgroupLike, value: bool, timeout: float | None) -> None:
    p = cgroup_path(cg)
    if not (p / "cgroup.freeze").exists():
        raise CgroupError(
            errno.ENOENT, f"not a non-root cgroup v2 directory: {p}", setting="freeze", path=p
        )
    verb = "freeze" if value else "thaw"
    write_file(p / "cgroup.freeze", "1" if value else "0", verb)
    wait_for(p / "cgroup.events", lambda t: _frozen(t) is value, timeout, f"waiting to {verb}")
    log.info("%s: %s", p, "frozen" if value else "thawed")


def freeze(cg: CgroupLike, timeout: float | None = FREEZE_TIMEOUT) -> None:
    """Stop every process of the cgroup (and its subtree); return once all are frozen.

    If they do not all stop within `timeout` seconds (e.g. a task stuck in uninterruptible
    I/O), the cgroup is thawed again and CgroupError(ETIMEDOUT) raised: never left half-frozen.
    """
    try:
        _set(cg, True, timeout)
    except CgroupError as e:
        if e.errno == errno.ETIMEDOUT:
            write_file(cgroup_path(cg) / "cgroup.freeze", "0", "thaw after a failed freeze")
        raise


def thaw(cg: CgroupLike, timeout: float | None = FREEZE_TIMEOUT) -> None:
    """Let the cgroup's processes run again; return once the kernel reports `frozen 0`."""
    _set(cg, False, timeout)
