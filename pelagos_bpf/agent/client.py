"""`Client`: the library's setup/update/teardown/inspect served by the node's agent.

Why: a runtime that calls the library in-process loads BPF programs and holds their fds in its
own process; one that talks to `pelagos-bpf agent` instead needs only a socket, and every
container on the node shares the agent's programs. Errors arrive as the library's own
exception types with the agent's message (codec.error_from_doc), so error handling does not
change. One connection per request; every request has a deadline.
"""

from __future__ import annotations

import contextlib
import errno
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import CgroupConfig
from .codec import AgentError, config_to_json, error_from_doc
from .protocol import (
    CALL,
    CALL_REPLY,
    HEADER,
    HOOK,
    HOOK_REPLY,
    OWNERS,
    ProtocolError,
    call_payload,
    client_timeout,
    frame,
    hook_payload,
    parse_call_reply,
    parse_header,
    parse_hook_reply,
    socket_path,
)


@dataclass
class AgentCgroup:
    """A cgroup the agent set up: what a runtime keeps to update and tear it down later."""

    path: Path
    id: int
    created: list[Path] = field(default_factory=list)  # dirs setup made (teardown removes them)
    report: dict[str, Any] = field(default_factory=dict)  # applied / skipped / written


class Client:
    """Requests to the agent at `path` (default: $PELAGOS_BPF_AGENT_SOCKET, else
    /run/pelagos-bpf/agent.sock), each acting for `owner` ("runtime", "hook" or "nri"), each
    answered within `timeout` seconds (default $PELAGOS_BPF_AGENT_TIMEOUT, else 10)."""

    def __init__(
        self, path: str | None = None, *, timeout: float | None = None, owner: str = "runtime"
    ) -> None:
        if owner not in OWNERS:
            raise ValueError(f"owner={owner!r}: want one of {', '.join(OWNERS)}")
        self.path = socket_path(path)
        self.timeout = client_timeout(timeout)
        self.owner = owner

    # ------------------------------------------------------------ transport

    def request(self, kind: int, payload: bytes) -> tuple[int, bytes]:
        """Send one frame, return the reply's (kind, payload); AgentError when the agent is
        not there, closes early or misses the deadline."""
        deadline = time.monotonic() + self.timeout
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as s:
            try:
                s.settimeout(self.timeout)
                s.connect(self.path)
                # refused early (uid, connections): the reply is there to read all the same
                with contextlib.suppress(BrokenPipeError, ConnectionResetError):
                    s.sendall(frame(kind, payload))
                reply_kind, length = parse_header(
                    self._recv(s, HEADER.size, deadline), replies=True
                )
                return reply_kind, self._recv(s, length, deadline)
            except TimeoutError:
                raise AgentError(
                    f"agent at {self.path}: no reply within {self.timeout:g} s", errno.ETIMEDOUT
                ) from None
            except (FileNotFoundError, ConnectionRefusedError) as e:
                raise AgentError(f"no agent at {self.path} ({e.strerror})", e.errno) from None
            except ProtocolError as e:
                raise AgentError(f"agent at {self.path}: {e}", errno.EPROTO) from None
            except OSError as e:
                raise AgentError(f"agent at {self.path}: {e.strerror or e}", e.errno) from None

    def _recv(self, s: socket.socket, n: int, deadline: float) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            s.settimeout(left)
            try:
                chunk = s.recv(min(n - len(buf), 1 << 20))
            except ConnectionResetError:  # it died with our request unread: the same event
                raise AgentError(
                    f"agent at {self.path} closed the connection before replying (reset: it "
                    "died with the request unread)",
                    errno.ECONNRESET,
                ) from None
            if not chunk:
                raise AgentError(
                    f"agent at {self.path} closed the connection before replying",
                    errno.ECONNRESET,
                )
            buf += chunk
        return bytes(buf)

    def call(self, op: str, **args: Any) -> Any:
        """One CALL: the result, or the error raised as the library's exception type."""
        kind, payload = self.request(CALL, call_payload(op, self.owner, args))
        if kind != CALL_REPLY:
            raise AgentError(f"agent at {self.path}: a reply of kind {kind:#x} to a call")
        try:
            doc = parse_call_reply(payload)
        except ProtocolError as e:
            raise AgentError(f"agent at {self.path}: {e}", errno.EPROTO) from None
        if not doc["ok"]:
            raise error_from_doc(doc["error"])
        return doc.get("result")

    # ------------------------------------------------------------ operations

    def hook(self, stage: str, raw_state: bytes) -> tuple[int, str]:
        """What the thin hook does: (exit code, stderr text) of one OCI hook invocation."""
        kind, payload = self.request(HOOK, hook_payload(stage, raw_state))
        if kind == CALL_REPLY:  # refused before the agent could tell the kind
            doc = parse_call_reply(payload)
            return 2, str(doc.get("error", {}).get("message", "agent error"))
        if kind != HOOK_REPLY:
            raise AgentError(f"agent at {self.path}: a reply of kind {kind:#x} to a hook")
        return parse_hook_reply(payload)

    def setup(
        self,
        cfg: CgroupConfig,
        pid: int | None = None,
        *,
        strict: bool = True,
        net_carrier: str | None = None,
    ) -> AgentCgroup:
        """setup_cgroup in the agent: the cgroup is made, configured, `pid` moved in."""
        r = self.call(
            "setup", config=config_to_json(cfg), pid=pid, strict=strict, net_carrier=net_carrier
        )
        return AgentCgroup(
            Path(r["path"]), int(r["id"]), [Path(p) for p in r["created"]], r["report"]
        )

    def update(self, cg: AgentCgroup | str | Path, cfg: CgroupConfig) -> dict[str, Any]:
        """update_cgroup in the agent (only what cfg names changes); returns the report."""
        r = self.call("update", path=str(_path(cg)), config=config_to_json(cfg))
        return dict(r["report"])

    def teardown(self, cg: AgentCgroup | str | Path) -> None:
        """teardown_cgroup in the agent; an AgentCgroup also removes the ancestors setup made."""
        created = [str(p) for p in cg.created] if isinstance(cg, AgentCgroup) else []
        self.call("teardown", path=str(_path(cg)), created=created)

    def inspect(self, path: str | Path | None = None) -> dict[str, Any]:
        """`pelagos-bpf inspect --json` of one cgroup (plus "container"), or with no path
        {"cgroups": [...]} listing every cgroup with our programs."""
        return dict(self.call("inspect", path=None if path is None else str(path)))

    def gc(self) -> dict[str, Any]:
        return dict(self.call("gc"))

    def status(self) -> dict[str, Any]:
        return dict(self.call("status"))

    def metrics(self) -> str:
        return str(self.call("metrics"))


def _path(cg: AgentCgroup | str | Path) -> Path:
    return cg.path if isinstance(cg, AgentCgroup) else Path(cg)
