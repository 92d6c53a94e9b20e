"""The package's folders are its layers, and imports respect them: a module imports at module level only from
its own layer or the layers below (`LAYERS`, bottom first), and the module-level import graph has no cycles.
An import inside a function (done when it runs, e.g. a stage kind's module looked up by name) is free."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "align"

LAYERS = [
    {"errors"},                             # what a user can act on
    {"config", "objectives"},               # the recipe schema; pure tensor objectives
    {"runtime", "registry"},                # the machine; the model registry
    {"data", "models"},                     # rows to examples; model refs, loading, generation
    {"eval", "rewards", "rl"},              # the evaluation hook; rewards and checkers; the PPO loop
    {"stages"},                             # one lifecycle, one module per kind
    {"pipeline", "export", "playground"},   # plan and run; merge and export; chat
    {"cli"},                                # the command
]


def _layer(module: str) -> int | None:
    parts = module.split(".")
    if parts[0] != "align" or len(parts) < 2:
        return None
    for index, names in enumerate(LAYERS):
        if parts[1] in names:
            return index
    raise AssertionError(f"{module}: its folder {parts[1]!r} is in no layer of LAYERS")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _top_level_imports(path: Path) -> set[str]:
    """Modules imported when `path` is imported: module-level statements, not those inside functions."""
    found = set()
    for node in ast.parse(path.read_text()).body:
        nodes = [node]
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            continue  # for type checkers only, never imported when the module is
        if isinstance(node, (ast.If, ast.Try)):
            nodes += [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
        for n in nodes:
            if isinstance(n, ast.Import):
                found |= {alias.name for alias in n.names}
            elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
                found.add(n.module)
                found |= {f"{n.module}.{alias.name}" for alias in n.names}  # `from align.x import module`
    return {name for name in found if name.startswith("align.")}


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: {m for m in _top_level_imports(path) if m in modules and m != name}
            for name, path in modules.items()}


def test_every_module_imports_only_from_its_layer_or_below():
    wrong = []
    for module, imports in _graph().items():
        own = _layer(module)
        for imported in imports:
            theirs = _layer(imported)
            if own is not None and theirs is not None and theirs > own:
                wrong.append(f"{module} (layer {own}) imports {imported} (layer {theirs})")
    assert wrong == []


def test_the_module_level_import_graph_has_no_cycles():
    graph, state, cycles = _graph(), {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]) if nxt in path else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    assert cycles == []


def test_no_module_is_over_400_lines():
    long = {_module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > 400}
    assert long == {}
