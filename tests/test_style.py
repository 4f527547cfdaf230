"""The tree stays ruff-clean (lint and format) and the package mypy --strict clean: CI fails on
style or type drift, not just on bugs. `bash scripts/test --fast` runs the same checks first."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _tool(name: str) -> list[str]:
    exe = Path(sys.executable).with_name(name)
    if exe.exists():
        return [str(exe)]
    found = shutil.which(name)
    if not found:
        pytest.skip(f"{name} is not installed (pip install -e '.[test]')")
    return [found]


@pytest.mark.parametrize("args", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_clean(args: list[str]) -> None:
    r = subprocess.run(
        [*_tool("ruff"), *args, "--no-cache", str(ROOT)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stdout + r.stderr


def test_mypy_strict_clean() -> None:
    """[tool.mypy] in pyproject.toml: --strict over pelagos_bpf/ (protoc's output excluded);
    no cache written into the tree (/dev/null is mypy's "no cache" directory)."""
    r = subprocess.run(
        [*_tool("mypy"), "--cache-dir", "/dev/null"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Success: no issues found" in r.stdout, r.stdout
