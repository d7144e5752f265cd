"""The import graph of onnxfold runs one way:

    cli → api → pipeline/search → passes → decide/rewrite → find/measure → runtime → io/tensors → errors

Every module under ``onnxfold/`` is parsed with ``ast``; every import in it
(at module level and inside functions, where the lazy ones live) becomes an
edge to the onnxfold module it names. An edge may go to the same layer or a
lower one, never up, and the graph between modules has no cycle. Importing
a name that starts with ``_`` from another module is not allowed either: what
is shared gets a public name.

Only explicit imports count: that ``import onnxfold.x`` first runs
``onnxfold/__init__.py`` is Python's doing, not an edge of the design.
"""

from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "onnxfold"

#: Layer of each module or package (the longest matching prefix wins); an
#: import may only go to the same layer or a lower one.
LAYERS = {
    # the bottom: imported from everywhere, importing nothing of onnxfold
    "onnxfold.errors": 0,
    "onnxfold.version": 0,
    "onnxfold.profile": 0,  # stage timing, used from measure up to the CLI
    # storage: tensor data and the ONNX file (size accounting, wire format, load, save)
    "onnxfold.tensors": 1,
    "onnxfold.io": 1,
    # onnxruntime: providers, sessions, run errors; it depends on io, io never on it
    "onnxfold.runtime": 2,
    # reading the graph, and measuring a model on data
    "onnxfold.find": 3,
    "onnxfold.measure": 3,
    "onnxfold.verify": 3,  # compares two models on data: a measurement (decide.budget judges with it)
    "onnxfold.latency": 3,  # times a model: a measurement
    # deciding and rewriting
    "onnxfold.decide": 4,
    "onnxfold.rewrite": 4,
    "onnxfold.distributed": 4,  # runs measure's statistics jobs on a backend; the passes submit them
    "onnxfold.passes": 5,
    "onnxfold.options": 5,  # what a run is asked to do (holds a decide.Budget); read by the pipeline up
    # assembling a run
    "onnxfold.pipeline": 6,
    "onnxfold.search": 6,
    "onnxfold.report": 6,  # summarises a run (model, passes) for the API and the CLI
    "onnxfold.api": 7,
    "onnxfold.plot": 7,  # an API function (neuron_rates) the CLI's plot command draws
    "onnxfold.cli": 8,
    "onnxfold.__main__": 9,
    "onnxfold": 9,  # the package itself re-exports the API
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def all_modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str, layers: dict[str, int] = LAYERS) -> int | None:
    best = max((p for p in layers if module == p or module.startswith(p + ".")), key=len, default=None)
    return None if best is None else layers[best]


def _target(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(module: str, source: str, is_package: bool, modules) -> list[tuple[str, str, int]]:
    """(imported onnxfold module, imported name or "", line) for every
    import in ``source``, at any depth."""
    out = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out += [(a.name, "", node.lineno) for a in node.names if a.name.split(".")[0] == "onnxfold"]
        elif isinstance(node, ast.ImportFrom):
            target = _target(module, is_package, node)
            if target.split(".")[0] != "onnxfold":
                continue
            for a in node.names:
                sub = f"{target}.{a.name}"
                out.append((sub, "", node.lineno) if sub in modules else (target, a.name, node.lineno))
    return out


def import_graph() -> dict[str, list[tuple[str, str, int]]]:
    modules = all_modules()
    return {m: imports_of(m, p.read_text(encoding="utf-8"), p.name == "__init__.py", modules)
            for m, p in modules.items()}


def upward_imports(graph, layers=LAYERS) -> list[str]:
    return [f"{m}:{line} imports {t} (layer {layer_of(m, layers)} → {layer_of(t, layers)})"
            for m, edges in graph.items() for t, _name, line in edges
            if layer_of(t, layers) > layer_of(m, layers)]


def import_cycle(graph) -> list[str] | None:
    deps = {m: {t for t, _n, _l in edges if t != m} for m, edges in graph.items()}
    try:
        graphlib.TopologicalSorter(deps).prepare()
    except graphlib.CycleError as e:
        return list(e.args[1])
    return None


def private_imports(graph) -> list[str]:
    return [f"{m}:{line} imports {name} from {t}" for m, edges in graph.items() for t, name, line in edges
            if name.startswith("_") and not name.startswith("__") and t != m]


# --------------------------------------------------------------------------


def test_every_module_has_a_layer():
    assert [m for m in all_modules() if layer_of(m) is None] == []


def test_imports_never_go_up_a_layer():
    assert upward_imports(import_graph()) == []


def test_modules_import_each_other_without_a_cycle():
    assert import_cycle(import_graph()) is None


def test_no_private_names_are_imported_across_modules():
    assert private_imports(import_graph()) == []


def test_the_checks_find_an_upward_import_a_cycle_and_a_private_import():
    modules = {"onnxfold.api": None, "onnxfold.io": None, "onnxfold.find.chains": None}
    graph = {
        "onnxfold.io": imports_of("onnxfold.io", "def f():\n    from ..api import _load\n", True, modules),
        "onnxfold.api": imports_of("onnxfold.api", "import onnxfold.io\n", False, modules),
        "onnxfold.find.chains": imports_of("onnxfold.find.chains", "from .chains import x\n", False, modules),
    }
    assert graph["onnxfold.io"] == [("onnxfold.api", "_load", 2)]  # a function-level import is seen
    assert upward_imports(graph) == ["onnxfold.io:2 imports onnxfold.api (layer 1 → 7)"]
    assert set(import_cycle(graph)) == {"onnxfold.io", "onnxfold.api"}
    assert private_imports(graph) == ["onnxfold.io:2 imports _load from onnxfold.api"]


@pytest.mark.parametrize("module, layer", [("onnxfold.find.conv", 3), ("onnxfold.io.load", 1), ("onnxfold", 9),
                                           ("onnxfold.passes", 5)])
def test_the_longest_prefix_gives_the_layer(module, layer):
    assert layer_of(module) == layer
