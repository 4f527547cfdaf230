"""Run the test suite inside QEMU guests of Debian kernels (the kernel matrix).

    python -m tests.vm.run                      # default kernels, full guest suite
    python -m tests.vm.run --kernel 6.12 -- -k memory -x
    python -m tests.vm.run --kernel 6.1 --cmd 'python -c "import pelagos_bpf"'
    python -m tests.vm.run --list
    python -m tests.vm.run --kernel 6.12 --node containerd --cmd 'python -m tests.cri ...'
    python -m tests.vm.run --jobs 1             # one guest at a time ($PELAGOS_MATRIX_JOBS)

Why a guest at all: the development host's cgroups are hybrid (every v1 controller taken), so
controller files can only be proven on a pure cgroup v2 kernel; and the library must work on
the kernels people run (Debian 6.1 and 6.12), not only on the host's. Stdlib only, so it runs
before (and independently of) the project's own code.
"""

from __future__ import annotations

import argparse
import io
import os
import shlex
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import containerd, kernels, pool, qemu, roots, systemd_init

PROJECT = Path(__file__).resolve().parents[2]
GUEST_PYTEST_ARGS = ("-p", "no:cacheprovider", "-m", "not matrix")


TIMEOUT = float(os.environ.get("PELAGOS_MATRIX_TIMEOUT", "1500"))


# Budget (CI: 45 min on 2 cores). Guests run the KERNEL suite: the test files whose outcome
# depends on the kernel (cgroup v2 controllers, the BPF features, freezer/OOM events, real
# runtimes). Kernel-independent files (pure logic, CLI wording and signals, config parsing, the
# hook's input handling, the upgrade path, style) prove nothing more under TCG, where each
# subprocess-heavy test costs 10-40 s: they run on the host. The oldest and newest default
# kernels run the kernel suite whole; the middle ones also drop the device-rule evaluator
# comparison (hypothesis, ~2/3 of a guest's time), whose bytecode is the same on every kernel.
# `--full` or PELAGOS_MATRIX_FULL=1 runs every test everywhere; explicit pytest args always win.
KERNEL_SUITE = (
    "tests/test_cgroup_lifecycle.py",
    "tests/test_bpfsys.py",
    "tests/test_controllers_v2.py",
    "tests/test_oci_v2.py",
    "tests/test_cli_v2.py",
    "tests/test_stats.py",
    "tests/test_device_kernel.py",
    "tests/test_device_race.py",
    "tests/test_device_setup.py",
    "tests/test_device_semantics_kernel.py",
    "tests/test_fast_path.py",
    "tests/test_feature.py",
    "tests/test_gc.py",
    "tests/test_trust_kernel.py",
    "tests/test_net_classify.py",
    "tests/test_net_accounting.py",
    "tests/test_net_update.py",
    "tests/test_net_leak.py",
    "tests/test_net_resolve.py",
    "tests/test_net_socket.py",
    "tests/test_tenants.py",
    "tests/test_device_check.py",
)
SUBSET_KERNELS = ("6.1", "6.12")
SUBSET_ARGS = ("--deselect", "tests/test_device_kernel.py::test_kernel_matches_evaluator")
# Real runc/crun/podman containers (Debian 12's) run on Debian 12's newer kernel, where the
# evaluator comparison does not run, which keeps the guests' times even.
RUNTIME_TESTS = ("tests/test_runtimes.py",)
RUNTIME_KERNELS = ("6.12",)
FULL = os.environ.get("PELAGOS_MATRIX_FULL", "") not in ("", "0")


def guest_args(name: str, user_args: list[str] | None, full: bool = FULL) -> list[str]:
    """The pytest args a kernel's guest runs: the user's, else everything (full), else the
    kernel suite (minus the evaluator comparison on the middle kernels)."""
    if user_args:
        return list(user_args)
    if full:
        return []
    runtimes = RUNTIME_TESTS if name in RUNTIME_KERNELS else ()
    if name in SUBSET_KERNELS:
        return [*SUBSET_ARGS, *KERNEL_SUITE, *runtimes]
    return [*KERNEL_SUITE, *runtimes]


# What a kernel the runner cannot resolve, unpack or boot raises: reported as a message.
RUNNER_ERRORS = (kernels.KernelError, qemu.BootError, containerd.NodeError, roots.RootError)
NODES = ("containerd",)


@dataclass
class KernelResult:
    name: str
    package: str
    release: str
    run: qemu.GuestRun
    attempts: int
    counts: dict[str, int] = field(default_factory=dict)  # from pytest's junit xml
    error: str | None = None  # the runner's own failure (no guest ran)

    @classmethod
    def failed(cls, name: str, error: str) -> KernelResult:
        run = qemu.GuestRun(None, False, None, 0.0, False, "", "")
        return cls(name, "-", "-", run, 0, error=error)

    @property
    def ok(self) -> bool:
        return self.run.status == 0

    def summary(self) -> str:
        r = self.run
        if self.error is not None:
            return f"{self.name:<11} ERROR        {self.error}"
        if r.status is None:
            verdict = "TIMEOUT" if r.timed_out else "CRASH"
        else:
            verdict = "PASS" if r.status == 0 else f"FAIL(exit {r.status})"
        counts = " ".join(f"{k}={v}" for k, v in self.counts.items()) or "no junit"
        boot = f"{r.boot_seconds:.1f}s" if r.boot_seconds is not None else "-"
        retried = f" attempts={self.attempts}" if self.attempts > 1 else ""
        return (
            f"{self.name:<11} {self.release:<28} {verdict:<12} {counts}  "
            f"boot={boot} wall={r.wall_seconds:.1f}s{retried}"
        )


def venv_python(project: Path = PROJECT) -> Path:
    p = project / ".venv" / "bin" / "python"
    return p if p.exists() else Path(sys.executable)


def job_script(
    project: Path,
    python: Path | None,
    argv: list[str] | None,
    cmd: str | None,
    kernel: str,
    prelude: list[str] | None = None,
) -> str:
    """The guest's job: environment for a read-only project tree, `prelude` (a node's start),
    then pytest (or `cmd`). python None: the guest's own root has no host interpreter (only
    `cmd` runs there)."""
    path = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
    env = {
        "PATH": f"{python.parent}:{path}" if python is not None else path,
        "HOME": "/root",
        "LANG": "C.UTF-8",
        "TERM": "dumb",
        "TMPDIR": "/tmp",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
        "HYPOTHESIS_STORAGE_DIRECTORY": "/tmp/hypothesis",
        "PELAGOS_VM_KERNEL": kernel,
        # the agent's soak length and seed (tests/test_agent_runtimes.py), when set here
        **{k: v for k, v in os.environ.items() if k in ("PELAGOS_SOAK", "PELAGOS_SOAK_SEED")},
    }
    lines = ["set -e", f"cd {shlex.quote(str(project))}"]
    lines += [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    lines += prelude or []
    if cmd is not None:
        lines.append(f"exec /bin/sh -c {shlex.quote(cmd)}")
    else:
        if python is None:
            raise ValueError("pytest runs only on the host root (give a command)")
        full = [str(python), "-m", "pytest", *GUEST_PYTEST_ARGS]
        full += [f"--junitxml={qemu.GUEST_OUT}/junit.xml", *(argv or [])]
        lines.append("exec " + shlex.join(full))
    return "\n".join(lines) + "\n"


def parse_junit(data: bytes | None) -> dict[str, int]:
    if not data:
        return {}
    root = ET.fromstring(data)
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    tot = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    for s in suites:
        for k in tot:
            tot[k] += int(s.get(k, 0))
    passed = tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"]
    return {
        "passed": passed,
        "skipped": tot["skipped"],
        "failed": tot["failures"],
        "errors": tot["errors"],
    }


def run_kernel(
    name: str,
    pytest_args: list[str] | None = None,
    *,
    cmd: str | None = None,
    root: str = roots.HOST,
    shares: list[Path] | None = None,
    timeout: float | None = None,
    boot_timeout: float = 180.0,
    keep: Path | None = None,
    memory: str | None = None,
    init: str = "busybox",
    node: str | None = None,
    node_setup: str | None = None,
    log=print,
) -> KernelResult:
    """Boot kernel `name`, run the guest suite (or `cmd`), retrying once if it dies in boot.
    node "containerd": containerd runs (and `node_setup`, a shell command, ran) when it starts.

    init "systemd": systemd is PID 1 and the job a service (tests/vm/systemd_init.py).

    root: `host` (the host's root, read-only) or a tests/vm/roots.py root, which runs `cmd`
    only (no pytest there). shares: more host dirs the guest sees at the same path.
    Raises one of RUNNER_ERRORS (with a message) when the kernel can't be fetched or launched.
    """
    if root != roots.HOST and cmd is None:
        raise roots.RootError(f"the {root} root runs a --cmd only: it has no pytest")
    k = kernels.ensure_kernel(name, log=log)
    root_dir = roots.ensure_root(root, log=log)
    if cmd is not None:
        what = f"command: {cmd}"
    else:
        what = f"pytest {shlex.join(pytest_args)}" if pytest_args else "every test"
        if pytest_args == guest_args(name, None, full=False):
            evaluator = "without" if name in SUBSET_KERNELS else "with"
            runtimes = ", real runtimes" if name in RUNTIME_KERNELS else ""
            what = f"the kernel suite ({evaluator} the evaluator comparison{runtimes})"
    python = venv_python() if root == roots.HOST else None
    memory = memory or "2G"
    timeout = TIMEOUT if timeout is None else timeout
    # the project, the interpreter's installation (the venv's python links into it), modules
    share = [PROJECT, k.modules_dir, *(shares or [])]
    if python is not None:
        share.append(Path(os.path.realpath(python)).parents[1])
    prefill: dict[str, Path] = {}
    second: dict[str, Any] = {}
    prelude = None
    if node is not None:
        n = containerd.ensure_node(log)
        prelude = containerd.job_lines(n, node_setup)
        share += [n.tree, n.images]
        what += f", on a {node} node"
    job = job_script(PROJECT, python, pytest_args, cmd, name, prelude)
    attempts = 0
    with tempfile.TemporaryDirectory(prefix="pelagos-vm-init-") as stage:
        if init == "systemd":
            prefill[systemd_init.STAGE_NAME] = systemd_init.write_stage(Path(stage) / "s")
            second = {
                "guest_env": systemd_init.guest_env(),
                "kernel_args": systemd_init.KERNEL_ARGS,
            }
        elif init != "busybox":
            raise ValueError(f"init must be busybox or systemd, not {init!r}")
        while True:
            attempts += 1
            on = "" if root == roots.HOST else f" on the {root} root"
            log(f"vm: booting {name} ({k.package}, {k.boot_image.name}, init {init}){on}; {what}")
            r = qemu.boot(
                k,
                job,
                share_paths=share,
                root=root_dir,
                prefill=prefill,
                timeout=timeout,
                boot_timeout=boot_timeout,
                keep=keep,
                memory=memory,
                progress=lambda t, line: log(f"vm: {name} {t:4.0f}s | {line}"),
                **second,
            )
            if r.started or attempts >= 2:
                break
            log(f"vm: {name}: guest died before the job started; retrying once. Console tail:")
            log(_tail(r.console, 30))
    return KernelResult(
        name=name,
        package=k.package,
        release=k.release,
        run=r,
        attempts=attempts,
        counts=parse_junit(r.files.get("junit.xml")),
    )


def _tail(text: str, n: int) -> str:
    return "\n".join("    | " + line for line in text.rstrip().splitlines()[-n:])


def report(res: KernelResult, log=print) -> None:
    """Print what the guest printed, then (on failure) the console tail, then the summary."""
    r = res.run
    if res.error is not None:
        log(f"==== {res.summary()}")
        return
    log(f"---- {res.name}: guest output ----")
    log(r.output.rstrip() or "(none)")
    if not res.ok:
        why = "timed out" if r.timed_out else "no exit status (crash?)"
        if r.status is not None:
            why = f"exit status {r.status}"
        log(f"---- {res.name}: {why}; console tail ----")
        log(_tail(r.console, 40))
    log(f"==== {res.summary()}")


def list_kernels() -> int:
    """Each short name, where it comes from, what it resolves to now, and whether it's cached."""
    bad = 0
    for n, src in kernels.KERNELS.items():
        default = "default" if n in kernels.DEFAULT_KERNELS else ""
        try:
            package = kernels.resolve_package(n)
        except kernels.KernelError as e:
            package, bad = f"unresolved: {e}", bad + 1
        cached = "cached" if (kernels.cache_dir() / package / ".complete").exists() else ""
        suite = src.suite or "system"
        print(f"{n:<11} {suite:<9} {package:<36} {default:<8}{cached}")
    print(f"cache: {kernels.cache_dir()} (${kernels.CACHE_ENV})")
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if isinstance(sys.stdout, io.TextIOWrapper):  # CI logs are pipes: heartbeats must not wait
        sys.stdout.reconfigure(line_buffering=True)
    pytest_args: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, pytest_args = argv[:i], argv[i + 1 :]
    ap = argparse.ArgumentParser(prog="python -m tests.vm.run", description=__doc__.split("\n")[0])
    ap.add_argument(
        "--kernel",
        action="append",
        help=f"short name ({', '.join(kernels.KERNELS)}) or linux-image-* package; "
        f"repeatable; default {' '.join(kernels.DEFAULT_KERNELS)}",
    )
    ap.add_argument("--full", action="store_true", help="the full suite on every kernel")
    ap.add_argument("--cmd", help="run this shell command in the guest instead of pytest")
    ap.add_argument(
        "--init",
        choices=("busybox", "systemd"),
        default="busybox",
        help="the guest's PID 1 when the job runs: busybox (fast) or systemd 252 (the host's)",
    )
    ap.add_argument("--node", choices=NODES, help="start this container runtime first")
    ap.add_argument("--node-setup", metavar="SHELL", help="run after the node is up (an agent)")
    ap.add_argument(
        "--root",
        default=roots.HOST,
        choices=[roots.HOST, *roots.ROOTS],
        help="the guest's root: the host's (default) or a cached Debian root without "
        "compilers (built with mmdebstrap on first use; runs --cmd only)",
    )
    ap.add_argument(
        "--share",
        action="append",
        type=Path,
        default=[],
        help="another host dir the guest sees at the same path, read-only (repeatable)",
    )
    ap.add_argument(
        "--jobs",
        type=int,
        help=f"guests at once (default ${pool.JOBS_ENV}, else one per core up to 2)",
    )
    ap.add_argument(
        "--timeout",
        type=float,
        help=f"per kernel, seconds (default {TIMEOUT:g})",
    )
    ap.add_argument("--boot-timeout", type=float, default=180.0, help="until the job starts")
    ap.add_argument("--keep", type=Path, help="copy each run's files (console, logs) here")
    ap.add_argument("--memory", help="guest RAM (default 2G; the agent's load test wants 4G)")
    ap.add_argument("--fetch-only", action="store_true", help="download/unpack and exit")
    ap.add_argument("--list", action="store_true", help="show kernels and the cache, then exit")
    args = ap.parse_args(argv)
    if args.node_setup and not args.node:
        ap.error("--node-setup needs --node")
    names = args.kernel or list(kernels.DEFAULT_KERNELS)
    if args.root != roots.HOST and args.cmd is None:
        ap.error(f"--root {args.root} runs a --cmd only (it has no pytest)")
    if missing_share := [str(p) for p in args.share if not p.is_dir()]:
        ap.error(f"--share: no such directory: {', '.join(missing_share)}")

    try:
        if args.list:
            return list_kernels()
        if args.fetch_only:
            for n in names:
                k = kernels.ensure_kernel(n)
                print(f"{n}: {k.boot_image}")
            return 0
    except kernels.KernelError as e:
        print(f"vm: {e}")
        return 2
    missing = qemu.missing_tools()
    if missing:
        print(f"vm: cannot boot guests, missing: {', '.join(missing)} (run scripts/bootstrap)")
        return 2

    jobs = args.jobs or pool.default_jobs()
    t0 = time.monotonic()
    results: dict[str, KernelResult] = {}
    with pool.GuestPool(jobs) as guests:
        for n in dict.fromkeys(names):

            def job(log: pool.Log, n: str = n) -> KernelResult:
                return run_kernel(
                    n,
                    guest_args(n, pytest_args, args.full or FULL),
                    cmd=args.cmd,
                    root=args.root,
                    shares=args.share,
                    timeout=args.timeout,
                    boot_timeout=args.boot_timeout,
                    keep=args.keep / n if args.keep else None,
                    memory=args.memory,
                    init=args.init,
                    node=args.node,
                    node_setup=args.node_setup,
                    log=log,
                )

            guests.submit(n, job)
        for n, fut in guests.as_completed(print):
            try:
                res = fut.result()
            except RUNNER_ERRORS as e:
                res = KernelResult.failed(n, str(e))
            report(res)
            results[n] = res
    took = time.monotonic() - t0
    print(f"==== kernel matrix: {len(results)} kernels in {took:.0f}s, {jobs} at once")
    for n in dict.fromkeys(names):
        print(f"     {results[n].summary()}")
    return 0 if all(r.ok for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
