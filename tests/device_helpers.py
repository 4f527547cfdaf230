"""Probe device access from a process inside a cgroup (real kernel, root).

A probe is (kind, major, minor, op) with op "r" (open O_RDONLY), "w" (O_WRONLY), "rw" (O_RDWR)
or "m" (mknod). The answer is True (allowed: the open worked, or failed with ENXIO/ENODEV
because no driver exists) or False (EPERM: the cgroup denied it). One forked child per call
joins the cgroup and runs every probe, reporting over a pipe, so probing stays fast.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

Probe = tuple[str, int, int, str]
OPS = ("r", "w", "rw", "m")
_FLAGS = {"r": os.O_RDONLY, "w": os.O_WRONLY, "rw": os.O_RDWR}
ALLOWED_ERRNOS = {errno.ENXIO, errno.ENODEV}
# Devices probed by default: unassigned majors (no driver: ENXIO after the cgroup check) plus
# the harmless real char devices null, zero, full and urandom.
FREE_CHAR = (240, 241, 242, 243, 244)
FREE_BLOCK = tuple(range(240, 253))
REAL_CHAR = ((1, 3), (1, 5), (1, 7), (1, 9))


def _node_name(kind: str, major: int, minor: int) -> str:
    return f"{kind}{major}_{minor}"


@contextmanager
def node_dir(devices: Iterable[tuple[str, int, int]]) -> Iterator[Path]:
    """A private tmpdir holding device nodes for the given (kind, major, minor); removed after."""
    d = Path(tempfile.mkdtemp(prefix="pelagos-devtest-"))
    try:
        for kind, major, minor in set(devices):
            mode = (stat.S_IFCHR if kind == "c" else stat.S_IFBLK) | 0o600
            os.mknod(d / _node_name(kind, major, minor), mode, os.makedev(major, minor))
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _probe_one(d: Path, probe: Probe, n: int) -> str:
    kind, major, minor, op = probe
    try:
        if op == "m":
            mode = (stat.S_IFCHR if kind == "c" else stat.S_IFBLK) | 0o600
            p = d / f"mk{n}"
            os.mknod(p, mode, os.makedev(major, minor))
            os.unlink(p)
        else:
            os.close(os.open(d / _node_name(kind, major, minor), _FLAGS[op] | os.O_NONBLOCK))
        return "ok"
    except OSError as e:
        return errno.errorcode.get(e.errno or 0, str(e.errno))


def _child(cg_path: Path, d: Path, probes: list[Probe], wfd: int) -> None:
    try:
        with open(cg_path / "cgroup.procs", "w") as f:
            f.write(str(os.getpid()))
        out = [_probe_one(d, p, i) for i, p in enumerate(probes)]
        os.write(wfd, json.dumps(out).encode())
    except BaseException as e:  # report instead of dying silently
        os.write(wfd, json.dumps({"error": repr(e)}).encode())
    finally:
        os._exit(0)


def probe_raw(cg_path: Path, probes: list[Probe], d: Path) -> list[str]:
    """Run probes inside the cgroup; errno names ("ok", "EPERM", "ENXIO", ...) per probe."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rfd)
        _child(cg_path, d, probes, wfd)
    os.close(wfd)
    chunks = []
    while chunk := os.read(rfd, 1 << 16):
        chunks.append(chunk)
    os.close(rfd)
    os.waitpid(pid, 0)
    res = json.loads(b"".join(chunks))
    if isinstance(res, dict):
        raise RuntimeError(f"probe child failed: {res['error']}")
    return res


def verdict(raw: str, probe: Probe) -> bool:
    if raw == "ok" or raw in {errno.errorcode[e] for e in ALLOWED_ERRNOS}:
        return True
    if raw == "EPERM":
        return False
    raise AssertionError(f"probe {probe} gave unexpected {raw}")


def probe(cg_path: Path, probes: list[Probe]) -> list[bool]:
    """True (allowed) / False (EPERM) per probe, from a child inside cg_path."""
    with node_dir((k, ma, mi) for k, ma, mi, _ in probes) as d:
        raw = probe_raw(cg_path, probes, d)
    return [verdict(r, p) for r, p in zip(raw, probes, strict=True)]


def grid(devices: Iterable[tuple[str, int, int]]) -> list[Probe]:
    """Every op on every device."""
    return [(k, ma, mi, op) for k, ma, mi in devices for op in OPS]


def progs_using_map(map_id: int) -> list[int]:
    """Ids of every loaded program (any process) that uses this map (bpftool)."""
    out = subprocess.run(
        ["bpftool", "-j", "prog", "show"], check=True, capture_output=True, text=True
    ).stdout
    return [p["id"] for p in json.loads(out or "[]") if map_id in p.get("map_ids", [])]


def bpf_fds() -> dict[str, int]:
    """This process's open BPF objects by kind ("bpf-prog", "bpf-map", ...)."""
    out: dict[str, int] = {}
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith("anon_inode:bpf"):
            kind = target.removeprefix("anon_inode:")
            out[kind] = out.get(kind, 0) + 1
    return out


# ---------------------------------------------------------------- hypothesis strategies

from hypothesis import strategies as st  # noqa: E402

from pelagos_bpf.config import CgroupDeviceRule  # noqa: E402

PROBE_MAJORS = (240, 241)
PROBE_MINORS = (0, 1)
RULE_MAJORS = (-1, 240, 241, 242)
RULE_MINORS = (-1, 0, 1, 2)
PROBE_DEVICES = (
    *tuple((k, ma, mi) for k in "bc" for ma in PROBE_MAJORS for mi in PROBE_MINORS),
    ("c", 1, 3),
)

accesses = st.lists(st.sampled_from("rwm"), min_size=1, max_size=3, unique=True).map("".join)
rules_st = st.lists(
    st.builds(
        CgroupDeviceRule,
        allow=st.booleans(),
        kind=st.sampled_from("abc"),
        major=st.sampled_from((*RULE_MAJORS, 1)),
        minor=st.sampled_from((*RULE_MINORS, 3)),
        access=accesses,
    ),
    min_size=1,
    max_size=12,
)
