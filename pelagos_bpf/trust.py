"""Trust checks for what reaches PROG_LOAD: bytecode files and pinned programs (and the files
the OCI hook and the agent act on: the admin policy, the hook records).

Why: device rules are a security boundary, and a program is only as trustworthy as the places it
comes from. A directory or file that someone other than us could write (a bytecode dir an
unprivileged user pre-created under /tmp, a 0777 dir, a name squatted in a 1777 bpffs) must be
refused with an error naming the path and the fix, never followed or loaded. The checks follow
sshd's StrictModes: every directory from / down is owned by a trusted uid and not group/world
writable; a sticky ancestor (like /tmp) is allowed because nobody else may rename or remove the
entry below it, which we check in turn. Paths are walked with openat(O_NOFOLLOW) and every check
fstat()s the opened fd, so a symlink swap between check and use cannot redirect us.

Trusted uids: root, plus the current euid when it is not root (an unprivileged read-only tool
may trust its own files: whoever can write them already runs as that user). See docs/TRUST.md.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import stat
import threading
from typing import TYPE_CHECKING

from .errors import BpfError

# bpfsys and hashlib are imported where used: the file checks alone (the OCI hook's records,
# the admin policy) must not load the BPF runtime nor OpenSSL on the hook's no-op paths.
if TYPE_CHECKING:
    from . import bpfsys

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
DIR_MODE = 0o755
FILE_MODE = 0o644
MAX_FILE = 8 << 20  # a cache file is a few KiB; refuse to slurp anything huge

# BPF_LD | BPF_IMM | BPF_DW, and the src_reg values the kernel zeroes for the tag.
_LD_IMM64 = 0x18
_PSEUDO_MAP_FD = 1
_PSEUDO_MAP_VALUE = 2
_MAP_SRC = (_PSEUDO_MAP_FD, _PSEUDO_MAP_VALUE)


def trusted_uids() -> frozenset[int]:
    """Owners we accept: root, and ourselves when unprivileged."""
    return frozenset({0, os.geteuid()})


def _refuse(path: str, what: str, why: str, fix: str) -> BpfError:
    return BpfError(
        errno.EPERM, "trust check", f"untrusted {what} {path}: {why}; fix: {fix}", path=path
    )


def _check_st(
    st: os.stat_result, path: str, what: str, *, sticky_ok: bool, uids: frozenset[int] | None = None
) -> None:
    """Owner trusted (`uids`, default trusted_uids()) and not writable by group/others (unless
    sticky_ok and sticky)."""
    if st.st_uid not in (uids if uids is not None else trusted_uids()):
        fix = f"remove it, or `chown root {path}` if root made it"
        raise _refuse(path, what, f"owned by uid {st.st_uid}, not root", fix)
    if st.st_mode & 0o022 and not (sticky_ok and st.st_mode & stat.S_ISVTX):
        mode = stat.S_IMODE(st.st_mode)
        raise _refuse(path, what, f"mode {mode:04o} is group/world-writable", f"chmod go-w {path}")


def trusted_file_stat(st: os.stat_result) -> bool:
    """What read_trusted_file demands of a file's lstat, as a test: a regular file, owned by a
    trusted uid, not writable by group or others."""
    return stat.S_ISREG(st.st_mode) and st.st_uid in trusted_uids() and not st.st_mode & 0o022


def check_dir_stat(st: os.stat_result, path: str, what: str) -> None:
    """The leaf check of open_trusted_dir, for a dir fd opened (and walked) earlier."""
    _check_st(st, path, what, sticky_ok=False)


def open_trusted_dir(
    path: str | os.PathLike[str], what: str, *, create: bool = False, sticky_leaf_ok: bool = False
) -> int:
    """O_DIRECTORY fd of `path` after checking it and every ancestor; with create, missing
    components are made root-owned (our euid) with mode 0755 whatever the umask.

    The leaf itself must not be writable by others even if sticky (unless sticky_leaf_ok: the
    caller then checks each entry's owner): anyone could create the names we are about to read.
    Raises BpfError (EPERM: untrusted or a symlink in the path, ENOENT: absent).
    """
    full = os.path.abspath(os.fspath(path))
    parts = [p for p in full.split("/") if p]
    uids = trusted_uids()  # once per walk: a geteuid per component adds up
    fd = _open_existing_checked(full, parts, what, sticky_leaf_ok, uids)
    if fd is not None:
        return fd
    fd = os.open("/", _DIR_FLAGS)
    try:
        _check_st(os.fstat(fd), "/", what, sticky_ok=sticky_leaf_ok or bool(parts), uids=uids)
        walked = ""
        for i, name in enumerate(parts):
            walked += "/" + name
            nfd = _open_component(fd, name, walked, what, create)
            os.close(fd)
            fd = nfd
            sticky_ok = sticky_leaf_ok or i < len(parts) - 1
            _check_st(os.fstat(fd), walked, what, sticky_ok=sticky_ok, uids=uids)
    except BaseException:
        os.close(fd)
        raise
    return fd


_HELD: dict[tuple[str, str], tuple[int, int, int]] = {}  # (path, what) -> (fd, st_dev, st_ino)
_RETIRED: list[int] = []  # fds of held dirs found replaced: a thread may still use one
_HELD_LOCK = threading.Lock()


def open_trusted_dir_held(path: str, what: str, *, create: bool = False) -> int:
    """open_trusted_dir for a dir a long-lived process opens again and again (the agent's hook
    records): the walk from / runs once, and the fd it opened is held and shared. Later calls
    return it after one stat of `path`: it still names that same directory, and its owner and
    mode still pass. A moved, removed, re-created or loosened dir is walked (and refused)
    again. The caller must not close the fd. The fd of a dir found replaced stays open (a
    thread may still be writing through it): one fd per replacement, an admin's act."""
    key = (path, what)
    with _HELD_LOCK:
        held = _HELD.get(key)
        if held is not None:
            fd, dev, ino = held
            try:
                st: os.stat_result | None = os.stat(path)
            except OSError:
                st = None
            # The held fd pins its inode, so no other dir can have its (dev, ino) meanwhile.
            if st is not None and st.st_dev == dev and st.st_ino == ino:
                check_dir_stat(st, path, what)
                return fd
            del _HELD[key]
            _RETIRED.append(fd)
        fd = open_trusted_dir(path, what, create=create)
        st = os.fstat(fd)
        _HELD[key] = (fd, st.st_dev, st.st_ino)
        return fd


def _open_existing_checked(
    full: str, parts: list[str], what: str, sticky_leaf_ok: bool, uids: frozenset[int]
) -> int | None:
    """open_trusted_dir's fast path for a dir that exists: lstat each prefix (one syscall
    each, where the fd walk costs three), then open the whole path and check it is the leaf
    lstat saw. None: something is missing, not a directory, or changed under us; the caller
    then takes the fd walk, which creates, or names the problem.

    As safe as the fd walk: each prefix was checked to be a real directory that only a trusted
    uid can write (or sticky, where nobody else may rename the trusted entry below), so nobody
    else can change what the path resolves to between the lstats and the open; untrusted
    prefixes raise the same error the walk would.
    """
    walked = ""
    st = os.lstat("/")
    _check_st(st, "/", what, sticky_ok=sticky_leaf_ok or bool(parts), uids=uids)
    for i, name in enumerate(parts):
        walked += "/" + name
        try:
            st = os.lstat(walked)
        except OSError:
            return None
        if not stat.S_ISDIR(st.st_mode):
            return None
        _check_st(st, walked, what, sticky_ok=sticky_leaf_ok or i < len(parts) - 1, uids=uids)
    try:
        fd = os.open(full, _DIR_FLAGS)
    except OSError:
        return None
    fst = os.fstat(fd)
    if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
        os.close(fd)
        return None
    return fd


def _open_component(dirfd: int, name: str, walked: str, what: str, create: bool) -> int:
    try:
        return os.open(name, _DIR_FLAGS, dir_fd=dirfd)
    except FileNotFoundError:
        if not create:
            raise BpfError(
                errno.ENOENT, f"{what} {walked}", "does not exist", path=walked
            ) from None
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENOTDIR):
            fix = "use a path without symlinks"
            raise _refuse(walked, what, "is a symlink or not a directory", fix) from None
        raise BpfError(
            e.errno or errno.EIO, f"{what} {walked}", e.strerror or "", path=walked
        ) from e
    try:
        # 0700 first: whatever the umask, a concurrent checker never sees it writable by others.
        os.mkdir(name, 0o700, dir_fd=dirfd)
        made = True
    except FileExistsError:  # a concurrent creator won; its dir is checked like any other
        made = False
    except OSError as e:
        raise BpfError(
            e.errno or errno.EIO, f"create {what} {walked}", e.strerror or "", path=walked
        ) from e
    nfd = _open_component(dirfd, name, walked, what, create=False)
    if made:
        os.fchmod(nfd, DIR_MODE)  # explicit, not the umask's choice
    return nfd


def read_trusted_file(dirfd: int, name: str, dir_path: str, what: str) -> bytes | None:
    """Contents of a regular file in a trusted dir (None: absent); refuses symlinks, files
    owned by others or writable by group/world, and anything larger than MAX_FILE."""
    path = f"{dir_path.rstrip('/')}/{name}"
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dirfd)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _refuse(path, what, "is a symlink", f"rm {path}") from None
        raise BpfError(
            e.errno or errno.EIO, f"read {what} {path}", e.strerror or "", path=path
        ) from e
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(path, what, "is not a regular file", f"rm -r {path}")
        _check_st(st, path, what, sticky_ok=False)
        if st.st_size > MAX_FILE:
            raise _refuse(path, what, f"{st.st_size} bytes is too large", f"rm {path}")
        # Reads sized by fstat (plus one byte to see EOF): asking for MAX_FILE at once makes
        # Python map and unmap an 8 MiB buffer per read, on every fresh process's start.
        chunks: list[bytes] = []
        size, want = 0, st.st_size + 1
        while size <= MAX_FILE and (chunk := os.read(fd, min(want, MAX_FILE + 1 - size))):
            chunks.append(chunk)
            size += len(chunk)
            want = 4096  # grew since the fstat: keep reading in pages
        return b"".join(chunks)
    finally:
        os.close(fd)


TMP_PREFIX = ".tmp-"  # write_trusted_file's temporary names (a writer killed mid-write leaves one)
_tmp_seq = itertools.count(int.from_bytes(os.urandom(4), "little"))
_pid = os.getpid()


def _after_fork() -> None:
    global _pid, _tmp_seq
    _pid = os.getpid()
    _tmp_seq = itertools.count(int.from_bytes(os.urandom(4), "little"))


os.register_at_fork(after_in_child=_after_fork)


def write_trusted_file(
    dirfd: int, name: str, data: bytes, *, durable: bool = True, exact_mode: bool = True
) -> None:
    """Atomically replace `name` in a trusted dir: a fresh O_EXCL tmp (0644 whatever the
    umask), fsync, rename; a concurrent reader sees the old file or the new one, never half.
    durable False skips the fsync: for state that means nothing after a reboot (the hook's
    records under /run), where it would only cost every container start a disk flush.
    exact_mode False skips the fchmod: the file is 0644 less the umask, which can only take
    bits away (never make it writable by others), for files only root reads.

    The tmp name is unique without a syscall: this pid, and a counter that starts at random in
    each process (a killed writer's tmp under a reused pid is not met again)."""
    tmp = f"{TMP_PREFIX}{name}-{_pid}-{next(_tmp_seq) & 0xFFFF_FFFF:08x}"
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(tmp, flags, FILE_MODE, dir_fd=dirfd)
    try:
        try:
            if exact_mode:
                os.fchmod(fd, FILE_MODE)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dirfd)
        raise


# ---------------------------------------------------------------- program tags and pins


def _tag_input(insns: bytes) -> bytes:
    """The instructions as bpf_prog_calc_tag hashes them: the imm of both halves of every
    map-referencing BPF_LD_IMM64 zeroed, so the tag does not depend on the map fds. Visits only
    the BPF_LD_IMM64 opcodes (bytes.find), mirroring the kernel's was_ld_map state machine."""
    if len(insns) % 8:
        raise BpfError(errno.EINVAL, "prog_tag", f"{len(insns)} bytes is not whole instructions")
    code = bytearray(insns)
    ops = insns[0::8]
    last = -2  # index of the last first half that set the kernel's was_ld_map
    i = ops.find(_LD_IMM64)
    while i != -1:
        if last != i - 1 and (code[i * 8 + 1] >> 4) in _MAP_SRC:
            code[i * 8 + 4 : i * 8 + 8] = bytes(4)
            nxt = (i + 1) * 8
            if code[nxt : nxt + 4] == bytes(4):  # second half: code, regs and off all 0
                code[nxt + 4 : nxt + 8] = bytes(4)
            last = i
        i = ops.find(_LD_IMM64, i + 1)
    return bytes(code)


def prog_tag(insns: bytes, hash_name: str = "sha256") -> bytes:
    """The kernel's tag for this bytecode: the first 8 bytes of a digest of _tag_input. Kernels
    since 6.18 use SHA-256 (measured: 6.18.44), older ones SHA-1."""
    import hashlib

    return hashlib.new(hash_name, _tag_input(insns), usedforsecurity=False).digest()[:8]


def prog_tags(insns: bytes) -> frozenset[bytes]:
    """Every tag a kernel may give this bytecode (SHA-256 and SHA-1 flavours): either is a
    64-bit second-preimage target, so accepting both costs no strength and survives backports."""
    import hashlib

    data = _tag_input(insns)
    return frozenset(
        hashlib.new(h, data, usedforsecurity=False).digest()[:8] for h in ("sha256", "sha1")
    )


def is_our_program(info: bpfsys.ProgInfo, insns: bytes, prog_type: int) -> bool:
    """Does this loaded program run exactly `insns` (up to map fds) with our program type?"""
    return has_tag(info, prog_tags(insns), prog_type)


def has_tag(info: bpfsys.ProgInfo, tags: frozenset[bytes], prog_type: int) -> bool:
    """is_our_program with the bytecode's tags already known (e.g. recorded in the key index)."""
    return info.type == int(prog_type) and bytes.fromhex(info.tag) in tags


def check_pin_dir(path: str | os.PathLike[str], *, create: bool = False) -> int:
    """O_DIRECTORY fd of a pin dir we may use: it and its ancestors trusted; the dir itself may
    be sticky and world-writable (a plain bpffs mount is 1777), because every pin we read is
    then checked to be root's own (open_pinned_program). create: make it (0755, ours)."""
    return open_trusted_dir(path, "pin dir", create=create, sticky_leaf_ok=True)


BPF_FS_MAGIC = 0xCAFE4A11


def is_bpffs(path: str) -> bool:
    """Is a bpffs mounted at (or holding) `path`? statfs(2)'s f_type (bpfsys)."""
    from . import bpfsys

    return bpfsys.statfs_type(path) == BPF_FS_MAGIC


def open_pinned_program(
    path: str | os.PathLike[str], *, insns: bytes, prog_type: int
) -> int | None:
    """fd of the program pinned at `path` if it is ours, None if nothing is pinned there.

    Ours means: not a symlink, a bpffs object owned by a trusted uid and not writable by
    others, a program of `prog_type` whose kernel tag is the tag of `insns` (the bytecode we
    would load ourselves). Anything else raises BpfError naming the path.
    """
    full = os.path.abspath(os.fspath(path))
    dirfd = check_pin_dir(os.path.dirname(full))
    try:
        got = open_pinned_program_at(dirfd, full, tags=prog_tags(insns), prog_type=prog_type)
    finally:
        os.close(dirfd)
    return None if got is None else got[0]


def open_pinned_program_at(
    dirfd: int, full: str, *, tags: frozenset[bytes], prog_type: int
) -> tuple[int, bpfsys.ProgInfo] | None:
    """open_pinned_program in a pin dir the caller checked (check_pin_dir), so a caller with
    several pins walks the dir once; returns the program's info too, which the check read.
    `tags`: prog_tags of the bytecode we would load (recorded ones spare reading it)."""
    from . import bpfsys

    name = os.path.basename(full)
    try:
        pfd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(pfd)
        if stat.S_ISLNK(st.st_mode):
            raise _refuse(full, "pin", "is a symlink (squatted?)", f"rm {full}")
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(full, "pin", "is not a pinned program (squatted?)", f"rm -r {full}")
        _check_st(st, full, "pin", sticky_ok=False)
        # The magic link names exactly the inode we checked, whatever happens to `full` now.
        try:
            fd = bpfsys.obj_get(f"/proc/self/fd/{pfd}")
        except BpfError as e:
            raise _refuse(full, "pin", f"not a BPF object ({e.strerror})", f"rm {full}") from e
    finally:
        os.close(pfd)
    try:
        # OBJ_GET_INFO_BY_FD answers for maps and links too: ask what the fd is first.
        if os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:bpf-prog":
            raise _refuse(full, "pin", "is not a BPF program", f"rm {full}")
        info = bpfsys.prog_info(fd)
    except BaseException:
        os.close(fd)
        raise
    if not has_tag(info, tags, prog_type):
        os.close(fd)
        want = "/".join(sorted(t.hex() for t in tags))
        why = (
            f"holds program {info.id} (type {info.type}, tag {info.tag}), not ours "
            f"(type {int(prog_type)}, tag {want})"
        )
        raise _refuse(full, "pin", why, f"rm {full}")
    return fd, info


def pin_program(fd: int, path: str | os.PathLike[str]) -> bool:
    """Pin `fd` at `path` in a checked pin dir; False if the name already exists (someone
    pinned first: read theirs with open_pinned_program, which verifies it)."""
    full = os.path.abspath(os.fspath(path))
    dirfd = check_pin_dir(os.path.dirname(full))
    try:
        return pin_program_at(fd, dirfd, full)
    finally:
        os.close(dirfd)


def pin_program_at(fd: int, dirfd: int, full: str) -> bool:
    """pin_program in a pin dir the caller checked (check_pin_dir)."""
    from . import bpfsys

    try:
        bpfsys.obj_pin(fd, f"/proc/self/fd/{dirfd}/{os.path.basename(full)}")
    except BpfError as e:
        if e.errno == errno.EEXIST:
            return False
        raise
    return True
