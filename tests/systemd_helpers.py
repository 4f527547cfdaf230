"""What the systemd-driver tests share: whether this machine can run them, and their deadline."""

from __future__ import annotations

import os
from pathlib import Path

DEADLINE = 60.0  # generous: TCG guests are slow


def not_under_systemd() -> str | None:
    """Why the systemd tests cannot run here (None: they can): root, systemd as PID 1, jeepney."""
    if os.geteuid() != 0:
        return "needs root"
    try:
        pid1 = Path("/proc/1/comm").read_text().strip()
    except OSError:
        pid1 = "?"
    if pid1 != "systemd" or not Path("/run/systemd/system").is_dir():
        return f"needs systemd as PID 1 (PID 1 is {pid1}): run in the --init systemd guest"
    try:
        import jeepney  # type: ignore[import-untyped]  # noqa: F401
    except ImportError:
        return "needs jeepney (pip install 'pelagos-bpf[systemd]')"
    return None
