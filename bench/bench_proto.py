"""Design study for issue 12 (root): prototypes measured side by side, NOT library code.

1. container start/stop paths, interleaved in one run, with DEFAULT_DEVICE_RULES + 3 rules:
   - C floor: the peers' syscalls (mkdir, PROG_LOAD runc-shaped, PROG_ATTACH, cgroup.procs);
   - today: setup_cgroup / teardown_cgroup;
   - lean per-cgroup attach: what the library does today (rule-set batch, PROG_ATTACH of the
     shared program, storage write, cgroup.procs), but through dir fds, without PROG_QUERY, and
     teardown = rmdir (the kernel frees the attachment) + one batch delete of the entries;
   - attach once at the parent: one device program at the runtime's parent cgroup, its rule
     set chosen by bpf_get_current_ancestor_cgroup_id(level of the container cgroups), so a
     start is mkdir + rule-set batch + one owner-map write + cgroup.procs (no PROG_ATTACH).
2. the parent program's confinement (a task in the container, in a cgroup nested inside it, in
   a cgroup under the parent with no entry) and its per-open cost vs today's per-cgroup attach.
3. CLONE_INTO_CGROUP (clone3 with a cgroup dir fd) vs fork + a cgroup.procs write.
4. dirfd-relative syscalls vs pathlib for mkdir + open + procs write + rmdir.
5. first attach in a fresh process, by component: libbpf dlopen, bytecode cache read, each
   map create, PROG_LOAD, and fetching the program and maps from a pin instead.

Usage: .venv/bin/python bench/bench_proto.py [--n 40] [--rounds 5] [--opens 50000]
"""

from __future__ import annotations

import argparse
import ast
import ctypes
import errno
import json
import os
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_devices import (
    RULES,
    Timings,
    bench_c_setup,
    build_c,
    never_seen,
    open_cost,
    remove_tree,
    runc_program,
    sleeper,
)

from pelagos_bpf import bpfsys, progcache
from pelagos_bpf.bpfsys import AttachType, MapType
from pelagos_bpf.cgroup import setup_cgroup, teardown_cgroup
from pelagos_bpf.config import CgroupConfig
from pelagos_bpf.config import CgroupDeviceRule as R
from pelagos_bpf.devices import encode as enc
from pelagos_bpf.devices import program as devprog
from pelagos_bpf.hierarchy import discover

HERE = Path(__file__).resolve().parent
DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
U64 = struct.Struct("<Q")
wall, cpu = time.perf_counter_ns, time.thread_time_ns


def med_us(xs: list[int] | list[float]) -> float:
    return statistics.median(xs) / 1000


# ---------------------------------------------------------------- the parent program


_STORAGE = "BPF_CGROUP_STORAGE(dev_cur, u64);"
_READ = """    u64 *cur = (u64 *)(long)dev_cur.get_local_storage(0);
    u64 rs = *cur;
    if (rs == 0)
        return 0;"""


def parent_program_source(level: int) -> str:
    """bpf/device.c with the rule set chosen by the task's container cgroup, not by storage.

    Generated from the real source so the rule evaluation measured is the library's own. A
    task whose ancestor at `level` has no entry (a cgroup under the parent that is not a
    container, or a task above that level) is denied: fail closed.
    """
    src = (HERE.parent / "bpf" / "device.c").read_text()
    if _STORAGE not in src or _READ not in src:
        raise SystemExit("bpf/device.c changed: update bench_proto.parent_program_source")
    src = src.replace(_STORAGE, "BPF_HASH(dev_owner, u64, u64, 65536);")
    return src.replace(
        _READ,
        f"""    u64 cg = bpf_get_current_ancestor_cgroup_id({level});
    u64 *cur = dev_owner.lookup(&cg);
    if (!cur)
        return 0;
    u64 rs = *cur;""",
    )


class ParentProgram:
    """The prototype loaded with its own maps and attached at `parent`."""

    def __init__(self, parent: Path, level: int, tmp: Path) -> None:
        src = tmp / "device_parent.c"
        src.write_text(parent_program_source(level))
        t0 = wall()
        # bcc (LLVM) is imported in a child: mapped into this process it would make every
        # fork measured below several times slower.
        code = (
            "import json, sys; from pelagos_bpf import progcache as p; "
            "print(json.dumps(p._to_json(p.compile_program(sys.argv[1], 'pelagos_dev', 15))))"
        )
        out = subprocess.run(
            [sys.executable, "-c", code, str(src)], check=True, capture_output=True, text=True
        ).stdout
        self.compiled = progcache._from_json(json.loads(out))
        self.compile_ms = (wall() - t0) / 1e6
        specs = dict(devprog.MAP_SPECS)
        del specs["dev_cur"]
        specs["dev_owner"] = (MapType.HASH, 8, 8, 65536, devprog.BPF_F_NO_PREALLOC)
        self.maps = {
            n: bpfsys.map_create(t, k, v, m, name=n, flags=f)
            for n, (t, k, v, m, f) in specs.items()
        }
        self.fd = progcache.load_program(self.compiled, self.maps, name="pelagos_pdev")
        self.parent_fd = os.open(parent, DIR)
        bpfsys.prog_attach(self.fd, self.parent_fd, AttachType.CGROUP_DEVICE)

    def close(self) -> None:
        bpfsys.prog_detach(self.fd, self.parent_fd, AttachType.CGROUP_DEVICE)
        for fd in (self.fd, self.parent_fd, *self.maps.values()):
            os.close(fd)


# ---------------------------------------------------------------- start/stop variants


def _write_at(dfd: int, name: str, data: bytes) -> None:
    fd = os.open(name, os.O_WRONLY | os.O_CLOEXEC, dir_fd=dfd)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def lean_start(
    pfd: int, name: str, pid: bytes, rules: list[R]
) -> tuple[int, int, devprog.Prepared]:
    """Today's per-cgroup attach without PROG_QUERY, pathlib or re-discovery."""
    prep = devprog.prepare(rules)
    prog = devprog.own_program()
    os.mkdir(name, dir_fd=pfd)
    cfd = os.open(name, DIR, dir_fd=pfd)
    cgid = os.fstat(cfd).st_ino
    rs = enc.ruleset_key(cgid, 0)
    bpfsys.map_update_batch(prog.maps["dev_rules"], enc.with_ruleset(rs, prep.template))
    bpfsys.prog_attach(prog.fd, cfd, AttachType.CGROUP_DEVICE)
    bpfsys.map_update(
        prog.maps["dev_cur"], enc.STORAGE_KEY.pack(cgid, AttachType.CGROUP_DEVICE), U64.pack(rs)
    )
    _write_at(cfd, "cgroup.procs", pid)
    return cfd, cgid, prep


def lean_stop(pfd: int, name: str, cfd: int, cgid: int, prep: devprog.Prepared) -> None:
    """rmdir frees the attachment; the rule entries go after (no task can use them then)."""
    os.close(cfd)
    os.rmdir(name, dir_fd=pfd)
    rs = enc.ruleset_key(cgid, 0)
    bpfsys.map_delete_batch(
        devprog.own_program().maps["dev_rules"], [k for k, _ in enc.with_ruleset(rs, prep.template)]
    )


def parent_start(
    pp: ParentProgram, pfd: int, name: str, pid: bytes, rules: list[R]
) -> tuple[int, int, devprog.Prepared]:
    prep = devprog.prepare(rules)
    os.mkdir(name, dir_fd=pfd)
    cfd = os.open(name, DIR, dir_fd=pfd)
    cgid = os.fstat(cfd).st_ino
    rs = enc.ruleset_key(cgid, 0)
    bpfsys.map_update_batch(pp.maps["dev_rules"], enc.with_ruleset(rs, prep.template))
    bpfsys.map_update(pp.maps["dev_owner"], U64.pack(cgid), U64.pack(rs))  # enforcing from here
    if pid:
        _write_at(cfd, "cgroup.procs", pid)
    return cfd, cgid, prep


def parent_stop(
    pp: ParentProgram, pfd: int, name: str, cfd: int, cgid: int, prep: devprog.Prepared
) -> None:
    os.close(cfd)
    os.rmdir(name, dir_fd=pfd)
    bpfsys.map_delete(pp.maps["dev_owner"], U64.pack(cgid))
    rs = enc.ruleset_key(cgid, 0)
    bpfsys.map_delete_batch(
        pp.maps["dev_rules"], [k for k, _ in enc.with_ruleset(rs, prep.template)]
    )


def bench_paths(
    exe: Path, root: Path, parent: Path, pp: ParentProgram, pid: int, n: int, rounds: int, tmp: Path
) -> None:
    pfd = os.open(parent, DIR)
    pidb = str(pid).encode()
    res: dict[str, Timings] = {k: [] for k in ("C", "today", "lean", "parent")}
    # Today's path and the lean one attach per cgroup: they run in a sibling of the parent
    # program's cgroup (where no parent program applies), the parent variant under it.
    side = parent.parent / (parent.name + "-side")
    side.mkdir()
    sfd = os.open(side, DIR)
    srel = side.relative_to(root)
    (side / "cgroup.procs").write_text(str(pid))

    def timed(start: Callable[[], object], back: int, stop: Callable[[object], None]) -> tuple:
        c0, t0 = cpu(), wall()
        h = start()
        t1, c1 = wall(), cpu()
        _write_at(back, "cgroup.procs", pidb)  # the bench's sleeper leaves (the C floor does too)
        stop(h)
        t2, c2 = wall(), cpu()
        return (t1 - t0, t2 - t0, c1 - c0, c2 - c0)

    try:
        for r in range(rounds):
            progs = [runc_program(never_seen(r * n + i)) for i in range(n)]
            res["C"] += bench_c_setup(exe, side, pid, progs, n, tmp)
            for i in range(n):
                rules = never_seen(50_000 + r * n + i)
                cfg = CgroupConfig(device_rules=rules, path=f"{srel}/t{r}_{i}")
                res["today"].append(
                    timed(lambda cfg=cfg: setup_cgroup(cfg, pid, root=root), sfd, teardown_cgroup)
                )
            # Both prototypes validate and encode the never-seen rule set inside the timing.
            for i in range(n):
                rules = never_seen(100_000 + r * n + i)
                nm = f"l{r}_{i}"
                res["lean"].append(
                    timed(
                        lambda nm=nm, rules=rules: lean_start(sfd, nm, pidb, rules),
                        sfd,
                        lambda h, nm=nm: lean_stop(sfd, nm, *h),
                    )
                )
            for i in range(n):
                rules = never_seen(150_000 + r * n + i)
                nm = f"p{r}_{i}"
                res["parent"].append(
                    timed(
                        lambda nm=nm, rules=rules: parent_start(pp, pfd, nm, pidb, rules),
                        pfd,
                        lambda h, nm=nm: parent_stop(pp, pfd, nm, *h),
                    )
                )
            _write_at(sfd, "cgroup.procs", pidb)
    finally:
        os.close(pfd)
        os.close(sfd)
        (parent / "cgroup.procs").write_text(str(pid))
        side.rmdir()
    labels = {
        "C": "C floor (per-container PROG_LOAD runc-shaped)",
        "today": "today: setup_cgroup / teardown_cgroup",
        "lean": "lean per-cgroup attach, teardown = rmdir",
        "parent": "attach once at the parent (prototype)",
    }
    c = res["C"]
    for title, s_col, t_col in (("wall clock", 0, 1), ("thread CPU time", 2, 3)):
        print(f"\n== container start/stop, never-seen rule sets, {title} ({len(c)} runs, medians)")
        print(f"{'variant':48} {'start us':>9} {'ratio':>6} {'+stop us':>9} {'ratio':>6}")
        for k, t in res.items():
            s = med_us([x[s_col] for x in t])
            tt = med_us([x[t_col] for x in t])
            cs = med_us([x[s_col] for x in c])
            ct = med_us([x[t_col] for x in c])
            print(f"{labels[k]:48} {s:9.1f} {s / cs:6.2f} {tt:9.1f} {tt / ct:6.2f}")


# ---------------------------------------------------------------- confinement and per-open


def can_open(cg: Path, dev: str, flags: int = os.O_RDONLY) -> str:
    """Open `dev` from a child in cg: 'ok', or the errno name."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            (cg / "cgroup.procs").write_text(str(os.getpid()))
            os.close(os.open(dev, flags | os.O_NONBLOCK))
            res = "ok"
        except OSError as e:
            res = errno.errorcode.get(e.errno or 0, "?")
        os.write(w, res.encode())
        os._exit(0)
    os.close(w)
    out = os.read(r, 64).decode()
    os.close(r)
    os.waitpid(pid, 0)
    return out


def bench_parent_confinement(
    exe: Path, parent: Path, pp: ParentProgram, opens: int, rounds: int, tmp: Path
) -> None:
    pfd = os.open(parent, DIR)
    # A denied node: c 240:1 (no driver: ENXIO when allowed, EPERM when denied).
    node = tmp / "c240_1"
    os.mknod(node, 0o600 | 0o020000, os.makedev(240, 1))
    deny = [*RULES, R(False, "c", 240, -1, "rwm")]
    cfd, cgid, prep = parent_start(pp, pfd, "ctr", b"", deny)  # forked tasks join it below
    ctr = parent / "ctr"
    nested = ctr / "nested" / "deeper"
    nested.mkdir(parents=True)
    stranger = parent / "not-a-container"
    stranger.mkdir()
    print("\n== attach once at the parent: who is confined (a forked task opens each device)")
    for label, cg in (
        ("task in the container cgroup", ctr),
        ("task in container/nested/deeper", nested),
        ("task in a cgroup under the parent, no entry", stranger),
    ):
        print(
            f"  {label:46} /dev/null: {can_open(cg, '/dev/null'):6} "
            f"c 240:1 (denied by a rule): {can_open(cg, str(node))}"
        )
    # per-open cost: baseline outside the parent; ours per-cgroup; parent program.
    base = parent.parent / (parent.name + "-open0")
    ours = parent.parent / (parent.name + "-open1")
    base.mkdir()
    ours.mkdir()
    try:
        from pelagos_bpf.cgroup import Cgroup
        from pelagos_bpf.devices import attach_devices, detach_devices

        attach_devices(Cgroup.open(ours), deny)
        cases = [
            ("no program", base),
            ("today: per-cgroup attach", ours),
            ("parent program, task in the container", ctr),
            ("parent program, task 2 levels deeper", nested),
        ]
        costs: list[list[float]] = [[] for _ in cases]
        for _ in range(rounds):
            for i, (_, d) in enumerate(cases):
                costs[i].append(open_cost(exe, d, opens))
        b = statistics.median(costs[0])
        print(f"\n== per-open cost of /dev/null O_RDWR (thread CPU, {opens} opens x {rounds})")
        for (label, _), c in zip(cases, costs, strict=True):
            m = statistics.median(c)
            print(f"  {label:46} {m:8.1f} ns/open  overhead {m - b:7.1f} ns")
        detach_devices(Cgroup.open(ours))
    finally:
        for d in (nested, nested.parent, stranger, base, ours):
            d.rmdir()
        parent_stop(pp, pfd, "ctr", cfd, cgid, prep)
        os.close(pfd)


# ---------------------------------------------------------------- CLONE_INTO_CGROUP


class CloneArgs(ctypes.Structure):
    _fields_ = [
        (n, ctypes.c_uint64)
        for n in (
            "flags",
            "pidfd",
            "child_tid",
            "parent_tid",
            "exit_signal",
            "stack",
            "stack_size",
            "tls",
            "set_tid",
            "set_tid_size",
            "cgroup",
        )
    ]


SYS_clone3 = 435
CLONE_INTO_CGROUP = 0x200000000


def bench_clone(parent: Path, runs: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    d = parent / "clone"
    d.mkdir()
    dfd = os.open(d, DIR)
    procs = os.open(d / "cgroup.procs", os.O_WRONLY | os.O_CLOEXEC)
    fork_t, clone_t, write_t = [], [], []
    try:
        for _ in range(runs):
            # fork, then move the child in (it waits on a pipe so the move finds it alive)
            r, w = os.pipe()
            t0 = wall()
            pid = os.fork()
            if pid == 0:
                os.read(r, 1)
                os._exit(0)
            tw = wall()
            os.write(procs, str(pid).encode())
            t1 = wall()
            write_t.append(t1 - tw)
            os.write(w, b"x")
            os.waitpid(pid, 0)
            os.close(r)
            os.close(w)
            fork_t.append(t1 - t0)
            # clone3 straight into the cgroup
            r, w = os.pipe()
            args = CloneArgs(flags=CLONE_INTO_CGROUP, exit_signal=signal.SIGCHLD, cgroup=dfd)
            t0 = wall()
            pid = libc.syscall(SYS_clone3, ctypes.byref(args), ctypes.sizeof(args))
            if pid == 0:
                os.read(r, 1)
                os._exit(0)
            t1 = wall()
            if pid < 0:
                raise OSError(ctypes.get_errno(), "clone3")
            inside = str(pid) in (d / "cgroup.procs").read_text().split()
            os.write(w, b"x")
            os.waitpid(pid, 0)
            os.close(r)
            os.close(w)
            if not inside:
                raise SystemExit("clone3 child is not in the cgroup")
            clone_t.append(t1 - t0)
    finally:
        os.close(procs)
        os.close(dfd)
        d.rmdir()
    f, c = med_us(fork_t), med_us(clone_t)
    print(f"\n== starting a child inside the cgroup, parent side (wall, {runs} runs, medians)")
    print(f"  fork + write pid to cgroup.procs            {f:8.1f} us")
    print(f"    of which the cgroup.procs write           {med_us(write_t):8.1f} us")
    print(f"  clone3(CLONE_INTO_CGROUP, cgroup dir fd)    {c:8.1f} us   saves {f - c:6.1f} us")


# ---------------------------------------------------------------- dirfd vs pathlib


def bench_dirfd(parent: Path, sleeper_pid: int, runs: int) -> None:
    pid = str(sleeper_pid)
    back = parent / "cgroup.procs"
    pfd = os.open(parent, DIR)
    path_t, fd_t = [], []
    for i in range(runs):
        t0 = wall()
        p = parent / f"pl{i}"
        p.mkdir()
        fd = os.open(p, DIR)
        (p / "cgroup.procs").write_text(pid)
        back.write_text(pid)
        os.close(fd)
        p.rmdir()
        t1 = wall()
        name = f"fd{i}"
        os.mkdir(name, dir_fd=pfd)
        fd = os.open(name, DIR, dir_fd=pfd)
        _write_at(fd, "cgroup.procs", pid.encode())
        _write_at(pfd, "cgroup.procs", pid.encode())
        os.close(fd)
        os.rmdir(name, dir_fd=pfd)
        t2 = wall()
        path_t.append(t1 - t0)
        fd_t.append(t2 - t1)
    os.close(pfd)
    a, b = med_us(path_t), med_us(fd_t)
    print(f"\n== mkdir + open + procs write + write back + rmdir (wall, {runs} runs, medians)")
    print(f"  pathlib                    {a:8.1f} us")
    print(f"  dir fds (os.*(dir_fd=))    {b:8.1f} us   saves {a - b:6.1f} us")


# ---------------------------------------------------------------- first attach, by component


_FIRST = r"""
import os, sys, time
w = time.perf_counter_ns
from pelagos_bpf.devices import program as dp
from pelagos_bpf import bpfsys, progcache
t = {}
t0 = w(); bpfsys._lib(); t["dlopen libbpf.so.1 + argtypes"] = w() - t0
t0 = w(); prog = dp.compiled(); t["bytecode cache: key + JSON read"] = w() - t0
pin = sys.argv[1]
if os.path.exists(pin):
    t0 = w(); fd = bpfsys.obj_get(pin); t["BPF_OBJ_GET of the pinned program"] = w() - t0
    t0 = w(); p = dp._from_fd(fd); t["prog info + 3 map fds by id + map info"] = w() - t0
else:
    maps = {}
    for name, (mt, ks, vs, me, fl) in dp.MAP_SPECS.items():
        t0 = w(); maps[name] = bpfsys.map_create(mt, ks, vs, me, name=name, flags=fl)
        t[f"MAP_CREATE {name} ({me} entries)"] = w() - t0
    t0 = w(); fd = progcache.load_program(prog, maps, name=dp.PROG_NAME)
    t[f"PROG_LOAD ({prog.insn_count} insns)"] = w() - t0
    bpfsys.obj_pin(fd, pin)
print(repr(t))
"""


def bench_first(tmp: Path, runs: int) -> None:
    pin_dir = tmp / "bpffs"
    pin_dir.mkdir()
    subprocess.run(["mount", "-t", "bpf", "bpf", str(pin_dir)], check=True)
    rows: dict[str, dict[str, list[int]]] = {"load": {}, "pin": {}}
    try:
        for i in range(runs):
            pin = pin_dir / f"p{i}"
            for kind in ("load", "pin"):  # the first run pins, the second fetches
                out = subprocess.run(
                    [sys.executable, "-c", _FIRST, str(pin)],
                    check=True,
                    capture_output=True,
                    text=True,
                ).stdout
                for k, v in ast.literal_eval(out).items():
                    rows[kind].setdefault(k, []).append(v)
            pin.unlink()
    finally:
        subprocess.run(["umount", str(pin_dir)], check=True)
    print(f"\n== first attach in a fresh process, by component (wall, {runs} runs, medians)")
    for kind, title in (("load", "load (no pin)"), ("pin", "fetch from a pin")):
        total = sum(med_us(v) for v in rows[kind].values())
        print(f"  {title}: {total:.0f} us before PROG_ATTACH")
        for k, v in rows[kind].items():
            print(f"    {k:44} {med_us(v):8.0f} us")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=40, help="runs per variant per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--opens", type=int, default=50_000)
    ap.add_argument("--open-rounds", type=int, default=7)
    args = ap.parse_args()
    root = discover().root
    parent = root / f"pelagos-proto-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    parent.mkdir()
    level = len(parent.relative_to(root).parts) + 1  # the container cgroups' level
    pid = sleeper()
    (parent / "cgroup.procs").write_text(str(pid))
    pp = None
    try:
        with tempfile.TemporaryDirectory(prefix="pelagos-proto-") as tmpd:
            tmp = Path(tmpd)
            exe = build_c(tmp)
            pp = ParentProgram(parent, level, tmp)
            print(
                f"parent program: {pp.compiled.insn_count} insns (today's: "
                f"{devprog.compiled().insn_count}), bcc compile {pp.compile_ms:.0f} ms (once)"
            )
            devprog.own_program()
            bench_paths(exe, root, parent, pp, pid, args.n, args.rounds, tmp)
            bench_parent_confinement(exe, parent, pp, args.opens, args.open_rounds, tmp)
            bench_clone(parent, 200)
            bench_dirfd(parent, pid, 200)
            bench_first(tmp, 7)
    finally:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        if pp is not None:
            pp.close()
        remove_tree(parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
