"""`devices check` tells the truth about a cgroup: every device program in effect, asked.

Finding 10 of issue 23: the landed main evaluated only our own program and said "allowed"
where the runtime's program denies. Each case here is checked against a real open of the
device node in the cgroup (device_helpers.probe), so the tool and the kernel must agree.
"""

from __future__ import annotations

import contextlib
import os
import struct
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from device_helpers import probe

from pelagos_bpf import bpfsys
from pelagos_bpf.bpfabi import AttachType, ProgType
from pelagos_bpf.cgroup import Cgroup
from pelagos_bpf.cli import main
from pelagos_bpf.devices import DEFAULT_DEVICE_RULES, attach_devices
from pelagos_bpf.devices.effective import check_access
from pelagos_bpf.devices.interp import NotEvaluable, run_foreign
from pelagos_bpf.devices.rules import CgroupDeviceRule as R

KMSG = ("c", 1, 11, "r")
NULL = ("c", 1, 3, "r")


def _insn(op: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", op, dst | src << 4, off, imm)


def runc_like(major: int, minor: int) -> bytes:
    """A runtime's own device filter, shaped like runc's: allow char major:minor only."""
    return b"".join(
        [
            _insn(0x61, 2, 1, 0),  # r2 = ctx->access_type (u32)
            _insn(0x54, 2, imm=0xFFFF),  # w2 &= 0xffff: the type
            _insn(0x61, 3, 1, 4),  # r3 = ctx->major
            _insn(0x61, 4, 1, 8),  # r4 = ctx->minor
            _insn(0x55, 2, off=4, imm=2),  # if r2 != char goto deny
            _insn(0x55, 3, off=3, imm=major),  # if r3 != major goto deny
            _insn(0x55, 4, off=2, imm=minor),  # if r4 != minor goto deny
            _insn(0xB7, 0, imm=1),  # r0 = 1
            _insn(0x95),  # exit
            _insn(0xB7, 0, imm=0),  # deny: r0 = 0
            _insn(0x95),
        ]
    )


def with_helper_call() -> bytes:
    """A program the interpreter cannot run (a helper call): allows everything for real."""
    return b"".join(
        [_insn(0x85, imm=15), _insn(0xB7, 0, imm=1), _insn(0x95)]  # get_current_uid_gid
    )


@contextlib.contextmanager
def attached(path: Path, insns: bytes) -> Iterator[int]:
    """A foreign device program attached with BPF_F_ALLOW_MULTI at `path` (like runc's)."""
    prog = bpfsys.prog_load(ProgType.CGROUP_DEVICE, insns, name="foreign")
    cgfd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        bpfsys.prog_attach(prog, cgfd, AttachType.CGROUP_DEVICE)
        yield bpfsys.prog_info(prog).id
    finally:
        with contextlib.suppress(OSError):
            bpfsys.prog_detach(prog, cgfd, AttachType.CGROUP_DEVICE)
        os.close(cgfd)
        os.close(prog)


@contextlib.contextmanager
def sleeper(path: Path) -> Iterator[None]:
    """A process this test starts inside the cgroup (a hybrid host's v1 cgroup is then known)."""
    p = subprocess.Popen(
        ["sleep", "60"], preexec_fn=lambda: (path / "cgroup.procs").write_text(str(os.getpid()))
    )
    try:
        yield
    finally:
        p.kill()
        p.wait()


def test_interpreter_runs_a_runtimes_filter() -> None:
    code = runc_like(1, 3)
    assert run_foreign(code, 2, 1, 3, 2) is True
    assert run_foreign(code, 2, 1, 11, 2) is False
    assert run_foreign(code, 1, 1, 3, 2) is False  # a block device
    with pytest.raises(NotEvaluable, match="helper"):
        run_foreign(with_helper_call(), 2, 1, 3, 2)


@pytest.mark.root
def test_the_runtimes_deny_wins_over_the_hooks_allow(cg_root: Path) -> None:
    """Our runtime set denies /dev/kmsg, the hook's set allows it: the answer is DENIED, named
    after the runtime's rule, and the kernel agrees."""
    p = cg_root / "owners"
    p.mkdir()
    cg = Cgroup.open(p)
    attach_devices(cg, list(DEFAULT_DEVICE_RULES))
    attach_devices(cg, [R(True, "a")], owner="hook")
    with sleeper(p):
        res = check_access(p, *KMSG)
        assert res.allowed is False
        denier = [v for v in res.verdicts if v.allowed is False]
        assert len(denier) == 1 and "the runtime's rules" in denier[0].source
        assert any("the hook's rules" in v.source and v.allowed for v in res.verdicts)
        assert check_access(p, *NULL).allowed is True
    assert probe(p, [KMSG, NULL]) == [False, True]


@pytest.mark.root
def test_a_foreign_program_is_interpreted(cg_root: Path, capsys: pytest.CaptureFixture) -> None:
    """A runtime's own filter (allow only /dev/null) under our permissive hook set: the tool
    runs it on the access and reports its denial; the kernel agrees."""
    p = cg_root / "foreign"
    p.mkdir()
    attach_devices(Cgroup.open(p), [R(True, "a")], owner="hook")
    with attached(p, runc_like(1, 3)) as prog_id, sleeper(p):
        assert main(["devices", "check", str(p), "c", "1:11", "r"]) == 1
        out = capsys.readouterr().out
        assert f"program id {prog_id} (foreign, foreign) at {p}" in out  # (its name, its kind)
        assert "DENIES (interpreted on this access)" in out
        assert main(["devices", "check", str(p), "c", "1:3", "r"]) == 0
        assert probe(p, [KMSG, NULL]) == [False, True]


@pytest.mark.root
def test_an_ancestors_program_counts(cg_root: Path) -> None:
    """A program attached at the parent is in effect in the child (BPF_F_ALLOW_MULTI)."""
    parent, child = cg_root / "parent", cg_root / "parent" / "child"
    child.mkdir(parents=True)
    with attached(parent, runc_like(1, 3)):
        res = check_access(child, *KMSG)
        assert res.allowed is False
        assert any(str(parent) in v.source for v in res.verdicts if v.allowed is False)
        assert probe(child, [KMSG]) == [False]


@pytest.mark.root
def test_a_program_it_cannot_run_is_never_guessed(
    cg_root: Path, capsys: pytest.CaptureFixture
) -> None:
    """A foreign program with helper calls: "may be DENIED", exit 125, never "allowed"."""
    p = cg_root / "opaque"
    p.mkdir()
    with attached(p, with_helper_call()), sleeper(p):
        assert check_access(p, *NULL).allowed is None
        assert main(["devices", "check", str(p), "c", "1:3", "r"]) == 125
        # (the translated call's number is the kernel's rewrite, not 14)
        assert "may deny: cannot be evaluated here (helper " in capsys.readouterr().out
