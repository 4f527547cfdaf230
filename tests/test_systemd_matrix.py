"""The systemd driver's guest run: systemd 252 as PID 1 in a QEMU guest, running
tests/test_systemd_driver.py (python -m tests.vm.run --init systemd, see tests/vm/systemd_init.py).

Why a guest: the host has no systemd as PID 1, and the driver must be proven against the real
daemon (its D-Bus API, its re-apply at daemon-reload, its BPFProgram= attachments).
Kernel: $PELAGOS_SYSTEMD_KERNEL (default 6.12, Debian 12's newest). Deselected with -m 'not
matrix', as the kernel matrix.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from tests.vm import pool  # noqa: E402
from tests.vm import run as vmrun  # noqa: E402
from tests.vm.pytest_guests import Context, guest_job, show, wait  # noqa: E402

KERNEL = os.environ.get("PELAGOS_SYSTEMD_KERNEL", "6.12")
GUEST_TESTS = ["tests/test_systemd_driver.py", "tests/test_systemd_library.py"]


@guest_job("systemd")
def _systemd_suite(ctx: Context) -> pool.Job:
    def job(log: pool.Log) -> vmrun.KernelResult:
        return vmrun.run_kernel(KERNEL, GUEST_TESTS, init="systemd", log=log)

    return job


@pytest.mark.matrix
@pytest.mark.guest("systemd", cost=3)
def test_systemd_guest(guest_pool: pool.GuestPool, request: pytest.FixtureRequest) -> None:
    try:
        res = wait(guest_pool, request)
    except vmrun.RUNNER_ERRORS as e:
        pytest.fail(f"{KERNEL}: {e}", pytrace=False)
    vmrun.report(res)  # captured: shown when the test fails
    request.node.user_properties.append(("systemd", res.summary()))
    show(request.config, f"[systemd] {res.summary()}")
    r = res.run
    assert r.started, f"{KERNEL}: systemd never started the job (retried once)"
    assert r.status == 0, f"{KERNEL}: guest pytest exited {r.status}: {res.counts}"
    # a skip would mean systemd was not PID 1 or jeepney missing: the driver went untested
    assert res.counts.get("passed", 0) > 0 and res.counts.get("skipped", 0) == 0, res.counts
