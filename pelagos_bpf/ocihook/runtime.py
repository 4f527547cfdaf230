"""Which OCI runtime the hook serves: its parent process.

Why: the hook's device program carries a copy of the runtime's rules (the audit mirror,
mirror.py), and runc and crun read the same OCI rule list differently
(docs/DEVICE_SEMANTICS.md). The mirror must read it the way the runtime enforcing it does, or
it could deny what the runtime allows.

How: runc and crun run hooks themselves. runc starts each hook from the `runc create` /
`runc run` / `runc delete` process (the parent, not `runc init`), crun forks and execs it from
its own process; podman and CRI-O put hooks into config.json and leave running them to that
runtime, and containerd's shim calls runc. So the hook's parent is the runtime: its
/proc/<ppid>/exe (or comm, when exe cannot be read) names it. $PELAGOS_BPF_HOOK_RUNTIME
(runc, crun or none) overrides, for wrappers that run hooks from another process; pod authors
cannot set a hook's environment (its `env` comes from hooks.d or the runtime's config).
An unrecognised runtime gets no mirror (a warning says so): no copy is safer than a wrong one.
"""

from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Literal

from ..errors import ConfigError

Runtime = Literal["runc", "crun"]
RUNTIMES: tuple[Runtime, ...] = ("runc", "crun")
RUNTIME_ENV = "PELAGOS_BPF_HOOK_RUNTIME"
_NAME = re.compile(r"(?:^|[-_.])(runc|crun)(?:$|[-_.])")  # runc, docker-runc, crun.static


def classify(name: str) -> Runtime | None:
    """ "runc"/"crun" when a binary's name says so ("/usr/sbin/runc", "runc.amd64")."""
    m = _NAME.search(os.path.basename(name.removesuffix(" (deleted)")))
    return m[1] if m else None  # type: ignore[return-value]


def runtime_of_pid(pid: int, proc: Path = Path("/proc")) -> Runtime | None:
    """The runtime process `pid` runs, from its executable (or comm); None when neither is
    runc or crun, or the process is gone."""
    try:
        found = classify(os.readlink(proc / str(pid) / "exe"))
    except OSError:
        found = None
    if found is None:
        with contextlib.suppress(OSError):
            found = classify((proc / str(pid) / "comm").read_text().strip())
    return found


def runtime_of_parent(pid: int, proc: Path = Path("/proc")) -> Runtime | None:
    """The runtime that started process `pid` (the agent: `pid` is its thin hook client's,
    from SO_PEERCRED; the client waits for the reply, so it and its parent are still there).

    The parent pid comes from /proc/PID/stat (field 4, after the comm's closing parenthesis:
    a comm may hold spaces and parentheses), which the kernel formats in a fraction of the
    time it takes for /proc/PID/status."""
    try:
        stat = (proc / str(pid) / "stat").read_bytes()
    except OSError:
        return None
    fields = stat[stat.rfind(b")") + 1 :].split()
    ppid = fields[1] if len(fields) > 1 else b""
    return runtime_of_pid(int(ppid), proc) if ppid.isdigit() else None


def detect(
    environ: dict[str, str] | None = None, ppid: int | None = None
) -> tuple[Runtime | None, str]:
    """(runtime or None, how it was found) for this hook process."""
    env = os.environ if environ is None else environ
    forced = env.get(RUNTIME_ENV, "")
    if forced:
        if forced == "none":
            return None, f"{RUNTIME_ENV}=none"
        if forced not in RUNTIMES:
            raise ConfigError(RUNTIME_ENV, forced, f"want one of {', '.join(RUNTIMES)} or none")
        return forced, f"{RUNTIME_ENV}={forced}"
    parent = os.getppid() if ppid is None else ppid
    found = runtime_of_pid(parent)
    return found, f"the hook's parent process {parent}"
