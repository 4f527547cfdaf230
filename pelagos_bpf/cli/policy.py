"""`pelagos-bpf policy check FILE`: validate an admin policy before installing it.

Checks what the OCI hook (and the agent) would check when reading the file where it is: its
owner and mode (and those of every directory above it), the TOML, every key and value. Exit 0
with a summary of what each namespace may ask for, or 2 with one message naming the key.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from .common import EXIT_OK

EXIT_INVALID = 2


def _summary(name: str, rules: Any) -> str:
    from ..policy import PRIO_MAX

    classids = ", ".join(r.text for r in rules.classids) or "none"
    prios = ", ".join(f"{a}-{b}" if a != b else str(a) for a, b in rules.priorities) or "none"
    above = "if a classid above allows" if rules.priority_classids else "no"
    grants = "yes" if rules.device_grants else "no"
    return (
        f"  {name}: classids {classids}; priorities {prios}; above {PRIO_MAX}: {above}; "
        f"device grants {grants}; {rules.rules_per_set} rules per set; "
        f"{rules.entries_per_namespace} rule-map entries per namespace"
    )


def cmd_check(args: argparse.Namespace) -> int:
    from ..policy import MAX_FILE, PolicyFileError, load, parse

    path = os.path.abspath(args.file)
    try:
        with open(path, "rb") as f:  # the content first: a draft's errors, wherever it is
            raw = f.read(MAX_FILE + 1)
    except OSError as e:
        print(f"pelagos-bpf policy: {path}: {e.strerror}", file=sys.stderr)
        return EXIT_INVALID
    try:
        if len(raw) > MAX_FILE:
            raise PolicyFileError(path, "", f"more than {MAX_FILE} bytes")
        pol = parse(raw, path)
        load(path)  # then what the hook checks where the file is: owner and mode, up to /
    except PolicyFileError as e:
        print(f"pelagos-bpf policy: {e}", file=sys.stderr)
        return EXIT_INVALID
    print(f"{path}: valid")
    print(_summary("default (namespaces not listed, containers without one)", pol.default))
    for name, rules in sorted(pol.namespaces.items()):
        print(_summary(f"namespace {name}", rules))
    return EXIT_OK


def register(sub: Any) -> None:
    p = sub.add_parser(
        "policy",
        help="the admin policy of the OCI hook: what pods may ask for by annotation",
        description="The admin policy (/etc/pelagos-bpf/policy.toml, or $PELAGOS_BPF_POLICY) "
        "says per Kubernetes namespace which classids and priorities pods may request, whether "
        "they may grant devices, and their rule quotas. See docs/OCI_HOOK.md.",
    )
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    c = actions.add_parser(
        "check",
        help="validate a policy file (exit 0 valid, 2 invalid)",
        description="Read FILE as the hook would (owner, mode, TOML, every key) and print "
        "what each namespace may ask for; exit 2 with a message naming the bad key.",
    )
    c.add_argument("file", metavar="FILE")
    c.set_defaults(func=cmd_check)
