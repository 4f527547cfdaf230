"""Fixtures of the agent's host tests (a pytest plugin: `pytest_plugins` names it)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from agentlib import Ctr, bundle

from pelagos_bpf.cgroup import Cgroup


@pytest.fixture
def make_ctr(
    make_cgroup: Callable[[str], Cgroup],
    spawn: Callable[..., subprocess.Popen[bytes]],
    tmp_path: Path,
) -> Callable[..., Ctr]:
    def make(name: str, ann: dict[str, str]) -> Ctr:
        cg = make_cgroup(name)
        p = spawn("sleep", "600")
        (cg.path / "cgroup.procs").write_text(str(p.pid))
        return Ctr(cg, p.pid, bundle(tmp_path / f"bundle-{name}", ann), ann)

    return make
