"""The registry of cgroup-BPF features: what `compile` builds and `gc` sweeps.

Listed explicitly (no discovery by module name): a third feature is one more line here.
"""

from __future__ import annotations

from collections.abc import Iterable

from .devices import program as devices_program
from .feature import Feature
from .net import program as net_program

FEATURES: tuple[Feature, ...] = (devices_program.FEATURE, net_program.FEATURE)


def all_programs(names: Iterable[str] | None = None) -> list[tuple[str, str, int]]:
    """(bpf/ source name, function, prog type) of every program the features load (all
    features, or those named: "devices", "net")."""
    wanted = None if names is None else set(names)
    out = [
        (f.current.source, p.func, int(p.prog_type))
        for f in FEATURES
        if wanted is None or f.name in wanted
        for p in f.current.progs
    ]
    if wanted is None or net_program.FEATURE.name in wanted:
        out += net_program.PROGRAMS  # the tc classifier, loaded outside the cgroup runtime
    return list(dict.fromkeys(out))
