"""No import runs upward: every module under testbed/ imports only its own layer or lower ones,
and fit/ has no import cycle. Function-local imports count: hiding an import inside a function
moves the error from import time to run time, it does not remove the dependency."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "testbed"

# Bottom to top; a module may import its own layer and any lower one. The longest matching
# prefix decides a module's layer.
LAYERS = {
    "testbed": 0,  # the package itself (its __init__ imports nothing)
    "testbed.errors": 0,
    "testbed.exits": 0,  # the trainer's exit contract
    "testbed.rundir": 1,  # the run directory's files (standard library and errors only)
    "testbed.registry": 1,
    "testbed.stats": 1,  # the statistics fit/ and study/ share (numpy, scipy, pandas only)
    "testbed.schedules": 2,
    "testbed.config": 3,
    "testbed.model": 4,
    "testbed.data": 4,
    "testbed.optim": 4,  # optimisers are registered parts, like the model's
    "testbed.plan": 5,
    "testbed.train": 6,
    "testbed.fit": 6,
    "testbed.sweep": 6,
    # Studies run sweeps, branch runs and fit the results: above train/, fit/ and sweep/.
    "testbed.study": 7,
    # The command line: testbed.cli and each subsystem's cli module.
    "testbed.cli": 8,
    "testbed.__main__": 8,
    "testbed.train.cli": 8,
    "testbed.data.cli": 8,
    "testbed.sweep.cli": 8,
    "testbed.fit.cli": 8,
    "testbed.study.cli": 8,
}

# (importer, imported) pairs allowed to run upward, each with the reason.
EXCEPTIONS = {
    # The fork server's children run the `testbed` command; only the server process (python -m
    # testbed.sweep.forkserver) imports it, never the executor that imports the client class.
    ("testbed.sweep.forkserver", "testbed.cli"): "the forked child runs the command line",
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def layer_of(name: str) -> int:
    best = max((p for p in LAYERS if name == p or name.startswith(p + ".")), key=len, default=None)
    assert best is not None, f"{name} has no layer; add it to LAYERS"
    return LAYERS[best]


def imports_of(path: Path) -> set[str]:
    """Every testbed module `path` imports, at any depth of the code (functions included)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            # `from testbed.fit.laws import annealing` imports the submodule testbed.fit.laws.annealing.
            found |= {f"{module}.{a.name}" for a in node.names
                      if (PACKAGE.parent / f"{module}.{a.name}".replace(".", "/")).with_suffix(".py").exists()}
    return {m for m in found if m == "testbed" or m.startswith("testbed.")}


def import_graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in sorted(PACKAGE.rglob("*.py"))}


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    out = []
    for importer, imported in graph.items():
        for target in sorted(imported):
            if layer_of(target) > layer_of(importer) and (importer, target) not in EXCEPTIONS:
                out.append(f"{importer} (layer {layer_of(importer)}) imports {target} (layer {layer_of(target)})")
    return out


def cycles(graph: dict[str, set[str]], within: str) -> list[list[str]]:
    """Elementary cycles found by depth-first search among the modules under `within`."""
    nodes = {n for n in graph if n == within or n.startswith(within + ".")}
    edges = {n: sorted(m for m in graph[n] if m in nodes and m != n) for n in nodes}
    found, state, stack = [], {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in edges[node]:
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(nodes):
        if node not in state:
            visit(node)
    return found


def test_every_module_has_a_layer():
    for name in import_graph():
        layer_of(name)


def test_no_import_runs_upward():
    assert upward_imports(import_graph()) == []


@pytest.mark.parametrize("package", ["testbed.fit", "testbed"])
def test_no_import_cycle(package):
    # The package __init__ files are left out: `from testbed.fit import x` names the package
    # only as the way to reach x.
    graph = {k: {m for m in v if m not in ("testbed", "testbed.fit", "testbed.train", "testbed.model",
                                           "testbed.data", "testbed.sweep")} for k, v in import_graph().items()}
    if package == "testbed":
        # The fork server's upward import is the one allowed exception; nothing else loops.
        graph["testbed.sweep.forkserver"] -= {"testbed.cli"}
    assert cycles(graph, package) == []


def test_the_checks_catch_what_they_claim():
    """The checks on a made-up graph: an upward import (as a function-local one is seen) and a cycle."""
    graph = {"testbed.config": {"testbed.train.trainer"}, "testbed.fit.a": {"testbed.fit.b"},
             "testbed.fit.b": {"testbed.fit.a"}, "testbed.train.trainer": set()}
    assert upward_imports(graph) == ["testbed.config (layer 3) imports testbed.train.trainer (layer 6)"]
    assert cycles(graph, "testbed.fit") == [["testbed.fit.a", "testbed.fit.b", "testbed.fit.a"]]
