"""vagrant/ cannot boot here (no hardware virtualisation); at least keep it syntactically valid."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

VAGRANT = Path(__file__).resolve().parent.parent / "vagrant"


def test_vagrantfile_parses() -> None:
    ruby = shutil.which("ruby")
    if ruby is None:
        pytest.skip("ruby is not installed (scripts/bootstrap installs it)")
    r = subprocess.run(
        [ruby, "-c", str(VAGRANT / "Vagrantfile")], capture_output=True, text=True, check=False
    )
    assert r.returncode == 0 and "Syntax OK" in r.stdout, r.stdout + r.stderr


def test_provision_script_parses() -> None:
    r = subprocess.run(
        ["bash", "-n", str(VAGRANT / "provision.sh")], capture_output=True, text=True, check=False
    )
    assert r.returncode == 0, r.stderr
