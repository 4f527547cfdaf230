"""trust.py on real directories: who may own and write what the loader reads (root: chown)."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
import struct
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pelagos_bpf import trust
from pelagos_bpf.errors import BpfError

pytestmark = pytest.mark.root
NOBODY = 65534


@pytest.fixture
def base() -> Iterator[Path]:
    """A root-owned 0755 dir directly under the sticky /tmp, removed afterwards."""
    if os.geteuid() != 0:
        pytest.skip("needs root (chown)")
    d = Path(f"/tmp/pelagos-trust-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    d.mkdir(mode=0o755)
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _open(path: Path, **kw: bool) -> None:
    os.close(trust.open_trusted_dir(path, "cache dir", **kw))


def _refused(path: Path, fix: str, *, named: Path | None = None, **kw: bool) -> BpfError:
    with pytest.raises(BpfError) as ei:
        _open(path, **kw)
    assert ei.value.errno == errno.EPERM
    assert f"{named or path}: " in str(ei.value) and fix in str(ei.value)
    return ei.value


def test_root_owned_dir_under_sticky_tmp_is_trusted(base: Path) -> None:
    _open(base)  # /tmp is 1777 root: a sticky ancestor is fine


def test_world_and_group_writable_dirs_are_refused(base: Path) -> None:
    for mode in (0o777, 0o775, 0o757):
        os.chmod(base, mode)
        _refused(base, f"chmod go-w {base}")


def test_sticky_world_writable_leaf_is_refused_unless_allowed(base: Path) -> None:
    os.chmod(base, 0o1777)
    _refused(base, "chmod go-w")  # anyone could create the names we read
    _open(base, sticky_leaf_ok=True)  # pins: each entry's owner is checked instead


def test_dir_owned_by_another_user_is_refused(base: Path) -> None:
    d = base / "planted"
    d.mkdir(mode=0o755)
    os.chown(d, NOBODY, NOBODY)
    err = _refused(d, "remove it")
    assert "uid 65534" in str(err)


def test_untrusted_ancestor_is_refused(base: Path) -> None:
    (base / "a" / "b").mkdir(parents=True)
    os.chown(base / "a", NOBODY, NOBODY)
    _refused(base / "a" / "b", "remove it", named=base / "a")


def test_sticky_ancestor_allows_only_trusted_children(base: Path) -> None:
    sticky = base / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)
    good, bad = sticky / "root", sticky / "nobody"
    good.mkdir(mode=0o755)
    bad.mkdir(mode=0o755)
    os.chown(bad, NOBODY, NOBODY)
    _open(good)
    _refused(bad, "remove it")
    os.chmod(sticky, 0o777)  # not sticky: others could rename `good` away
    _refused(good, "chmod go-w", named=sticky)


def test_symlink_in_path_is_refused(base: Path) -> None:
    (base / "real").mkdir()
    (base / "link").symlink_to(base / "real")
    with pytest.raises(BpfError) as ei:
        _open(base / "link" / "x", create=True)
    assert "symlink" in str(ei.value) and f"{base}/link: " in str(ei.value)
    assert not (base / "real" / "x").exists()


def test_symlink_in_an_existing_path_is_refused(base: Path) -> None:
    (base / "real" / "x").mkdir(parents=True)
    (base / "link").symlink_to(base / "real")
    with pytest.raises(BpfError) as ei:
        _open(base / "link" / "x")
    assert "symlink" in str(ei.value) and f"{base}/link: " in str(ei.value)


def test_existing_dir_is_opened_once(base: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path: lstat per prefix, one open of the whole path (the fd walk opens every
    component); the fd is the dir's."""
    leaf = base / "a" / "b"
    leaf.mkdir(parents=True)
    opened: list[object] = []
    real_open = os.open

    def counting_open(path: object, *a: object, **kw: object) -> int:
        opened.append(path)
        return real_open(path, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(trust.os, "open", counting_open)
    fd = trust.open_trusted_dir(leaf, "cache dir")
    try:
        assert opened == [str(leaf)]
        assert os.fstat(fd).st_ino == leaf.stat().st_ino
    finally:
        os.close(fd)


def test_leaf_swapped_after_its_check_is_checked_again(
    base: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If the dir opened is not the one lstat checked (swapped in between), the fd walk runs
    and checks what is there now: a world-writable replacement is refused."""
    leaf = base / "leaf"
    leaf.mkdir(mode=0o755)
    evil = base / "evil"
    evil.mkdir()
    os.chmod(evil, 0o777)
    real_open = os.open
    swapped: list[bool] = []

    def swapping_open(path: object, *a: object, **kw: object) -> int:
        if path == str(leaf) and not swapped:
            swapped.append(True)
            os.rename(leaf, base / "old")
            os.rename(evil, leaf)
        return real_open(path, *a, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(trust.os, "open", swapping_open)
    _refused(leaf, f"chmod go-w {leaf}")
    assert swapped


def test_create_makes_0755_dirs_whatever_the_umask(base: Path) -> None:
    target = base / "a" / "b"
    with umask(0):
        _open(target, create=True)
    for d in (base / "a", target):
        st = d.stat()
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o755, 0)
    with umask(0o077):
        _open(base / "c", create=True)
    assert stat.S_IMODE((base / "c").stat().st_mode) == 0o755


def test_missing_dir_without_create_is_enoent(base: Path) -> None:
    with pytest.raises(BpfError) as ei:
        _open(base / "absent")
    assert ei.value.errno == errno.ENOENT


def _read(base: Path, name: str) -> bytes | None:
    fd = trust.open_trusted_dir(base, "cache dir")
    try:
        return trust.read_trusted_file(fd, name, str(base), "cache file")
    finally:
        os.close(fd)


def test_read_trusted_file_checks_the_opened_file(base: Path) -> None:
    (base / "ok").write_bytes(b"data")
    os.chmod(base / "ok", 0o644)
    assert _read(base, "ok") == b"data"
    assert _read(base, "absent") is None
    bad: dict[str, str] = {}
    (base / "ww").write_bytes(b"x")
    os.chmod(base / "ww", 0o666)
    bad["ww"] = "chmod go-w"
    (base / "theirs").write_bytes(b"x")
    os.chown(base / "theirs", NOBODY, NOBODY)
    bad["theirs"] = "uid 65534"
    (base / "link").symlink_to(base / "ok")
    bad["link"] = "symlink"
    (base / "dir").mkdir()
    bad["dir"] = "not a regular file"
    os.mkfifo(base / "fifo")  # must not block the reader
    bad["fifo"] = "not a regular file"
    for name, why in bad.items():
        with pytest.raises(BpfError) as ei:
            _read(base, name)
        assert f"{base}/{name}: " in str(ei.value) and why in str(ei.value), name


def test_read_trusted_file_refuses_huge_files(base: Path) -> None:
    with open(base / "big", "wb") as f:
        f.truncate(trust.MAX_FILE + 1)
    with pytest.raises(BpfError, match="too large"):
        _read(base, "big")


def test_write_trusted_file_is_atomic_and_0644(base: Path) -> None:
    fd = trust.open_trusted_dir(base, "cache dir")
    try:
        with umask(0):
            trust.write_trusted_file(fd, "f", b"one")
        with umask(0o077):
            trust.write_trusted_file(fd, "f", b"two")
    finally:
        os.close(fd)
    assert (base / "f").read_bytes() == b"two"
    assert stat.S_IMODE((base / "f").stat().st_mode) == 0o644
    assert os.listdir(base) == ["f"]  # no tmp files left


def test_unprivileged_user_trusts_root_and_itself_only(base: Path) -> None:
    """Read-only tools run unprivileged: their own files and root's count, nobody else's."""
    own, other = base / "own", base / "other"
    for d, uid in ((own, NOBODY), (other, NOBODY - 1)):
        d.mkdir(mode=0o755)
        os.chown(d, uid, uid)
    code = (
        "import sys; from pelagos_bpf import trust\n"
        "for p in sys.argv[1:]:\n"
        "    try:\n"
        "        trust.open_trusted_dir(p, 'cache dir'); print('ok')\n"
        "    except OSError as e:\n"
        "        print('refused' if 'untrusted' in str(e) else repr(e))\n"
    )
    as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    r = subprocess.run(
        [*as_nobody, sys.executable, "-c", code, str(base), str(own), str(other)],
        capture_output=True,
        text=True,
        check=True,
    )
    assert r.stdout.split() == ["ok", "ok", "refused"], r.stderr


# ---------------------------------------------------------------- tags (pure)

MOV_R0_1 = bytes.fromhex("b700000001000000")
EXIT = bytes.fromhex("9500000000000000")


def _ld_map(fd: int, src: int = 1, hi_imm: int = 0) -> bytes:
    return struct.pack("<BBhi", 0x18, (src << 4) | 1, 0, fd) + struct.pack("<BBhi", 0, 0, 0, hi_imm)


def test_prog_tag_ignores_map_fds_only() -> None:
    a = _ld_map(3) + MOV_R0_1 + EXIT
    assert trust.prog_tag(a) == trust.prog_tag(_ld_map(7) + MOV_R0_1 + EXIT)
    # BPF_PSEUDO_MAP_VALUE: both halves (fd and offset) are zeroed
    assert trust.prog_tag(_ld_map(3, 2, 8) + EXIT) == trust.prog_tag(_ld_map(9, 2, 16) + EXIT)
    # a plain 64-bit constant load keeps its value, and so does every other instruction
    assert trust.prog_tag(_ld_map(3, 0) + EXIT) != trust.prog_tag(_ld_map(7, 0) + EXIT)
    mov_r0_0 = bytes.fromhex("b700000000000000")
    assert trust.prog_tag(a) != trust.prog_tag(_ld_map(3) + mov_r0_0 + EXIT)


def test_prog_tag_is_a_truncated_digest_of_the_zeroed_code() -> None:
    code = _ld_map(5) + MOV_R0_1 + EXIT
    zeroed = _ld_map(0) + MOV_R0_1 + EXIT
    assert trust.prog_tag(code) == hashlib.sha256(zeroed).digest()[:8]
    assert trust.prog_tag(code, "sha1") == hashlib.sha1(zeroed).digest()[:8]
    assert trust.prog_tags(code) == {trust.prog_tag(code), trust.prog_tag(code, "sha1")}


def test_prog_tag_rejects_partial_instructions() -> None:
    with pytest.raises(BpfError):
        trust.prog_tag(MOV_R0_1 + b"\x95")
