"""The registry of cgroup-BPF features: what `compile` fills and `gc` sweeps.

Listed explicitly (no discovery by module name): a third feature is one more line here.
"""

from __future__ import annotations

from .devices import program as devices_program
from .feature import Feature
from .net import program as net_program

FEATURES: tuple[Feature, ...] = (devices_program.FEATURE, net_program.FEATURE)


def all_programs() -> list[tuple[str, str, int]]:
    """(bpf/ source name, function, prog type) of every program the features load."""
    out = [(f.current.source, p.func, int(p.prog_type)) for f in FEATURES for p in f.current.progs]
    return list(dict.fromkeys([*out, *net_program.PROGRAMS]))
