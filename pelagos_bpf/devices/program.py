"""Load, attach, update, detach and audit the generic device program (bpf/device.c).

One program, compiled once (progcache) and loaded once per process (or fetched from a pin), is
attached with BPF_F_ALLOW_MULTI to every container cgroup. Which rules apply to an attachment is
the ruleset key in its cgroup storage (`dev_cur`); the rules themselves are entries of the shared
`dev_rules` hash under that key. So a container start costs map writes plus one PROG_ATTACH, and a
live update is map writes plus one storage write (an atomic switch), never a PROG_LOAD.

Every function finds its state from the kernel (PROG_QUERY on the cgroup, prog info -> map ids),
so a cgroup set up by one process can be updated, audited and torn down by another.
"""

from __future__ import annotations

import errno
import hashlib
import os
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from .. import bpfsys, progcache, progfind, trust
from ..bpfsys import AttachType, MapType, ProgType
from ..config import CgroupDeviceRule
from ..errors import BpfError, CgroupError
from . import encode as enc
from .rules import validate_device_rules

PROG_NAME = "pelagos_dev"
FUNC = "pelagos_dev"
SOURCE = "device"
PIN_ENV = "PELAGOS_BPF_PIN_DIR"
BPF_F_NO_PREALLOC = 1
RULES_MAX = 65536  # shared by all cgroups; buckets are allocated at map creation
DENIALS_MAX = 16384
ATTACH = AttachType.CGROUP_DEVICE

# name -> (type, key size, value size, max entries, flags); must match bpf/device.c.
MAP_SPECS: dict[str, tuple[int, int, int, int, int]] = {
    "dev_cur": (MapType.CGROUP_STORAGE, enc.STORAGE_KEY.size, enc.STORAGE_VAL.size, 0, 0),
    "dev_rules": (MapType.HASH, enc.RULE_KEY.size, enc.RULE_VAL.size, RULES_MAX, BPF_F_NO_PREALLOC),
    "dev_denials": (
        MapType.HASH,
        enc.DENY_KEY.size,
        enc.DENY_VAL.size,
        DENIALS_MAX,
        BPF_F_NO_PREALLOC,
    ),
}


@dataclass(frozen=True)
class Program:
    """A loaded device program and its map fds (owned by whoever made the object)."""

    fd: int
    id: int
    maps: dict[str, int]

    def close(self) -> None:
        for fd in (self.fd, *self.maps.values()):
            os.close(fd)


_lock = threading.Lock()
_own: Program | None = None


def compiled() -> progcache.CompiledProgram:
    """The cached bytecode (compiled with bcc only if the cache has none)."""
    return progcache.get_program(progcache.bpf_source(SOURCE), FUNC, ProgType.CGROUP_DEVICE)


def own_program() -> Program:
    """This process's program: loaded once, or fetched from $PELAGOS_BPF_PIN_DIR if pinned."""
    global _own
    if _own is not None:
        return _own
    with _lock:
        if _own is None:
            _own = _load_or_fetch()
        return _own


def _pin_path(prog: progcache.CompiledProgram) -> Path | None:
    d = os.environ.get(PIN_ENV)
    if not d:
        return None
    # Named by the bytecode so a changed program never picks up an old pin.
    return Path(d) / f"{PROG_NAME}_{hashlib.sha256(prog.insns).hexdigest()[:16]}"


def _open_pin(pin: Path, prog: progcache.CompiledProgram) -> int | None:
    """The pinned program if it is exactly ours (trust checks owner, symlinks, type, tag)."""
    return trust.open_pinned_program(pin, insns=prog.insns, prog_type=ProgType.CGROUP_DEVICE)


def _load_or_fetch() -> Program:
    prog = compiled()
    pin = _pin_path(prog)
    if pin is not None and (pinned := _open_pin(pin, prog)) is not None:
        return _from_fd(pinned)
    maps: dict[str, int] = {}
    try:
        for name, (mtype, ksz, vsz, maxe, flags) in MAP_SPECS.items():
            maps[name] = bpfsys.map_create(mtype, ksz, vsz, maxe, name=name, flags=flags)
        fd = progcache.load_program(prog, maps, name=PROG_NAME)
    except BaseException:
        for mfd in maps.values():
            os.close(mfd)
        raise
    loaded = Program(fd=fd, id=bpfsys.prog_info(fd).id, maps=maps)
    if pin is not None:
        try:
            theirs = None if trust.pin_program(fd, pin) else _open_pin(pin, prog)
        except BaseException:
            loaded.close()
            raise
        if theirs is not None:  # another process pinned first: share its program and maps
            loaded.close()
            return _from_fd(theirs)
    return loaded


def _from_fd(fd: int) -> Program:
    """Wrap a program fd (from a pin or an id) with its maps; raise if it is not ours."""
    try:
        info = bpfsys.prog_info(fd)
        if info.name != PROG_NAME or info.type != ProgType.CGROUP_DEVICE:
            raise BpfError(errno.EINVAL, "device program", f"prog {info.id} is not {PROG_NAME}")
        maps = progfind.open_maps(info, MAP_SPECS)
    except BaseException:
        os.close(fd)
        raise
    missing = set(MAP_SPECS) - set(maps)
    if missing:
        Program(fd, info.id, maps).close()
        raise BpfError(errno.EPROTO, "device program", f"prog {info.id} lacks maps {missing}")
    return Program(fd=fd, id=info.id, maps=maps)


@contextmanager
def attached(cgfd: int) -> Iterator[list[Program]]:
    """Our device programs attached at this cgroup (foreign handles closed on exit)."""
    own = _own
    found: list[Program] = []
    opened: list[Program] = []
    pending = progfind.open_attached(cgfd, ATTACH, PROG_NAME, ProgType.CGROUP_DEVICE)
    try:
        while pending:
            fd, info = pending.pop(0)
            if own is not None and info.id == own.id:
                os.close(fd)
                found.append(own)
                continue
            prog = _from_fd(fd)  # closes fd itself if the program is not usable
            opened.append(prog)
            found.append(prog)
        yield found
    finally:
        for fd, _ in pending:
            os.close(fd)
        for prog in opened:
            prog.close()


def _storage_key(cgroup_id: int) -> bytes:
    return enc.STORAGE_KEY.pack(cgroup_id, ATTACH)


def current_ruleset(prog: Program, cgroup_id: int) -> int:
    """The ruleset key in this attachment's cgroup storage (0 = not set)."""
    raw = bpfsys.map_lookup(prog.maps["dev_cur"], _storage_key(cgroup_id), enc.STORAGE_VAL.size)
    return enc.STORAGE_VAL.unpack(raw)[0] if raw else 0


def delete_ruleset(prog: Program, rs: int) -> int:
    """Delete every entry of ruleset rs (found through its index); returns patterns removed."""
    fd = prog.maps["dev_rules"]
    rule_keys: list[bytes] = []
    index_keys: list[bytes] = []
    while True:
        ik = enc.index_key(rs, len(index_keys))
        val = bpfsys.map_lookup(fd, ik, enc.INDEX_VAL.size)
        if val is None:
            break
        index_keys.append(ik)
        rule_keys.extend(enc.RULE_KEY.pack(rs, *p) for p in enc.index_patterns(val))
    if not index_keys:
        return 0
    n = bpfsys.map_delete_batch(fd, rule_keys)
    bpfsys.map_delete_batch(fd, index_keys)
    return n


@dataclass(frozen=True)
class Prepared:
    """A validated rule list, encoded (the map entries minus their ruleset key)."""

    n_patterns: int
    template: tuple[tuple[bytes, bytes], ...]


@lru_cache(maxsize=256)
def _prepare(rules: tuple[CgroupDeviceRule, ...]) -> Prepared:
    table = enc.encode_rules(rules)
    return Prepared(len(table), enc.entry_template(table))


def prepare(rules: Sequence[CgroupDeviceRule]) -> Prepared:
    """Validate and encode (memoized: a repeated rule list costs a dict lookup)."""
    validate_device_rules(rules)  # valid rules have exact types, so the cache key is exact
    return _prepare(tuple(rules))


def write_ruleset(prog: Program, rs: int, prep: Prepared) -> None:
    """Store a ruleset under rs (which must not be in use); all or nothing."""
    fd = prog.maps["dev_rules"]
    delete_ruleset(prog, rs)  # leftovers of a crashed writer
    entries = list(enc.with_ruleset(rs, prep.template))
    try:
        bpfsys.map_update_batch(fd, entries)  # one syscall for the whole rule set
    except BpfError as e:
        bpfsys.map_delete_batch(fd, [key for key, _ in entries])
        hint = " (dev_rules map full?)" if e.errno == errno.E2BIG else ""
        raise BpfError(
            e.errno or errno.EIO,
            "device_rules",
            f"cannot store {prep.n_patterns} rule patterns{hint}: {e.strerror}",
        ) from e


def _switch(prog: Program, cgroup_id: int, rs: int) -> None:
    bpfsys.map_update(prog.maps["dev_cur"], _storage_key(cgroup_id), enc.STORAGE_VAL.pack(rs))


def _attach_new(cgfd: int, cgroup_id: int, prep: Prepared) -> None:
    prog = own_program()
    rs = enc.ruleset_key(cgroup_id, 0)
    # Leftovers under generation 1 (a crashed earlier attempt) are harmless while unused, and
    # the first update clears them before writing there; generation 0 is cleared right here.
    write_ruleset(prog, rs, prep)
    try:
        try:
            bpfsys.prog_attach(prog.fd, cgfd, ATTACH, bpfsys.BPF_F_ALLOW_MULTI)
        except BpfError as e:
            hint = (
                " (a program attached without BPF_F_ALLOW_MULTI on this cgroup or an ancestor "
                "forbids more)"
                if e.errno == errno.EPERM
                else ""
            )
            raise BpfError(
                e.errno or errno.EIO, "device_rules", f"cannot attach to the cgroup{hint}: {e}"
            ) from e
        try:
            # Until this write the storage is 0, which the program treats as deny-all.
            _switch(prog, cgroup_id, rs)
        except BaseException:
            bpfsys.prog_detach(prog.fd, cgfd, ATTACH)
            raise
    except BaseException:
        delete_ruleset(prog, rs)
        raise


def _update(prog: Program, cgroup_id: int, prep: Prepared) -> None:
    old = current_ruleset(prog, cgroup_id)
    rs = enc.ruleset_key(cgroup_id, (old & 1) ^ 1 if old else 0)
    write_ruleset(prog, rs, prep)
    try:
        _switch(prog, cgroup_id, rs)  # one map write: the atomic switch
    except BaseException:
        delete_ruleset(prog, rs)
        raise
    # The previous generation stays until the next update reuses its slot (write_ruleset clears
    # it first) or detach: a program run that read the old key just before the switch must not
    # see its entries vanish mid-lookup, which would fail open.


def _detach(prog: Program, cgfd: int, cgroup_id: int) -> None:
    bpfsys.prog_detach(prog.fd, cgfd, ATTACH)
    # Entries go only after the detach: with the program still attached, missing entries allow.
    for gen in (0, 1):
        delete_ruleset(prog, enc.ruleset_key(cgroup_id, gen))
    clear_denials(prog, cgroup_id)


def _open_cgroup(path: Path) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None


def apply(cg_path: Path, cgroup_id: int, rules: Sequence[CgroupDeviceRule]) -> None:
    """Make `rules` the device rules of the cgroup: attach, update in place, or detach ([])."""
    prep = prepare(rules)
    try:
        cgfd = os.open(cg_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        msg = f"device_rules: cannot open cgroup {cg_path}: {e.strerror}"
        raise CgroupError(e.errno, msg) from e
    try:
        with attached(cgfd) as progs:
            if not rules:
                for prog in progs:
                    _detach(prog, cgfd, cgroup_id)
                return
            if not progs:
                _attach_new(cgfd, cgroup_id, prep)
                return
            _update(progs[0], cgroup_id, prep)
            for extra in progs[1:]:  # two runtimes raced: keep one program
                _detach(extra, cgfd, cgroup_id)
    finally:
        os.close(cgfd)


def detach(cg_path: Path, cgroup_id: int) -> None:
    """Detach our programs and delete this cgroup's entries; no-op if nothing is attached."""
    cgfd = _open_cgroup(cg_path)
    if cgfd is None:
        return
    try:
        with attached(cgfd) as progs:
            for prog in progs:
                _detach(prog, cgfd, cgroup_id)
    finally:
        os.close(cgfd)


def _denial_items(prog: Program) -> list[tuple[bytes, bytes]]:
    fd = prog.maps["dev_denials"]
    items = []
    for key in bpfsys.map_keys(fd, enc.DENY_KEY.size):
        val = bpfsys.map_lookup(fd, key, enc.DENY_VAL.size)
        if val is not None:
            items.append((key, val))
    return items


def clear_denials(prog: Program, cgroup_id: int) -> None:
    fd = prog.maps["dev_denials"]
    for key in bpfsys.map_keys(fd, enc.DENY_KEY.size):
        if enc.DENY_KEY.unpack(key)[0] == cgroup_id:
            bpfsys.map_delete(fd, key)


def denials(cg_path: Path, cgroup_id: int) -> dict[str, int]:
    """Denied accesses counted by our programs on this cgroup, e.g. {"c 240:1 rw": 3}."""
    cgfd = _open_cgroup(cg_path)
    if cgfd is None:
        return {}
    out: dict[str, int] = {}
    try:
        with attached(cgfd) as progs:
            for prog in progs:
                for label, n in enc.decode_denials(_denial_items(prog), cgroup_id).items():
                    out[label] = out.get(label, 0) + n
    finally:
        os.close(cgfd)
    return out


def ruleset_table(cg_path: Path, cgroup_id: int) -> dict[enc.Pattern, enc.Entry] | None:
    """The rule table currently in force on the cgroup (None: no program attached)."""
    cgfd = _open_cgroup(cg_path)
    if cgfd is None:
        return None
    try:
        with attached(cgfd) as progs:
            if not progs:
                return None
            prog = progs[0]
            rs = current_ruleset(prog, cgroup_id)
            fd = prog.maps["dev_rules"]
            table: dict[enc.Pattern, enc.Entry] = {}
            chunk = 0
            while (
                ival := bpfsys.map_lookup(fd, enc.index_key(rs, chunk), enc.INDEX_VAL.size)
            ) is not None:
                for p in enc.index_patterns(ival):
                    val = bpfsys.map_lookup(fd, enc.RULE_KEY.pack(rs, *p), enc.RULE_VAL.size)
                    if val is not None:
                        m, r, w, final = enc.RULE_VAL.unpack(val)
                        table[p] = ((m, r, w), bool(final))
                chunk += 1
            return table
    finally:
        os.close(cgfd)
