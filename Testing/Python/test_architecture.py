"""The layout's rules, checked on the source: each package imports only the layers below it,
and an import inside a function is a deliberate deferral of a heavy dependency, said so.

ARCHITECTURE.md describes the layers; this test keeps the code and that page in step.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

MODULE_DIR = Path(__file__).resolve().parents[2] / "ThinSectionSegmentation"
CORE = MODULE_DIR / "thinseg"

#: Lowest first. A package may import its own modules and any package of an earlier layer.
LAYERS: list[set[str]] = [
    {"errors", "resources"},
    {"__init__"},  # the version and ThinSegError
    {"classes"},
    {"io"},
    {"jsonio"},
    {"synth"},
    {"data"},
    {"model"},
    {"inference"},
    {"metrics"},
    {"registration"},
    {"training"},
    {"reports"},
    {"pipelines"},
    {"cli", "jobs"},  # the two entry points a process starts; neither imports the other
    {"__main__"},
]
LAYER_OF = {package: rank for rank, packages in enumerate(LAYERS) for package in packages}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def _core_modules() -> list[tuple[Path, str]]:
    modules = []
    for path in sorted(CORE.rglob("*.py")):
        dotted = ".".join(("thinseg", *path.relative_to(CORE).with_suffix("").parts))
        modules.append((path, dotted.removesuffix(".__init__")))
    return modules


def _imports(tree: ast.Module) -> list[tuple[ast.stmt, str]]:
    found: list[tuple[ast.stmt, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node, node.module))
        elif isinstance(node, ast.Import):
            found.extend((node, alias.name) for alias in node.names)
    return found


def test_every_core_package_has_a_layer():
    packages = {_package(module) for _path, module in _core_modules()}
    assert packages <= set(LAYER_OF), f"give these packages a layer: {sorted(packages - set(LAYER_OF))}"


@pytest.mark.parametrize(("path", "module"), _core_modules(), ids=lambda value: str(value))
def test_imports_point_down_the_layers(path: Path, module: str):
    own = _package(module)
    upward = []
    for node, target in _imports(ast.parse(path.read_text(encoding="utf-8"))):
        if not target.startswith("thinseg.") and target != "thinseg":
            continue
        other = _package(target) if target != "thinseg" else "__init__"
        if other != own and LAYER_OF[other] >= LAYER_OF[own]:
            upward.append(f"line {node.lineno}: {target}")
    assert not upward, f"{module} imports a layer at or above its own: {upward}"


def test_imports_inside_functions_are_commented_deferrals():
    """Imports belong at the top; one inside a function must say why it is deferred."""
    undocumented = []
    slicer_side = [
        MODULE_DIR / "ThinSectionSegmentation.py",
        *sorted((MODULE_DIR / "ThinSectionSegmentationLib").glob("*.py")),
    ]
    for path, module in [*_core_modules(), *((p, p.stem) for p in slicer_side)]:
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        tree = ast.parse(source)
        top_level = {id(node) for node in tree.body}
        for node in tree.body:  # guarded imports at module level (try/if) are still top-level
            if isinstance(node, (ast.Try, ast.If)):
                top_level.update(id(child) for child in ast.walk(node))
        imports = _imports(tree)
        import_lines = {n for node, _ in imports for n in range(node.lineno, (node.end_lineno or node.lineno) + 1)}
        for node, _target in imports:
            if id(node) in top_level:
                continue
            # the comment may head a block of imports: walk up through imports, blanks and comments
            first = node.lineno
            while first > 1 and (
                first - 1 in import_lines or not lines[first - 2].strip() or lines[first - 2].strip().startswith("#")
            ):
                first -= 1
            block = " ".join(lines[first - 1 : node.end_lineno or node.lineno])
            if "deferred" not in block.lower():
                undocumented.append(f"{module} line {node.lineno}")
    assert not undocumented, f"imports inside functions without a '# deferred: why' comment: {undocumented}"
