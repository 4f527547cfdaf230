"""`pelagos-bpf compile`: fill the bytecode cache (the only step that runs bcc), one line per step.

Why a command of its own: a compile costs ~0.3 s and ~125 MB per program; doing it ahead (at
install or boot) keeps bcc off every container start. `run` calls `ensure_compiled` for the
features it uses so a first run says what it is doing instead of pausing silently.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from .common import CliError


def declared_programs(features: tuple[str, ...] | None = None) -> list[tuple[str, str, int]]:
    """(bpf/ source name, C function, program type) of the programs the features declare."""
    from ..features import all_programs

    return all_programs(features)


def _writable_cache(cache: Path) -> None:
    """CliError naming the directory when the cache cannot be written (before bcc starts)."""
    d = cache
    while not os.path.exists(d) and d != d.parent:  # False also where we may not look
        d = d.parent
    if not os.access(d, os.W_OK):
        raise CliError(
            f"the bytecode cache {cache} is not writable ({d} is not): compiling needs root, "
            "or set PELAGOS_BPF_CACHE to a writable directory"
        )


def ensure_compiled(
    features: tuple[str, ...] | None = None, *, out: Any = sys.stderr
) -> list[tuple[str, str, int, str]]:
    """Compile what the cache lacks, printing one line per program; (source, func, insns, state).

    Only a missing program is compiled (and announced before the slow step starts)."""
    from .. import progcache

    done = []
    for source, func, ptype in declared_programs(features):
        src = progcache.bpf_source(source)
        try:
            prog = progcache.get_program(src, func, ptype, compile_if_missing=False)
            state = "cached"
        except OSError:
            _writable_cache(progcache.cache_dir())
            if os.geteuid() != 0:
                raise CliError(
                    f"{src.name}:{func} is not in the bytecode cache; compiling it needs root "
                    "(bcc loads the program into the kernel to build it)"
                ) from None
            if out is not None:
                print(f"compiling {src.name}:{func} with bcc ...", file=out, flush=True)
            prog = progcache.get_program(src, func, ptype)
            state = "compiled"
        done.append((src.name, func, prog.insn_count, state))
    return done


def cmd_compile(args: argparse.Namespace) -> int:
    from .. import progcache

    print(f"cache: {progcache.cache_dir()}", flush=True)
    for name, func, insns, state in ensure_compiled(out=sys.stdout):
        print(f"{state:8} {name}:{func} ({insns} insns)", flush=True)
    return 0


def register(sub: Any) -> None:
    c = sub.add_parser(
        "compile",
        help="compile every bpf/ program into the bytecode cache (bcc; needs root)",
        description="Compile each BPF program the features declare (bcc) into the bytecode "
        "cache ($PELAGOS_BPF_CACHE or /var/cache/pelagos-bpf). Programs already cached are "
        "listed, not recompiled.",
    )
    c.set_defaults(func=cmd_compile)
