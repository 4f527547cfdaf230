"""The tree stays ruff-clean (lint and format): CI fails on style drift, not just on bugs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _ruff() -> list[str]:
    exe = Path(sys.executable).with_name("ruff")
    if exe.exists():
        return [str(exe)]
    found = shutil.which("ruff")
    if not found:
        pytest.skip("ruff is not installed (pip install -e '.[test]')")
    return [found]


@pytest.mark.parametrize("args", [["check"], ["format", "--check"]], ids=["lint", "format"])
def test_ruff_clean(args: list[str]) -> None:
    r = subprocess.run(
        [*_ruff(), *args, "--no-cache", str(ROOT)], capture_output=True, text=True, check=False
    )
    assert r.returncode == 0, r.stdout + r.stderr
