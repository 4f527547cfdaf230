"""Pins by default: where /sys/fs/bpf is a bpffs, fresh processes share one loaded program.

Each case runs in a private mount namespace (`unshare --mount`) with its own bpffs on
/sys/fs/bpf, so nothing is pinned on the host and everything pinned goes away with the
namespace; the test then checks the programs themselves are gone.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pelagos_bpf import bpfsys
from pelagos_bpf.errors import BpfError
from pelagos_bpf.pins import DEFAULT_PIN_DIR, PIN_ENV, pin_dir

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

ATTACH = """
import json, sys
from pelagos_bpf.cgroup import Cgroup
from pelagos_bpf import devices
from pelagos_bpf.devices import DEFAULT_DEVICE_RULES, program
devices.attach_devices(Cgroup.open(sys.argv[1]), DEFAULT_DEVICE_RULES)
print(json.dumps(program.FEATURE.loaded().ids))
"""

GC = """
import json
from pelagos_bpf import gc
print(json.dumps(gc.collect().pins_removed))
"""

# Runs as PID 1's sibling inside `unshare --mount --propagation private`: mounts the bpffs
# (mode 0700, as systemd does), then starts fresh interpreters the way a runtime would.
DRIVER = """
import json, os, stat, subprocess, sys
py, attach, gc, cgs = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
subprocess.run(["mount", "-t", "bpf", "-o", "mode=700", "bpf", "/sys/fs/bpf"], check=True)
drop = ("PELAGOS_BPF_PIN_DIR", "PELAGOS_BPF_RULES_MAX")
env = {k: v for k, v in os.environ.items() if k not in drop}
def run(code, *args, **extra):
    out = subprocess.run([py, "-c", code, *args], env={**env, **extra}, check=True,
                         capture_output=True, text=True).stdout
    return json.loads(out)
out = {"first": run(attach, cgs[0]), "second": run(attach, cgs[1]),
       "resized": run(attach, cgs[2], PELAGOS_BPF_RULES_MAX="4096")}
st = os.stat("/sys/fs/bpf/pelagos-bpf")
out["dir"] = [st.st_uid, stat.S_IMODE(st.st_mode)]
out["pins_before_gc"] = sorted(os.listdir("/sys/fs/bpf/pelagos-bpf"))
out["removed"] = run(gc)
out["pins_after_gc"] = sorted(os.listdir("/sys/fs/bpf/pelagos-bpf"))
print(json.dumps(out))
"""


def _gone(prog_id: int, timeout: float = 5.0) -> bool:
    """The kernel freed the program (no fd by id), waiting out the RCU-deferred free."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.close(bpfsys.prog_get_fd_by_id(prog_id))
        except BpfError as e:
            if e.errno == errno.ENOENT:
                return True
            raise
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def test_pin_dir_setting(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(PIN_ENV, str(tmp_path))
    assert pin_dir() == str(tmp_path)
    monkeypatch.setenv(PIN_ENV, "")
    assert pin_dir() is None  # set but empty: no pins at all


@pytest.mark.skipif(shutil.which("unshare") is None, reason="util-linux unshare is missing")
def test_fresh_processes_share_the_default_pin(cg_root: Path) -> None:
    cgs = []
    for i in range(3):
        d = cg_root / f"c{i}"
        d.mkdir()
        cgs.append(str(d))
    r = subprocess.run(
        [
            "unshare",
            "--mount",
            "--propagation",
            "private",
            sys.executable,
            "-c",
            DRIVER,
            sys.executable,
            ATTACH,
            GC,
            *cgs,
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    first, second, resized = (out[k]["pelagos_dev_rt"] for k in ("first", "second", "resized"))
    owners = len(out["first"])  # one program per owner, pinned as one set
    # The first process exited; its program lived on only through the pin the second fetched.
    assert first == second and out["first"] == out["second"]
    # Another map size is another set with its own pins, never the old maps.
    assert resized != first
    assert out["dir"] == [0, 0o755]
    assert len(out["pins_before_gc"]) == 2 * owners
    assert all(
        p.startswith(("pelagos_drt_v3_", "pelagos_dhk_v3_", "pelagos_dnr_v3_"))
        for p in out["pins_before_gc"]
    )
    # gc (default size) unpins the set it would not fetch and keeps the current one.
    assert len(out["removed"]) == owners
    assert all(r.startswith(DEFAULT_PIN_DIR + "/") for r in out["removed"])
    kept = out["pins_after_gc"]
    assert len(kept) == owners and set(kept) <= set(out["pins_before_gc"])
    assert not {f"{DEFAULT_PIN_DIR}/{k}" for k in kept} & set(out["removed"])
    # The resized program is still attached to c2; the shared one to c0 and c1.
    assert not _gone(first, timeout=0) and not _gone(resized, timeout=0)
    for d in cgs:
        os.rmdir(d)  # the kernel detaches; with the namespace gone, nothing pins them
    assert _gone(first) and _gone(resized)
