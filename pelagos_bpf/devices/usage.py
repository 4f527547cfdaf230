"""How full the node-wide rule map is, and the admission check every rule-set write passes.

Why: one map holds every cgroup's rule sets, so without limits one tenant could fill it and make
every later setup fail (E2BIG). Three limits, all checked before anything is written:
- a rule set holds at most $PELAGOS_BPF_RULES_PER_SET rules (default 4,096; `prepare`);
- a write that would leave fewer than $PELAGOS_BPF_RULES_RESERVE free entries (default 16,384)
  is refused unless it is small (at most SMALL_WRITE entries: a container with the default
  allowlist and some rules of its own needs ~20): the reserve keeps room for ordinary setups
  whatever large rule sets others have written;
- entries are counted, not rules (an index entry per 16 patterns), and an update holds both
  generations until its switch, so it reserves its whole new set.

The fill level is kept in the map itself, in one META entry no program ever looks up (absent
while the count is zero), updated under a node-wide lock by every writer (a BPF hash map has no
cheap element count). A writer killed between its reservation and its write leaves the count
high (refusing early, never late); `gc` recounts.
"""

from __future__ import annotations

import errno
import logging
import struct
import threading

from .. import bpfsys
from ..errors import BpfError
from ..locks import node_lock
from ..numbers import env_int
from . import encode as enc
from . import layout as lay

PER_SET_ENV = "PELAGOS_BPF_RULES_PER_SET"
PER_SET_DEFAULT = 4096
RESERVE_ENV = "PELAGOS_BPF_RULES_RESERVE"
RESERVE_DEFAULT = 16384
SMALL_WRITE = 64  # entries a write may take from the reserve
META_TYPE = 0xFFFF  # dev_key.type of the fill-level entry (devices have types 1 and 2)
META_KEY = enc.RULE_KEY.pack(0, 0, 0, META_TYPE, 0, 0)
_COUNT = struct.Struct(f"<Q{lay.VAL_SIZE - 8}x")
LOCK = "dev-rules-usage"

log = logging.getLogger(__name__)

_sizes: dict[int, int] = {}  # map id -> max_entries
_sizes_lock = threading.Lock()


class Refused(BpfError):
    """A write refused by admission (the fill level and the reserve), before the kernel saw
    it: its message names the setting that decided."""


def per_set_limit() -> int:
    return env_int(PER_SET_ENV, PER_SET_DEFAULT)


def reserve_entries() -> int:
    return env_int(RESERVE_ENV, RESERVE_DEFAULT, lo=0)


def capacity(fd: int) -> int:
    """max_entries of the rule map behind fd (one syscall per map per process)."""
    info = bpfsys.map_info(fd)
    with _sizes_lock:
        return _sizes.setdefault(info.id, info.max_entries)


def used(fd: int) -> int:
    raw = bpfsys.map_lookup(fd, META_KEY, lay.VAL_SIZE)
    return _COUNT.unpack(raw)[0] if raw else 0


def _store(fd: int, n: int) -> None:
    """The count, or no META entry at all at zero (an unused map holds nothing, so a leak
    check can compare it with the empty map it started as)."""
    if n > 0:
        bpfsys.map_update(fd, META_KEY, _COUNT.pack(n))
    else:
        bpfsys.map_delete(fd, META_KEY)


def admit(fd: int, n: int, what: str) -> None:
    """Reserve `n` entries for a write, or refuse it (BpfError E2BIG naming `what` and the
    setting) when it would leave fewer than the reserve free (small writes excepted)."""
    size = capacity(fd)
    with node_lock(LOCK):
        now = used(fd)
        free_after = size - 1 - now - n  # the META entry takes one
        floor = 0 if n <= SMALL_WRITE else reserve_entries()
        if free_after < floor:
            why = f"{n} entries would leave {max(free_after, 0)} of the rule map's {size} free" + (
                f", fewer than the {floor} kept for other cgroups' setups ({RESERVE_ENV})"
                if floor
                else ""
            )
            log.info("%s: refused: %s", what, why)
            raise Refused(errno.E2BIG, what, why, setting=what)
        _store(fd, now + n)
        log.debug("%s: admitted %d entries (%d of %d in use)", what, n, now + n, size)


def release(fd: int, n: int) -> None:
    """Give back `n` entries (deleted, or reserved and never written)."""
    if n <= 0:
        return
    with node_lock(LOCK):
        _store(fd, used(fd) - n)


def recount(fd: int) -> int:
    """Count the entries for real (O(entries): gc's job) and store the count."""
    with node_lock(LOCK):
        n = sum(1 for k in bpfsys.map_keys(fd, enc.RULE_KEY.size) if k != META_KEY)
        was = used(fd)
        _store(fd, n)
        if was != n:
            log.info("rule map fill level recounted: %d entries (the count said %d)", n, was)
        return n
