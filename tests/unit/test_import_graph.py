"""The import graph of `pipeline/` and `jobs/`, read with `ast` (nothing is imported):

- no cycles between modules. A function-level import is still a dependency (it only moves the failure
  from import time to call time), so imports inside functions count like module-level ones. Only imports
  under `if TYPE_CHECKING:` are left out: they never run.
- the light packages (tool calling, the typed config, the OpenAI formats and request checks, records and
  images, the endpoint's request guard, the report's model and HTML, the parity comparison and its driver,
  which leaves the engines to their own processes) import no Ray and no vLLM, directly
  or through any pipeline module they import: they are used by the job's driver, the endpoint's ingress
  and the tests of pure logic, and vLLM's plugin loader imports `pipeline.tools` in every engine process.
"""
from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

from tests.conftest import ROOT

PACKAGES = ("pipeline", "jobs")
HEAVY = ("ray", "vllm")
# Module or package names that must stay free of HEAVY. Each must exist (as `name.py` or `name/`): a
# renamed or moved package must be renamed here too, not silently dropped from the check.
LIGHT = ("pipeline.tools", "pipeline.config", "pipeline.openai", "pipeline.io", "pipeline.report.model",
         "pipeline.report.html", "pipeline.serve.guard", "pipeline.engine.checkpoint_layout",
         "pipeline.parity.compare", "pipeline.parity.run")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def collect_modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            modules[module_name(path)] = path
    return modules


MODULES = collect_modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """Every Import/ImportFrom node, at any depth, except those under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        children = list(ast.iter_child_nodes(node))
        if isinstance(node, ast.If) and _is_type_checking(node):
            children = node.orelse
        stack.extend(children)


def _internal(dotted: str) -> str | None:
    """The deepest module of ours that `import dotted` loads (`a.b.c` may name an attribute of `a.b`)."""
    parts = dotted.split(".")
    while parts:
        name = ".".join(parts)
        if name in MODULES:
            return name
        parts.pop()
    return None


def dependencies(name: str) -> tuple[set[str], set[str]]:
    """(modules of ours, top-level external packages) that module `name` imports."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    internal, external = set(), set()

    def add(dotted: str) -> None:
        target = _internal(dotted)
        if target is not None:
            internal.add(target)
        elif dotted.split(".")[0] not in PACKAGES:
            external.add(dotted.split(".")[0])

    for node in _imports(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
            continue
        if node.level:
            base_parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            base = ".".join(base_parts + ([node.module] if node.module else []))
        else:
            base = node.module
        for alias in node.names:
            # `from pkg import sub` loads the submodule `pkg.sub` when there is one; otherwise a name of pkg.
            submodule = f"{base}.{alias.name}"
            add(submodule if submodule in MODULES else base)
    internal.discard(name)  # `from . import x` inside x's own package __init__ resolves to itself only
    return internal, external


GRAPH = {name: dependencies(name) for name in MODULES}


def strongly_connected(edges: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's algorithm, iterative; components of more than one module."""
    index, low, on_stack, stack, components = {}, {}, set(), [], []
    counter = 0
    for root in sorted(edges):
        if root in index:
            continue
        work = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return components


def shortest_path(edges: dict[str, set[str]], start: str, goal: set[str] | str) -> list[str] | None:
    goals = {goal} if isinstance(goal, str) else goal
    previous: dict[str, str | None] = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for child in sorted(edges[node]):
            if child in goals:
                path = [child, node]
                while previous[path[-1]] is not None:
                    path.append(previous[path[-1]])
                return path[::-1]
            if child not in previous:
                previous[child] = node
                queue.append(child)
    return None


def find_cycles() -> list[str]:
    edges = {name: internal for name, (internal, _) in GRAPH.items()}
    cycles = []
    for component in strongly_connected(edges):
        members = set(component)
        inside = {name: edges[name] & members for name in component}
        cycles.append(" -> ".join(shortest_path(inside, component[0], component[0])) +
                      (f"   (component: {', '.join(component)})" if len(component) > 2 else ""))
    return cycles


def light_modules(prefix: str) -> list[str]:
    return sorted(name for name in MODULES if name == prefix or name.startswith(prefix + "."))


def heavy_paths(name: str) -> list[str]:
    """For each HEAVY package reachable from `name`: one import path to it."""
    edges = {module: internal for module, (internal, _) in GRAPH.items()}
    found = []
    for heavy in HEAVY:
        importers = {module for module, (_, external) in GRAPH.items() if heavy in external}
        if name in importers:
            found.append(f"{name} -> {heavy}")
            continue
        path = shortest_path(edges, name, importers)
        if path is not None:
            found.append(" -> ".join(path + [heavy]))
    return found


def test_the_graph_sees_our_modules_and_their_imports():
    """The walk itself: function-level and relative imports resolve to our modules, external ones to
    their top-level package."""
    assert {"pipeline.config", "pipeline.batch.caption", "jobs.caption"} <= MODULES.keys()
    internal, external = GRAPH["pipeline.batch.caption"]
    assert "pipeline.config" in internal and "ray" in external
    # pipeline/__init__.py: `from .config import ...`
    assert "pipeline.config" in GRAPH["pipeline"][0]


def test_no_import_cycles():
    cycles = find_cycles()
    assert not cycles, "import cycles between modules:\n" + "\n".join(cycles)


def test_light_packages_import_no_ray_or_vllm():
    missing = [prefix for prefix in LIGHT if not light_modules(prefix)]
    assert not missing, f"listed light packages not found (renamed? update LIGHT): {missing}"
    problems = []
    for prefix in LIGHT:
        for name in light_modules(prefix):
            problems.extend(heavy_paths(name))
    assert not problems, "light packages reach Ray or vLLM:\n" + "\n".join(problems)
