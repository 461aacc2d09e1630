"""The import structure, read from the source: no import cycles among the project's modules
(function-level imports count too: a cycle hidden inside a function is still a cycle), logic
modules that import neither Dagster nor the resources, and resources that depend on logic only.

The layers: logic (pure Python, torch, vLLM; testable without Dagster) <- resources (Dagster
resources built on the logic) <- the Dagster layer (assets, checks, sensors, jobs, the CLI and the
code location), which may import both."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

PACKAGES = ("music_assets", "resources")
# The modules of music_assets that define Dagster objects or drive Dagster (each stage's assets.py,
# the code location, automation, the CLI); every other module is logic. A new module is logic
# unless it is added here.
DAGSTER_LAYER = {
    "music_assets.assembly", "music_assets.automation", "music_assets.cli", "music_assets.definitions",
    "music_assets.lineage", "music_assets.settings",
    "music_assets.common.metadata", "music_assets.common.partitions",
    "music_assets.seeds.assets", "music_assets.simulation.assets", "music_assets.curation.assets",
    "music_assets.training.assets", "music_assets.evaluation.assets", "music_assets.evaluation.best_of_n_assets",
}
# dagster-pipes is the small protocol library a Pipes job (train_rm) reports through, not Dagster.
ALLOWED_IN_LOGIC = {"dagster_pipes"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module name an import statement in the file names (at any depth of the file)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def project_graph() -> tuple[dict[str, set[str]], dict[str, set[str]]]:
    """({module: project modules it imports}, {module: every name it imports})."""
    files = {module_name(p): p for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))}
    names = {m: imports_of(p) for m, p in files.items()}
    return {m: {n for n in imported if n in files and n != m} for m, imported in names.items()}, names


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles():
    graph, _ = project_graph()
    assert not cycles(graph), f"import cycles: {cycles(graph)}"


def test_logic_imports_neither_dagster_nor_resources():
    graph, names = project_graph()
    assert DAGSTER_LAYER <= graph.keys(), f"listed but missing: {sorted(DAGSTER_LAYER - graph.keys())}"
    offences = {}
    for module, imported in names.items():
        if not module.startswith("music_assets") or module in DAGSTER_LAYER:
            continue
        bad = sorted(n for n in imported if (n.split(".")[0].startswith("dagster") and n.split(".")[0]
                                             not in ALLOWED_IN_LOGIC) or n.split(".")[0] == "resources")
        if bad:
            offences[module] = bad
    assert not offences, f"logic modules importing Dagster or resources: {offences}"


def test_resources_depend_on_logic_only():
    graph, _ = project_graph()
    offences = {m: sorted(graph[m] & DAGSTER_LAYER) for m in graph if m.startswith("resources") and graph[m] & DAGSTER_LAYER}
    assert not offences, f"resources importing the Dagster layer: {offences}"
