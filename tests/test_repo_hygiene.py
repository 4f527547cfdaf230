"""Git tracks sources only: a tracked venv or build output makes a fresh clone reuse another
machine's interpreter paths (it happened: 3,192 files of .venv/ were once committed)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BUILT = re.compile(r"(^|/)(\.venv|[^/]+\.egg-info|__pycache__|build|dist|\.pytest_cache)/")


def _tracked() -> list[str]:
    git = shutil.which("git")
    if git is None or not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: nothing to check")
    out = subprocess.run(
        [git, "-C", str(ROOT), "ls-files", "-z"], capture_output=True, check=True
    ).stdout
    return [p for p in out.decode().split("\0") if p]


def test_no_built_files_tracked() -> None:
    tracked = _tracked()
    assert tracked, "git ls-files listed nothing: the check would prove nothing"
    built = [p for p in tracked if BUILT.search(p) or p.endswith((".pyc", ".so", ".o"))]
    assert built == [], f"built files are tracked (git rm -r --cached them): {built[:10]}"


def test_pattern_catches_what_it_must() -> None:
    for path in (".venv/bin/python", "pelagos_bpf.egg-info/PKG-INFO", "tests/__pycache__/x.pyc"):
        assert BUILT.search(path), path
    for path in ("pelagos_bpf/cgroup.py", "bpf/device.c", "bench/bench_net.py"):
        assert not BUILT.search(path), path
