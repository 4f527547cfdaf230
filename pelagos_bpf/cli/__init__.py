"""`pelagos-bpf`: the command line over the library.

Subcommands are listed explicitly in COMMANDS (name -> module with `register(subparsers)`, and
its one-line help). Only the module of the command being run is imported, so `--help` and
every command start without loading the others (or bcc, or pyroute2). A module may register
several commands (lifecycle: update, freeze, thaw, events).

Failures the tool expects (bad flags, refused settings, not a cgroup, needs root) are one line
on stderr and exit 125; `--debug` or PELAGOS_BPF_DEBUG=1 adds the traceback. See
docs/CLI.md.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
import traceback
from collections.abc import Sequence

from ..errors import PelagosError
from .common import EXIT_CODES_HELP, EXIT_TOOL, CliError, Parser, describe

COMMANDS: dict[str, tuple[str, str]] = {
    "run": ("pelagos_bpf.cli.run", "run a command in a new cgroup, print its stats, tear down"),
    "update": ("pelagos_bpf.cli.lifecycle", "change a live cgroup's settings"),
    "inspect": ("pelagos_bpf.cli.show", "show what is in force on a cgroup, and its stats"),
    "freeze": ("pelagos_bpf.cli.lifecycle", "stop every process of a cgroup"),
    "thaw": ("pelagos_bpf.cli.lifecycle", "let a frozen cgroup run again"),
    "events": ("pelagos_bpf.cli.lifecycle", "a cgroup's events (OOM, frozen, ...) as JSON lines"),
    "devices": ("pelagos_bpf.cli.devices", "device rules: check an access, show denials"),
    "compile": ("pelagos_bpf.cli.compile", "build the BPF bytecode with bcc (development)"),
    "net-demo": ("pelagos_bpf.cli.netdemo", "watch net_classid classify real packets into HTB"),
    "oci-hook": ("pelagos_bpf.ocihook.cli", "OCI runtime hook (createRuntime/poststop)"),
    "gc": ("pelagos_bpf.cli.gc", "remove BPF state of cgroups that are gone"),
    "policy": ("pelagos_bpf.cli.policy", "the OCI hook's admin policy: check a policy file"),
    "agent": ("pelagos_bpf.agent.cli", "the node agent (serve; status; metrics)"),
    "hook-path": ("pelagos_bpf.agent.cli", "print the thin OCI hook's path"),
}
DEBUG_ENV = "PELAGOS_BPF_DEBUG"


def version() -> str:
    from .. import _version  # what `pelagos_bpf.__version__` answers, typed

    return _version()


class _VersionAction(argparse.Action):
    """`--version`, looked up only when asked: the version comes from importlib.metadata,
    whose import and distribution search are a large part of a fresh process's start, and
    every command (the OCI hook runs on each container start) builds this parser."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        print(f"{parser.prog} {version()}")  # stdout, as argparse's own version action
        parser.exit()


def _chosen(argv: Sequence[str]) -> str | None:
    """The subcommand named in argv (global options take no values), or None."""
    return next((a for a in argv if not a.startswith("-")), None)


def build_parser(argv: Sequence[str] = ()) -> argparse.ArgumentParser:
    """The parser, with the chosen command's module registered and the others as stubs."""
    parser = Parser(
        prog="pelagos-bpf",
        description="cgroup v2 controller files plus cgroup BPF (devices, net)",
        epilog=EXIT_CODES_HELP + "\n\nPELAGOS_BPF_DEBUG=1 (or --debug) shows tracebacks.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_VersionAction, help="show the version and exit")
    parser.add_argument(
        "-v", "--verbose", action="count", default=0, help="log what the library does (-vv: more)"
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks of failures")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = _chosen(argv)
    if chosen in COMMANDS:
        _register(sub, chosen)
    for name, (_module, text) in COMMANDS.items():
        if name not in sub.choices:
            sub.add_parser(name, help=text)
    return parser


def _register(sub: argparse._SubParsersAction[Parser], name: str) -> None:
    module = COMMANDS[name][0]
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or not module.startswith(e.name):
            raise
        raise CliError(f"not available in this installation ({module} is missing)") from e
    mod.register(sub)


def _setup_logging(verbosity: int) -> None:
    if verbosity:
        logging.basicConfig(
            level=logging.DEBUG if verbosity > 1 else logging.INFO,
            format="pelagos-bpf: %(name)s: %(message)s",
            stream=sys.stderr,
        )


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get(DEBUG_ENV, "") not in ("", "0") or "--debug" in argv
    args = None
    try:
        args = build_parser(argv).parse_args(argv)
        _setup_logging(args.verbose)
        return int(args.func(args))
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # e.g. `| head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except (CliError, PelagosError, OSError) as e:
        if debug:
            traceback.print_exc()
        _report(argv, args, e)
        return e.code if isinstance(e, CliError) else EXIT_TOOL
    except Exception as e:  # a bug: keep the traceback, still exit as a tool failure
        traceback.print_exc()
        _report(argv, args, e)
        return EXIT_TOOL


def _report(argv: list[str], args: argparse.Namespace | None, e: BaseException) -> None:
    """One line per problem, prefixed with the command, naming flags (not Python fields)."""
    from .flags import default_rule_count

    hint = bool(getattr(args, "best_effort_hint", False))
    offset = default_rule_count(args) if args is not None and hasattr(args, "device") else 0
    name = _chosen(argv)
    prefix = f"pelagos-bpf {name}: " if name in COMMANDS else "pelagos-bpf: "
    for line in describe(e, best_effort_hint=hint, rule_offset=offset).splitlines():
        print(prefix + line, file=sys.stderr)
