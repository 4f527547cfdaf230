"""Which of our pinned programs systemd attaches to a scope (`BPFProgram=type:pin`).

Why systemd and not us: an attachment systemd made is one it keeps across daemon-reload,
daemon-reexec and set-property, and `systemctl show` names it (crun hands its device program to
systemd the same way, crun #1765). The program must be pinned, so it comes from the node's pin
set (pins.py): the same programs and maps every process of the node fetches, so the rule sets
and net settings written later into those maps reach what systemd attached. Each scope's state
is keyed by its cgroup id, so one pin serves every scope.

What systemd holds is fixed at start (BPFProgram is read-only on a running unit, measured on
252): the runtime owner's device program and the net programs of the scope's carrier.
"""

from __future__ import annotations

import errno
import os

from .. import bpfsys, pins
from ..errors import BpfError, ConfigError
from ..layers import Layer
from ..loader import Loaded
from ..owners import RUNTIME
from .driver import BPF_ATTACH_TYPES
from .properties import SINCE

KIND_OF_ATTACH: dict[int, str] = {v: k for k, v in BPF_ATTACH_TYPES.items()}
NET_KINDS = frozenset({"egress", "ingress", "sock_create", "setsockopt"})


def why_not_systemd(version: int) -> str | None:
    """None when systemd `version` can hold our programs here; else why not (the programs are
    then attached inside the delegated scope, which daemon-reload leaves alone as well)."""
    if version < SINCE["BPFProgram"]:
        return f"systemd {version} lacks BPFProgram= (since {SINCE['BPFProgram']})"
    if pins.pin_dir() is None:
        return (
            f"pins are off (${pins.PIN_ENV} set but empty, or /sys/fs/bpf is not a bpffs): "
            "systemd attaches pinned programs only"
        )
    return None


def _pinned(loaded: Loaded, layer: Layer, func: str, setting: str) -> str:
    """The pin path of `func` in this process's (fetched or freshly pinned) set, checked to be
    the very program this process loaded: the maps we write must be the attached program's."""
    d = pins.pin_dir()
    if d is None:
        raise ConfigError(setting, None, "no pin dir: systemd attaches pinned programs only")
    path = pins.pin_paths(layer, d)[func]
    try:
        fd = bpfsys.obj_get(path)
    except BpfError as e:
        raise BpfError(
            e.errno or errno.ENOENT,
            setting,
            f"{path}: this process's programs are not pinned there ({e})",
        ) from None
    try:
        pinned = bpfsys.prog_info(fd).id
    finally:
        os.close(fd)
    if pinned != loaded.ids[func]:
        raise BpfError(
            errno.ESTALE,
            setting,
            f"{path} holds program {pinned}, not this process's {loaded.ids[func]} (the pin "
            f"set changed under a running process; ${pins.PIN_ENV} changed?)",
        )
    return path


def device_entry() -> tuple[str, str]:
    """("device", pin) of the runtime owner's device program."""
    from ..devices import layout as lay
    from ..devices import program as devprog

    loaded = devprog.own_program()
    return ("device", _pinned(loaded, devprog.FEATURE.current, lay.FUNCS[RUNTIME], "device_rules"))


def net_entries(carrier: str) -> list[tuple[str, str]]:
    """(type, pin) of the net programs of `carrier`: egress + ingress (per packet), or
    sock_create + setsockopt (carrier "socket")."""
    from ..net import layout as lay
    from ..net import program as netprog

    loaded = netprog.shared_programs()
    specs = lay.SOCKET_PROGS if carrier == "socket" else lay.PACKET_PROGS
    out = []
    for spec in specs:
        assert spec.attach_type is not None
        path = _pinned(loaded, netprog.FEATURE.current, spec.func, "net_classid")
        out.append((KIND_OF_ATTACH[int(spec.attach_type)], path))
    return out


def net_kinds_for(carrier: str) -> frozenset[str]:
    """The BPFProgram= types a carrier's programs attach as."""
    return frozenset(
        {"sock_create", "setsockopt"} if carrier == "socket" else {"egress", "ingress"}
    )
