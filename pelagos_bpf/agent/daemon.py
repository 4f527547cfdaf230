"""What a root daemon owes its host: a private socket, enough fds, and systemd's handshakes.

Why by hand: sd_notify is one datagram and socket activation two environment variables;
libsystemd (or a binding) would be a dependency for ~30 lines (the protocol: sd_notify(3),
sd_listen_fds(3)).
"""

from __future__ import annotations

import contextlib
import errno
import functools
import logging
import os
import resource
import socket
import stat
import time

log = logging.getLogger("pelagos_bpf.agent")

SD_LISTEN_FDS_START = 3
PR_SET_PDEATHSIG = 1
NOFILE_WANTED = 65536


class DaemonError(Exception):
    """The agent cannot start (socket dir unsafe, another agent listening, ...)."""


def raise_nofile(wanted: int = NOFILE_WANTED) -> int:
    """Raise the soft RLIMIT_NOFILE towards `wanted` (up to the hard limit); returns it.
    Every open connection costs an fd, and 1,000 clients may connect at once."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = target
    return int(soft)


def sd_notify(message: str) -> bool:
    """Send one state datagram to systemd ($NOTIFY_SOCKET; "@" = abstract). False when not
    under systemd (no variable) or the send failed (logged)."""
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if not addr:
        return False
    if addr.startswith("@"):
        addr = "\0" + addr[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(message.encode())
    except OSError as e:
        log.warning("sd_notify %r to %s failed: %s", message, addr, e)
        return False
    return True


def activated_socket() -> socket.socket | None:
    """The listening socket systemd passed (socket activation: LISTEN_PID is us, LISTEN_FDS
    is 1), or None. The variables are removed so children do not inherit them."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    n = os.environ.pop("LISTEN_FDS", "")
    os.environ.pop("LISTEN_PID", None)
    os.environ.pop("LISTEN_FDNAMES", None)
    if n != "1":
        raise DaemonError(f"LISTEN_FDS={n!r}: the agent takes exactly one socket")
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise DaemonError("the socket systemd passed is not a unix stream socket")
    os.set_inheritable(sock.fileno(), False)
    return sock


def _check_dir(d: str) -> None:
    """The socket's directory: created 0700 if missing; else it must be root's and writable
    by nobody else (a directory others could write lets them replace the socket)."""
    try:
        os.mkdir(d, 0o700)
        log.info("created %s (mode 0700)", d)
        return
    except FileExistsError:
        pass
    st = os.lstat(d)
    if not stat.S_ISDIR(st.st_mode):
        raise DaemonError(f"{d} is not a directory")
    if st.st_uid != 0 or st.st_mode & 0o022:
        raise DaemonError(
            f"{d} is owned by uid {st.st_uid} with mode {stat.S_IMODE(st.st_mode):04o}: the "
            "agent's socket directory must be root's and writable by root only"
        )


def bind_socket(path: str, backlog: int) -> socket.socket:
    """A listening unix socket at `path`, mode 0600. A socket file nobody listens on (an
    agent killed before it could remove it) is replaced; one somebody listens on is not."""
    d = os.path.dirname(os.path.abspath(path)) or "/"
    os.makedirs(os.path.dirname(d) or "/", exist_ok=True)
    _check_dir(d)
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise DaemonError(f"{path} exists and is not a socket: not replacing it")
        if _listened_on(path):
            raise DaemonError(f"another agent is listening on {path}")
        os.unlink(path)
        log.info("removed the stale socket %s (nobody listened on it)", path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o177)  # the socket is created 0600: no window with a wider mode
    try:
        sock.bind(path)
    except OSError as e:
        sock.close()
        raise DaemonError(f"cannot bind {path}: {e.strerror}") from e
    finally:
        os.umask(old)
    sock.listen(backlog)
    return sock


def _listened_on(path: str, tries: int = 10, pause: float = 0.05) -> bool:
    """Whether a process listens on the socket file: a connect that succeeds `tries` times,
    `pause` apart. Why more than once: the serving processes of an agent just SIGKILLed die a
    moment after it (PR_SET_PDEATHSIG), and one may still hold the socket when a restart
    looks."""
    for i in range(tries):
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            return False
        finally:
            probe.close()
        if i + 1 < tries:
            time.sleep(pause)
    return True


def set_pdeathsig(sig: int) -> None:
    """prctl(PR_SET_PDEATHSIG, sig): this process gets `sig` when its parent dies."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"prctl(PR_SET_PDEATHSIG): {os.strerror(err)}")


def peer_uid_pid(sock: socket.socket) -> tuple[int, int]:
    """(uid, pid) of the peer, from SO_PEERCRED (pid 0: in a pid namespace we cannot see)."""
    import struct

    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, _gid = struct.unpack("3i", raw)
    return uid, pid


NAMESPACES = ("pid", "mnt", "cgroup")


@functools.cache
def _own_namespaces() -> tuple[str, ...]:
    return tuple(os.readlink(f"/proc/self/ns/{ns}") for ns in NAMESPACES)


def same_namespaces(pid: int) -> str | None:
    """None when `pid` shares our pid, mount and cgroup namespaces; else which one differs.

    Why: a hook request names a pid, a bundle path and a cgroup as the RUNTIME sees them; an
    agent in other namespaces would act on another process or directory."""
    if pid <= 0:
        return "pid (the client is in a pid namespace the agent cannot see)"
    for ns, own in zip(NAMESPACES, _own_namespaces(), strict=True):
        try:
            if os.readlink(f"/proc/{pid}/ns/{ns}") != own:
                return ns
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ESRCH):
                return None  # the client is gone: its request is moot, not refused
            raise
    return None


def release_memory() -> None:
    """Hand freed heap pages back to the kernel (glibc malloc_trim). A status or a metrics
    scrape of 10,000 cgroups builds megabytes of short-lived objects; without this the agent's
    RSS stays at that high-water mark for its whole life. A no-op where there is no glibc."""
    import ctypes

    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        return
