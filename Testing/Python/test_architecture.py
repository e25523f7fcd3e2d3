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
    {"errors", "resources", "console", "allocator"},  # allocator: how a training process keeps freed memory
    {"limits"},  # the bounds every reader checks, as ThinSegErrors
    {"__init__"},  # the version and ThinSegError
    {"classes"},
    {"io"},
    {"jsonio"},
    {"synth"},
    {"data"},
    {"model"},
    {"inference"},
    {"metrics"},
    {"analysis"},  # grains of labelmaps: sizes, shapes, contacts
    {"stitching"},  # microscope tiles -> panoramas
    {"registration"},
    {"training"},
    {"reports"},
    {"pipelines"},
    {"cli", "jobs"},  # the two entry points a process starts; neither imports the other
    {"__main__"},
]
LAYER_OF = {package: rank for rank, packages in enumerate(LAYERS) for package in packages}

LIB = MODULE_DIR / "ThinSectionSegmentationLib"
#: The Lib modules that use Qt (the panel). Every other Lib module, and the core, stays Qt-free.
QT_LIB_MODULES = {"panel"}
#: What a Qt-free module may not import: Qt bindings, and Slicer's Qt-side Python.
QT_IMPORTS = (
    "qt",
    "ctk",
    "PythonQt",
    "PySide2",
    "PySide6",
    "PyQt5",
    "PyQt6",
    "slicer.util",
    "slicer.ScriptedLoadableModule",
)
#: What the core may not import at all: it runs without Slicer.
HOST_IMPORTS = ("slicer", "vtk", "mrml", "ltrace", *QT_IMPORTS)


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


def _names(path: Path) -> list[tuple[int, str]]:
    """(line, dotted module) of every import in `path`, relative ones resolved within the Lib."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # `from . import panel`, `from .panel import X`
                targets = [f"ThinSectionSegmentationLib.{module}"] if module else []
                targets += [f"ThinSectionSegmentationLib.{a.name}" for a in node.names if not module]
                found += [(node.lineno, t) for t in targets]
            else:
                found.append((node.lineno, module))
        elif isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
    return found


def _matches(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


@pytest.mark.parametrize(("path", "module"), _core_modules(), ids=lambda value: str(value))
def test_the_core_imports_no_host(path: Path, module: str):
    bad = [f"line {line}: {name}" for line, name in _names(path) if _matches(name, HOST_IMPORTS)]
    assert not bad, f"{module} imports Slicer, VTK or Qt: {bad}"


def test_only_the_panel_uses_qt_and_only_the_module_file_imports_the_panel():
    qt_modules = tuple(f"ThinSectionSegmentationLib.{m}" for m in QT_LIB_MODULES)
    assert {p.stem for p in LIB.glob("*.py")} >= QT_LIB_MODULES
    for path in sorted(LIB.glob("*.py")):
        if path.stem in QT_LIB_MODULES:
            continue
        names = _names(path)
        qt = [f"line {line}: {name}" for line, name in names if _matches(name, QT_IMPORTS)]
        assert not qt, f"{path.name} is Qt-free but imports {qt}"
        panel = [f"line {line}: {name}" for line, name in names if _matches(name, qt_modules)]
        assert not panel, f"{path.name} is Qt-free but imports the Qt part {panel}"
