"""Device-rule benchmarks, side by side in one run (root). Prints medians and ratios.

0. the syscall costs of a container's life on THIS machine, each timed alone in C (mkdir,
   PROG_LOAD of the runc-shaped filter and of our generic program, PROG_ATTACH, the rule-set
   map batch update, cgroup.procs write, PROG_DETACH, rmdir with and without attachments), so
   a reader sees why a ratio below moves from one machine to the next.
1. setup (and setup+teardown) of a container cgroup with DEFAULT_DEVICE_RULES + 3 user rules:
   `setup_cgroup` from Python (repeated and never-seen rule sets; and with pid=None, the call
   of a runtime that starts its process with clone3(CLONE_INTO_CGROUP, cg.open_fd()), whose
   child starts inside, so nothing is moved in; and the repeated set through bpfsys's ctypes
   fallback, the backend of an install without a C compiler) vs a C program, built here,
   issuing the peers' bare syscalls (mkdir, PROG_LOAD of a per-container runc-shaped filter,
   PROG_ATTACH, cgroup.procs; cleanup = pid back out + rmdir).
2. per-open overhead of /dev/null in a cgroup with 1, 16, 1000 rules vs no program (our
   generic program, and the runc-shaped filter for contrast), timed by a C loop inside it.

The run ends with one "goal met / not met" line per goal of issue 12 (setup <= 0.7x the C
floor, setup+teardown <= 1.0x, for repeated and never-seen rule sets, on wall clock and on
thread CPU time medians). bench/README.md says how to read it.

Usage: .venv/bin/python bench/bench_devices.py [--n 60] [--rounds 10] [--opens 50000]
       [--costs 200] [--skip-opens]
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pelagos_bpf import bpfsys, bytecode
from pelagos_bpf.bpfsys import AttachType, ProgType
from pelagos_bpf.cgroup import Cgroup, setup_cgroup, teardown_cgroup
from pelagos_bpf.config import CgroupConfig
from pelagos_bpf.config import CgroupDeviceRule as R
from pelagos_bpf.devices import (
    DEFAULT_DEVICE_RULES,
    attach_devices,
    detach_devices,
)
from pelagos_bpf.devices import encode as enc
from pelagos_bpf.devices import program as devprog
from pelagos_bpf.hierarchy import discover
from pelagos_bpf.owners import OWNER_IDS, RUNTIME

HERE = Path(__file__).resolve().parent
USER_RULES = [R(True, "c", 240, 1, "r"), R(False, "c", 1, 9, "w"), R(True, "b", 240, -1, "rw")]
RULES = [*DEFAULT_DEVICE_RULES, *USER_RULES]


# ---------------------------------------------------------------- runc-shaped program


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


_LDXW, _AND32K, _RSH32K, _MOV32K, _MOV32X, _JNE32K, _JNE32X, _EXIT = (
    0x61, 0x54, 0x74, 0xB4, 0xBC, 0x56, 0x5E, 0x95,
)  # fmt: skip
_TYPE = {"b": 1, "c": 2}
_ACC = {"m": 1, "r": 2, "w": 4}


def runc_program(rules: Sequence[R]) -> bytes:
    """A first-match filter shaped like runc/crun/youki's: one block per rule.

    Blocks go in reverse order so first match = last rule (our semantics, youki's order);
    a block without conditions ends the program (the verifier rejects dead code).
    """
    out = [
        _insn(_LDXW, 2, 1, 0),  # r2 = access_type
        _insn(_AND32K, 2, imm=0xFFFF),  # r2 = type
        _insn(_LDXW, 3, 1, 0),
        _insn(_RSH32K, 3, imm=16),  # r3 = access
        _insn(_LDXW, 4, 1, 4),  # r4 = major
        _insn(_LDXW, 5, 1, 8),  # r5 = minor
    ]
    for rule in reversed(rules):
        conds: list[tuple[str, int]] = []
        if rule.kind != "a":
            conds.append(("type", _TYPE[rule.kind]))
        acc = sum(_ACC[c] for c in rule.access)
        if acc != 7:
            conds.append(("acc", acc))
        if rule.major != -1:
            conds.append(("major", rule.major))
        if rule.minor != -1:
            conds.append(("minor", rule.minor))
        size = sum(3 if c == "acc" else 1 for c, _ in conds) + 2
        block: list[bytes] = []
        for c, v in conds:
            left = size - len(block) - (3 if c == "acc" else 1)
            if c == "type":
                block.append(_insn(_JNE32K, 2, off=left, imm=v))
            elif c == "acc":  # requested access must be a subset of the rule's
                block.append(_insn(_MOV32X, 1, 3))
                block.append(_insn(_AND32K, 1, imm=v))
                block.append(_insn(_JNE32X, 1, 3, off=left))
            else:
                block.append(_insn(_JNE32K, 4 if c == "major" else 5, off=left, imm=v))
        block += [_insn(_MOV32K, 0, imm=int(rule.allow)), _insn(_EXIT)]
        out += block
        if not conds:
            return b"".join(out)
    out += [_insn(_MOV32K, 0, imm=1), _insn(_EXIT)]  # no rule matched: allowed
    return b"".join(out)


# ---------------------------------------------------------------- helpers


def build_c(tmp: Path) -> Path:
    exe = tmp / "devbench"
    subprocess.run(["gcc", "-O2", "-o", str(exe), str(HERE / "devbench.c")], check=True)
    return exe


def sleeper() -> int:
    pid = os.fork()
    if pid == 0:
        signal.pause()
        os._exit(0)
    return pid


def never_seen(i: int) -> list[R]:
    return [*RULES, R(True, "c", 242, i % 1_000_000, "rw")]


def remove_tree(d: Path) -> None:
    """rmdir d and every cgroup below it, deepest first (the kernel frees the attachments)."""
    for p in sorted((p for p in d.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
        p.rmdir()
    d.rmdir()


# ---------------------------------------------------------------- 0. syscall costs

COST_NAMES = (
    "mkdir",
    "open cgroup dir",
    "PROG_LOAD runc-shaped filter",
    "PROG_LOAD our generic program",
    "PROG_ATTACH ours (allocates cgroup storage)",
    "PROG_ATTACH runc-shaped",
    "MAP_UPDATE_BATCH of one rule set",
    "write pid to cgroup.procs",
    "write pid back to the parent",
    "PROG_DETACH x2",
    "close 3 fds",
    "rmdir",
    "MAP_DELETE_BATCH of one rule set",
)


def write_entries(path: Path, entries: Sequence[tuple[bytes, bytes]]) -> Path:
    """A rule set's map entries for devbench: count, key and value size, keys, values."""
    path.write_bytes(
        struct.pack("<III", len(entries), enc.RULE_KEY.size, enc.RULE_VAL.size)
        + b"".join(k for k, _ in entries)
        + b"".join(v for _, v in entries)
    )
    return path


def measure_costs(exe: Path, parent: Path, pid: int, n: int, tmp: Path) -> dict[str, float]:
    """Median wall us of each syscall, from the C program; also returned for the ratios' notes."""
    own = devprog.own_program()
    ours = bytecode.relocate(devprog.compiled(), own.maps)  # fd numbers survive pass_fds
    runc = runc_program(RULES)
    pf = tmp / "cost_progs.bin"
    pf.write_bytes(
        struct.pack("<I", 2) + b"".join(struct.pack("<I", len(p) // 8) + p for p in (runc, ours))
    )
    entries = enc.with_ruleset(1, 1, OWNER_IDS[RUNTIME], devprog.prepare(RULES).template)
    ef = write_entries(tmp / "cost_entries.bin", entries)
    rules_fd = own.maps["dev_rules"]
    out = subprocess.run(
        [str(exe), "costs", str(parent), str(pid), str(pf), str(n), str(rules_fd), str(ef)],
        check=True,
        capture_output=True,
        text=True,
        pass_fds=(*own.progs.values(), *own.maps.values()),
    ).stdout
    rows = [list(map(int, line.split())) for line in out.splitlines() if line.strip()]
    med: dict[str, float] = {}
    for i, name in enumerate(COST_NAMES, start=1):
        vals = [r[i] for r in rows if name != "PROG_DETACH x2" or r[0] == 0]
        med[name] = statistics.median(vals) / 1000
    med["rmdir, programs detached before"] = (
        statistics.median(r[12] for r in rows if r[0] == 0) / 1000
    )
    med["rmdir, 2 programs still attached"] = (
        statistics.median(r[12] for r in rows if r[0] == 1) / 1000
    )
    del med["rmdir"]
    print(
        f"\n== syscall costs on this machine (C, wall clock, median of {len(rows)} container lives)"
    )
    sizes = {
        "PROG_LOAD runc-shaped filter": f"{len(runc) // 8} insns",
        "PROG_LOAD our generic program": f"{len(ours) // 8} insns, once per process",
        "MAP_UPDATE_BATCH of one rule set": f"{len(entries)} entries",
        "MAP_DELETE_BATCH of one rule set": f"{len(entries)} entries",
    }
    for name, us in med.items():
        print(f"  {name:44} {us:8.1f} us  {sizes.get(name, '')}")
    floor = sum(
        med[k]
        for k in (
            "mkdir",
            "open cgroup dir",
            "PROG_LOAD runc-shaped filter",
            "PROG_ATTACH runc-shaped",
            "write pid to cgroup.procs",
        )
    )
    print(f"  sum = the C floor's setup (mkdir+open+PROG_LOAD runc+attach+procs): {floor:.0f} us")
    return med


# ---------------------------------------------------------------- 1. setup


Timings = list[tuple[int, int, int, int]]  # (setup, setup+teardown) wall ns, then CPU ns


def bench_c_setup(
    exe: Path, parent: Path, pid: int, progs: list[bytes], n: int, tmp: Path
) -> Timings:
    pf = tmp / "progs.bin"
    with open(pf, "wb") as f:
        f.write(struct.pack("<I", len(progs)))
        for p in progs:
            f.write(struct.pack("<I", len(p) // 8) + p)
    out = subprocess.run(
        [str(exe), "setup", str(parent), str(pid), str(pf), str(n)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split("\n")
    return [tuple(map(int, line.split())) for line in out if line.strip()]  # type: ignore[misc]


def bench_py_setup(
    root: Path,
    parent: Path,
    pid: int | None,
    rules_for: Callable[[int], list[R]],
    n: int,
    tag: str,
) -> Timings:
    """pid None: `setup_cgroup(cfg, None)`, what a runtime that clone3s into `cg.open_fd()`
    (CLONE_INTO_CGROUP) calls; its child starts inside, nothing is moved in or back out."""
    out: Timings = []
    rel = parent.relative_to(root)
    parent_procs = parent / "cgroup.procs"
    wall, cpu = time.perf_counter_ns, time.thread_time_ns
    for i in range(n):
        cfg = CgroupConfig(device_rules=rules_for(i), path=f"{rel}/{tag}{i}")
        c0, t0 = cpu(), wall()
        cg = setup_cgroup(cfg, pid, root=root)
        t1, c1 = wall(), cpu()
        if pid is not None:  # the C floor's open + write + close of the parent's cgroup.procs
            fd = os.open(parent_procs, os.O_WRONLY | os.O_CLOEXEC)
            os.write(fd, b"%d" % pid)
            os.close(fd)
        teardown_cgroup(cg)
        t2, c2 = wall(), cpu()
        out.append((t1 - t0, t2 - t0, c1 - c0, c2 - c0))
    return out


def print_setup(rows: list[tuple[str, Timings]]) -> dict[str, tuple[float, float]]:
    """Print the tables; return {"<rule sets>, <wall|CPU>": (setup, setup+teardown ratios)}."""

    def med(t: Timings, col: int) -> float:
        return statistics.median(x[col] for x in t) / 1000

    c = rows[0][1]
    for title, s_col, t_col in (("wall clock", 0, 1), ("thread CPU time", 2, 3)):
        print(f"\n== setup with DEFAULT_DEVICE_RULES + 3 rules: {title} ({len(c)} runs, medians)")
        print(f"{'variant':46} {'setup us':>9} {'ratio':>6} {'+teardown us':>13} {'ratio':>6}")
        for name, t in rows:
            s, tt = med(t, s_col), med(t, t_col)
            print(
                f"{name:46} {s:9.1f} {s / med(c, s_col):6.2f} {tt:13.1f} {tt / med(c, t_col):6.2f}"
            )
    print("(ratio < 1: faster than the C floor)")
    return {
        f"{name.split(', ')[-1]}, {metric}": (med(t, s) / med(c, s), med(t, e) / med(c, e))
        for name, t in rows[1:]
        for metric, s, e in (("wall", 0, 1), ("CPU", 2, 3))
    }


def goal(label: str, value: float, limit: float, unit: str = "x") -> None:
    verdict = "goal met" if value <= limit else "goal NOT met"
    print(f"  {verdict:12} {label}: {value:.2f}{unit} (goal <= {limit}{unit})")


# ---------------------------------------------------------------- 2. per-open


def open_cost(exe: Path, cg_path: Path, opens: int) -> float:
    def child() -> None:
        (cg_path / "cgroup.procs").write_text(str(os.getpid()))

    out = subprocess.run(
        [str(exe), "open", str(opens)], preexec_fn=child, check=True, capture_output=True, text=True
    ).stdout
    return float(out)


def attach_runc(cg_path: Path, rules: Sequence[R]) -> int:
    prog = bpfsys.prog_load(ProgType.CGROUP_DEVICE, runc_program(rules), name="runc_shaped")
    fd = os.open(cg_path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        bpfsys.prog_attach(prog, fd, AttachType.CGROUP_DEVICE, bpfsys.BPF_F_ALLOW_MULTI)
    finally:
        os.close(fd)
    return prog


def bench_opens(exe: Path, parent: Path, opens: int, rounds: int) -> None:
    big = [*RULES, *(R(True, "c", 242, i, "r") for i in range(1000 - len(RULES)))]
    one = [R(True, "c", 1, 3, "rwm")]
    cases: list[tuple[str, str, list[R] | None]] = [
        ("no program", "none", None),
        ("ours, 1 rule", "ours", one),
        ("ours, 16 rules", "ours", RULES),
        ("ours, 1000 rules", "ours", big),
        ("runc-shaped, 1 rule", "runc", one),
        ("runc-shaped, 16 rules", "runc", RULES),
        ("runc-shaped, 1000 rules", "runc", big),
    ]
    dirs, progs = [], []
    try:
        for i, (_, kind, rules) in enumerate(cases):
            d = parent / f"open{i}"
            d.mkdir()
            dirs.append(d)
            if kind == "ours" and rules is not None:
                attach_devices(Cgroup.open(d), rules)
            elif kind == "runc" and rules is not None:
                progs.append(attach_runc(d, rules))
        costs: list[list[float]] = [[] for _ in cases]
        for _ in range(rounds):  # interleaved, so load changes hit every case alike
            for i, d in enumerate(dirs):
                costs[i].append(open_cost(exe, d, opens))
    finally:
        for fd in progs:
            os.close(fd)
        for d in dirs:
            detach_devices(Cgroup.open(d))
            d.rmdir()
    print(
        f"\n== per-open cost of /dev/null O_RDWR (thread CPU time, {opens} opens x {rounds} "
        "interleaved rounds, medians)"
    )
    print(f"{'case':26} {'ns/open':>8} {'overhead ns':>12}")
    base = statistics.median(costs[0])
    for (name, _, rules), c in zip(cases, costs, strict=True):
        insns = ""
        if name.startswith("runc") and rules is not None:
            insns = f"  ({len(runc_program(rules)) // 8} insns)"
        print(f"{name:26} {statistics.median(c):8.1f} {statistics.median(c) - base:12.1f}{insns}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=60, help="runs per variant per round")
    ap.add_argument("--opens", type=int, default=50_000)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--open-rounds", type=int, default=9)
    ap.add_argument("--costs", type=int, default=200, help="container lives for the cost table")
    ap.add_argument("--skip-opens", action="store_true", help="skip the per-open benchmark")
    args = ap.parse_args()
    root = discover().root
    parent = root / f"pelagos-bench-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    parent.mkdir()
    pid = sleeper()
    (parent / "cgroup.procs").write_text(str(pid))
    t0 = time.perf_counter_ns()
    devprog.own_program()
    first_load_us = (time.perf_counter_ns() - t0) / 1000
    try:
        with tempfile.TemporaryDirectory(prefix="pelagos-bench-") as tmpd:
            tmp = Path(tmpd)
            exe = build_c(tmp)
            insns = len(runc_program(RULES)) // 8
            print(f"runc-shaped program for DEFAULT_DEVICE_RULES + 3 rules: {insns} insns")
            print(f"syscall backend: {bpfsys.BACKEND} (bpfsys.BACKEND; ctypes is the fallback)")
            print(
                f"our generic program: {devprog.compiled().insn_count} insns, loaded once per "
                f"process (load + 3 map creates: {first_load_us:.0f} us, before the timings)"
            )
            measure_costs(exe, parent, pid, args.costs, tmp)
            n = args.n
            c_runs: Timings = []
            py_runs: Timings = []
            new_runs: Timings = []
            clone_runs: Timings = []
            ctypes_runs: Timings = []
            warm = [runc_program(RULES)]
            bench_c_setup(exe, parent, pid, warm, 20, tmp)
            bench_py_setup(root, parent, pid, lambda i: RULES, 20, "w")
            for r in range(args.rounds):  # interleaved rounds: drift hits all variants alike
                progs = [runc_program(never_seen(r * n + i)) for i in range(n)]
                c_runs += bench_c_setup(exe, parent, pid, progs, n, tmp)
                py_runs += bench_py_setup(root, parent, pid, lambda i: RULES, n, f"r{r}_")
                new_runs += bench_py_setup(
                    root, parent, pid, lambda i, r=r: never_seen(10_000 + r * n + i), n, f"n{r}_"
                )
                clone_runs += bench_py_setup(root, parent, None, lambda i: RULES, n, f"k{r}_")
                if bpfsys.BACKEND == "ext":  # the fallback of an install without a compiler
                    prev = bpfsys.use_backend("ctypes")
                    try:
                        ctypes_runs += bench_py_setup(
                            root, parent, pid, lambda i: RULES, n, f"t{r}_"
                        )
                    finally:
                        bpfsys.use_backend(prev)
            ratios = print_setup(
                [
                    ("C, peers' syscalls (per-container PROG_LOAD)", c_runs),
                    ("Python setup_cgroup, repeated rule set", py_runs),
                    ("Python setup_cgroup, never-seen rule sets", new_runs),
                    ("Python setup_cgroup(pid=None), for clone3", clone_runs),
                ]
                + (
                    [("Python setup_cgroup, repeated (ctypes backend)", ctypes_runs)]
                    if ctypes_runs
                    else []
                )
            )
            if not args.skip_opens:
                bench_opens(exe, parent, args.opens, args.open_rounds)
            print("\n== issue 12 goals, this run (medians; ratios to the C floor)")
            print("   (wall clock counts run-queue waits and RCU grace periods; CPU time does not)")
            for name, (setup, total) in ratios.items():
                goal(f"setup, {name}", setup, 0.7)
                goal(f"setup+teardown, {name}", total, 1.0)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        remove_tree(parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
