"""`pelagos-bpf run`: a command in a new cgroup, safe to stop, torn down whatever happens.

How it stops: SIGTERM, SIGHUP and SIGINT are blocked in this process and taken with
sigwaitinfo (with SIGCHLD), so no signal lands between two Python statements and no
KeyboardInterrupt unwinds half a teardown. The first one is forwarded to the command (unless
the terminal already sent it to the whole foreground process group: si_code SI_KERNEL); a
second one, or `--stop-timeout` seconds without the command exiting, kills it. The cgroup is
always torn down (which kills whatever else is left in it), and `run` exits 128+N.
A stop signal ignored when `run` started (nohup's SIGHUP, SIGINT in a script's background job)
stays ignored, by `run` and the command: blocking it would queue it instead.

`--systemd [--slice S]` does what `systemd-run --scope` does (a transient scope
`pelagos-run-<pid>.scope` in S, default system.slice, with the limits as unit properties), plus
our device and net settings, whose programs systemd attaches (BPFProgram=); the scope is
stopped at the end. Its stats may be gone by then (NO_STATS; JSON: "stats": null).
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import json
import os
import signal
import sys
import time
from typing import TYPE_CHECKING, Any

from ..cgroup import Cgroup, setup_cgroup, teardown_cgroup
from ..config import CgroupConfig
from ..errors import ConfigError
from ..stats import ResourceStats, read_stats
from ..systemd.names import expand_slice
from .common import (
    EXIT_CANNOT_EXEC,
    EXIT_CODES_HELP,
    EXIT_NOT_FOUND,
    EXIT_TOOL,
    CliError,
    flag_for,
)
from .flags import add_config_flags, config_from_args, default_rule_count
from .output import SCHEMA, format_stats, report_json, report_lines, stats_json

if TYPE_CHECKING:
    from ..systemd.properties import Route

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)
SI_KERNEL = 0x80  # siginfo si_code of a signal the terminal sent to the foreground group
STOP_TIMEOUT = 10.0
# systemd stops a scope and removes its cgroup, counters included, once its last process exits:
# reading them races with that, and a read that lost is not shown as zeros.
NO_STATS = "stats:  n/a (systemd removed the scope's cgroup when the command exited)"


class _Outcome:
    """How the command ended and whether we had to stop it."""

    def __init__(self) -> None:
        self.status: int | None = None  # waitpid status
        self.stopped_by: int | None = None  # the first stop signal we received
        self.killed: bool = False  # we SIGKILLed it (second signal or grace period over)

    def exit_code(self) -> int:
        if self.stopped_by is not None:
            return 128 + self.stopped_by
        assert self.status is not None
        code = os.waitstatus_to_exitcode(self.status)
        return code if code >= 0 else 128 - code

    def status_json(self) -> dict[str, Any]:
        if self.status is None:
            return {"code": None, "signal": None}
        code = os.waitstatus_to_exitcode(self.status)
        return {"code": code if code >= 0 else None, "signal": -code if code < 0 else None}


def _child(cmd: list[str], go_r: int, err_w: int, mask: set[int | signal.Signals]) -> None:
    """In the fork: wait until the parent built the cgroup, then exec (never returns)."""
    code = EXIT_TOOL
    try:
        for sig in (signal.SIGPIPE, signal.SIGXFSZ):  # Python ignores these; commands must not
            signal.signal(sig, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        if os.read(go_r, 1) == b"1":
            os.close(go_r)
            code = EXIT_NOT_FOUND
            os.execvp(cmd[0], cmd)
    except OSError as e:
        os.write(err_w, str(e.errno).encode())
    finally:
        os._exit(code)


def _stop_signals() -> set[signal.Signals]:
    """The stop signals this run answers: those not ignored when it started."""
    return {s for s in STOP_SIGNALS if signal.getsignal(s) is not signal.SIG_IGN}


def _stop_pending(stops: set[signal.Signals]) -> int | None:
    """A stop signal that arrived while the cgroup was being built (consumed)."""
    if not stops & signal.sigpending():
        return None
    info = signal.sigtimedwait(stops, 0)
    return info.si_signo if info else None


def _drain(waited: set[signal.Signals]) -> None:
    """Consume signals still pending, so unblocking them later does not kill us mid-report."""
    while signal.sigtimedwait(waited, 0) is not None:
        pass


def _wait(
    pid: int, stop_timeout: float, quiet: bool, out: _Outcome, waited: set[signal.Signals]
) -> None:
    deadline: float | None = None
    while True:
        wpid, status = os.waitpid(pid, os.WNOHANG)
        if wpid:
            out.status = status
            return
        info: signal.struct_siginfo | None
        if deadline is None:
            info = signal.sigwaitinfo(waited)
        else:
            info = signal.sigtimedwait(waited, max(0.0, deadline - time.monotonic()))
            if info is None:
                if not quiet:
                    name = signal.Signals(out.stopped_by or 0).name
                    print(
                        f"pelagos-bpf run: still running {stop_timeout:g}s after {name}: killing",
                        file=sys.stderr,
                    )
                os.kill(pid, signal.SIGKILL)
                out.killed = True
                deadline = None
                continue
        if info.si_signo == signal.SIGCHLD:
            continue
        if out.stopped_by is None:
            out.stopped_by = info.si_signo
            if info.si_code != SI_KERNEL:  # the terminal already signalled the command
                os.kill(pid, info.si_signo)
            deadline = time.monotonic() + stop_timeout
        else:
            os.kill(pid, signal.SIGKILL)
            out.killed = True
            deadline = None


def _exec_failure(cmd0: str, err: bytes) -> CliError:
    e = int(err)
    if e == errno.ENOENT:
        return CliError(f"{cmd0}: command not found", EXIT_NOT_FOUND)
    return CliError(f"{cmd0}: cannot execute: {os.strerror(e)}", EXIT_CANNOT_EXEC)


def cmd_run(args: argparse.Namespace) -> int:
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        raise CliError("give a command after --, e.g. pelagos-bpf run --memory 64M -- sleep 1")
    cfg = config_from_args(args)
    unit_slice = _systemd_slice(args)
    stops = _stop_signals()
    waited = {*stops, signal.SIGCHLD}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, waited)
    try:
        return _run(args, cmd, cfg, old, unit_slice, stops)
    finally:
        _drain(waited)
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _systemd_slice(args: argparse.Namespace) -> str | None:
    """The slice of the scope `--systemd`/`--slice` ask for (checked before the fork); None:
    no scope is made by `run` itself (a plain --path, or one in slice:prefix:name form)."""
    if not (args.systemd or args.slice):
        return None
    if args.path is not None:
        raise CliError(
            "--path with --systemd/--slice: give either --path SLICE:PREFIX:NAME (a scope of "
            "your naming) or --systemd [--slice S] (pelagos-run-<pid>.scope)"
        )
    if args.root is not None:
        raise CliError("--root with --systemd: systemd's tree is where systemd mounted it")
    slice_ = args.slice or "system.slice"
    try:
        expand_slice(slice_)
    except ConfigError as e:
        raise CliError(f"--slice {slice_}: {e.reason}") from None
    return slice_


def _run(
    args: argparse.Namespace,
    cmd: list[str],
    cfg: CgroupConfig,
    mask: set[int | signal.Signals],
    unit_slice: str | None,
    stops: set[signal.Signals],
) -> int:
    go_r, go_w = os.pipe()
    err_r, err_w = os.pipe2(os.O_CLOEXEC)
    pid = os.fork()
    if pid == 0:
        os.close(go_w)
        os.close(err_r)
        _child(cmd, go_r, err_w, mask)
    os.close(go_r)
    os.close(err_w)
    if unit_slice is not None:
        cfg.path = f"{unit_slice}:pelagos:run-{pid}"
    try:
        cg = setup_cgroup(
            cfg, pid, strict=not args.best_effort, root=args.root, net_carrier=args.net_carrier
        )
    except BaseException:
        os.close(go_w)  # the child reads EOF and exits without running the command
        os.close(err_r)
        os.waitpid(pid, 0)
        raise
    out = _Outcome()
    try:
        out.stopped_by = _stop_pending(stops)
        if out.stopped_by is None:
            os.write(go_w, b"1")
        os.close(go_w)
        err = os.read(err_r, 16)  # b"" once exec succeeded (the pipe is close-on-exec)
        os.close(err_r)
        if err:
            os.waitpid(pid, 0)
            raise _exec_failure(cmd[0], err)
        _wait(pid, args.stop_timeout, args.quiet, out, {*stops, signal.SIGCHLD})
        stats: ResourceStats | None = read_stats(cg)
        if cg.unit is not None and not cg.path.exists():
            stats = None  # systemd removed the emptied scope during (or before) the read
    finally:
        teardown_cgroup(cg)
    _print_summary(args, cmd, cg, out, stats)
    return out.exit_code()


def _print_summary(
    args: argparse.Namespace, cmd: list[str], cg: Cgroup, out: _Outcome, stats: Any
) -> None:
    offset = default_rule_count(args)
    if args.json:
        doc = {
            "schema": SCHEMA,
            "command": cmd,
            "path": str(cg.path),
            "id": cg.id,
            "exit": out.exit_code(),
            "status": out.status_json(),
            "stopped_by": signal.Signals(out.stopped_by).name if out.stopped_by else None,
            "killed": out.killed,
            "report": report_json(cg.report, offset),
            "stats": None if stats is None else stats_json(stats),
        }
        if cg.unit is not None:  # the systemd driver: the unit, and each setting's route
            doc["unit"] = cg.unit
            doc["routes"] = [dataclasses.asdict(r) for r in cg.report.routes]
        print(json.dumps(doc), flush=True)
        return
    if args.quiet:
        return
    lines = [f"--- pelagos-bpf: {cg.path} (id {cg.id})"]
    if cg.unit is not None:
        lines.append(f"unit:   {cg.unit} (stopped)")
    code = out.exit_code()
    how = f"{code}"
    if out.stopped_by:
        how += f" (stopped by {signal.Signals(out.stopped_by).name}"
        how += ", killed)" if out.killed else ")"
    elif code > 128:
        how += f" (killed by signal {code - 128})"
    lines.append(f"exit:   {how}")
    lines += report_lines(cg.report, offset)
    lines += route_lines(cg.report.routes, offset)
    lines += format_stats(stats) if stats is not None else [NO_STATS]
    print("\n".join(lines), file=sys.stderr, flush=True)


def route_lines(routes: list[Route], rule_offset: int = 0) -> list[str]:
    """Which path each setting took under the systemd driver."""
    where = {"systemd": "held by systemd", "file": "written in the scope", "scope": "attached"}
    return [
        f"{where.get(r.via, r.via)}: {flag_for(r.setting, rule_offset)}: {r.what}"
        + ("" if r.reload_safe else " (lost at the next daemon-reload)")
        for r in routes
    ]


def register(sub: Any) -> None:
    r = sub.add_parser(
        "run",
        help="run a command in a new cgroup, print its stats, tear down",
        description="Create a cgroup from the flags, run CMD in it, report, remove the cgroup. "
        "SIGTERM/SIGHUP/SIGINT are forwarded to CMD (unless ignored when run started); a "
        "second signal or --stop-timeout kills it. The cgroup is removed in every case.",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_flags(r)
    r.add_argument(
        "--net-carrier",
        choices=("auto", "priority", "mark", "socket"),
        default="auto",
        help="where --net-classid goes: skb->priority or skb->mark per packet, or the socket's "
        "priority once at its creation (socket: no per-packet cost; auto: mark if --net-prio)",
    )
    r.add_argument(
        "--path",
        help="cgroup path under the root (default pelagos-<pid>); SLICE:PREFIX:NAME (runc's "
        "--systemd-cgroup form) makes the systemd scope PREFIX-NAME.scope in SLICE",
    )
    r.add_argument(
        "--systemd",
        action="store_true",
        help="run in a transient systemd scope (pelagos-run-<pid>.scope), as systemd-run "
        "--scope: limits become unit properties, systemd attaches our device and net programs",
    )
    r.add_argument(
        "--slice", metavar="SLICE", help="the scope's slice (implies --systemd; system.slice)"
    )
    r.add_argument("--root", help="cgroup2 root (default: $PELAGOS_CGROUP_ROOT or mountinfo)")
    r.add_argument(
        "--best-effort", action="store_true", help="skip settings this host cannot apply"
    )
    r.add_argument(
        "--stop-timeout",
        type=float,
        default=STOP_TIMEOUT,
        metavar="SECONDS",
        help=f"after a forwarded signal, kill CMD if it still runs (default {STOP_TIMEOUT:g})",
    )
    out = r.add_mutually_exclusive_group()
    out.add_argument(
        "--json",
        action="store_true",
        help="print one JSON document on stdout (schema 1): exit, report, stats",
    )
    out.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    r.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    r.set_defaults(func=cmd_run, best_effort_hint=True)
