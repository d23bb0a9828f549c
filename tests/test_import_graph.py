"""The package's import graph: no circle, and no arrow from a lower floor to the one above.

Every `import` of every module of ditctl counts, at module level and inside functions alike
(an import moved into a function to dodge a circle is still a circle); only imports under
`if TYPE_CHECKING:` are left out, as they never run. Importing a module's own parent package
is not an arrow (Python initialises parents first).
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ditctl"

# The engine trains and loads models; the commands are built on it, never the reverse.
ENGINE_MAY_IMPORT = {"ditctl", "ditctl.config", "ditctl.console", "ditctl.errors",
                     "ditctl.fsutil", "ditctl.procutil", "ditctl.runs", "ditctl.tensorfile"}
ENGINE_MAY_IMPORT_PACKAGES = ("ditctl.engine", "ditctl.models", "ditctl.data")
COMMAND_LEVEL = ("ditctl.cli", "ditctl.train", "ditctl.train_hooks", "ditctl.sampling",
                 "ditctl.evaluation", "ditctl.export", "ditctl.status", "ditctl.precompute",
                 "ditctl.scaffold", "ditctl.oneshot", "ditctl.demo", "ditctl.report")


def _modules() -> dict[str, tuple[Path, bool]]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _runtime_imports(tree: ast.AST):
    """Import nodes that run (everything but the body of `if TYPE_CHECKING:`)."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            yield from (n for child in node.orelse for n in _runtime_imports_of(child))
            continue
        yield from _runtime_imports_of(node)


def _runtime_imports_of(node: ast.AST):
    if isinstance(node, (ast.Import, ast.ImportFrom)):
        yield node
    else:
        yield from _runtime_imports(node)


def import_graph() -> dict[str, set[str]]:
    modules = _modules()

    def known(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {}
    for module, (path, is_package) in modules.items():
        targets: set[str] = set()
        for node in _runtime_imports(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                base = node.module or ""
                if node.level:
                    parts = module.split(".")[:len(module.split(".")) - node.level + is_package]
                    base = ".".join(parts + ([node.module] if node.module else []))
                # `from x import y` imports x.y when y is a module, else just x
                names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base
                         for alias in node.names]
            targets |= {t for t in map(known, names) if t}
        ancestors = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
        graph[module] = targets - ancestors - {module}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(graph.get(node, ())):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def _within(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def test_the_walk_sees_module_and_function_level_imports():
    graph = import_graph()
    assert "ditctl.runs" in graph["ditctl.engine.checkpoint"]  # module level
    assert "ditctl.data.ingest" in graph["ditctl.train"]  # inside ensure_manifest
    assert "ditctl.data.cache" not in graph["ditctl.data.batches"]  # TYPE_CHECKING only


def test_no_import_cycles():
    assert _cycles(import_graph()) == []


def test_the_engine_imports_nothing_above_it():
    wrong = {(module, target) for module, targets in import_graph().items()
             if _within(module, ("ditctl.engine",)) for target in targets
             if target not in ENGINE_MAY_IMPORT
             and not _within(target, ENGINE_MAY_IMPORT_PACKAGES)}
    assert wrong == set()
    assert not any(_within(t, COMMAND_LEVEL) for m, ts in import_graph().items()
                   if _within(m, ("ditctl.engine",)) for t in ts)


def test_evaluation_knows_plugins_only_through_the_metric_interface():
    graph = import_graph()
    assert not {(m, t) for m, ts in graph.items() if _within(m, ("ditctl.evaluation",))
                for t in ts if _within(t, ("ditctl.demo",))}
