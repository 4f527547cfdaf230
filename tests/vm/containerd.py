"""A containerd node in the QEMU guest: fetch containerd on the host, run it in the guest.

    python -m tests.vm.run --kernel 6.12 --node containerd --cmd CMD    # host: boot a node
    python -m tests.vm.containerd restart                               # guest: restart it
    python -m tests.vm.containerd wait-plugin pelagos-bpf               # guest: NRI registered

Why sid's containerd 2.1.9 (not trixie's 1.7.24): 2.x is the line Kubernetes nodes move to,
it has NRI on by default (PR #9744), so the guest tests the configuration operators actually
get, and its CRI is v1 only. It runs on bookworm's libc; bookworm's runc 1.1.5 stays (newer
suites' runc needs glibc 2.38). The .deb comes through a private apt configuration for sid
(`apt.py`) and is unpacked with `dpkg -x` into the VM cache, flock'd like the kernels; the
guest sees it through the read-only host root.

In the guest (`start`): containerd's root and state live on tmpfs (overlayfs snapshots cannot
sit on the guest's overlay root), pods get a network namespace from Debian's bridge +
host-local CNI plugins (a veth whose pod end is eth0: a test can put an HTB qdisc on it and
read class counters), and the two local images (`images.py`) are imported with `ctr`. A
restart keeps the pods running (their shims are separate processes), as on a real node.
Stdlib only, like the rest of tests.vm.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from . import images, kernels
from .apt import Apt, AptError, locked

PACKAGE = "containerd"
SUITE = "sid"
RUNC = Path("/usr/sbin/runc")  # bookworm's 1.1.5 from the host root
CNI_BIN = Path("/usr/lib/cni")  # containernetworking-plugins (installed with podman)

# Guest paths: containerd's defaults, with root on a tmpfs of its own.
SOCKET = Path("/run/containerd/containerd.sock")
ROOT = Path("/var/lib/containerd")
STATE = Path("/run/containerd")
NRI_SOCKET = Path("/var/run/nri/nri.sock")
NODE_DIR = Path("/run/pelagos-node")  # config, CNI config, pid file, node.json
GUEST_OUT = Path("/run/pelagos-vm")  # the runner's writable share: the log goes home with it
NAMESPACE = "k8s.io"  # the CRI plugin's containerd namespace

BRIDGE = "pelagos0"
SUBNET = "10.88.0.0/16"
GATEWAY = "10.88.0.1"

READY_TIMEOUT = 120.0  # TCG under load: containerd's start has been seen to take ~10 s
STOP_TIMEOUT = 30.0
Log = Callable[[str], object]


class NodeError(RuntimeError):
    """containerd could not be fetched, configured or started (the message says why)."""


@dataclass(frozen=True)
class Node:
    """What the host hands the guest: the unpacked containerd and the images tarball."""

    tree: Path
    images: Path

    @property
    def bin(self) -> Path:
        return self.tree / "usr" / "bin"


# ---- host side: fetch and cache ----


def cache_dir() -> Path:
    return kernels.cache_dir() / "containerd"


def ensure_node(log: Log = print) -> Node:
    """containerd unpacked and the images built, both cached between runs."""
    needed = [RUNC, *(CNI_BIN / p for p in ("bridge", "host-local", "loopback"))]
    missing = [str(p) for p in needed if not os.access(p, os.X_OK)]
    if missing:  # the guest runs the host's: a pod would fail at RunPodSandbox
        raise NodeError(f"missing {missing}: apt-get install runc containernetworking-plugins")
    cache = cache_dir()
    return Node(tree=ensure_containerd(cache, log), images=images.ensure_archive(cache, log))


def ensure_containerd(cache: Path, log: Log = print) -> Path:
    """`<cache>/containerd_<version>/`, the `dpkg -x` tree of sid's containerd package."""
    apt = Apt(SUITE, kernels.cache_dir() / ".apt")
    remembered = cache / ".resolved"
    try:
        apt.ensure_lists(log)
        version = apt.version(PACKAGE)
        if version is None:
            raise AptError(f"{apt} has no {PACKAGE}")
    except AptError as e:  # offline: the version fetched last time
        version = remembered.read_text().strip() if remembered.exists() else ""
        if not (version and (cache / f"{PACKAGE}_{version}" / ".complete").exists()):
            raise NodeError(f"{e}; and no cached {PACKAGE} in {cache}") from None
        log(f"vm: {e}; using the cached {PACKAGE} {version}")
    dest = cache / f"{PACKAGE}_{version}"
    with locked(cache / f".{PACKAGE}.lock"):
        if not (dest / ".complete").exists():
            t0 = time.monotonic()
            _fetch(apt, dest)
            log(f"vm: fetched {PACKAGE} {version} ({apt}): {time.monotonic() - t0:.1f}s")
        remembered.write_text(version + "\n")
    return dest


def _fetch(apt: Apt, dest: Path) -> None:
    with tempfile.TemporaryDirectory(prefix=".fetch-", dir=dest.parent) as tmp:
        t = Path(tmp)
        try:
            (deb,) = apt.download([PACKAGE], t)
            subprocess.run(["dpkg", "-x", str(deb), str(t / "tree")], check=True, timeout=600)
        except (AptError, OSError, subprocess.SubprocessError) as e:
            raise NodeError(f"cannot fetch {PACKAGE} from {apt}: {e}") from None
        missing = [b for b in ("containerd", "containerd-shim-runc-v2", "ctr")
                   if not (t / "tree" / "usr" / "bin" / b).is_file()]  # fmt: skip
        if missing:
            raise NodeError(f"{deb.name} lacks {missing}")
        (t / "tree" / ".complete").write_text(deb.name + "\n")
        if dest.exists():
            shutil.rmtree(dest)
        (t / "tree").rename(dest)


def job_lines(node: Node, setup: str | None) -> list[str]:
    """Shell lines for the guest's job: start the node, then the user's setup (e.g. an agent),
    before the command. Exports tell tests (and ctr) where the node is."""
    env = {
        "PELAGOS_VM_NODE": "containerd",
        "CONTAINERD_ADDRESS": str(SOCKET),
        "CONTAINERD_NAMESPACE": NAMESPACE,
        "PELAGOS_CRI_IMAGE": images.BUSYBOX_IMAGE,
    }
    lines = [f"export {k}={shlex.quote(v)}" for k, v in env.items()]
    lines.append(f'export PATH="$PATH":{shlex.quote(str(node.bin))}')
    start = ["python", "-m", "tests.vm.containerd", "start"]
    lines.append(shlex.join([*start, "--tree", str(node.tree), "--images", str(node.images)]))
    if setup:
        lines.append(f"/bin/sh -c {shlex.quote(setup)}")
    return lines


# ---- configuration (pure) ----


def config_toml(
    *,
    systemd_cgroup: bool = False,
    log_level: str = "info",
    nri_registration_timeout: str = "5s",
    nri_request_timeout: str = "2s",
) -> str:
    """containerd 2.x config (version 3): CRI with runc, pod annotations `io.pelagos-bpf.*`
    passed to config.json, NRI on at its default socket, the local pause image, overlayfs.

    AppArmor is off: the guest has no apparmor_parser and our tests do not need it.
    """
    sd = "true" if systemd_cgroup else "false"
    return f"""\
version = 3
root = '{ROOT}'
state = '{STATE}'

[grpc]
  address = '{SOCKET}'

[debug]
  level = '{log_level}'

[plugins.'io.containerd.cri.v1.images']
  snapshotter = 'overlayfs'
  [plugins.'io.containerd.cri.v1.images'.pinned_images]
    sandbox = '{images.PAUSE_IMAGE}'

[plugins.'io.containerd.cri.v1.runtime']
  disable_apparmor = true
  [plugins.'io.containerd.cri.v1.runtime'.containerd]
    default_runtime_name = 'runc'
    [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
      runtime_type = 'io.containerd.runc.v2'
      pod_annotations = ['io.pelagos-bpf.*']
      container_annotations = ['io.pelagos-bpf.*']
      [plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
        BinaryName = '{RUNC}'
        SystemdCgroup = {sd}
  [plugins.'io.containerd.cri.v1.runtime'.cni]
    bin_dirs = ['{CNI_BIN}']
    conf_dir = '{NODE_DIR / "cni"}'

[plugins.'io.containerd.nri.v1.nri']
  disable = false
  disable_connections = false
  socket_path = '{NRI_SOCKET}'
  plugin_path = '/opt/nri/plugins'
  plugin_config_path = '/etc/nri/conf.d'
  plugin_registration_timeout = '{nri_registration_timeout}'
  plugin_request_timeout = '{nri_request_timeout}'
"""


def cni_conflist() -> str:
    """One bridge network: each pod gets a veth (eth0 inside) and an address from host-local.

    No ipMasq (it needs iptables) and no portmap: pods talk to the gateway, which is all a
    classification test needs (packets leave through the pod's eth0)."""
    bridge = {
        "type": "bridge",
        "bridge": BRIDGE,
        "isGateway": True,
        "ipMasq": False,
        "ipam": {
            "type": "host-local",
            "ranges": [[{"subnet": SUBNET, "gateway": GATEWAY}]],
            "routes": [{"dst": "0.0.0.0/0"}],
        },
    }
    conf = {"cniVersion": "1.0.0", "name": "pelagos", "plugins": [bridge]}
    return json.dumps(conf, indent=2) + "\n"


# ---- guest side: start, stop, restart ----


def log_path() -> Path:
    return (GUEST_OUT if GUEST_OUT.is_dir() else NODE_DIR) / "containerd.log"


def _pid_file() -> Path:
    return NODE_DIR / "containerd.pid"


def running_pid() -> int | None:
    """The pid of the containerd this module started, if it is still alive."""
    try:
        pid = int(_pid_file().read_text())
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError):
        return None
    return pid


def _prepare(node: Node, nri_registration_timeout: str = "5s") -> None:
    NODE_DIR.mkdir(parents=True, exist_ok=True)
    (NODE_DIR / "node.json").write_text(json.dumps({k: str(v) for k, v in asdict(node).items()}))
    config = config_toml(nri_registration_timeout=nri_registration_timeout)
    (NODE_DIR / "config.toml").write_text(config)
    (NODE_DIR / "cni").mkdir(exist_ok=True)
    (NODE_DIR / "cni" / "10-pelagos.conflist").write_text(cni_conflist())
    ROOT.mkdir(parents=True, exist_ok=True)
    if not os.path.ismount(ROOT):
        subprocess.run(["mount", "-t", "tmpfs", "-o", "mode=711", "tmpfs", str(ROOT)], check=True)


def _spawn(node: Node) -> int:
    env = {
        "PATH": f"{node.bin}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "HOME": "/root",
    }
    with log_path().open("ab") as log:
        p = subprocess.Popen(
            [str(node.bin / "containerd"), "--config", str(NODE_DIR / "config.toml")],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # a restart's stop must not take the caller with it
        )
    _pid_file().write_text(f"{p.pid}\n")
    return p.pid


def _wait_socket(pid: int, deadline: float) -> None:
    """Until containerd accepts connections on its socket (it listens once its plugins load)."""
    while True:
        try:
            with socket.socket(socket.AF_UNIX) as s:
                s.connect(str(SOCKET))
            return
        except OSError:
            pass
        if running_pid() != pid:
            raise NodeError(f"containerd exited during start-up: see {log_path()}")
        if time.monotonic() > deadline:
            raise NodeError(f"containerd did not listen on {SOCKET}: see {log_path()}")
        time.sleep(0.05)


def _ctr(node: Node, *args: str) -> str:
    argv = [str(node.bin / "ctr"), "--address", str(SOCKET), "-n", NAMESPACE, *args]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=False)
    if r.returncode != 0:
        raise NodeError(f"{shlex.join(argv)} failed: {(r.stderr or r.stdout).strip()}")
    return r.stdout


def start(node: Node, log: Log = print, nri_registration_timeout: str = "5s") -> int:
    """Start containerd (unless running) and import the images; return its pid."""
    t0 = time.monotonic()
    pid = running_pid()
    if pid is None:
        _prepare(node, nri_registration_timeout)
        pid = _spawn(node)
    _wait_socket(pid, t0 + READY_TIMEOUT)
    t1 = time.monotonic()
    imported = NODE_DIR / "images.imported"
    if not imported.exists():
        _ctr(node, "images", "import", "--snapshotter", "overlayfs", str(node.images))
        imported.write_text(str(node.images) + "\n")
    t2 = time.monotonic()
    log(f"node: containerd pid {pid} listening after {t1 - t0:.2f}s, images {t2 - t1:.2f}s")
    return pid


def stop(timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM the containerd we started and wait for it to exit (SIGKILL after `timeout`).
    Pods keep running: their shims are processes of their own."""
    pid = running_pid()
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            deadline += timeout
        time.sleep(0.05)
    _pid_file().unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    """True until the process is gone (a zombie of ours is reaped here, counts as gone)."""
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)
        if done:
            return False
    except ChildProcessError:  # not our child (started by another `start`)
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, IndexError):
        return False
    return state != "Z"


def restart(log: Log = print, nri_registration_timeout: str = "5s") -> int:
    """Stop containerd and start it again with the node of the first start; return its pid.
    The pods keep running; an NRI plugin sees its connection close and must reconnect."""
    node = saved_node()
    stop()
    return start(node, log, nri_registration_timeout)


def log_offset() -> int:
    """The containerd log's current size: pass it to wait_plugin to see only later lines."""
    try:
        return log_path().stat().st_size
    except FileNotFoundError:
        return 0


def wait_plugin(name: str, since: int = 0, timeout: float = READY_TIMEOUT) -> None:
    """Until containerd logs that NRI plugin `name` (with or without its index, "10-name")
    connected and synchronized, in the log after byte `since`."""
    pat = re.compile(
        rb'plugin \\?"(\d+-)?' + re.escape(name.encode()) + rb'\\?" connected and sync'
    )
    deadline = time.monotonic() + timeout
    while True:
        try:
            with log_path().open("rb") as f:
                f.seek(since)
                if pat.search(f.read()):
                    return
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            raise NodeError(
                f"NRI plugin {name!r} did not register in {timeout:.0f}s: see {log_path()}"
            )
        time.sleep(0.1)


def saved_node() -> Node:
    """The node the guest's first `start` recorded (restart needs no arguments)."""
    try:
        d = json.loads((NODE_DIR / "node.json").read_text())
    except FileNotFoundError:
        raise NodeError("no containerd node was started in this guest") from None
    return Node(tree=Path(d["tree"]), images=Path(d["images"]))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tests.vm.containerd", description=__doc__)
    sub = ap.add_subparsers(dest="what", required=True)
    st = sub.add_parser("start", help="start containerd and import the images (guest)")
    st.add_argument("--tree", type=Path, help="unpacked containerd (default: the last start's)")
    st.add_argument("--images", type=Path, help="images tarball (default: the last start's)")
    sub.add_parser("stop", help="stop the containerd started here; pods keep running")
    sub.add_parser("restart", help="stop, then start with the same node")
    wp = sub.add_parser("wait-plugin", help="wait until an NRI plugin has registered")
    wp.add_argument("name", help="the plugin's name (e.g. pelagos-bpf), index optional")
    wp.add_argument("--timeout", type=float, default=READY_TIMEOUT)
    args = ap.parse_args(argv)
    try:
        if args.what == "start":
            node = Node(args.tree, args.images) if args.tree and args.images else saved_node()
            start(node)
        elif args.what == "stop":
            stop()
        elif args.what == "restart":
            restart()
        else:
            wait_plugin(args.name, timeout=args.timeout)
    except (NodeError, OSError, subprocess.SubprocessError) as e:
        print(f"node: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
