"""`pelagos-bpf compile [--out DIR]`: build the BPF bytecode with bcc (the only step that runs it).

Why a command at all: the package ships its bytecode (built with the package), so nodes never
compile. This is for development (a checkout's editable install: `--out` defaults to the
package's own bytecode dir) and for custom builds (`--out DIR`, then `PELAGOS_BPF_BYTECODE=DIR`).
The output dir is created and trust-checked like any dir whose files reach PROG_LOAD.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from .common import CliError


def cmd_compile(args: argparse.Namespace) -> int:
    from .. import bytecode, compiler
    from ..registry import all_programs

    out = args.out or bytecode.PACKAGED_DIR
    if os.geteuid() != 0:
        raise CliError("compiling needs root (bcc loads each program into the kernel to build it)")
    print(f"bytecode dir: {out}", flush=True)
    for done in compiler.build(out, all_programs(), force=args.force):
        if isinstance(done, str):
            print(f"current  {done}", flush=True)
        else:
            print(
                f"compiled {bytecode.file_name(done.source, done.func)} ({done.insn_count} insns)",
                flush=True,
            )
    return 0


def register(sub: Any) -> None:
    c = sub.add_parser(
        "compile",
        help="build the BPF bytecode with bcc (development and custom builds; needs root)",
        description="Compile each BPF program (bcc) into bytecode files. Default output: the "
        "package's own bytecode dir (an editable install); with --out DIR, a custom set that "
        "PELAGOS_BPF_BYTECODE=DIR selects. Programs already current are kept.",
    )
    c.add_argument("--out", metavar="DIR", help="output directory (created 0755, trust-checked)")
    c.add_argument("--force", action="store_true", help="recompile even what is current")
    c.set_defaults(func=cmd_compile)
