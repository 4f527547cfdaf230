"""`pelagos-bpf` command line: `run` a command in a cgroup built from flags, `inspect` a cgroup.

Feature packages add their own subcommands: any `pelagos_bpf/<pkg>/cli.py` that defines
`register(subparsers) -> None` is imported (lazily, only when the CLI starts) and called. Each
subparser must `set_defaults(func=handler)` where `handler(args) -> int` is the exit code.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import convert
from .cgroup import Cgroup, setup_cgroup, teardown_cgroup
from .config import CgroupConfig, CgroupDeviceRule
from .errors import PelagosError
from .hierarchy import discover
from .stats import ResourceStats, read_stats

# ---------------------------------------------------------------- flag parsers (pure)


def _device_rules(args: argparse.Namespace) -> list[CgroupDeviceRule]:
    """--default-devices puts the container allowlist first, so --device rules override it."""
    if not args.default_devices:
        return list(args.device)
    from .devices import DEFAULT_DEVICE_RULES

    return [*DEFAULT_DEVICE_RULES, *args.device]


def parse_device_rule(text: str) -> CgroupDeviceRule:
    """ "allow c 1:3 rw" / "deny a *:* rwm" / "allow b 8:* m" -> CgroupDeviceRule."""
    parts = text.split()
    if len(parts) not in (3, 4) or parts[0] not in ("allow", "deny"):
        raise argparse.ArgumentTypeError(
            f"bad device rule {text!r}: want 'allow|deny KIND MAJ:MIN [ACCESS]'"
        )
    verb, kind, num, *rest = parts
    major, sep, minor = num.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"bad device numbers {num!r}: want MAJ:MIN")

    def n(s: str) -> int:
        if s == "*":
            return -1
        try:
            return int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad device number {s!r}") from None

    return CgroupDeviceRule(verb == "allow", kind, n(major), n(minor), rest[0] if rest else "rwm")


def parse_classid(text: str) -> int:
    """tc-style "1:10" (hex major:minor, as HTB handles) or a plain integer -> u32 classid."""
    try:
        if ":" in text:
            major, minor = text.split(":", 1)
            return (int(major or "0", 16) << 16) | int(minor or "0", 16)
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad classid {text!r}: want e.g. 1:10") from None


def parse_net_prio(text: str) -> tuple[str, int]:
    """ "eth0=5" -> ("eth0", 5)."""
    name, sep, prio = text.partition("=")
    if not sep or not prio.isdigit():
        raise argparse.ArgumentTypeError(f"bad --net-prio {text!r}: want IFNAME=PRIO")
    return name, int(prio)


def parse_cpu_quota(text: str) -> tuple[int, int]:
    """ "50000/100000" -> (50000, 100000); "50000" uses the default period; "max" -> -1."""
    quota, _, period = text.partition("/")
    try:
        q = -1 if quota in ("max", "-1") else int(quota)
        return q, int(period) if period else convert.DEFAULT_CFS_PERIOD
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad --cpu-quota {text!r}: want QUOTA/PERIOD") from None


def parse_throttle(text: str) -> tuple[int, int, int]:
    """ "8:0=1M" -> (8, 0, 1048576) (rates take size suffixes)."""
    dev, sep, rate = text.partition("=")
    major, sep2, minor = dev.partition(":")
    try:
        if not sep or not sep2:
            raise ValueError
        return int(major), int(minor), convert.parse_size(rate)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bad throttle {text!r}: want MAJ:MIN=RATE") from None


def _size(text: str) -> int:
    try:
        return convert.parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def config_from_args(args: argparse.Namespace) -> CgroupConfig:
    """The CgroupConfig the `run` flags describe."""
    return CgroupConfig(
        memory_limit=args.memory,
        memory_swap=args.memory_swap,
        memory_reservation=args.memory_reservation,
        memory_swappiness=args.memory_swappiness,
        cpu_shares=args.cpu_shares,
        cpu_quota=args.cpu_quota,
        cpuset_cpus=args.cpuset_cpus,
        cpuset_mems=args.cpuset_mems,
        pids_limit=args.pids,
        blkio_weight=args.blkio_weight,
        blkio_throttle_read_bps=args.read_bps,
        blkio_throttle_write_bps=args.write_bps,
        blkio_throttle_read_iops=args.read_iops,
        blkio_throttle_write_iops=args.write_iops,
        device_rules=_device_rules(args),
        net_classid=args.net_classid,
        net_priorities=args.net_prio,
        path=args.path,
    )


# ---------------------------------------------------------------- output


def _controller_line(s: ResourceStats, ctrl: str, line: str) -> str:
    """The line, or a note that its counters are absent (not zero) in this cgroup."""
    if ctrl in s.controllers:
        return line
    return f"{line.split(':')[0]}:{' ' * (7 - len(ctrl))}n/a (no {ctrl} controller in this cgroup)"


def format_stats(s: ResourceStats) -> list[str]:
    """Human-readable lines for a stats snapshot."""
    fs = convert.format_size
    lines = [
        _controller_line(
            s,
            "memory",
            f"memory: current {fs(s.memory_current_bytes)}, peak {fs(s.memory_peak_bytes)}, "
            f"oom {s.memory_oom}, oom_kill {s.memory_oom_kill}",
        ),
        # cpu.stat usage exists without the cpu controller; throttling needs it.
        f"cpu:    usage {s.cpu_usage_ns / 1e6:.3f} ms (user {s.cpu_user_ns / 1e6:.3f} ms, "
        f"system {s.cpu_system_ns / 1e6:.3f} ms)"
        + (
            f", throttled {s.cpu_nr_throttled} of {s.cpu_nr_periods} periods "
            f"({s.cpu_throttled_ns / 1e6:.3f} ms)"
            if "cpu" in s.controllers
            else ""
        ),
        _controller_line(
            s, "pids", f"pids:   current {s.pids_current}, fork refusals {s.pids_events_max}"
        ),
        _controller_line(
            s, "io", f"io:     read {fs(s.io_read_bytes)}, written {fs(s.io_write_bytes)}"
        ),
    ]
    some = [k for k in sorted(s.pressure) if k.endswith(".avg10")]
    if some:
        lines.append("psi:    " + ", ".join(f"{k} {s.pressure[k]:.2f}%" for k in some))
    if s.device_denials:
        lines.append(
            "device denials: " + ", ".join(f"{k} x{v}" for k, v in s.device_denials.items())
        )
    if s.net:
        lines.append("net:    " + ", ".join(f"{k} {v}" for k, v in s.net.items()))
    return lines


LIMIT_FILES = (
    "memory.max",
    "memory.swap.max",
    "memory.low",
    "memory.high",
    "cpu.weight",
    "cpu.max",
    "cpuset.cpus",
    "cpuset.mems",
    "cpuset.cpus.effective",
    "pids.max",
    "io.bfq.weight",
    "io.weight",
    "io.max",
)
_SIZE_FILES = {"memory.max", "memory.swap.max", "memory.low", "memory.high"}


def read_limits(path: Path) -> dict[str, str]:
    """The limit files present in a cgroup dir, stripped (missing files are left out)."""
    out = {}
    for name in LIMIT_FILES:
        try:
            out[name] = (path / name).read_text().strip()
        except OSError:
            continue
    return out


def _human_limit(name: str, value: str) -> str:
    if name in _SIZE_FILES and value.isdigit():
        return f"{value} ({convert.format_size(int(value))})"
    return value.replace("\n", "; ") or "(empty)"


# ---------------------------------------------------------------- subcommands


def cmd_run(args: argparse.Namespace) -> int:
    """Fork the command, build its cgroup while it waits on a pipe, let it exec, wait, report."""
    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        print("pelagos-bpf run: give a command after --", file=sys.stderr)
        return 2
    cfg = config_from_args(args)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: wait until the parent put us in the cgroup, then exec
        os.close(wfd)
        if os.read(rfd, 1) != b"1":
            os._exit(127)
        os.close(rfd)
        try:
            os.execvp(cmd[0], cmd)
        except OSError as e:
            print(f"pelagos-bpf run: {cmd[0]}: {e.strerror}", file=sys.stderr)
        os._exit(127)
    os.close(rfd)
    try:
        cg = setup_cgroup(cfg, pid, strict=not args.best_effort, root=args.root)
    except BaseException as e:
        os.close(wfd)  # child reads EOF and exits without running the command
        os.waitpid(pid, 0)
        if isinstance(e, PelagosError):
            print(f"pelagos-bpf run: {e}", file=sys.stderr)
            return 2
        raise
    try:
        os.write(wfd, b"1")
        os.close(wfd)
        _, status = os.waitpid(pid, 0)
        stats = read_stats(cg)
    finally:
        teardown_cgroup(cg)
    code = os.waitstatus_to_exitcode(status)
    out = sys.stderr
    print(f"--- pelagos-bpf: {cg.path} (id {cg.id})", file=out)
    print(f"exit:   {code if code >= 0 else f'killed by signal {-code}'}", file=out)
    if cg.report.applied:
        print("applied: " + ", ".join(cg.report.applied), file=out)
    for setting, reason in cg.report.skipped:
        print(f"skipped: {setting}: {reason}", file=out)
    if args.json:
        print(json.dumps({"exit": code, "path": str(cg.path), "stats": stats.to_dict()}))
    else:
        for line in format_stats(stats):
            print(line, file=out)
    return code if code >= 0 else 128 - code


def cmd_inspect(args: argparse.Namespace) -> int:
    p = Path(args.path)
    if not p.is_absolute():
        p = discover(args.root).root / p
    if not (p / "cgroup.procs").exists():
        print(f"pelagos-bpf inspect: {p} is not a cgroup v2 directory", file=sys.stderr)
        return 2
    cg = Cgroup.open(p)
    limits = read_limits(p)
    stats = read_stats(cg)
    procs = [int(x) for x in (p / "cgroup.procs").read_text().split()]
    controllers = (p / "cgroup.controllers").read_text().split()
    if args.json:
        data: dict[str, Any] = {
            "path": str(p),
            "id": cg.id,
            "controllers": controllers,
            "procs": procs,
            "limits": limits,
            "stats": stats.to_dict(),
        }
        print(json.dumps(data, indent=2))
        return 0
    print(f"cgroup:      {p} (id {cg.id})")
    print(f"controllers: {' '.join(controllers) or '(none)'}")
    print(f"processes:   {' '.join(map(str, procs)) or '(none)'}")
    print("limits:" if limits else "limits:      (no controller files)")
    for name, value in limits.items():
        print(f"  {name:22} {_human_limit(name, value)}")
    print("stats:")
    for line in format_stats(stats):
        print("  " + line)
    return 0


# ---------------------------------------------------------------- parser


def _add_run(sub: Any) -> None:
    r = sub.add_parser("run", help="run a command in a new cgroup, print its stats, tear down")
    r.add_argument("--memory", type=_size, help="memory.max, e.g. 256M")
    r.add_argument("--memory-swap", type=_size, help="memory+swap (OCI), -1 for unlimited")
    r.add_argument("--memory-reservation", type=_size, help="memory.low, e.g. 128M")
    r.add_argument("--memory-swappiness", type=int, help="(cgroup v1 only: rejected)")
    r.add_argument("--cpu-shares", type=int, help="cpu shares 2..262144 (-> cpu.weight)")
    r.add_argument(
        "--cpu-quota", type=parse_cpu_quota, help="QUOTA/PERIOD in us, e.g. 50000/100000"
    )
    r.add_argument("--cpuset-cpus", help="e.g. 0-1")
    r.add_argument("--cpuset-mems", help="e.g. 0")
    r.add_argument("--pids", type=int, help="pids.max")
    r.add_argument("--blkio-weight", type=int, help="10..1000 (-> io.bfq.weight or io.weight)")
    for flag in ("read-bps", "write-bps", "read-iops", "write-iops"):
        r.add_argument(
            f"--{flag}", type=parse_throttle, action="append", default=[], metavar="MAJ:MIN=RATE"
        )
    r.add_argument(
        "--device",
        type=parse_device_rule,
        action="append",
        default=[],
        metavar="RULE",
        help="e.g. 'deny a *:* rwm', 'allow c 1:3 rw' (repeatable, in order)",
    )
    r.add_argument(
        "--default-devices",
        action="store_true",
        help="start from DEFAULT_DEVICE_RULES (deny all + the usual container allowlist)",
    )
    r.add_argument("--net-classid", type=parse_classid, help="e.g. 1:10")
    r.add_argument("--net-prio", type=parse_net_prio, action="append", default=[])
    r.add_argument("--path", help="cgroup path under the root (default pelagos-<pid>)")
    r.add_argument("--root", help="cgroup2 root (default: $PELAGOS_CGROUP_ROOT or mountinfo)")
    r.add_argument("--best-effort", action="store_true", help="skip unsupported settings")
    r.add_argument("--json", action="store_true", help="print stats as JSON on stdout")
    r.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    r.set_defaults(func=cmd_run)


def _add_inspect(sub: Any) -> None:
    i = sub.add_parser("inspect", help="show a cgroup's limits and stats")
    i.add_argument("path", help="absolute cgroup dir, or a path under the root")
    i.add_argument("--root", help="cgroup2 root for relative paths")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)


def _register_extensions(sub: Any) -> None:
    """Call register(subparsers) of every pelagos_bpf/<pkg>/cli.py that exists."""
    pkg_dir = Path(__file__).parent
    for mod in pkgutil.iter_modules([str(pkg_dir)]):
        if mod.ispkg and (pkg_dir / mod.name / "cli.py").exists():
            ext = importlib.import_module(f"{__package__}.{mod.name}.cli")
            register = getattr(ext, "register", None)
            if register is not None:
                register(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pelagos-bpf", description="cgroup v2 controller files plus cgroup BPF"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    _add_run(sub)
    _add_inspect(sub)
    _register_extensions(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except PelagosError as e:
        print(f"pelagos-bpf {args.command}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
