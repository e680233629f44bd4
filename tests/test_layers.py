"""The rules of docs/design.md ("Layers", "Rules of the tree"): each layer imports only the layers
below it and the few sideways imports the design names, the import graph has no circle, and the
tree keeps its size and formatting limits."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import zigzag_mamba

PACKAGE = Path(zigzag_mamba.__file__).parent
# Lower ranks sit below higher ones.
RANKS = {"ops": 1, "orders": 2, "modules": 3, "models": 4}
# The top layer holds the optional parts; inside it only these imports run sideways.
TOP = 5
SIDEWAYS = {
    "train": {"viz", "cli"},  # the demo draws its orders; the commands share cli's arguments
    "bench": {"cli"},
    "integrations": {"train"},  # diffusers reads zigma train's checkpoints
    "viz": set(),
    "cli": set(),  # it imports the command modules by name, when it builds its parser
    "__main__": {"cli"},  # python -m zigzag_mamba
}
# train's library is its top-level modules; the commands and the ablation study sit on it.
TRAIN_APPLICATIONS = ("zigzag_mamba.train.apps", "zigzag_mamba.train.ablate")
MAX_LINES = 450
MAX_FORMAT_SKIPS = 5


def _layer(module: str) -> str:
    """zigzag_mamba.ops.backends -> ops; zigzag_mamba -> the package itself."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _rank(layer: str) -> int:
    return RANKS.get(layer, TOP)


def _imports(path: Path) -> set[str]:
    """Every zigzag_mamba module imported anywhere in the file (lazy imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return {name for name in found if name.startswith("zigzag_mamba.")}


def _modules() -> dict[str, Path]:
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts).removesuffix(".__init__")] = path
    return modules


def _violations(modules: dict[str, Path]) -> list[str]:
    """``module imports imported`` for every import the layer rules forbid."""
    found = []
    for module, path in modules.items():
        layer = _layer(module)
        if layer == "":
            continue
        for imported in sorted(_imports(path)):
            other = _layer(imported)
            if other == layer:
                continue
            if _rank(layer) < TOP:
                allowed = _rank(other) < _rank(layer)
            else:
                allowed = _rank(other) < TOP or other in SIDEWAYS[layer]
            if not allowed:
                found.append(f"{module} imports {imported}")
    return found


def _train_violations(modules: dict[str, Path]) -> list[str]:
    """The library in train/ imports none of its applications; they do not import each other."""
    found = []
    for module, path in modules.items():
        if not module.startswith("zigzag_mamba.train"):
            continue
        mine = next((app for app in TRAIN_APPLICATIONS if module.startswith(app)), None)
        for imported in _imports(path):
            theirs = next((app for app in TRAIN_APPLICATIONS if imported.startswith(app)), None)
            if theirs is not None and theirs != mine:
                found.append(f"{module} imports {imported}")
    return found


def _cycles(modules: dict[str, Path]) -> list[list[str]]:
    """Circles in the graph of imports between modules (a package stands for its __init__)."""
    graph = {m: {i for i in _imports(p) if i in modules and i != m} for m, p in modules.items()}
    # A module imports its packages' __init__ first; those edges are not circles of our making.
    for module, imported in graph.items():
        graph[module] = {i for i in imported if not module.startswith(i + ".")}
    cycles, state = [], {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append([*path[path.index(nxt) :], nxt])
            elif nxt not in state:
                visit(nxt, [*path, nxt])
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node, [node])
    return cycles


def test_each_layer_imports_only_the_layers_below_it():
    assert _violations(_modules()) == []


def test_trains_library_imports_none_of_its_applications():
    assert _train_violations(_modules()) == []


def test_the_import_graph_has_no_circle():
    assert _cycles(_modules()) == []


def test_the_rules_catch_an_upward_import_a_sideways_one_and_a_circle(tmp_path):
    kernel, trainer, loop_a, loop_b = (tmp_path / f"{n}.py" for n in "abcd")
    kernel.write_text("def f():\n    from zigzag_mamba.modules.block import ZigMaBlock\n")
    trainer.write_text("import zigzag_mamba.bench.timing\nimport zigzag_mamba.train.apps.demo\n")
    loop_a.write_text("import zigzag_mamba.ops.y\n")
    loop_b.write_text("import zigzag_mamba.ops.x\n")
    modules = {"zigzag_mamba.ops.kernel": kernel, "zigzag_mamba.train.trainer": trainer}
    assert _violations(modules) == [
        "zigzag_mamba.ops.kernel imports zigzag_mamba.modules.block",
        "zigzag_mamba.train.trainer imports zigzag_mamba.bench.timing",
    ]
    assert _train_violations(modules) == [
        "zigzag_mamba.train.trainer imports zigzag_mamba.train.apps.demo"
    ]
    loop = {"zigzag_mamba.ops.x": loop_a, "zigzag_mamba.ops.y": loop_b}
    assert _cycles(loop) == [["zigzag_mamba.ops.x", "zigzag_mamba.ops.y", "zigzag_mamba.ops.x"]]


def test_no_source_file_is_longer_than_450_lines():
    # docs/design.md: a module that outgrows this splits along its parts (e.g. a backend's
    # kernels beside its launchers), so that each file reads top to bottom.
    long = {
        str(path.relative_to(PACKAGE)): lines
        for path in PACKAGE.rglob("*.py")
        if (lines := len(path.read_text().splitlines())) > MAX_LINES
    }
    assert not long, long


def test_the_formatter_is_skipped_almost_nowhere():
    skips = sum(path.read_text().count("# fmt: skip") for path in PACKAGE.rglob("*.py"))
    assert skips <= MAX_FORMAT_SKIPS


def test_no_old_name_is_kept_alive():
    # The package was never released: a renamed thing has one name, with no warning shim.
    uses = [
        str(path.relative_to(PACKAGE))
        for path in PACKAGE.rglob("*.py")
        if re.search(r"\bDeprecationWarning\b", path.read_text())
    ]
    assert uses == []
