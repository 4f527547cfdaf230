"""Lazy access to the optional feature packages (devices, net) written by later issues.

Why lazy: `import pelagos_bpf` must stay cheap, and a feature that does not exist yet must
surface as "not implemented yet" instead of being dropped.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any


def feature(name: str) -> ModuleType | None:
    """`pelagos_bpf.<name>` if that package exists, else None (other import errors propagate)."""
    full = f"{__package__}.{name}"
    try:
        return importlib.import_module(full)
    except ModuleNotFoundError as e:
        if e.name == full:
            return None
        raise


def feature_func(name: str, func: str) -> Callable[..., Any] | None:
    """A function of a feature package, or None if the package or the function is missing."""
    mod = feature(name)
    return getattr(mod, func, None) if mod is not None else None
