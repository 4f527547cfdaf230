"""`pelagos-bpf devices ...`: check an access, show denials, print the default allowlist.

`devices check` answers "would this access be allowed?" either for a rule list given on the
command line (reference evaluator) or for a live cgroup: every device program in effect there
(each owner's rules as in the maps, foreign programs interpreted, ancestors' included) and the
v1 devices controller of a hybrid host (devices/effective.py), with the cgroup's denial
counters. Its exit status is the answer: 0 allowed, 1 denied; anything that keeps it from
answering (a typo, not a cgroup, needs root, a program it cannot evaluate that might deny) is
125, so a script never reads an error or a guess as an answer.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..devices.rules import (
    DEFAULT_DEVICE_RULES,
    CgroupDeviceRule,
    deciding_rules,
    device_allowed,
    validate_access,
)
from .common import EXIT_DENIED, EXIT_OK, EXIT_TOOL, CliError, cgroup_dir
from .flags import parse_device_rule


def _device(text: str) -> tuple[int, int]:
    """MAJOR:MINOR in ASCII decimal digits, each in the kernel's range (numbers.parse_dec)."""
    from ..devices.rules import MAJOR_MAX, MINOR_MAX
    from ..errors import ConfigError
    from ..numbers import parse_dec

    major, sep, minor = text.partition(":")
    try:
        if not sep:
            raise ConfigError("device", text, "want MAJOR:MINOR")
        return parse_dec(major, "MAJOR", 0, MAJOR_MAX), parse_dec(minor, "MINOR", 0, MINOR_MAX)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(f"bad device {text!r}: {e.reason}") from None


def _check_rules(rules: list[CgroupDeviceRule], kind: str, dev: tuple[int, int], acc: str) -> int:
    allowed = device_allowed(rules, kind, dev[0], dev[1], acc)
    print(f"{kind} {dev[0]}:{dev[1]} {acc}: {'allowed' if allowed else 'DENIED'}")
    for bit, idx in deciding_rules(rules, kind, dev[0], dev[1], acc).items():
        why = "no rule mentions it: allowed" if idx is None else f"rule {idx}: {rules[idx]}"
        print(f"  {bit}: {why}")
    return EXIT_OK if allowed else EXIT_DENIED


def _check_cgroup(path: Path, kind: str, dev: tuple[int, int], acc: str) -> int:
    from ..cgroup import Cgroup
    from ..devices import program
    from ..devices.effective import check_access

    where = cgroup_dir(str(path))
    result = check_access(where, kind, dev[0], dev[1], acc)
    verdict = {True: "allowed", False: "DENIED", None: "may be DENIED"}[result.allowed]
    print(f"{kind} {dev[0]}:{dev[1]} {acc}: {verdict}")
    if not result.verdicts:
        print("  no device program in effect: every device allowed")
    for v in result.verdicts:
        said = {True: "allows", False: "DENIES", None: "unknown"}[v.allowed]
        print(f"  {v.source}: {said} ({v.why})")
    _print_denials(program.denials(Cgroup.open(where)))
    if result.allowed is None:  # some source could not be evaluated and none denies
        return EXIT_TOOL
    return EXIT_OK if result.allowed else EXIT_DENIED


def _print_denials(denials: dict[str, int]) -> None:
    if not denials:
        print("denials: none counted")
        return
    print("denials:")
    for label, n in sorted(denials.items(), key=lambda kv: -kv[1]):
        print(f"  {label:20} x{n}")


def cmd_check(args: argparse.Namespace) -> int:
    validate_access(args.access, "ACCESS")
    if args.kind not in ("b", "c"):
        raise CliError(f"KIND {args.kind!r}: a device is 'b' (block) or 'c' (char)")
    if args.cgroup:
        if args.rule or args.defaults:
            raise CliError("give either a cgroup or --rule/--defaults, not both")
        return _check_cgroup(Path(args.cgroup), args.kind, args.device, args.access)
    rules = [*(DEFAULT_DEVICE_RULES if args.defaults else ()), *args.rule]
    return _check_rules(rules, args.kind, args.device, args.access)


def cmd_denials(args: argparse.Namespace) -> int:
    from ..cgroup import Cgroup
    from ..devices import program

    cg = Cgroup.open(cgroup_dir(args.cgroup))
    _print_denials(program.denials(cg))
    return 0


def cmd_defaults(args: argparse.Namespace) -> int:
    for rule in DEFAULT_DEVICE_RULES:
        print(rule)
    return 0


def register(sub: Any) -> None:
    from .common import EXIT_CODES_HELP

    d = sub.add_parser("devices", help="device rules: check an access, show denials")
    dsub = d.add_subparsers(dest="devices_cmd", required=True)
    ch = dsub.add_parser(
        "check",
        help="would this access be allowed? (a live cgroup's rules, or --rule/--defaults)",
        description="Exit status 0 = allowed, 1 = denied, 125 = could not answer (bad input, "
        "not a cgroup, needs root).",
        epilog=EXIT_CODES_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ch.add_argument("cgroup", nargs="?", help="cgroup dir whose attached rules to ask")
    ch.add_argument(
        "--rule",
        type=parse_device_rule,
        action="append",
        default=[],
        metavar="RULE",
        help="'allow|deny KIND MAJ:MIN [ACCESS]' as for run --device (repeatable, in order)",
    )
    ch.add_argument("--defaults", action="store_true", help="start from DEFAULT_DEVICE_RULES")
    ch.add_argument("kind", help="b or c")
    ch.add_argument("device", type=_device, help="MAJOR:MINOR")
    ch.add_argument("access", help="any of r, w, m (rw = O_RDWR)")
    ch.set_defaults(func=cmd_check)
    dn = dsub.add_parser("denials", help="denied accesses counted on a cgroup")
    dn.add_argument("cgroup")
    dn.set_defaults(func=cmd_denials)
    df = dsub.add_parser("defaults", help="print DEFAULT_DEVICE_RULES")
    df.set_defaults(func=cmd_defaults)
