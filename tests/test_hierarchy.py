"""parse_mountinfo / choose_root on sample mountinfo texts, and discover() on this host."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from pelagos_bpf import hierarchy
from pelagos_bpf.errors import CgroupError
from pelagos_bpf.hierarchy import ROOT_ENV, choose_root, discover, parse_mountinfo

PURE_V2 = """\
22 1 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw
25 21 0:23 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:4 - cgroup2 cgroup2 rw,nsdelegate
"""

HYBRID = """\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
"""

ODD = r"""
50 1 0:40 / /mnt/my\040cgroup rw - cgroup2 cgroup2 rw
51 1 0:41 / /srv/cg2/deeper/path rw shared:5 master:2 - cgroup2 none rw
"""


def test_pure_v2() -> None:
    h = choose_root(parse_mountinfo(PURE_V2))
    assert (h.root, h.mode) == (Path("/sys/fs/cgroup"), "unified")


def test_hybrid_prefers_unified() -> None:
    mounts = parse_mountinfo(HYBRID)
    assert ("/sys/fs/cgroup/cpu", "cgroup") in mounts
    h = choose_root(mounts)
    assert (h.root, h.mode) == (Path("/sys/fs/cgroup/unified"), "hybrid")


def test_escaped_mount_points_and_optional_fields() -> None:
    mounts = parse_mountinfo(ODD)
    assert ("/mnt/my cgroup", "cgroup2") in mounts
    assert ("/srv/cg2/deeper/path", "cgroup2") in mounts
    h = choose_root(mounts)
    assert h.root == Path("/mnt/my cgroup")  # shortest path
    assert h.mode == "unified"


def test_no_cgroup2_is_an_error() -> None:
    with pytest.raises(CgroupError, match="no cgroup2"):
        choose_root(parse_mountinfo(HYBRID.replace("cgroup2 cgroup2", "tmpfs tmpfs")))


def test_discover_explicit_root_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(CgroupError, match="not a cgroup v2"):
        discover(tmp_path)
    (tmp_path / "cgroup.procs").write_text("")
    assert discover(tmp_path).mode == "explicit"
    monkeypatch.setenv(ROOT_ENV, str(tmp_path))
    assert discover().root == tmp_path


def test_discover_this_host(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ROOT_ENV, raising=False)
    h = discover()
    assert (h.root / "cgroup.procs").exists()
    text = Path("/proc/self/mountinfo").read_text()
    assert h.mode == ("hybrid" if " - cgroup cgroup " in text else "unified")


def test_errors_carry_an_errno(tmp_path: Path) -> None:
    with pytest.raises(CgroupError) as e:
        choose_root(parse_mountinfo(HYBRID.replace("cgroup2 cgroup2", "tmpfs tmpfs")))
    assert e.value.errno == errno.ENOENT
    with pytest.raises(CgroupError) as e:
        discover(tmp_path)
    assert e.value.errno == errno.ENOENT


@pytest.fixture
def fake_mountinfo(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """discover() reads this file instead of /proc/self/mountinfo; cache cleared around."""
    f = tmp_path / "mountinfo"
    f.write_text(PURE_V2)
    monkeypatch.setattr(hierarchy, "MOUNTINFO", str(f))
    monkeypatch.delenv(ROOT_ENV, raising=False)
    hierarchy.clear_cache()
    yield f
    hierarchy.clear_cache()


def test_discovery_is_cached_until_cleared(fake_mountinfo: Path) -> None:
    assert discover().root == Path("/sys/fs/cgroup")
    fake_mountinfo.write_text(HYBRID)
    assert discover().root == Path("/sys/fs/cgroup")  # cached: mountinfo not read again
    hierarchy.clear_cache()
    assert discover().root == Path("/sys/fs/cgroup/unified")


def test_cache_honours_explicit_root_and_env(
    fake_mountinfo: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert discover().mode == "unified"
    explicit = tmp_path / "cg"
    explicit.mkdir()
    (explicit / "cgroup.procs").write_text("")
    assert discover(explicit) == hierarchy.Hierarchy(explicit, "explicit")
    monkeypatch.setenv(ROOT_ENV, str(explicit))
    assert discover().root == explicit
    monkeypatch.delenv(ROOT_ENV)
    assert discover().root == Path("/sys/fs/cgroup")


def test_failures_are_not_cached(fake_mountinfo: Path, tmp_path: Path) -> None:
    with pytest.raises(CgroupError):
        discover(tmp_path)
    (tmp_path / "cgroup.procs").write_text("")
    assert discover(tmp_path).root == tmp_path


def test_forked_child_discovers_again(fake_mountinfo: Path) -> None:
    assert discover().mode == "unified"
    fake_mountinfo.write_text(HYBRID)
    pid = os.fork()
    if pid == 0:  # the child has another pid: its key misses, it reads the new text
        os._exit(0 if discover().root == Path("/sys/fs/cgroup/unified") else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert discover().root == Path("/sys/fs/cgroup")  # the parent keeps its cached answer
