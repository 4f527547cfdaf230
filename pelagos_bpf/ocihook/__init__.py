"""OCI runtime hook: give runc/crun/podman/CRI-O containers what they drop on cgroup v2.

`pelagos-bpf oci-hook` runs at createRuntime/prestart (attach net classid/priorities from
`linux.resources.network` or `io.pelagos-bpf.*` annotations, extra device rules, the denial
audit) and at poststop (clean up), as owner "hook", within what the admin policy allows
(pelagos_bpf.policy). See docs/OCI_HOOK.md; request.py lists the annotations.
"""

from __future__ import annotations

from .hook import Result, run_hook
from .locate import cgroup_of_pid
from .request import HookError, Request, build_request, parse_state, pod_namespace

__all__ = [
    "HookError",
    "Request",
    "Result",
    "build_request",
    "cgroup_of_pid",
    "parse_state",
    "pod_namespace",
    "run_hook",
]
