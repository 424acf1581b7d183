"""graphopt's floors: every import inside the package points down, and no import cycle exists.

``FLOORS`` is the one table of allowed directions (the passes README shows it, and a test below
checks that it shows this one). A module belongs to a room: the first folder under ``graphopt/``
(``graphopt/analysis/cost_model.py`` -> ``analysis``), or the module itself at the top
(``_compat``, ``config``, ``demo``, ...). A room may import its own modules and any room on a lower
floor; never a room on its own floor (rooms of one floor know nothing of each other) or above.
Imports inside functions count: a lazy import is still a dependency, only a later one.
"""

from __future__ import annotations

import ast
import pathlib
import re

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "graphopt"

# Lowest floor first.
FLOORS: list[tuple[str, ...]] = [
    ("_compat",),                          # every private torch API
    ("kernels",),                          # Triton kernels: tensors in, tensors out
    ("analysis", "distributed"),           # models of cost and memory; runtimes of communication
    ("config",),                           # typed flags (a device profile is checked as one loads)
    ("debug", "measure", "ops"),           # dumps; measurement on the device; custom ops
    ("passes",),                           # graph rewrites and the pass manager
    ("backends",),                         # the torch.compile backend: the pipeline driver
    ("models",),                           # the reference Llama
    ("planning",),                         # the layout planner, and applying its plan
    ("__init__",),                         # `import graphopt` (graphopt.parallelize: the planner's)
    ("demo",),                             # `python -m graphopt demo`
    ("__main__",),                         # the command line
]


def _floor_of() -> dict[str, int]:
    return {room: index for index, rooms in enumerate(FLOORS) for room in rooms}


def _module_name(path: pathlib.Path) -> str:
    parts = ("graphopt",) + path.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _room(module: str) -> str:
    parts = module.split(".")
    return "__init__" if len(parts) == 1 else parts[1]


def _modules() -> dict[str, pathlib.Path]:
    return {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imports(path: pathlib.Path, module: str, known: set[str]) -> list[tuple[str, int]]:
    """(imported graphopt module, line) for every import statement in the file, lazy ones too."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:  # `from graphopt.x import y`: y may be a module or a name
                target = f"{base}.{alias.name}"
                found.append((target if target in known else base, node.lineno))
    return [(name, line) for name, line in found if name == "graphopt" or name.startswith("graphopt.")]


def _import_graph() -> dict[str, list[tuple[str, int]]]:
    modules = _modules()
    known = set(modules)
    return {module: _imports(path, module, known) for module, path in modules.items()}


def test_every_room_has_a_floor():
    rooms = {_room(module) for module in _modules()}
    assert rooms <= set(_floor_of()), f"rooms without a floor in FLOORS: {sorted(rooms - set(_floor_of()))}"


def test_imports_point_down_a_floor():
    floor = _floor_of()
    wrong = []
    for module, imports in _import_graph().items():
        room = _room(module)
        for target, line in imports:
            other = _room(target)
            if other == room:
                continue
            if floor[other] >= floor[room]:
                where = "sideways to" if floor[other] == floor[room] else "up to"
                wrong.append(f"{module}:{line} imports {target}: {room} (floor {floor[room]}) points "
                             f"{where} {other} (floor {floor[other]})")
    assert not wrong, "imports against graphopt's floors (tests/unit/test_layering.py FLOORS):\n" + \
        "\n".join(wrong)


def test_no_import_cycle():
    graph = _import_graph()
    edges = {module: sorted({target for target, _ in imports if target in graph and target != module})
             for module, imports in graph.items()}
    cycles = [component for component in _strongly_connected(edges) if len(component) > 1]
    assert not cycles, "import cycles (lazy imports included): " + "; ".join(
        " <-> ".join(sorted(component)) for component in cycles)


def _strongly_connected(edges: dict[str, list[str]]) -> list[list[str]]:
    """Tarjan's components of a directed graph."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in edges.get(node, ()):
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            components.append(component)

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return components


def test_a_cycle_and_an_upward_import_are_found(tmp_path, monkeypatch):
    """The checks themselves: a kernel that imports an op (up) which imports it back (a cycle)."""
    package = tmp_path / "graphopt"
    (package / "kernels").mkdir(parents=True)
    (package / "ops").mkdir()
    for init in (package, package / "kernels", package / "ops"):
        (init / "__init__.py").write_text("")
    (package / "kernels" / "merge.py").write_text(
        "def merge():\n    from graphopt.ops.attention import blocks\n    return blocks\n")
    (package / "ops" / "attention.py").write_text(
        "from graphopt.kernels import merge\n\ndef blocks():\n    return merge\n")
    monkeypatch.setitem(globals(), "PACKAGE", package)
    with pytest.raises(AssertionError, match=r"graphopt.kernels.merge:2 imports graphopt.ops.attention"):
        test_imports_point_down_a_floor()
    with pytest.raises(AssertionError, match="graphopt.kernels.merge <-> graphopt.ops.attention"):
        test_no_import_cycle()


def test_the_passes_readme_shows_these_floors():
    readme = (PACKAGE / "passes" / "README.md").read_text()
    shown = {}
    for line in readme.splitlines():
        match = re.match(r"\|\s*(\d+)\s*\|([^|]*)\|", line)
        if match:
            shown[int(match.group(1))] = tuple(sorted(re.findall(r"`([^`]+)`", match.group(2))))
    assert shown == {index: tuple(sorted(rooms)) for index, rooms in enumerate(FLOORS)}, (
        "graphopt/passes/README.md's floors table differs from FLOORS in tests/unit/test_layering.py")
