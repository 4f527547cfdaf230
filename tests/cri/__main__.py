"""Shell front end of the CRI test client (inside the containerd guest, as root).

    python -m tests.cri run-pod [--annotation K=V ...] [--namespace NS] [--name N]
                                [--host-network] -- CMD...
        prints one JSON line {"pod": ID, "container": ID, "pid": PID}
    python -m tests.cri exec CONTAINER -- CMD...   # its stdout/stderr, exits with its status
    python -m tests.cri rm POD                     # stop and remove the pod
    python -m tests.cri ready                      # wait until the CRI knows the image

A CRI error goes to stderr as `cri: <Method>: <CODE>: <runtime's message>`, exit status 1.
Socket: --socket, else $PELAGOS_CRI_SOCKET, else /run/containerd/containerd.sock.
"""

from __future__ import annotations

import argparse
import sys

from .client import Client, CriError

DEFAULT_COMMAND = ("sleep", "inf")


def _pairs(items: list[str] | None, what: str) -> dict[str, str]:
    """K=V strings (repeatable flags) as a dict; the value may itself contain '='."""
    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"cri: {what} {item!r} is not KEY=VALUE")
        out[key] = value
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m tests.cri",
        description=__doc__.split("\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n", 1)[1],
    )
    ap.add_argument("--socket", help="the runtime's CRI socket")
    sub = ap.add_subparsers(dest="what", required=True)
    run = sub.add_parser("run-pod", help="run a one-container pod; print its ids and pid")
    run.add_argument("--annotation", action="append", metavar="K=V", help="pod annotation")
    run.add_argument("--container-annotation", action="append", metavar="K=V")
    run.add_argument("--namespace", default="default", help="the pod's Kubernetes namespace")
    run.add_argument("--name", help="the pod's name (default pelagos-<random>)")
    run.add_argument("--container-name", default="main")
    run.add_argument("--host-network", action="store_true", help="the node's network namespace")
    run.add_argument("--sysctl", action="append", metavar="K=V", help="a pod sysctl")
    run.add_argument("--image", help="container image (default $PELAGOS_CRI_IMAGE)")
    run.add_argument("--cgroup-parent", help="default /pelagos-cri/pod<uid>")
    run.add_argument("command", nargs="*", help=f"after --; default: {' '.join(DEFAULT_COMMAND)}")
    ex = sub.add_parser("exec", help="run a command in a container (ExecSync)")
    ex.add_argument("--timeout", type=int, default=60, help="seconds (0: none)")
    ex.add_argument("container")
    ex.add_argument("command", nargs="+")
    rm = sub.add_parser("rm", help="stop and remove a pod")
    rm.add_argument("pod", nargs="+")
    rd = sub.add_parser("ready", help="wait until the CRI answers and knows the image")
    rd.add_argument("--image", help="default $PELAGOS_CRI_IMAGE")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        with Client(args.socket) as c:
            if args.what == "run-pod":
                per_container = _pairs(args.container_annotation, "--container-annotation")
                pod = c.run_pod(
                    args.command or DEFAULT_COMMAND,
                    annotations=_pairs(args.annotation, "--annotation"),
                    container_annotations=per_container,
                    namespace=args.namespace,
                    name=args.name,
                    container_name=args.container_name,
                    host_network=args.host_network,
                    sysctls=_pairs(args.sysctl, "--sysctl"),
                    image=args.image,
                    cgroup_parent=args.cgroup_parent,
                )
                print(pod.json(), flush=True)
                return 0
            if args.what == "exec":
                r = c.exec_sync(args.container, args.command, timeout=args.timeout)
                sys.stdout.buffer.write(r.stdout)
                sys.stdout.flush()
                sys.stderr.buffer.write(r.stderr)
                sys.stderr.flush()
                return r.exit_code
            if args.what == "rm":
                for pod_id in args.pod:
                    c.remove_pod(pod_id)
                return 0
            c.wait_ready(args.image or c.default_image())
            return 0
    except CriError as e:
        print(f"cri: {e}", file=sys.stderr)
        for note in getattr(e, "__notes__", []):
            print(f"cri: {note}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
