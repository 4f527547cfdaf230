"""`python -m pelagos_bpf.ocihook [create|poststop] [-v]`: the hook without the whole CLI.

Why: the hook's latency is mostly interpreter start and imports; this entry skips the CLI's own
(its parser of every subcommand, logging). Since the CLI stopped loading the library up front,
the two entry points cost about the same (bench/bench_hook.py times both).
"""

from __future__ import annotations

import argparse
import sys

from .cli import register


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pelagos_bpf.ocihook")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["oci-hook", *(sys.argv[1:] if argv is None else argv)])
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
