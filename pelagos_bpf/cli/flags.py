"""The resource flags `run` and `update` share, their parsers (pure) and the config they build."""

from __future__ import annotations

import argparse
from typing import Any

from .. import convert, numbers
from ..config import CgroupConfig
from ..devices.rules import MAJOR_MAX, MINOR_MAX, CgroupDeviceRule
from ..errors import ConfigError


def parse_device_rule(text: str) -> CgroupDeviceRule:
    """ "allow c 1:3 rw" -> rule: the library's one grammar (`CgroupDeviceRule.parse`)."""
    try:
        return CgroupDeviceRule.parse(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(f"bad rule {text!r}: {e.reason}") from None


def parse_classid(text: str) -> int:
    """tc-style "1:10" (hex major:minor, each a u16, as HTB handles), "0x10010" or a decimal
    integer -> u32 classid: numbers.parse_classid, the grammar the OCI hook uses too."""
    try:
        return numbers.parse_classid(text, "--net-classid")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(f"bad classid {text!r}: {e.reason}; e.g. 1:10") from None


def parse_net_prio(text: str) -> tuple[str, int]:
    """ "eth0=5" -> ("eth0", 5) (decimal u32, ASCII digits)."""
    name, sep, prio = text.partition("=")
    try:
        if not sep:
            raise ConfigError("--net-prio", text, "want IFNAME=PRIO")
        return name, numbers.parse_dec(prio, "--net-prio")
    except ConfigError as e:
        raise argparse.ArgumentTypeError(f"bad --net-prio {text!r}: {e.reason}") from None


def parse_int(text: str) -> int:
    """An integer flag: ASCII digits with an optional '-' (int() also takes '+', '_', spaces
    and Unicode digits)."""
    try:
        return numbers.parse_int(text, "value", -(1 << 63), (1 << 63) - 1)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(f"bad integer {text!r}: {e.reason}") from None


def parse_cpu_quota(text: str) -> tuple[int, int]:
    """ "50000/100000" -> (50000, 100000); "50000" uses the default period; "max" -> -1."""
    quota, _, period = text.partition("/")
    try:
        q = -1 if quota in ("max", "-1") else numbers.parse_dec(quota, "quota", 0, (1 << 63) - 1)
        p = numbers.parse_dec(period, "period", 0, (1 << 63) - 1) if period else None
        return q, convert.DEFAULT_CFS_PERIOD if p is None else p
    except ConfigError:
        raise argparse.ArgumentTypeError(f"bad --cpu-quota {text!r}: want QUOTA/PERIOD") from None


def parse_throttle(text: str) -> tuple[int, int, int]:
    """ "8:0=1M" -> (8, 0, 1048576) (rates take size suffixes)."""
    dev, sep, rate = text.partition("=")
    major, sep2, minor = dev.partition(":")
    try:
        if not sep or not sep2:
            raise ValueError
        return (
            numbers.parse_dec(major, "major", 0, MAJOR_MAX),
            numbers.parse_dec(minor, "minor", 0, MINOR_MAX),
            convert.parse_size(rate),
        )
    except ValueError:  # ConfigError is one
        raise argparse.ArgumentTypeError(f"bad throttle {text!r}: want MAJ:MIN=RATE") from None


def parse_size(text: str) -> int:
    try:
        return convert.parse_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """The CgroupConfig flags (common.FLAGS maps each field back to its flag for errors)."""
    g = p.add_argument_group("resources")
    g.add_argument("--memory", type=parse_size, help="memory.max, e.g. 256M (-1: unlimited)")
    g.add_argument("--memory-swap", type=parse_size, help="memory+swap (OCI), -1 for unlimited")
    g.add_argument("--memory-reservation", type=parse_size, help="memory.low, e.g. 128M")
    g.add_argument("--memory-swappiness", type=parse_int, help="(cgroup v1 only: refused)")
    g.add_argument("--cpu-shares", type=parse_int, help="cpu shares 2..262144 (-> cpu.weight)")
    g.add_argument(
        "--cpu-quota", type=parse_cpu_quota, help="QUOTA/PERIOD in us, e.g. 50000/100000"
    )
    g.add_argument("--cpuset-cpus", help="e.g. 0-1")
    g.add_argument("--cpuset-mems", help="e.g. 0")
    g.add_argument("--pids", type=parse_int, help="pids.max (-1: unlimited)")
    g.add_argument(
        "--blkio-weight", type=parse_int, help="10..1000 (-> io.bfq.weight or io.weight)"
    )
    for flag in ("read-bps", "write-bps", "read-iops", "write-iops"):
        g.add_argument(
            f"--{flag}", type=parse_throttle, action="append", default=[], metavar="MAJ:MIN=RATE"
        )
    g.add_argument(
        "--device",
        type=parse_device_rule,
        action="append",
        default=[],
        metavar="RULE",
        help="'allow|deny KIND MAJ:MIN [ACCESS]', KIND a/b/c, * for any number, ACCESS "
        "default rwm; e.g. 'deny a *:* rwm', 'allow c 1:3 rw' (repeatable; the last match "
        "decides each access bit)",
    )
    g.add_argument(
        "--default-devices",
        action="store_true",
        help="start from the default container allowlist (deny all + /dev/null, ...); "
        "--device rules come after it and override it",
    )
    g.add_argument("--net-classid", type=parse_classid, help="e.g. 1:10")
    g.add_argument(
        "--net-prio", type=parse_net_prio, action="append", default=[], metavar="IFNAME=PRIO"
    )


def default_rule_count(args: argparse.Namespace) -> int:
    """How many rules --default-devices put before the user's own --device rules."""
    if not getattr(args, "default_devices", False):
        return 0
    from ..devices import DEFAULT_DEVICE_RULES

    return len(DEFAULT_DEVICE_RULES)


def config_from_args(args: argparse.Namespace) -> CgroupConfig:
    """The CgroupConfig the flags describe (path only for `run`)."""
    rules: list[CgroupDeviceRule] = list(args.device)
    if args.default_devices:
        from ..devices import DEFAULT_DEVICE_RULES

        rules = [*DEFAULT_DEVICE_RULES, *rules]
    kw: dict[str, Any] = {"path": getattr(args, "path", None)}
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
        device_rules=rules,
        net_classid=args.net_classid,
        net_priorities=args.net_prio,
        **kw,
    )
