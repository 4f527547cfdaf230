"""Errors a runtime can act on: every error the library raises carries `.setting`, `.path` and
`.errno` (an errno name's value), set where they are known, so no caller parses a message.

Each case provokes a real failure (a missing cgroup, an untrusted or missing bytecode dir, a
full rule map's refusal, a lock past its deadline), not a hand-built exception.
"""

from __future__ import annotations

import ast
import errno
import fcntl
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pelagos_bpf import bytecode
from pelagos_bpf.cgref import Ref
from pelagos_bpf.cgroup import Cgroup
from pelagos_bpf.cgroupfs import write_file
from pelagos_bpf.config import CgroupConfig
from pelagos_bpf.devices import attach_devices, detach_devices, layout, usage
from pelagos_bpf.devices.rules import CgroupDeviceRule as R
from pelagos_bpf.errors import (
    BpfError,
    CgroupError,
    ConfigError,
    OwnerConflict,
    PelagosError,
    UnsupportedSettings,
)
from pelagos_bpf.hierarchy import discover
from pelagos_bpf.locks import LockTimeout, flock_until
from pelagos_bpf.validate import validate_config

PACKAGE = Path(__file__).resolve().parent.parent / "pelagos_bpf"


def _carries(e: PelagosError, setting: str | None, path: Path | str | None, code: int) -> None:
    """The three attributes, and errno is a real errno (one `errno` has a name for)."""
    assert (e.setting, e.path, getattr(e, "errno", None)) == (
        setting,
        None if path is None else str(path),
        code,
    ), (e.setting, e.path, getattr(e, "errno", None), str(e))
    assert code in errno.errorcode


def test_a_missing_cgroup(tmp_path: Path) -> None:
    gone = tmp_path / "no-such-cgroup"
    with pytest.raises(CgroupError) as ei:
        attach_devices(Ref(os.fspath(gone), 0), [R(False, "a")])
    _carries(ei.value, "device_rules", gone, errno.ENOENT)
    assert f"cgroup {gone} does not exist" in str(ei.value)


def test_a_write_to_a_missing_controller_file(tmp_path: Path) -> None:
    with pytest.raises(CgroupError) as ei:
        write_file(tmp_path / "pids.max", "10", "pids_limit")
    _carries(ei.value, "pids_limit", tmp_path / "pids.max", errno.ENOENT)


def test_an_explicit_root_that_is_not_a_cgroup(tmp_path: Path) -> None:
    with pytest.raises(CgroupError) as ei:
        discover(tmp_path)
    _carries(ei.value, "root", tmp_path, errno.ENOENT)


@pytest.fixture
def bytecode_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Path], None]]:
    """Point $PELAGOS_BPF_BYTECODE somewhere; this process's bytecode reads are forgotten
    before and after."""

    def use(d: Path) -> None:
        monkeypatch.setenv(bytecode.BYTECODE_ENV, os.fspath(d))
        bytecode.reset_process_state()

    yield use
    monkeypatch.undo()
    bytecode.reset_process_state()


def test_a_missing_bytecode_dir(tmp_path: Path, bytecode_env: Callable[[Path], None]) -> None:
    bytecode_env(tmp_path / "missing")
    with pytest.raises(BpfError) as ei:
        bytecode.get_program(layout.SOURCE, layout.FUNCS["runtime"], layout.PROG_TYPE)
    _carries(ei.value, bytecode.BYTECODE_ENV, tmp_path / "missing", errno.ENOENT)
    assert ei.value.op == "bytecode"


def test_an_untrusted_bytecode_dir(tmp_path: Path, bytecode_env: Callable[[Path], None]) -> None:
    """The trust check cannot know which node setting led to the directory; `errors.about`
    on the way out names it."""
    d = tmp_path / "bc"
    d.mkdir()
    d.chmod(0o777)
    bytecode_env(d)
    with pytest.raises(BpfError) as ei:
        bytecode.get_program(layout.SOURCE, layout.FUNCS["runtime"], layout.PROG_TYPE)
    _carries(ei.value, bytecode.BYTECODE_ENV, d, errno.EPERM)
    assert "group/world-writable" in str(ei.value)


def test_a_lock_past_its_deadline(tmp_path: Path) -> None:
    f = tmp_path / "lock"
    f.touch()
    holder = os.open(f, os.O_RDONLY)
    waiter = os.open(f, os.O_RDONLY)
    try:
        fcntl.flock(holder, fcntl.LOCK_EX)
        with pytest.raises(LockTimeout) as ei:
            flock_until(waiter, "device_rules: x", 0.01, setting="device_rules", path=str(f))
        _carries(ei.value, "device_rules", f, errno.ETIMEDOUT)
    finally:
        os.close(holder)
        os.close(waiter)


def test_config_errors_carry_einval_and_unsupported_settings_eopnotsupp() -> None:
    with pytest.raises(ConfigError) as ei:
        validate_config(CgroupConfig(pids_limit=-5))
    _carries(ei.value, "pids_limit", None, errno.EINVAL)
    unsupported = UnsupportedSettings([("memory_limit", "no memory controller"), ("x", "y")])
    _carries(unsupported, "memory_limit", None, errno.EOPNOTSUPP)
    conflict = OwnerConflict("net_classid", "/sys/fs/cgroup/x", "runtime", "hook")
    _carries(conflict, "net_classid", "/sys/fs/cgroup/x", errno.EACCES)


@pytest.mark.root
def test_a_refused_rule_set_write(
    make_cgroup: Callable[[str], Cgroup], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The reserve refuses a large write before anything is written (E2BIG), naming the
    setting and the cgroup; nothing of it is left."""
    cg = make_cgroup("e2big")
    monkeypatch.setenv(usage.RESERVE_ENV, str(10**9))
    rules = [R(True, "c", 240, minor, "r") for minor in range(200)]  # far above SMALL_WRITE
    with pytest.raises(BpfError) as ei:
        attach_devices(cg, rules)
    _carries(ei.value, "device_rules", cg.path, errno.E2BIG)
    assert usage.RESERVE_ENV in str(ei.value.__cause__)
    detach_devices(cg)


def _raises_of(tree: ast.AST) -> list[ast.Call]:
    names = {"CgroupError", "BpfError", "LockTimeout", "PartialWrite"}
    return [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Name | ast.Attribute)
        and (node.func.id if isinstance(node.func, ast.Name) else node.func.attr) in names
    ]


def test_errnos_are_named_never_numbers() -> None:
    """`BpfError(errno.ENOENT, ...)`, never `BpfError(2, ...)`: a number hides what it means."""
    literal = []
    for src in sorted(PACKAGE.rglob("*.py")):
        for call in _raises_of(ast.parse(src.read_text())):
            first = call.args[0] if call.args else None
            if isinstance(first, ast.Constant) and isinstance(first.value, int):
                literal.append(f"{src.relative_to(PACKAGE)}:{call.lineno}")
    assert literal == []
