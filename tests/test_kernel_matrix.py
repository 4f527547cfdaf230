"""The kernel matrix: the whole suite (`-m "not matrix"`) inside QEMU guests of Debian kernels.

Why: this host's cgroups are hybrid, so controller effects (`v2_controllers` tests) can only be
proven on a pure cgroup v2 kernel, and the BPF features must hold on the kernels people run.
The host's own kernel is the ordinary run; `-m "not matrix"` deselects this file.
Kernels: $PELAGOS_MATRIX_KERNELS (space-separated) or the runner's defaults; extra guest pytest
args: $PELAGOS_MATRIX_PYTEST_ARGS.
"""

from __future__ import annotations

import os
import shlex
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[1]
if str(_ROOT) not in sys.path:  # `tests.vm` is importable however pytest was started
    sys.path.insert(0, str(_ROOT))

from tests.vm import kernels, qemu  # noqa: E402
from tests.vm import run as vmrun  # noqa: E402

pytestmark = pytest.mark.matrix

KERNELS = os.environ.get("PELAGOS_MATRIX_KERNELS", " ".join(kernels.DEFAULT_KERNELS)).split()
GUEST_ARGS = shlex.split(os.environ.get("PELAGOS_MATRIX_PYTEST_ARGS", ""))


@pytest.fixture(scope="module")
def bpf_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path | None]:
    """BPF bytecode compiled once on the host, copied into each guest (no bcc under TCG)."""
    if os.environ.get("PELAGOS_VM_KERNEL"):
        pytest.skip("already inside a matrix guest")
    missing = qemu.missing_tools()
    if missing:
        pytest.skip(f"cannot boot QEMU guests here, missing: {', '.join(missing)}")
    d = tmp_path_factory.mktemp("bpf") / vmrun.BPF_CACHE_NAME
    d.mkdir()
    yield d if vmrun.prefill_bpf_cache(vmrun.venv_python(), d) else None


def _show(request: pytest.FixtureRequest, line: str) -> None:
    """Write past pytest's capture: the per-kernel counts belong in every run's output."""
    tr = request.config.pluginmanager.get_plugin("terminalreporter")
    cap = request.config.pluginmanager.get_plugin("capturemanager")
    if tr is None or cap is None:
        print(line)
        return
    with cap.global_and_fixture_disabled():
        tr.write_line("")
        tr.write_line(line)


@pytest.mark.parametrize("kernel", KERNELS)
def test_guest_suite(kernel: str, bpf_cache: Path | None, request: pytest.FixtureRequest) -> None:
    res = vmrun.run_kernel(kernel, GUEST_ARGS, bpf_cache=bpf_cache)
    vmrun.report(res)  # captured: shown when the test fails
    request.node.user_properties.append(("matrix", res.summary()))
    _show(request, f"[matrix] {res.summary()}")
    r = res.run
    assert r.started, f"{kernel}: the guest never started the suite (retried once)"
    assert r.status is not None, f"{kernel}: guest crashed or timed out during the suite"
    assert r.status == 0, f"{kernel}: guest pytest exited {r.status}: {res.counts}"
    assert res.counts.get("passed", 0) > 0, f"{kernel}: no test passed in the guest"
