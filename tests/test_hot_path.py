"""The container-start path never loads the compiler: bcc/LLVM stay out of the process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from pelagos_bpf.features import all_programs
from pelagos_bpf.progcache import bpf_source, get_program

CHILD = r"""
import json, os, sys
import pelagos_bpf
after_import = sorted(m for m in ("bcc", "pyroute2") if m in sys.modules)
from pelagos_bpf import (CgroupConfig, DEFAULT_DEVICE_RULES, CgroupDeviceRule,
    setup_cgroup, teardown_cgroup, read_stats)
cfg = CgroupConfig(
    device_rules=[*DEFAULT_DEVICE_RULES, CgroupDeviceRule(False, "c", 1, 7, "w")],
    net_classid=0x10010,
    path=sys.argv[1],
)
cg = setup_cgroup(cfg, None)
read_stats(cg)
teardown_cgroup(cg)
print(json.dumps({"after_import": after_import, "after_setup": "bcc" in sys.modules}))
"""


def test_import_and_setup_never_import_bcc(cg_root: Path) -> None:
    # Fill the bytecode cache first (what `pelagos-bpf compile` does at install time).
    for src, func, ptype in all_programs():
        get_program(bpf_source(src), func, ptype)
    rel = f"{cg_root.name}/hot"
    out = subprocess.run(
        [sys.executable, "-c", CHILD, rel], capture_output=True, text=True, check=False, timeout=60
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"after_import": [], "after_setup": False}


def test_no_import_cycles_among_library_modules() -> None:
    """The static graph of imports between pelagos_bpf modules has no cycle."""
    import ast
    import pkgutil

    import pelagos_bpf

    pkg_dir = Path(pelagos_bpf.__file__).parent
    graph: dict[str, set[str]] = {}
    for mod in pkgutil.walk_packages([str(pkg_dir)], "pelagos_bpf."):
        name = mod.name
        rel = name.split(".")[1:]
        path = pkg_dir.joinpath(*rel)
        file = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        if not file.exists():  # a C extension (pelagos_bpf._sys): it imports no module of ours
            continue
        tree = ast.parse(file.read_text())
        base = name if file.name == "__init__.py" else name.rsplit(".", 1)[0]
        deps: set[str] = set()
        # Module-level imports (what runs at import time). TODO(lead): walk function bodies too
        # (ast.walk) once validate.py stops importing net/devices lazily (oci branch).
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and node.level:
                parts = base.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                target = f"{parent}.{node.module}" if node.module else parent
                if node.module:
                    deps.add(target)
                for alias in node.names:  # a submodule, or a name of `target` (then dropped)
                    deps.add(f"{target}.{alias.name}")
            elif isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name.startswith("pelagos_bpf"))
        graph[name] = deps
    graph = {k: {d for d in v if d in graph and d != k} for k, v in graph.items()}
    # A package's __init__ importing its own submodules is not a cycle through the package.
    for k, deps in graph.items():
        graph[k] = {d for d in deps if not k.startswith(d + ".") or d == "pelagos_bpf"}
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        stack.append(n)
        for d in sorted(graph[n]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*stack[stack.index(d) :], d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)


LAZY_API = r"""
import json, sys
import pelagos_bpf
loaded_at_import = [m for m in ("pelagos_bpf.cgroup", "pelagos_bpf.stats") if m in sys.modules]
submodules = [pelagos_bpf.gc.collect.__module__, pelagos_bpf.devices.read_state.__module__]
from pelagos_bpf import *  # every name of __all__ resolves
from pelagos_bpf.cgroup import setup_cgroup as direct
try:
    pelagos_bpf.no_such_name
    missing = "no error"
except AttributeError as e:
    missing = str(e)
print(json.dumps({
    "loaded_at_import": loaded_at_import,
    "same_object": pelagos_bpf.setup_cgroup is direct,
    "in_dir": sorted(set(pelagos_bpf.__all__) - set(dir(pelagos_bpf))),
    "submodules": submodules,
    "missing": missing,
}))
"""


def test_package_api_loads_on_first_use() -> None:
    """`import pelagos_bpf` (which every submodule import, the OCI hook's included, runs first)
    defers the library to the first use of a name, and every exported name still resolves."""
    out = subprocess.run(
        [sys.executable, "-c", LAZY_API], capture_output=True, text=True, check=True, timeout=60
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {
        "loaded_at_import": [],
        "same_object": True,
        "in_dir": [],
        "submodules": ["pelagos_bpf.gc", "pelagos_bpf.devices"],  # as the README names them
        "missing": "module 'pelagos_bpf' has no attribute 'no_such_name'",
    }
