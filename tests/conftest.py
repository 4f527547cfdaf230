"""Shared fixtures: every cgroup a test makes lives under one unique prefix that is removed."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pelagos_bpf.cgroup import Cgroup
from pelagos_bpf.hierarchy import discover

# QEMU guest tests run in one pool, several guests at once (tests/vm/pytest_guests.py).
if str(Path(__file__).resolve().parents[1]) not in sys.path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
pytest_plugins = ("tests.vm.pytest_guests",)

IS_ROOT = os.geteuid() == 0

# No default pins for the suite (set but empty = nowhere; inherited by subprocesses): guests
# mount a bpffs at /sys/fs/bpf, and a pinned program outlives the process on purpose, which
# would read as a leak to every test that checks programs are gone. Pins are tested where a
# test asks for them (test_default_pins.py runs the default in a private mount namespace).
os.environ.setdefault("PELAGOS_BPF_PIN_DIR", "")


def _kill_and_remove(d: Path) -> None:
    """Remove a test cgroup subtree, killing only processes inside it (which tests started)."""
    if not d.exists():
        return
    for child in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        _kill_and_remove_one(child)
    _kill_and_remove_one(d)


def _kill_and_remove_one(d: Path) -> None:
    for _ in range(200):
        try:
            pids = [int(x) for x in (d / "cgroup.procs").read_text().split()]
        except FileNotFoundError:
            return
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.01)
    for _ in range(200):
        try:
            d.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            time.sleep(0.01)


@pytest.fixture
def cg_root() -> Iterator[Path]:
    """A unique, empty cgroup2 directory for this test; removed (with its subtree) afterwards."""
    if not IS_ROOT:
        pytest.skip("needs root")
    h = discover()
    d = h.root / f"pelagos-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    d.mkdir()
    try:
        yield d
    finally:
        _kill_and_remove(d)


@pytest.fixture
def make_cgroup(cg_root: Path):
    """Factory: make_cgroup("name") creates cg_root/name and returns a Cgroup handle."""

    def make(name: str = "c") -> Cgroup:
        p = cg_root / name
        p.mkdir(parents=True)
        return Cgroup.open(p, root=cg_root)

    return make


# Tests that need these fixtures need root and a real cgroup2 mount, whatever their file says.
_ROOT_FIXTURES = frozenset({"cg_root", "make_cgroup"})
# Markers of tests that need more than a Python interpreter (root, kernel features, QEMU).
_HOST_MARKERS = frozenset({"root", "matrix", "net", "runtimes", "v2_controllers"})


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark `root` what uses a cgroup fixture, and `pure` everything left that needs nothing
    but Python: `bash scripts/test --fast` runs `-m pure` (CONTRIBUTING.md), and
    tests/test_style.py checks that the pure tests pass as an unprivileged user."""
    for item in items:
        if _ROOT_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.root)
        if not any(item.get_closest_marker(m) for m in _HOST_MARKERS):
            item.add_marker(pytest.mark.pure)
