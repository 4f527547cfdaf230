"""Lazy public names (PEP 562), one mechanism for every package that exports them.

Why: `import pelagos_bpf` (and `.devices`, `.net`) must not load the BPF runtime, ctypes
layouts or the compiler until a name that needs them is used; the OCI hook's input parsing
and `config` import these packages on every start.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, MutableMapping
from typing import Any


def load(
    package: str, namespace: MutableMapping[str, Any], lazy: Mapping[str, str], name: str
) -> Any:
    """`name` from the submodule `lazy[name]` of `package`, bound in the package's namespace
    so that later lookups skip its `__getattr__`; AttributeError for any other name."""
    module = lazy.get(name)
    if module is None:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", package), name)
    namespace[name] = value
    return value
