"""Many tenants on one node: quotas, fair counters, gc of what is provably dead (issue 23).

A tenant is one cgroup. Every test works on real maps and, where it says so, real device
nodes (device_helpers.probe: EPERM from the cgroup check). Scenarios that need a small rule map
run in a child process with private maps ($PELAGOS_BPF_RULES_MAX, pins off), so they neither
depend on nor disturb the suite's own maps.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from device_helpers import probe

from pelagos_bpf import bpfsys, gc
from pelagos_bpf.cgroup import Cgroup
from pelagos_bpf.devices import (
    DEFAULT_DEVICE_RULES,
    attach_devices,
    read_state,
    update_devices,
    usage,
)
from pelagos_bpf.devices import encode as enc
from pelagos_bpf.devices import program as devprog
from pelagos_bpf.devices.rules import CgroupDeviceRule as R
from pelagos_bpf.owners import OWNER_IDS

pytestmark = pytest.mark.root
IN_GUEST = bool(os.environ.get("PELAGOS_VM_KERNEL"))  # QEMU/TCG: ~50x slower per syscall
KMSG = ("c", 1, 11, "r")
NULL = ("c", 1, 3, "rw")


def _child(code: str, *args: str, **env: str) -> dict:
    """Run `code` in a fresh interpreter with private maps; its last stdout line as JSON."""
    full = {**os.environ, "PELAGOS_BPF_PIN_DIR": "", **env}
    r = subprocess.run(
        [sys.executable, "-c", code, *args], env=full, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- quotas (finding 3)

QUOTA = r"""
import json, sys
from pelagos_bpf.cgroup import Cgroup
from pelagos_bpf.devices import DEFAULT_DEVICE_RULES, attach_devices, program, usage
from pelagos_bpf.devices.rules import CgroupDeviceRule as R
from pelagos_bpf.errors import PelagosError
root = sys.argv[1]
def many(n, major):
    return [R(False, "c", major, i, "r") for i in range(n)]
out = {}
def attempt(name, rules):
    import os
    os.makedirs(f"{root}/{name}", exist_ok=True)
    try:
        attach_devices(Cgroup.open(f"{root}/{name}"), rules)
        out[name] = "ok"
    except PelagosError as e:
        out[name] = f"{type(e).__name__}: {e}"
attempt("too_many", many(1001, 240))        # over the per-set limit: refused before writing
attempt("big", many(900, 241))               # fits, leaving more than the reserve
attempt("growth", many(200, 242))            # would eat into the reserve: refused
attempt("ordinary", list(DEFAULT_DEVICE_RULES))  # small: may use the reserve
attempt("ordinary2", list(DEFAULT_DEVICE_RULES))
fd = program.FEATURE.loaded().maps["dev_rules"]
out["used"] = usage.used(fd)
out["counted"] = usage.recount(fd)
print(json.dumps(out))
"""


def test_quotas_refuse_before_writing_and_keep_room_for_others(cg_root: Path) -> None:
    """A per-set limit, and a reserve of free entries that only small writes may use: one
    tenant's huge rule set can neither be written past the limit nor crowd out the next
    ordinary setup (the landed main wrote until E2BIG for everyone)."""
    out = _child(
        QUOTA,
        str(cg_root),
        PELAGOS_BPF_RULES_MAX="1300",
        PELAGOS_BPF_RULES_PER_SET="1000",
        PELAGOS_BPF_RULES_RESERVE="200",
    )
    assert out["too_many"].startswith("ConfigError: device_rules='1001 rules'")
    assert "PELAGOS_BPF_RULES_PER_SET" in out["too_many"]
    assert out["big"] == "ok"
    assert out["growth"].startswith("BpfError: [Errno 7]")
    assert "kept for other cgroups' setups (PELAGOS_BPF_RULES_RESERVE)" in out["growth"]
    assert out["ordinary"] == out["ordinary2"] == "ok"
    # The fill level the writers kept is the real count: nothing refused left an entry.
    assert out["used"] == out["counted"]
    assert not any((cg_root / n).exists() and _our_progs(cg_root / n) for n in ("too_many",))


def _our_progs(path: Path) -> list[int]:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return bpfsys.prog_query(fd, 6)
    finally:
        os.close(fd)


ROLLBACK = r"""
import json, sys
from pelagos_bpf import bpfsys
from pelagos_bpf.cgroup import Cgroup
from pelagos_bpf.devices import attach_devices, program, usage
from pelagos_bpf.devices.rules import CgroupDeviceRule as R
from pelagos_bpf.errors import BpfError
path = sys.argv[1]
fd = program.FEATURE.loaded().maps["dev_rules"]
calls = []
real = bpfsys._bpf
def counting(op, attr):
    calls.append(op)
    return real(op, attr)
# The fill level drifted low (a writer's count was lost): admission passes, the kernel refuses
# half-way through the batch, and the write must undo exactly what it wrote.
usage._store(fd, 0)
bpfsys._bpf = counting
try:
    attach_devices(Cgroup.open(path), [R(False, "c", 240, i, "r") for i in range(3000)])
    result = "written"
except BpfError as e:
    result = str(e)
finally:
    bpfsys._bpf = real
deletes = calls.count("BPF_MAP_DELETE_BATCH")
left = sum(int.from_bytes(k[:8], "little") != 0 for k in bpfsys.map_keys(fd, 24))
print(json.dumps({"result": result, "deletes": deletes, "left": left, "progs": 0}))
"""


def test_a_failed_setup_rolls_back_in_one_batch(cg_root: Path) -> None:
    """The rollback deletes what the failed batch wrote with one syscall (the landed main
    resumed after every absent key: quadratic), and leaves no entry behind."""
    (cg_root / "rb").mkdir()
    out = _child(
        ROLLBACK,
        str(cg_root / "rb"),
        PELAGOS_BPF_RULES_MAX="2000",
        PELAGOS_BPF_RULES_PER_SET="4000",
        PELAGOS_BPF_RULES_RESERVE="0",
    )
    assert "device_rules" in out["result"] and "Errno 7" in out["result"]
    assert out["left"] == 0
    # One undo of the partial write, then the retry after gc is refused by admission: the
    # delete syscalls do not grow with the number of entries.
    assert out["deletes"] <= 4, out
    assert _our_progs(cg_root / "rb") == []


# ---------------------------------------------------------------- fair counters (finding 4)


def test_one_cgroup_cannot_use_up_the_denial_counters(cg_root: Path) -> None:
    """A hostile cgroup provokes thousands of distinct denials: it gets at most its cap of
    itemised counters (the rest counted as not itemised), and another cgroup's denials are
    still itemised afterwards (the landed main's shared counter map filled at 16,383)."""
    hostile, victim = cg_root / "hostile", cg_root / "victim"
    for p in (hostile, victim):
        p.mkdir()
        attach_devices(Cgroup.open(p), list(DEFAULT_DEVICE_RULES))
    n = 300 if IN_GUEST else 3000
    distinct = [("c", 240 + i % 5, i // 5, "r") for i in range(n)]
    assert not any(probe(hostile, distinct))
    st = read_state(Cgroup.open(hostile))
    assert len(st.denials) <= devprog.lay.AUDIT_ITEMS
    assert len(st.denials) + st.denials_not_itemised >= n  # every denial counted somewhere
    assert st.denials_not_itemised > 0
    assert probe(victim, [KMSG, KMSG]) == [False, False]
    assert read_state(Cgroup.open(victim)).denials == {"c 1:11 r": 2}


# ---------------------------------------------------------------- gc (findings 5, 6)


def _stale(cg: Cgroup, gen: int) -> None:
    """What a writer killed after its switch leaves: a complete rule set of an old
    generation (written here directly, as that writer did before dying)."""
    maps = devprog.FEATURE.loaded().maps
    prep = devprog.prepare([R(True, "a")])
    devprog.write_set(cg, maps, gen, "runtime", prep)


def _generations(cg: Cgroup) -> set[int]:
    maps = devprog.FEATURE.loaded().maps
    return {
        enc.key_head(k)[1]
        for k in bpfsys.map_keys(maps["dev_rules"], enc.RULE_KEY.size)
        if enc.key_head(k)[0] == cg.id and enc.key_head(k)[2] == OWNER_IDS["runtime"]
    }


def test_gc_reclaims_stale_generations_of_live_cgroups(cg_root: Path) -> None:
    """Generations no program can read (not the current one, not the one before it) are
    reclaimed while the cgroup lives; a cgroup a writer holds is left alone."""
    p = cg_root / "live"
    p.mkdir()
    cg = Cgroup.open(p)
    attach_devices(cg, list(DEFAULT_DEVICE_RULES))
    for _ in range(3):
        update_devices(cg, [*DEFAULT_DEVICE_RULES, R(False, "c", 1, 5, "w")])
    cur = devprog.current_gen(devprog.FEATURE.loaded().maps, cg.id)
    assert _generations(cg) == {cur - 1, cur}
    for g in (cur - 3, cur - 2):
        _stale(cg, g)
    assert _generations(cg) == {cur - 3, cur - 2, cur - 1, cur}
    # Held by a writer (another process has the cgroup's flock): gc must not judge it.
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(p)], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.read(1) == b"l"
        assert not _flock_free(p)
        gc.collect()
        assert _generations(cg) == {cur - 3, cur - 2, cur - 1, cur}
    finally:
        holder.kill()
        holder.wait()
    report = gc.collect()
    assert _generations(cg) == {cur - 1, cur}
    assert any("stale generations" in k for k in report.entries_removed), report
    assert probe(p, [KMSG, NULL, ("c", 1, 5, "w")]) == [False, True, False]  # still enforced
    fd = devprog.FEATURE.loaded().maps["dev_rules"]
    assert usage.used(fd) == usage.recount(fd)


HOLD = r"""
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
fcntl.flock(fd, fcntl.LOCK_EX)  # what a writer of this cgroup holds while it works
os.write(1, b"l")
time.sleep(120)
"""


def _flock_free(path: Path) -> bool:
    import fcntl

    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


def test_gc_prefix_removes_only_cgroups_we_created(cg_root: Path) -> None:
    """`gc --prefix` tears down abandoned cgroups this library created, never one we only
    attached to (a runtime's, where `pelagos-bpf update` or the hook added rules), and a
    prefix spelled with `..` cannot reach outside itself."""
    from pelagos_bpf.cgroup import setup_cgroup
    from pelagos_bpf.config import CgroupConfig

    base = cg_root / "base"
    (base / "theirs").mkdir(parents=True)
    attach_devices(Cgroup.open(base / "theirs"), list(DEFAULT_DEVICE_RULES))  # attached only
    ours = setup_cgroup(
        CgroupConfig(device_rules=list(DEFAULT_DEVICE_RULES), path=f"{cg_root.name}/base/ours"),
        None,
    )
    outside = cg_root / "outside"
    outside.mkdir()
    setup_cgroup(CgroupConfig(path=f"{cg_root.name}/outside/mine"), None)
    report = gc.collect(f"{base}/../base")
    assert report.cgroups_removed == [str(ours.path)]
    assert (base / "theirs").is_dir() and _our_progs(base / "theirs")
    assert (outside / "mine").is_dir()  # outside the prefix, though ours
    assert probe(base / "theirs", [KMSG]) == [False]


# ---------------------------------------------------------------- many tenants at once


HOSTILE = r"""
import os, sys, time
from pelagos_bpf.cgroup import Cgroup
from pelagos_bpf.devices import DEFAULT_DEVICE_RULES, update_devices
from pelagos_bpf.devices.rules import CgroupDeviceRule as R
cg = Cgroup.open(sys.argv[1])
i = 0
os.write(1, b"r")
while True:  # killed at a random point: updates interrupted anywhere
    extra = [R(False, "c", 243, j, "r") for j in range(i % 50)]
    update_devices(cg, [*DEFAULT_DEVICE_RULES, *extra])
    i += 1
"""


def test_fifty_tenants_one_hostile(cg_root: Path) -> None:
    """49 ordinary tenants keep setting up, enforcing and auditing correctly while a hostile
    one asks for a huge rule set, provokes thousands of distinct denials and has its updates
    SIGKILLed; afterwards gc leaves exactly the live tenants' current state."""
    from pelagos_bpf.errors import PelagosError

    hostile = cg_root / "t00"
    hostile.mkdir()
    hcg = Cgroup.open(hostile)
    attach_devices(hcg, list(DEFAULT_DEVICE_RULES))
    with pytest.raises(PelagosError, match="RULES_PER_SET"):  # the huge set: refused up front
        update_devices(hcg, [R(False, "c", 244, i, "r") for i in range(usage.per_set_limit() + 1)])
    n = 200 if IN_GUEST else 2000
    assert not any(probe(hostile, [("c", 240 + i % 5, i // 5, "r") for i in range(n)]))
    kills = 3 if IN_GUEST else 10
    for _ in range(kills):
        proc = subprocess.Popen(
            [sys.executable, "-c", HOSTILE, str(hostile)], stdout=subprocess.PIPE
        )
        assert proc.stdout is not None and proc.stdout.read(1) == b"r"
        time.sleep(0.05)
        proc.kill()
        proc.wait()
    tenants = []
    for i in range(1, 50):
        p = cg_root / f"t{i:02}"
        p.mkdir()
        cg = Cgroup.open(p)
        attach_devices(
            cg, [*DEFAULT_DEVICE_RULES, R(False, "c", 1, 5, "w"), R(True, "c", 242, i, "r")]
        )
        tenants.append((i, p, cg))
    for i, p, cg in tenants:
        got = probe(p, [KMSG, NULL, ("c", 1, 5, "w"), ("c", 242, i, "r"), ("c", 242, 0, "r")])
        assert got == [False, True, False, True, False], (i, got)
        st = read_state(cg)
        assert st.installed and st.denials == {"c 1:11 r": 1, "c 1:5 w": 1, "c 242:0 r": 1}, i
    gc.collect()
    for _, _, cg in tenants:
        assert len(_generations(cg)) == 1  # attached once, never updated: only generation 1
    assert read_state(hcg).installed  # the hostile tenant itself is enforced, killed or not
    assert probe(hostile, [KMSG, NULL]) == [False, True]
