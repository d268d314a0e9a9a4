"""The package's import structure: no import circle, and imports point down the layers.

Every `import` / `from ... import` in `opd/` and `kernels/` (as `opd.kernels`) is read with `ast`,
including the lazy ones inside functions (they are circles too when they run); imports under
`if TYPE_CHECKING:` are type-only and skipped. Layers, bottom to top (ARCHITECTURE.md, "Layout to
grow into"): a module may import its own layer and the layers below, never a layer above, except
the one exception listed in `UPWARD_ALLOWED` with its reason.

Run: `pytest -n 0 tests/unit/test_import_layers.py` (the failure lists the offending imports).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
# Module-name prefix -> layer. The longest matching prefix wins.
LAYERS = {
    "opd.types": 0, "opd.arguments": 0, "opd.kernels": 0, "opd.teacher.wire_header": 0,
    "opd.shard_seal": 0, "opd.trainer.trl_seams": 0,
    "opd.config": 1, "opd.guards": 1, "opd.rewards": 1, "opd.demo": 1,
    "opd.models": 2, "opd.data": 2, "opd.prompts": 2, "opd.shards": 2, "opd.objectives": 2,
    "opd.report": 2,
    "opd.teacher": 3, "opd.rollout": 3, "opd.evaluation": 3,
    "opd.trainer": 4,
    "opd.commands": 5,
    "opd.cli": 6, "opd": 6,
}  # fmt: skip
# (importer, imported): why it may point up.
UPWARD_ALLOWED: dict[tuple[str, str], str] = {}


def module_files() -> dict[str, Path]:
    files = {}
    for path in [*ROOT.glob("opd/**/*.py"), *ROOT.glob("kernels/**/*.py")]:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[0] == "kernels":  # installed as opd.kernels (pyproject's package-dir)
            parts = ["opd", *parts]
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = path
    return files


def _runtime_nodes(tree: ast.AST):
    """Every node except those under `if TYPE_CHECKING:`."""
    for node in ast.iter_child_nodes(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test).endswith("TYPE_CHECKING"):
            continue
        yield node
        yield from _runtime_nodes(node)


def imported_names(module: str, path: Path) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def import_graph() -> dict[str, set[str]]:
    """`{module: the opd modules it imports}` (a name is resolved to its longest known module)."""
    files = module_files()
    graph = {}
    for module, path in files.items():
        targets = set()
        for name in imported_names(module, path):
            while name and name not in files:
                name = name.rpartition(".")[0]
            if name and name != module:
                targets.add(name)
        graph[module] = targets
    return graph


def layer(module: str) -> int:
    prefixes = [p for p in LAYERS if module == p or module.startswith(p + ".")]
    assert prefixes, f"{module} has no layer: add it to LAYERS"
    return LAYERS[max(prefixes, key=len)]


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return cycles


def test_no_import_circle():
    assert find_cycles(import_graph()) == []


def test_imports_point_down_the_layers():
    upward = sorted(
        (module, target)
        for module, targets in import_graph().items()
        for target in targets
        if layer(target) > layer(module)
    )
    assert [edge for edge in upward if edge not in UPWARD_ALLOWED] == []
    assert len(UPWARD_ALLOWED) <= 1


def test_the_checker_sees_a_circle_and_an_upward_import():
    graph = {"opd.types": {"opd.config"}, "opd.config": {"opd.types"}, "opd.cli": set()}
    assert find_cycles(graph) == [["opd.config", "opd.types"]]
    assert layer("opd.types") < layer("opd.config") < layer("opd.teacher.local")
    assert layer("opd.trainer.trl_seams") < layer("opd.trainer.loss")


def test_stage_folders_never_import_commands():
    graph = import_graph()
    stages = [m for m in graph if not m.startswith(("opd.commands", "opd.cli")) and m != "opd"]
    assert {m: t for m in stages if (t := {x for x in graph[m] if "commands" in x})} == {}
