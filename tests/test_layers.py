"""The import rules of docs/design.md ("Layers"): each layer imports only the layers below it."""

from __future__ import annotations

import ast
from pathlib import Path

import zigzag_mamba

PACKAGE = Path(zigzag_mamba.__file__).parent
# Lower ranks sit below higher ones; the top layer (rank 5) holds the optional parts.
RANKS = {"ops": 1, "orders": 2, "modules": 3, "models": 4}
TOP = 5


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


def _violations(modules: dict[str, Path]) -> list[str]:
    """``module imports imported`` for every import of a higher layer (module name -> file)."""
    found = []
    for module, path in modules.items():
        layer = _layer(module)
        if layer == "" or _rank(layer) == TOP:
            continue
        found += [
            f"{module} imports {imported}"
            for imported in sorted(_imports(path))
            if _rank(_layer(imported)) > _rank(layer)
        ]
    return found


def test_each_layer_imports_only_the_layers_below_it():
    modules = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts).removesuffix(".__init__")] = path
    assert _violations(modules) == []


def test_the_rule_catches_an_upward_import(tmp_path):
    path = tmp_path / "kernel.py"
    path.write_text("def f():\n    from zigzag_mamba.modules.block import ZigMaBlock\n")
    found = _violations({"zigzag_mamba.ops.kernel": path, "zigzag_mamba.train.x": path})
    assert found == ["zigzag_mamba.ops.kernel imports zigzag_mamba.modules.block"]


def test_no_source_file_is_longer_than_500_lines():
    # docs/design.md: a module that outgrows this splits along its parts (e.g. a backend's
    # kernels beside its launchers), so that each file reads top to bottom.
    long = {
        str(path.relative_to(PACKAGE)): lines
        for path in PACKAGE.rglob("*.py")
        if (lines := len(path.read_text().splitlines())) > 500
    }
    assert not long, long
