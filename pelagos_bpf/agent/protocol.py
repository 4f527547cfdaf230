"""The agent's wire format: one request frame, one reply frame, per connection (docs/AGENT.md).

Why a fixed 12-byte binary header: the thin C hook must frame and check replies in a few
lines, with no JSON parser; CALL payloads are JSON because their callers are Python (and
anything else that speaks JSON). Pure: no I/O, so every accepted and refused frame is
unit-tested (tests/test_agent_protocol.py). hook/pelagos-bpf-hook.c mirrors the constants;
tests/test_agent_hook.py checks they agree.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from typing import Any

MAGIC = b"PBA1"
VERSION = 1
HEADER = struct.Struct(">4sHHI")  # magic, version, kind, payload length (big-endian)
MAX_PAYLOAD = 1 << 20
"""Largest request payload, and largest HOOK_REPLY (the thin hook's buffer)."""
MAX_REPLY = 64 << 20
"""Largest CALL_REPLY payload: `metrics` and `inspect` of every cgroup on a node with 10,000
containers exceed 1 MiB; only the Python client reads those."""

HOOK = 1
CALL = 2
HOOK_REPLY = 0x8001
CALL_REPLY = 0x8002
REPLY_OF = {HOOK: HOOK_REPLY, CALL: CALL_REPLY}

STAGES = ("create", "poststop", "auto")
OWNERS = ("runtime", "hook", "nri")
"""Whom a request acts for (issue 23's roles): a library caller or the CLI, the OCI hook, the
NRI plugin. A HOOK frame always acts for "hook"."""
OPS = ("setup", "update", "teardown", "inspect", "gc", "status", "metrics")

SOCKET_ENV = "PELAGOS_BPF_AGENT_SOCKET"
DEFAULT_SOCKET = "/run/pelagos-bpf/agent.sock"
TIMEOUT_ENV = "PELAGOS_BPF_AGENT_TIMEOUT"
DEFAULT_TIMEOUT = 10.0
"""Seconds a client (the thin hook, `Client`) waits for its reply, connect included."""
FRAME_DEADLINE = 5.0
"""Seconds the agent gives a client to send one whole request frame after connecting. A
thin hook sends its frame right after connect; 2 s proved too tight on a starved machine (a
TCG guest starting 20 containers at once), and an idle connection costs one fd until then."""


class ProtocolError(Exception):
    """A frame that breaks the protocol; `kind` is the reply kind to answer with, or None when
    no reply kind can be told (bad magic or version: the server replies CALL_REPLY)."""

    def __init__(self, message: str, reply_kind: int | None = CALL_REPLY) -> None:
        super().__init__(message)
        self.reply_kind = reply_kind


def socket_path(given: str | None = None) -> str:
    """The socket: `given` (--socket), else $PELAGOS_BPF_AGENT_SOCKET, else the default."""
    return given or os.environ.get(SOCKET_ENV) or DEFAULT_SOCKET


def client_timeout(given: float | None = None) -> float:
    """The client's deadline: `given`, else $PELAGOS_BPF_AGENT_TIMEOUT, else 10 s."""
    if given is not None:
        return given
    raw = os.environ.get(TIMEOUT_ENV, "")
    if not raw:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not 0 < value <= 3600:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: want seconds, more than 0 and at most 3600")
    return value


def limit(kind: int) -> int:
    """The largest payload a frame of this kind may carry."""
    return MAX_REPLY if kind == CALL_REPLY else MAX_PAYLOAD


def frame(kind: int, payload: bytes) -> bytes:
    if len(payload) > limit(kind):
        raise ProtocolError(f"payload of {len(payload)} bytes exceeds {limit(kind)}")
    return HEADER.pack(MAGIC, VERSION, kind, len(payload)) + payload


def parse_header(raw: bytes, *, replies: bool = False) -> tuple[int, int]:
    """(kind, payload length) of a 12-byte header; ProtocolError names what is wrong.

    replies=False checks a request (kinds HOOK, CALL); True a reply."""
    magic, version, kind, length = HEADER.unpack(raw)
    if magic != MAGIC:
        raise ProtocolError(f"bad magic {magic!r}: not a pelagos-bpf agent frame", CALL_REPLY)
    known = (HOOK_REPLY, CALL_REPLY) if replies else (HOOK, CALL)
    reply_kind = REPLY_OF.get(kind, CALL_REPLY)
    if version != VERSION:
        raise ProtocolError(f"protocol version {version}: this agent speaks {VERSION}", reply_kind)
    if kind not in known:
        raise ProtocolError(f"unknown frame kind {kind:#x}", CALL_REPLY)
    if length > limit(kind):
        raise ProtocolError(f"payload of {length} bytes exceeds {limit(kind)}", reply_kind)
    return kind, length


# ---------------------------------------------------------------- requests


@dataclass(frozen=True)
class Request:
    """One decoded request: a hook invocation or a call of `op` acting for `owner`."""

    kind: int
    op: str  # "hook" for HOOK frames
    owner: str
    args: dict[str, Any]
    stage: str = ""
    state: bytes = b""
    client_pid: int | None = None  # the peer's pid (SO_PEERCRED), set by the server

    @property
    def label(self) -> str:
        """The request in log lines ("hook create", "setup", ...)."""
        return f"hook {self.stage}" if self.kind == HOOK else self.op


def hook_payload(stage: str, state: bytes) -> bytes:
    return stage.encode("ascii") + b"\n" + state


def call_payload(op: str, owner: str, args: dict[str, Any]) -> bytes:
    return json.dumps({"op": op, "owner": owner, "args": args}).encode()


def parse_request(kind: int, payload: bytes) -> Request:
    """A request from a frame's kind and payload; ProtocolError (with the reply kind) if bad."""
    if kind == HOOK:
        stage, sep, state = payload.partition(b"\n")
        if not sep or stage.decode("ascii", "replace") not in STAGES:
            shown = stage[:20].decode("ascii", "replace")
            raise ProtocolError(
                f"hook frame: want STAGE\\nSTATE with STAGE one of {', '.join(STAGES)}, "
                f"got {shown!r}",
                HOOK_REPLY,
            )
        return Request(HOOK, "hook", "hook", {}, stage.decode("ascii"), state)
    try:
        doc = json.loads(payload)
    except (ValueError, RecursionError) as e:
        raise ProtocolError(f"call frame: payload is not JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ProtocolError("call frame: want a JSON object {op, owner, args}")
    op, owner, args = doc.get("op"), doc.get("owner"), doc.get("args", {})
    if op not in OPS:
        raise ProtocolError(f"call frame: op={op!r}: want one of {', '.join(OPS)}")
    if owner not in OWNERS:
        raise ProtocolError(f"call frame: owner={owner!r}: want one of {', '.join(OWNERS)}")
    if not isinstance(args, dict):
        raise ProtocolError("call frame: args must be a JSON object")
    return Request(CALL, op, owner, args)


# ---------------------------------------------------------------- replies


def hook_reply(code: int, text: str) -> bytes:
    return frame(HOOK_REPLY, bytes([code & 0xFF]) + text.encode("utf-8", "replace"))


def call_ok_parts(result: Any) -> tuple[bytes, ...]:
    """A CALL_REPLY with the result as (header, payload), to be sent one after the other: a
    metrics reply of 10,000 cgroups is megabytes, and joining the two would copy it once more.
    An error reply when it would exceed MAX_REPLY."""
    payload = json.dumps({"ok": True, "result": result}).encode()
    if len(payload) > MAX_REPLY:
        msg = f"the reply ({len(payload)} bytes) exceeds the protocol's {MAX_REPLY} bytes"
        return (call_error(error_doc("AgentError", msg)),)
    return HEADER.pack(MAGIC, VERSION, CALL_REPLY, len(payload)), payload


def call_ok(result: Any) -> bytes:
    return b"".join(call_ok_parts(result))


def error_doc(
    type_: str,
    message: str,
    *,
    errno: int | None = None,
    setting: str | None = None,
    path: str | None = None,
) -> dict[str, Any]:
    return {"type": type_, "errno": errno, "setting": setting, "path": path, "message": message}


def call_error(err: dict[str, Any]) -> bytes:
    return frame(CALL_REPLY, json.dumps({"ok": False, "error": err}).encode())


def error_reply(reply_kind: int, err: dict[str, Any]) -> bytes:
    """An error in the kind the client reads: HOOK_REPLY (exit 2 + text) or CALL_REPLY."""
    if reply_kind == HOOK_REPLY:
        return hook_reply(2, f"pelagos-bpf agent: error: {err['message']}")
    return call_error(err)


def parse_hook_reply(payload: bytes) -> tuple[int, str]:
    if not payload:
        raise ProtocolError("hook reply: empty payload (want an exit code byte)")
    return payload[0], payload[1:].decode("utf-8", "replace")


def parse_call_reply(payload: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(payload)
    except ValueError as e:
        raise ProtocolError(f"call reply: not JSON ({e})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("ok"), bool):
        raise ProtocolError("call reply: want a JSON object with a boolean 'ok'")
    if not doc["ok"] and not isinstance(doc.get("error"), dict):
        raise ProtocolError("call reply: 'ok' is false but there is no 'error' object")
    return doc
