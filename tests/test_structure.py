"""The package's shape, checked from its source: no import circle among freezert's modules (imports inside
functions count), no module over 600 lines, FrozenModel within 400, every module's docstring says what it holds."""

from __future__ import annotations

import ast
import pathlib

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent / "freezert"


def _modules() -> dict[str, pathlib.Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(name: str, path: pathlib.Path, known: set[str]) -> set[str]:
    """Every freezert module ``name`` imports, at the top or inside a function (``TYPE_CHECKING`` blocks aside)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    skip: set[int] = set()
    for node in ast.walk(tree):  # imports for type checkers only never run
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:  # `from . import x` names a module; `from .m import f` names m
                if a.name == "_C":  # the compiled extension: a leaf
                    continue
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in known else base)
    out = set()
    for mod in found:
        while mod and mod not in known:
            mod = mod.rpartition(".")[0]
        if mod and mod != name and mod.startswith("freezert"):
            out.add(mod)
    return out


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    known = set(mods)
    graph = {name: _imports(name, path, known) for name, path in mods.items()}
    # The package roots re-export lazily (PEP 562) or import their own submodules: an edge from a package to its
    # own children is how a package is built, not a circle through the code that uses it.
    for name in graph:
        graph[name] = {m for m in graph[name] if not m.startswith(name + ".")}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state:
                found = visit(m)
                if found:
                    return found
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(graph):
        if n not in state:
            found = visit(n)
            if found:
                return found
    return None


def test_no_import_circle_among_the_packages_modules():
    graph = _graph()
    # the package root re-exports its public names lazily; modules importing `freezert` itself would close a
    # circle through it, so none may
    assert not [n for n, deps in graph.items() if "freezert" in deps and n != "freezert"], "import freezert inside"
    cycle = _cycle({n: d - {"freezert"} for n, d in graph.items()})
    assert cycle is None, " -> ".join(cycle)


@pytest.mark.parametrize("name", sorted(_modules()))
def test_modules_stay_small_and_say_what_they_hold(name):
    path = _modules()[name]
    text = path.read_text()
    assert len(text.splitlines()) <= 600, f"{name} has {len(text.splitlines())} lines"
    doc = ast.get_docstring(ast.parse(text))
    assert doc, f"{name} has no module docstring saying what it holds"


def test_frozen_model_stays_a_facade():
    tree = ast.parse((ROOT / "wrapper.py").read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "FrozenModel")
    assert cls.end_lineno - cls.lineno + 1 <= 400
