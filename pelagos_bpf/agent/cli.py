"""`pelagos-bpf agent [status|metrics]` and `pelagos-bpf hook-path`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from ..cli.common import EXIT_CODES_HELP, EXIT_OK, CliError

HOOK_BINARY = "pelagos-bpf-hook"


def hook_binary() -> Path:
    """The thin hook shipped in this installation (built with the package, see setup.py)."""
    return Path(__file__).resolve().parent.parent / "_bin" / HOOK_BINARY


def cmd_hook_path(args: argparse.Namespace) -> int:
    p = hook_binary()
    if not os.access(p, os.X_OK):
        raise CliError(
            f"{p} is not there: this installation was built without a C compiler (gcc with "
            "static glibc, Debian's libc6-dev); point the hooks at `pelagos-bpf oci-hook` instead"
        )
    print(p)
    return EXIT_OK


def cmd_agent(args: argparse.Namespace) -> int:
    from .server import Limits, default_processes, parse_listen, serve

    if args.metrics_listen:
        try:
            parse_listen(args.metrics_listen)
        except ValueError as e:
            raise CliError(str(e)) from None
    if os.geteuid() != 0:
        raise CliError("the agent needs root (CAP_BPF, CAP_SYS_ADMIN, the cgroup tree)")
    # One line per request from the agent (and its NRI plugin); the library's own decisions
    # (attach, pin, rollback, gc: several lines per container) with -v. A line costs a
    # formatted write on the request's path, and journald's CPU after it.
    logging.basicConfig(
        level=logging.DEBUG
        if args.verbose > 1
        else logging.INFO
        if args.verbose
        else logging.WARNING,
        format="pelagos-bpf agent: %(levelname)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    for name in ("pelagos_bpf.agent", "pelagos_bpf.nri"):
        logging.getLogger(name).setLevel(logging.DEBUG if args.verbose > 1 else logging.INFO)
    from .daemon import DaemonError
    from .nrihost import NriSettings, NriUnavailable, launched, serve_launched
    from .protocol import socket_path

    nri = NriSettings(socket=args.nri_socket, index=args.nri_index) if args.nri else None
    try:
        if nri is not None and launched():
            return serve_launched(nri, args.lock_timeout)
        return serve(
            socket_path(args.socket),
            metrics_listen=args.metrics_listen,
            nri=nri,
            limits=Limits(
                processes=args.processes or default_processes(),
                workers=args.workers,
                max_pending=args.max_pending,
                queue_wait=args.queue_wait,
                lock_timeout=args.lock_timeout,
                frame_deadline=args.frame_deadline,
                gc_interval=args.gc_interval,
            ),
        )
    except (DaemonError, NriUnavailable) as e:
        raise CliError(str(e)) from None


def cmd_status(args: argparse.Namespace) -> int:
    from .client import Client

    st = Client(args.socket).status()
    if args.json:
        print(json.dumps(st, indent=2))
        return EXIT_OK
    lines = [
        f"agent:      pid {st['pid']} on {st['socket']}, up {st['uptime_seconds']:.0f} s"
        + (" (draining)" if st["draining"] else ""),
        "programs:   " + ", ".join(f"{p['name']} (id {p['id']})" for p in st["programs"]),
        f"held:       {st['cgroups_held']} cgroups, {st['containers']} with a container id",
        f"now:        {st['in_flight']} requests in flight, {st['connections']} connections",
        *([_nri_line(st["nri"])] if st.get("nri") else []),
        f"failed:     {st['failed']}; refused: "
        + (", ".join(f"{k} {n}" for k, n in sorted(st["refused"].items())) or "none"),
        "requests:   op                      count  failed   p50 ms   p99 ms",
    ]
    for op, r in st["requests"].items():
        counts = f"{r['count']:6} {r['failed']:7}"
        lines.append(f"            {op:22} {counts} {_ms(r['p50_ms'])} {_ms(r['p99_ms'])}")
    print("\n".join(lines))
    return EXIT_OK


def _nri_line(nri: dict[str, Any]) -> str:
    where = "launched by NRI" if nri["launched"] else nri["socket"]
    state = "registered" if nri["registered"] else "not registered (connecting)"
    return f"nri:        plugin {nri['plugin']} on {where}: {state}"


def _ms(v: float | None) -> str:
    return f"{v:8.3f}" if v is not None else "       -"


def cmd_metrics(args: argparse.Namespace) -> int:
    from .client import Client

    sys.stdout.write(Client(args.socket).metrics())
    return EXIT_OK


def _positive(typ: type, *, zero: bool = False) -> Any:
    def parse(text: str) -> Any:
        try:
            v = typ(text)
        except ValueError:
            v = -1
        if not (v > 0 or (zero and v == 0)):
            raise argparse.ArgumentTypeError(f"{text!r}: want a positive {typ.__name__}")
        return v

    return parse


def _socket_flag(p: argparse.ArgumentParser, default: Any = None) -> None:
    p.add_argument(
        "--socket",
        default=default,
        metavar="PATH",
        help="the agent's socket (default: $PELAGOS_BPF_AGENT_SOCKET, else "
        "/run/pelagos-bpf/agent.sock)",
    )


def register(sub: Any) -> None:
    from .server import MAX_PROCESSES, Limits

    fmt = argparse.RawDescriptionHelpFormatter
    a = sub.add_parser(
        "agent",
        help="the node agent: serve the thin OCI hook, library clients and metrics",
        description="Without a subcommand: run the agent in the foreground (root; logs on "
        "stderr; SIGTERM drains). It serves the thin OCI hook (`pelagos-bpf hook-path`), "
        "pelagos_bpf.agent.Client, status and Prometheus metrics over a root-only unix socket. "
        "See docs/AGENT.md.",
        epilog=EXIT_CODES_HELP,
        formatter_class=fmt,
    )
    _socket_flag(a)
    a.add_argument(
        "--metrics-listen",
        metavar="unix:PATH|127.0.0.1:PORT",
        help="also serve GET /metrics over HTTP there (loopback or a unix socket only)",
    )
    limits = Limits()
    a.add_argument(
        "--processes",
        type=_positive(int),
        default=None,
        metavar="N",
        help=f"processes serving the socket (default: one per CPU, up to {MAX_PROCESSES})",
    )
    a.add_argument(
        "--workers",
        type=_positive(int),
        default=limits.workers,
        metavar="N",
        help=f"threads per process running library calls (default {limits.workers})",
    )
    a.add_argument(
        "--max-pending",
        type=_positive(int),
        default=limits.max_pending,
        metavar="N",
        help="requests per process running or waiting for a worker; more are refused as "
        f"overloaded (default {limits.max_pending})",
    )
    a.add_argument(
        "--queue-wait",
        type=_positive(float),
        default=limits.queue_wait,
        metavar="SECONDS",
        help="refuse (never run) a request that waited longer for a worker "
        f"(default {limits.queue_wait:g})",
    )
    a.add_argument(
        "--lock-timeout",
        type=_positive(float),
        default=limits.lock_timeout,
        metavar="SECONDS",
        help="fail a request whose cgroup another writer holds locked longer "
        f"(default {limits.lock_timeout:g})",
    )
    a.add_argument(
        "--frame-deadline",
        type=_positive(float),
        default=limits.frame_deadline,
        metavar="SECONDS",
        help="drop a client that has not sent its whole request this long after connecting "
        f"(default {limits.frame_deadline:g})",
    )
    a.add_argument(
        "--gc-interval",
        type=_positive(float, zero=True),
        default=300.0,
        metavar="SECONDS",
        help="garbage-collect map entries of removed cgroups this often (0: never; default 300)",
    )
    a.add_argument(
        "--nri",
        action="store_true",
        help="also be containerd's (or CRI-O's) NRI plugin: pod annotations under the admin "
        "policy (docs/NRI.md); with NRI_PLUGIN_SOCKET set (NRI launched us), the plugin only",
    )
    a.add_argument(
        "--nri-socket",
        default="/var/run/nri/nri.sock",
        metavar="PATH",
        help="the runtime's NRI socket (default /var/run/nri/nri.sock)",
    )
    a.add_argument(
        "--nri-index",
        default="10",
        metavar="NN",
        help="the plugin's two-digit index: NRI calls plugins in ascending order (default 10)",
    )
    a.set_defaults(func=cmd_agent)
    asub = a.add_subparsers(dest="agent_command", metavar="{status,metrics}")
    # SUPPRESS: `agent --socket X status` keeps X (a subparser's default would overwrite it)
    s = asub.add_parser("status", help="uptime, requests and latencies, programs, cgroups held")
    _socket_flag(s, argparse.SUPPRESS)
    s.add_argument("--json", action="store_true", help="the status document as JSON")
    s.set_defaults(func=cmd_status)
    m = asub.add_parser("metrics", help="print the Prometheus metrics (text format)")
    _socket_flag(m, argparse.SUPPRESS)
    m.set_defaults(func=cmd_metrics)
    h = sub.add_parser(
        "hook-path",
        help="print the thin OCI hook's path (for hooks.d and config.json)",
        description="Print the absolute path of the thin hook executable shipped with this "
        "installation: it forwards the OCI state to `pelagos-bpf agent` and, with no agent, "
        "runs `pelagos-bpf oci-hook` in-process. See docs/AGENT.md.",
        epilog=EXIT_CODES_HELP,
        formatter_class=fmt,
    )
    h.set_defaults(func=cmd_hook_path)
