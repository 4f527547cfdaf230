"""The import graph of pelagos_bpf is acyclic, function-level imports included.

Why count function-level imports: a cycle dodged with an import inside a function still ties
two modules together (neither can be understood, tested or split without the other) and only
moves the failure to run time. TYPE_CHECKING imports are excluded (they never run); lazy
PEP 562 attribute loading (`importlib.import_module` in a package's __getattr__) is not an
import statement and is allowed where it breaks no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pelagos_bpf

PKG = Path(pelagos_bpf.__file__).parent


def modules() -> dict[str, Path]:
    out = {}
    for p in PKG.rglob("*.py"):
        parts = list(p.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test):
            skip.update(id(m) for m in ast.walk(n))
    return skip


def imports_of(mod: str, path: Path, known: set[str]) -> set[str]:
    """Every pelagos_bpf module `mod` imports anywhere in its body, with the packages an import
    runs on the way (importing a.b.c runs a and a.b first)."""
    tree = ast.parse(path.read_text())
    skip = _type_checking_nodes(tree)
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names = [
                f"{prefix}.{a.name}" if f"{prefix}.{a.name}" in known else prefix
                for a in node.names
            ]
        for name in names:
            parts = name.split(".")
            for i in range(1, len(parts) + 1):
                found.add(".".join(parts[:i]))
    # A module's own ancestors run before it anyway: not an edge.
    return {d for d in found & known if d != mod and not mod.startswith(d + ".")}


def test_no_import_cycles_function_level_imports_included() -> None:
    mods = modules()
    graph = {m: imports_of(m, p, set(mods)) for m, p in mods.items()}
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


def test_the_checker_sees_a_function_level_cycle(tmp_path: Path) -> None:
    """The walk counts an import inside a function body (the kind of cycle it exists for)."""
    a = tmp_path / "a.py"
    a.write_text("def f():\n    from pkg import b\n")
    b = tmp_path / "b.py"
    b.write_text("from pkg import a\n")
    known = {"pkg", "pkg.a", "pkg.b"}
    assert imports_of("pkg.a", a, known) == {"pkg.b"}
    assert imports_of("pkg.b", b, known) == {"pkg.a"}
