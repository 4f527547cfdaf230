"""`pelagos-bpf agent`: one resident process per node that serves the OCI hook (through the
thin C client, hook/pelagos-bpf-hook.c), library callers (`Client`) and operators (status,
Prometheus metrics) over a root-only unix socket. See docs/AGENT.md.

Importing this package loads only the client side (no BPF, no cgroup code).
"""

from __future__ import annotations

from .client import AgentCgroup, Client
from .codec import AgentError

__all__ = ["AgentCgroup", "AgentError", "Client"]
