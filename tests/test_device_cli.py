"""`pelagos-bpf devices ...` (no root for rule lists; root for a live cgroup)."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pelagos_bpf.cgroup import Cgroup
from pelagos_bpf.cli import main
from pelagos_bpf.devices import DEFAULT_DEVICE_RULES, attach_devices


def test_check_rule_list_explains_the_decision(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["devices", "check", "--defaults", "--rule", "deny c 1:3 w", "c", "1:3", "rw"]) == 1
    out = capsys.readouterr().out
    assert "c 1:3 rw: DENIED" in out
    assert "r: rule 3: allow c 1:3 rwm" in out
    assert "w: rule 13: deny c 1:3 w" in out
    assert main(["devices", "check", "c", "240:0", "rwm"]) == 0
    assert "no rule mentions it" in capsys.readouterr().out


def test_check_rejects_bad_input_with_125_never_1(capsys: pytest.CaptureFixture[str]) -> None:
    """1 means denied: an input error must not read as a denial in a script."""
    assert main(["devices", "check", "--defaults", "a", "1:3", "r"]) == 125
    assert "KIND 'a': a device is 'b' (block) or 'c' (char)" in capsys.readouterr().err
    assert main(["devices", "check", "c", "1:3", "rx"]) == 125
    assert "ACCESS rx: must be a non-empty subset of 'rwm'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        main(["devices", "check", "--rule", "allow q 1:3 r", "c", "1:3", "r"])
    assert exc.value.code == 125
    assert main(["devices", "check", "--rule", "allow c 1:3", "/", "c", "1:3", "r"]) == 125
    assert "either a cgroup or --rule" in capsys.readouterr().err


@pytest.mark.root
def test_check_live_cgroup_and_denials(
    make_cgroup: Callable[[str], Cgroup], capsys: pytest.CaptureFixture[str]
) -> None:
    from device_helpers import probe

    cg = make_cgroup("dev")
    attach_devices(cg, list(DEFAULT_DEVICE_RULES))
    assert probe(cg.path, [("c", 240, 0, "r")]) == [False]
    assert main(["devices", "check", str(cg.path), "c", "240:0", "r"]) == 1
    out = capsys.readouterr().out
    assert "the runtime's rules at" in out and "r: rule 0 deny a *:* rw" in out
    assert "c 240:0 r            x1" in out
    # With a process inside, a hybrid host's v1 devices cgroup is known too (else "may deny").
    with sleeper_in(cg.path):
        assert main(["devices", "check", str(cg.path), "c", "1:3", "rw"]) == 0
    assert "c 1:3 rw: allowed" in capsys.readouterr().out


@contextlib.contextmanager
def sleeper_in(path: Path) -> Iterator[int]:
    """A `sleep` this test starts inside the cgroup at `path` (killed and reaped after)."""
    p = subprocess.Popen(
        ["sleep", "60"],
        preexec_fn=lambda: (path / "cgroup.procs").write_text(str(os.getpid())),
    )
    try:
        yield p.pid
    finally:
        p.kill()
        p.wait()
