"""`pelagos-bpf -v` shows what the library decided: a setup's writes and attachments (with the
owner), a gc's removals and what it kept, each with the reason; without -v, nothing."""

from __future__ import annotations

from pathlib import Path

import pytest
from cgtest import rel
from clitest import cli

from pelagos_bpf.cgroup import setup_cgroup
from pelagos_bpf.config import CgroupConfig

pytestmark = pytest.mark.root


def _log_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("pelagos-bpf: pelagos_bpf.")]


def test_verbose_run_shows_the_setup(cg_root: Path) -> None:
    path = rel(cg_root, "v")
    args = ["run", "--path", path, "--default-devices", "--device", "deny c 1:5", "--", "true"]
    r = cli("-v", *args)
    assert r.returncode == 0, r.stderr
    lines = "\n".join(_log_lines(r.stderr))
    full = str(cg_root / "v")
    assert f"device_rules: runtime attached its program to new cgroup {full}" in lines
    assert f"set up {full} (id " in lines and "applied ['device_rules']" in lines
    assert f"tore down {full}" in lines
    quiet = cli(*args)
    assert quiet.returncode == 0 and _log_lines(quiet.stderr) == [], quiet.stderr


def test_verbose_gc_shows_what_it_removed_and_kept_and_why(cg_root: Path) -> None:
    setup_cgroup(CgroupConfig(path=rel(cg_root, "ours")), None)  # abandoned: never torn down
    (cg_root / "theirs").mkdir()  # made by someone else
    r = cli("-v", "gc", "--prefix", str(cg_root))
    assert r.returncode == 0, r.stderr
    lines = _log_lines(r.stderr)
    assert (
        f"pelagos-bpf: pelagos_bpf.gc: gc: removed {cg_root}/ours: empty, and created by "
        "pelagos-bpf" in lines
    )
    assert (
        f"pelagos-bpf: pelagos_bpf.gc: gc: kept {cg_root}/theirs: not created by "
        "pelagos-bpf (no creation mark)" in lines
    )
    assert not (cg_root / "ours").exists() and (cg_root / "theirs").is_dir()
