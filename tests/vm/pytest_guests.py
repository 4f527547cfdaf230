"""pytest plugin: every QEMU guest test of a session runs in one pool, up to N guests at once.

A guest test is marked `@pytest.mark.guest("KIND", cost=MINUTES)` (the longest start first); a
module registers what KIND boots with `@guest_job("KIND")` on a factory `(ctx, **params) ->
Job` (params: the test's parametrize values). When the first guest test starts, the
session-wide `guest_pool` fixture submits the jobs of ALL selected guest tests; each test then
waits for its own result (`wait(request)`), showing every guest's progress meanwhile. Guest
tests are moved to the end of the session, so the host tests never share the cores with
guests. Leaving early (-x, Ctrl-C, SIGTERM) stops the running guests and starts no other.
"""

from __future__ import annotations

import os
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from . import pool, qemu

MARK = "guest"
Factory = Callable[..., pool.Job]
_FACTORIES: dict[str, Factory] = {}


def guest_job(kind: str) -> Callable[[Factory], Factory]:
    """Register the job factory of guest tests marked `guest(kind)`."""

    def register(factory: Factory) -> Factory:
        _FACTORIES[kind] = factory
        return factory

    return register


class Context:
    """Shared by a session's guest jobs: a scratch dir and set-up done once (thread-safe)."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self._lock = threading.Lock()
        self._once: dict[str, Any] = {}

    def once(self, key: str, make: Callable[[], Any]) -> Any:
        with self._lock:
            if key not in self._once:
                self._once[key] = make()
            return self._once[key]


def show(config: pytest.Config, line: str) -> None:
    """Write past pytest's capture (progress belongs in every run's output); a fresh line
    after pytest's own progress dots."""
    tr = config.pluginmanager.get_plugin("terminalreporter")
    cap = config.pluginmanager.get_plugin("capturemanager")
    if tr is None or cap is None:
        print(line)
        return
    with cap.global_and_fixture_disabled():
        tr.write_line(line)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARK}(kind): a QEMU guest test run in the guest pool")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Guest tests last (stable order otherwise)."""
    items.sort(key=lambda item: item.get_closest_marker(MARK) is not None)


def cannot_boot() -> str | None:
    """Why guests cannot run here, or None."""
    if os.environ.get("PELAGOS_VM_KERNEL"):
        return "already inside a matrix guest"
    missing = qemu.missing_tools()
    return f"cannot boot QEMU guests here, missing: {', '.join(missing)}" if missing else None


@pytest.fixture(scope="session")
def guest_pool(request: pytest.FixtureRequest) -> Iterator[pool.GuestPool]:
    """The session's pool, with the jobs of every selected guest test already submitted."""
    why = cannot_boot()
    if why:
        pytest.skip(why)
    marked = [(i, m) for i in request.session.items if (m := i.get_closest_marker(MARK))]
    # Longest first (a guest's `cost`, its minutes under TCG): the pool's FIFO then ends close
    # to the total divided by the number of guests at once, not with one long guest alone.
    marked.sort(key=lambda im: -float(im[1].kwargs.get("cost", 0)))
    jobs = pool.default_jobs()
    show(request.config, f"[guests] {len(marked)} guest tests, {jobs} at once")
    with tempfile.TemporaryDirectory(prefix="pelagos-guests-") as tmp:
        ctx = Context(Path(tmp))
        with pool.GuestPool(jobs, interrupt=KeyboardInterrupt) as guests:
            for item, mark in marked:
                kind = mark.args[0]
                if kind not in _FACTORIES:
                    raise pytest.UsageError(f"{item.nodeid}: no @guest_job({kind!r}) factory")
                callspec = getattr(item, "callspec", None)
                params = dict(callspec.params) if callspec is not None else {}
                label = f"{kind} {callspec.id}" if callspec is not None else kind
                guests.submit(item.nodeid, _FACTORIES[kind](ctx, **params), label=label)
            yield guests


def wait(guests: pool.GuestPool, request: pytest.FixtureRequest) -> Any:
    """This test's job result, every guest's lines shown meanwhile."""
    return guests.wait(request.node.nodeid, lambda line: show(request.config, line))
