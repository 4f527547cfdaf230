"""`pelagos-bpf oci-hook [create|poststop]`: the OCI hook entry point (state JSON on stdin)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def cmd_oci_hook(args: argparse.Namespace) -> int:
    from .hook import run_hook_io
    from .inputs import read_stdin

    return run_hook_io(read_stdin(sys.stdin.buffer), args.stage, args.verbose, sys.stderr)


def register(sub: Any) -> None:
    from .hook import STAGES

    p = sub.add_parser(
        "oci-hook",
        help="OCI runtime hook: attach net classid/priorities and device rules runc/crun drop",
        description=(
            "Run by the runtime as a createRuntime (or prestart) and a poststop hook, with the "
            "OCI state on stdin. Exit 2 (the container fails to start) only when the container "
            "asked for something this hook cannot do; warnings go to stderr. See "
            "docs/OCI_HOOK.md."
        ),
    )
    p.add_argument("stage", nargs="?", choices=STAGES, default="auto", help="default: from status")
    p.add_argument("-v", "--verbose", action="store_true", help="say what was attached")
    p.set_defaults(func=cmd_oci_hook)
