"""The wheel installs and enforces a device rule on a node with no compiler (issue 24).

The wheel is built here from this tree (its bytecode and thin hook built with it), carried with
its dependencies in an offline wheel directory, and installed into a fresh venv inside a 6.12
guest booted on the `minimal` root (tests/vm/roots.py: Debian 12 with python3 and NO gcc,
clang, LLVM, bcc, libbpf or headers; guests have no network). There `pelagos-bpf run` must deny
/dev/zero to a command whose rules deny it: the installed package compiled nothing, found no
bcc, and still loaded and attached its programs.
"""

from __future__ import annotations

import shlex
import subprocess
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
# What the guest runs (as root, in /tmp: the checkout is read-only there). Every step prints
# what it proves; `set -e` fails the job at the first step that does not hold.
GUEST_SCRIPT = r"""
set -eu
W="$1"
for tool in gcc cc clang llc bpftool; do
  if command -v "$tool" >/dev/null 2>&1; then echo "FAIL: $tool is installed"; exit 3; fi
done
python3 -c 'import bcc' 2>/dev/null && { echo "FAIL: bcc importable"; exit 3; }
echo "no compiler, no LLVM, no bcc: ok"
python3 -m venv /tmp/v
/tmp/v/bin/pip install -q --no-index --find-links "$W" pelagos-bpf
echo "installed: $(/tmp/v/bin/pelagos-bpf --version)"
set +e
/tmp/v/bin/pelagos-bpf run --default-devices --device "deny c 1:5" -- head -c1 /dev/zero \
  >/tmp/out 2>&1
code=$?
set -e
cat /tmp/out
[ "$code" = 1 ] || { echo "FAIL: run exited $code, want 1 (head's own failure)"; exit 4; }
grep -q "Operation not permitted" /tmp/out || { echo "FAIL: /dev/zero was not denied"; exit 4; }
/tmp/v/bin/pelagos-bpf run --default-devices -- head -c1 /dev/zero >/dev/null
echo "denied with the rule, allowed without it: ok"
"""


def build_wheelhouse(dest: Path) -> list[str]:
    """This tree's wheel (no build isolation: the tree holds current bytecode, so the build
    runs no bcc) plus its dependencies' wheels, in `dest`; the file names."""
    dest.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "--no-build-isolation", "-w", str(dest), str(_ROOT)], check=True)
    return sorted(p.name for p in dest.iterdir())


@guest_job("wheel")
def _wheel_job(ctx: Context) -> pool.Job:
    def job(log: pool.Log) -> vmrun.KernelResult:
        house = ctx.once("wheelhouse", lambda: ctx.tmp / "wheels")
        log(f"wheel: built {', '.join(build_wheelhouse(house))}")
        script = ctx.tmp / "wheel-check.sh"
        script.write_text(GUEST_SCRIPT)
        cmd = f"sh {shlex.quote(str(script))} {shlex.quote(str(house))}"
        return vmrun.run_kernel(KERNEL, None, cmd=cmd, root="minimal", shares=[ctx.tmp], log=log)

    return job


@pytest.mark.matrix
@pytest.mark.guest("wheel", cost=3)
def test_wheel_enforces_a_rule_on_a_node_without_a_compiler(
    guest_pool: pool.GuestPool, request: pytest.FixtureRequest
) -> None:
    try:
        res = wait(guest_pool, request)
    except vmrun.RUNNER_ERRORS as e:
        pytest.fail(f"wheel guest: {e}", pytrace=False)
    vmrun.report(res)
    show(request.config, f"[wheel] {res.summary()}")
    r = res.run
    assert r.started, "the guest never started the job (retried once)"
    assert r.status == 0, f"the wheel check failed in the guest (exit {r.status}): {r.output}"
    assert "denied with the rule, allowed without it: ok" in r.output
