"""The layering, checked from the source with the standard library's `ast`: imports run one way
(server -> synthesizer -> engine -> interfaces <- families), no module-level import cycle, the
engine imports no family, and nothing below the server imports it."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "cosyserve"


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _resolve(module: str, node: ast.ImportFrom) -> list[str]:
    """Absolute module names an ``ImportFrom`` refers to (the module, or its submodules)."""
    if node.level:
        base = module.split(".")[: len(module.split(".")) - node.level + (1 if _is_package(module) else 0)]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    names = [f"{target}.{alias.name}" for alias in node.names]
    return [target] + [n for n in names if n in MODULES]


def _is_package(module: str) -> bool:
    return (PACKAGE.parent / module.replace(".", "/") / "__init__.py").exists()


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(module: str, tree: ast.Module, module_level_only: bool) -> set[str]:
    found: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.Import):
                found.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                found.update(_resolve(module, node))
            elif isinstance(node, ast.If):
                if not _type_checking(node):
                    visit(node.body)
                    visit(node.orelse)
            elif isinstance(node, (ast.Try,)):
                visit(node.body)
                for handler in node.handlers:
                    visit(handler.body)
                visit(node.orelse)
                visit(node.finalbody)
            elif not module_level_only:
                for child in ast.walk(node):
                    if isinstance(child, ast.Import):
                        found.update(alias.name for alias in child.names)
                    elif isinstance(child, ast.ImportFrom):
                        found.update(_resolve(module, child))

    visit(tree.body)
    return {name for name in found if name == "cosyserve" or name.startswith("cosyserve.")}


SOURCES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
MODULES = set(SOURCES)
TREES = {name: ast.parse(path.read_text(encoding="utf-8")) for name, path in SOURCES.items()}


def _graph(module_level_only: bool) -> dict[str, set[str]]:
    graph = {}
    for name, tree in TREES.items():
        targets = set()
        for imported in _imports(name, tree, module_level_only):
            # `import a.b.c` also runs a and a.b: count the deepest module that exists.
            while imported not in MODULES and "." in imported:
                imported = imported.rsplit(".", 1)[0]
            if imported in MODULES and imported != name:
                targets.add(imported)
        graph[name] = targets
    return graph


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    WHITE, GREY, BLACK = 0, 1, 2
    colour = dict.fromkeys(graph, WHITE)
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        colour[node] = GREY
        stack.append(node)
        for nxt in sorted(graph[node]):
            if colour[nxt] == GREY:
                return stack[stack.index(nxt) :] + [nxt]
            if colour[nxt] == WHITE and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        colour[node] = BLACK
        return None

    for node in sorted(graph):
        if colour[node] == WHITE and (cycle := dfs(node)):
            return cycle
    return None


def test_the_checker_finds_a_cycle() -> None:
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_no_import_cycle_at_module_level() -> None:
    cycle = _find_cycle(_graph(module_level_only=True))
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def _importers(prefix: str, of: str) -> list[str]:
    """Modules under ``prefix`` that import anything under ``of`` (function-level imports too)."""
    graph = _graph(module_level_only=False)
    return sorted(
        f"{name} -> {target}"
        for name, targets in graph.items()
        if name.startswith(prefix)
        for target in targets
        if target == of or target.startswith(of + ".")
    )


def test_engine_imports_no_family() -> None:
    assert _importers("cosyserve.engine", "cosyserve.families") == []


def test_families_import_neither_engine_nor_server_nor_acceleration() -> None:
    for layer in ("cosyserve.engine", "cosyserve.server", "cosyserve.acceleration", "cosyserve.synthesizer"):
        assert _importers("cosyserve.families", layer) == []


def test_nothing_below_the_server_imports_it() -> None:
    below = ("cosyserve.engine", "cosyserve.families", "cosyserve.nn", "cosyserve.text", "cosyserve.voices")
    for prefix in below:
        assert _importers(prefix, "cosyserve.server") == []


def test_interfaces_and_api_stay_at_the_bottom() -> None:
    for module in ("cosyserve.api", "cosyserve.interfaces"):
        assert {t for t in _graph(module_level_only=False)[module]} <= {"cosyserve.api", "cosyserve.errors"}
