"""Bounded reads and strict JSON for the hook's inputs: the OCI state and config.json.

Why: both carry text pod authors influence (annotations), and the hook runs as root on every
container start. A config.json that is a FIFO would hang the hook, a symlink to /dev/zero would
grow it without limit, deeply nested JSON overflows the decoder's recursion (RecursionError),
and a key given twice means different things to different JSON readers. Each is refused with
one message naming the input, before anything is attached.
"""

from __future__ import annotations

import errno
import json
import os
import stat
from typing import IO, Any

from .request import HookError

MAX_BYTES = 4 << 20  # a podman config.json is ~20 KiB; Kubernetes caps annotations at 256 KiB
MAX_DEPTH = 64  # runtime-spec documents nest < 10 deep
_OPEN = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def read_stdin(stream: IO[bytes]) -> bytes:
    """The state on stdin, read to at most one byte past MAX_BYTES (loads refuses that)."""
    return stream.read(MAX_BYTES + 1)


def read_regular_file(path: str, what: str, limit: int = MAX_BYTES) -> bytes | None:
    """The bytes of `path` (None: it does not exist) if it is a regular file (not a symlink,
    FIFO or device) of at most `limit` bytes. The open never blocks and never follows a
    last-component symlink, and the file read is the one checked (fstat)."""
    try:
        fd = os.open(path, _OPEN)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise HookError(f"{what} {path}: is a symlink (refused)") from None
        raise HookError(f"{what} {path}: cannot open ({e.strerror})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise HookError(f"{what} {path}: not a regular file (a FIFO or a device is refused)")
        if st.st_size > limit:
            raise HookError(f"{what} {path}: {st.st_size} bytes, more than {limit}")
        # One read of the size fstat gave, plus one byte: a short read of a regular file is its
        # end, so a file that did not grow costs one read (and no buffer larger than itself).
        first = os.read(fd, st.st_size + 1)
        if len(first) <= st.st_size:
            return first
        chunks = [first]
        size = len(first)
        while chunk := os.read(fd, min(limit + 1 - size, 1 << 20)):
            chunks.append(chunk)
            size += len(chunk)
            if size > limit:  # grew since the fstat
                raise HookError(f"{what} {path}: more than {limit} bytes")
        return b"".join(chunks)
    except OSError as e:
        raise HookError(f"{what} {path}: cannot read ({e.strerror})") from None
    finally:
        os.close(fd)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out = dict(pairs)  # in C; a key given twice makes it shorter than the pairs
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise ValueError(f"key {key!r} appears twice in one object")
            seen.add(key)
    return out


_DECODER = json.JSONDecoder(object_pairs_hook=_no_duplicates)  # json.loads makes one per call


def depth(doc: Any) -> int:
    """How deeply arrays and objects nest in `doc` (iterative: any depth is safe to measure)."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        node, d = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        deepest = max(deepest, d)
        stack.extend((c, d + 1) for c in children)
    return deepest


def loads(raw: str | bytes, what: str, max_depth: int = MAX_DEPTH) -> Any:
    """Strict JSON of at most MAX_BYTES: UTF-8, each key once per object, nested at most
    `max_depth` deep."""
    if len(raw) > MAX_BYTES:
        raise HookError(f"{what}: more than {MAX_BYTES} bytes")
    try:
        text = raw.decode() if isinstance(raw, bytes) else raw
        doc = _DECODER.decode(text)
    except UnicodeDecodeError as e:
        raise HookError(f"{what}: not UTF-8 ({e.reason} at byte {e.start})") from None
    except RecursionError:
        raise HookError(f"{what}: JSON nested more than {max_depth} deep") from None
    except ValueError as e:
        raise HookError(f"{what}: not valid JSON ({e})") from None
    brackets = text.count("[") + text.count("{")  # fewer cannot nest deeper: no walk needed
    if brackets > max_depth and depth(doc) > max_depth:
        raise HookError(f"{what}: JSON nested more than {max_depth} deep")
    return doc
