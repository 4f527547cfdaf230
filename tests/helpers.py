"""Fixtures and helpers for tests that need live processes in test cgroups (not in conftest)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator

import pytest


@pytest.fixture
def spawn() -> Iterator[Callable[..., subprocess.Popen[bytes]]]:
    """spawn(*argv) starts a child we own (default `sleep 300`); all are killed and reaped after."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(*argv: str) -> subprocess.Popen[bytes]:
        p = subprocess.Popen(list(argv) or ["sleep", "300"])
        procs.append(p)
        return p

    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()
