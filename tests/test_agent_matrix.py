"""The agent with real runc, crun and podman: tests/test_agent_runtimes.py in a 6.12 guest of
its own (marked `matrix`), beside the kernel matrix's guests in the guest pool.

Why a guest of its own: its load test (200 containers, 20 at a time) wants 4 GiB and its soaks
run for minutes; in the kernel suite's 6.12 guest they made that guest the matrix's long pole.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:
    sys.path.insert(0, str(_ROOT))

from tests.vm import pool  # noqa: E402
from tests.vm import run as vmrun  # noqa: E402
from tests.vm.pytest_guests import Context, guest_job, show, wait  # noqa: E402

KERNEL = "6.12"
GUEST_TESTS = ["tests/test_agent_runtimes.py"]
MEMORY = "4G"  # the load test: 200 containers, 20 at a time
TIMEOUT = vmrun.TIMEOUT + 1500.0  # load, and the 5 + 3 minutes of soak under TCG


@guest_job("agent")
def _agent_suite(ctx: Context) -> pool.Job:
    def job(log: pool.Log) -> vmrun.KernelResult:
        return vmrun.run_kernel(KERNEL, GUEST_TESTS, memory=MEMORY, timeout=TIMEOUT, log=log)

    return job


@pytest.mark.matrix
@pytest.mark.guest("agent", cost=15)
def test_agent_guest(guest_pool: pool.GuestPool, request: pytest.FixtureRequest) -> None:
    try:
        res = wait(guest_pool, request)
    except vmrun.RUNNER_ERRORS as e:
        pytest.fail(f"{KERNEL}: {e}", pytrace=False)
    vmrun.report(res)  # captured: shown when the test fails
    show(request.config, f"[agent] {res.summary()}")
    r = res.run
    assert r.started, f"{KERNEL}: the guest never started the suite (retried once)"
    assert r.status == 0, f"{KERNEL}: guest pytest exited {r.status}: {res.counts}"
    assert res.counts.get("passed", 0) > 0, res.counts
