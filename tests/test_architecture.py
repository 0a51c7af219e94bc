"""The import graph of runner/ and geometry/: no cycle, and no project import hidden inside a
function (the usual way to dodge a cycle) except where an optional dependency requires it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("runner", "geometry")
# Modules that may import project modules lazily: those that load an optional dependency
# (mlx, jax) only when a backend is picked, and the task table of the entry point.
LAZY_IMPORTERS = {"runner.app", "runner.hardware"}
LAZY_PREFIXES = ("runner.models.backends",)
OPTIONAL_MODULES = ("geometry._mlx", "geometry._jax")  # import mlx / jax at module level


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))}


def _targets(node: ast.AST, module: str, modules: dict[str, Path]) -> list[str]:
    """The project modules an import statement loads."""
    if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            pkg = module.split(".")[: -node.level] if not modules[module].name == "__init__.py" \
                else module.split(".")[: len(module.split(".")) - node.level + 1]
            base = ".".join([*pkg, base] if base else pkg)
        names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base
                 for a in node.names]
    else:
        return []
    found = [n for n in names if n.split(".")[0] in PACKAGES and n in modules]
    # Importing a.b.c first runs the __init__ of every package above it that is not already
    # running (a package above the importer is): those imports are edges too.
    mine = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 2)}
    parents = {".".join(n.split(".")[:i]) for n in found for i in range(1, n.count(".") + 1)}
    return found + sorted(p for p in parents - mine if p in modules)


def _imports() -> tuple[dict[str, set[str]], list[str]]:
    """(module -> project modules imported at module level, lazy project imports found)."""
    modules = _modules()
    graph, lazy = {}, []
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        top = set()
        for node in tree.body:
            if isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks load nothing at run time
                continue
            for sub in ast.walk(node) if isinstance(node, ast.Try) else [node]:
                top.update(_targets(sub, name, modules))
        graph[name] = top - {name}
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(fn):
                    for target in _targets(sub, name, modules):
                        lazy.append(f"{name} -> {target} (line {sub.lineno})")
    return graph, lazy


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_import_graph_is_found() -> None:
    graph, _ = _imports()
    assert "runner.trial" in graph["runner.tasks.train"]  # the parser sees real imports
    assert "runner.ledger" in graph["runner.trial"]


def test_no_import_cycle_in_runner_or_geometry() -> None:
    graph, _ = _imports()
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_a_package_init_counts_as_an_import() -> None:
    """`from runner.b.y import f` in runner.a.x also runs runner/b/__init__.py: an edge, so a
    cycle through a package's __init__ (b/__init__ -> b.z -> a.x) is found."""
    names = ("runner", "runner.a", "runner.a.x", "runner.b", "runner.b.y")
    modules = {m: Path(m.replace(".", "/") + ".py") for m in names}
    node = ast.parse("from runner.b.y import f").body[0]
    assert _targets(node, "runner.a.x", modules) == ["runner.b.y", "runner.b"]


def test_a_planted_cycle_is_found() -> None:
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": set()}) is None


def test_no_project_import_inside_a_function() -> None:
    _, lazy = _imports()
    hidden = [line for line in lazy
              if not (line.split(" -> ")[0] in LAZY_IMPORTERS
                      or line.startswith(LAZY_PREFIXES)
                      or line.split(" -> ")[1].split(" ")[0] in OPTIONAL_MODULES)]
    assert not hidden, "project imports inside functions:\n" + "\n".join(hidden)
