"""The OCI hook exec'd as a runtime would, on a real process in a test cgroup.

`make_env` (each module's `env` fixture) gives a bundle dir, a record dir, a policy file
(permissive unless a test writes its own) and a container process in its own test cgroup;
`Env.run` execs the hook with the OCI state on stdin. Everything lives under the test's
tmp_path and cgroup prefix.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from pelagos_bpf import bpfsys
from pelagos_bpf.bpfsys import AttachType
from pelagos_bpf.cgroup import Cgroup

HOOK = [sys.executable, "-m", "pelagos_bpf.cli", "oci-hook"]
LEAN = [sys.executable, "-m", "pelagos_bpf.ocihook"]
ATTACH_TYPES = (
    AttachType.CGROUP_INET_EGRESS,
    AttachType.CGROUP_INET_INGRESS,
    AttachType.CGROUP_DEVICE,
)
OPEN_POLICY = """
version = 1
[default]
classids = ["*"]
priorities = ["0-65535"]
priority_classids = true
device_grants = true
rules_per_set = 4096
"""


def attached_ids(path: Path) -> dict[int, list[int]]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return {int(t): bpfsys.prog_query(fd, t) for t in ATTACH_TYPES}
    finally:
        os.close(fd)


def nothing_attached(path: Path) -> bool:
    return not any(attached_ids(path).values())


class Env:
    """A bundle dir, a hook state dir, a policy and a container process in a test cgroup."""

    def __init__(self, tmp: Path, cg: Cgroup, pid: int) -> None:
        self.tmp = tmp
        self.bundle = tmp / "bundle"
        self.bundle.mkdir()
        self.state_dir = tmp / "state"
        self.policy = tmp / "etc" / "policy.toml"
        self.policy.parent.mkdir()
        self.write_policy(OPEN_POLICY)
        self.cg, self.pid = cg, pid
        self.extra_env: dict[str, str] = {}
        self.write_config({})

    def write_policy(self, text: str) -> None:
        self.policy.write_text(text)
        self.policy.chmod(0o644)

    def write_config(self, annotations: dict[str, str], linux: dict | None = None) -> None:
        cfg = {"ociVersion": "1.0.2", "annotations": annotations, "linux": linux or {}}
        (self.bundle / "config.json").write_text(json.dumps(cfg))

    def state(self, annotations: dict[str, str], status: str, **over: object) -> dict:
        return {
            "ociVersion": "1.0.2",
            "id": "hooktest",
            "status": status,
            "pid": self.pid,
            "bundle": str(self.bundle),
            "annotations": annotations,
            **over,
        }

    def environ(self) -> dict[str, str]:
        out = dict(os.environ)
        out["PELAGOS_BPF_HOOK_STATE"] = str(self.state_dir)
        out["PELAGOS_BPF_POLICY"] = str(self.policy)
        return {**out, **self.extra_env}

    def run(
        self,
        annotations: dict[str, str],
        *,
        status: str = "creating",
        argv: list[str] = HOOK,
        raw: str | None = None,
        **over: object,
    ) -> subprocess.CompletedProcess[str]:
        """Exec the hook (-v) with the state on stdin (`raw`: that text instead)."""
        text = json.dumps(self.state(annotations, status, **over)) if raw is None else raw
        return subprocess.run(
            [*argv, "-v"],
            input=text,
            capture_output=True,
            text=True,
            env=self.environ(),
            timeout=120,
        )


def make_env(
    tmp_path: Path,
    make_cgroup: Callable[[str], Cgroup],
    spawn: Callable[..., subprocess.Popen[bytes]],
) -> Env:
    """What a module's `env` fixture returns (a plain function: this is not a plugin)."""
    cg = make_cgroup("ctr")
    p = spawn("sleep", "300")
    (cg.path / "cgroup.procs").write_text(str(p.pid))
    return Env(tmp_path, cg, p.pid)
