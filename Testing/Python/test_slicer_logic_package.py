"""The MRML logic package itself: importable as `from ThinSectionSegmentationLib import
ThinSectionSegmentationLogic` with the module folder on sys.path, no Qt anywhere in it but the
panel (panel.py, which only the module file imports), nothing heavy loaded at import (the
module must load before its dependencies are installed). The dependency check and installer
are tested in test_dependencies.py."""

import ast
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "ThinSectionSegmentation"
LIB = MODULE / "ThinSectionSegmentationLib"


def imported_modules(path: Path, full: bool = False) -> set[str]:
    """Top-level names (or full dotted names) of every absolute import, lazy ones included."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name if full else a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module if full else node.module.split(".")[0])
    return names


def test_logic_imports_no_qt():
    forbidden = {"qt", "ctk", "PythonQt", "PySide6", "PySide2", "PyQt5", "PyQt6"}
    qt_free = [path for path in LIB.glob("*.py") if path.stem != "panel"]
    assert len(qt_free) == len(list(LIB.glob("*.py"))) - 1
    assert imported_modules(LIB / "panel.py") >= {"qt", "slicer"}  # the one Qt part (so the rule above bites)
    for path in qt_free:
        bad = imported_modules(path) & forbidden
        assert not bad, f"{path.name} imports {bad}"
        assert "slicer.ScriptedLoadableModule" not in imported_modules(path, full=True), path.name


def test_job_runner_and_process_need_neither_slicer_nor_vtk():
    """`python -m thinseg.jobs` runs in Slicer's Python as a plain program: core library only."""
    job_runner = sorted((MODULE / "thinseg" / "jobs").glob("*.py"))
    assert job_runner, "thinseg/jobs is missing"
    for path in [*job_runner, *(LIB / name for name in ("process.py", "models.py"))]:
        bad = imported_modules(path) & {"slicer", "vtk", "qt", "ctk"}
        assert not bad, f"{path.name} imports {bad}"


def test_package_imports_in_a_fresh_interpreter_without_loading_heavy_modules():
    import slicer  # noqa: F401

    code = (
        "import sys\n"
        "from ThinSectionSegmentationLib import ThinSectionSegmentationLogic\n"
        "import slicer\n"
        "logic = ThinSectionSegmentationLogic(slicer.vtkMRMLScene())\n"
        "logic.getParameterNode()\n"
        "heavy = ('torch', 'monai', 'netCDF4', 'SimpleITK', 'xarray', 'qt', 'PySide6')\n"
        "heavy = [m for m in heavy if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    env = dict(os.environ, PYTHONPATH=str(MODULE))
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=str(REPO))
