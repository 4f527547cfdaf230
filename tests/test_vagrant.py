"""vagrant/ stays syntactically valid. Booting it is `bash vagrant/test` (a TCG VM: tens of
minutes, so not part of this suite; vagrant/README.md has its timings)."""

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


@pytest.mark.parametrize("script", ["provision.sh", "build-box", "test"])
def test_shell_script_parses(script: str) -> None:
    r = subprocess.run(
        ["bash", "-n", str(VAGRANT / script)], capture_output=True, text=True, check=False
    )
    assert r.returncode == 0, r.stderr


def test_box_gets_the_projects_apt_packages() -> None:
    """build-box reads scripts/apt-packages (the list bootstrap installs); a list it cannot parse
    once broke the box build before mmdebstrap ran."""
    r = subprocess.run(
        ["bash", str(VAGRANT / "build-box"), "--print-packages"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    pkgs = r.stdout.split()
    listed = [
        line.split("#", 1)[0].strip()
        for line in (VAGRANT.parent / "scripts" / "apt-packages").read_text().splitlines()
    ]
    listed = [p for p in listed if p]
    assert len(listed) >= 10
    assert set(listed) <= set(pkgs)
    assert {"systemd", "linux-image-amd64", "openssh-server"} <= set(pkgs)
    assert len(pkgs) == len(set(pkgs)), "a package is listed twice"
