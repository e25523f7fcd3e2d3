"""The MRML logic package itself: importable as `from ThinSectionSegmentationLib import
ThinSectionSegmentationLogic` with the module folder on sys.path, no Qt anywhere in it, nothing
heavy loaded at import (the module must load before its dependencies are installed), and the
dependency check that decides whether to offer an install."""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

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
    for path in LIB.glob("*.py"):
        bad = imported_modules(path) & forbidden
        assert not bad, f"{path.name} imports {bad}"
        assert "slicer.ScriptedLoadableModule" not in imported_modules(path, full=True), path.name


def test_job_runner_and_process_need_neither_slicer_nor_vtk():
    """`python -m thinseg.jobs` runs in Slicer's Python as a plain program: core library only."""
    job_runner = sorted((MODULE / "thinseg" / "jobs").glob("*.py"))
    assert job_runner, "thinseg/jobs is missing"
    for path in [*job_runner, *(LIB / name for name in ("process.py", "models.py", "parameters.py"))]:
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


def test_missing_requirements_are_detected_by_name_and_version():
    from ThinSectionSegmentationLib import dependencies

    assert dependencies.missing_requirements() == []  # the test environment has the core installed
    assert not dependencies.torch_missing()
    wanted = [
        ("numpy", "numpy>=1.0"),
        ("numpy", "numpy>=9999"),
        ("surely_not_installed_xyz", "surely-not-installed-xyz>=1"),
    ]
    assert dependencies.missing_requirements(wanted) == ["numpy>=9999", "surely-not-installed-xyz>=1"]
    text = dependencies.describe(["monai>=1.4", "netCDF4>=1.6"], torch_needed=True)
    assert "PyTorch, monai, netCDF4" in text


def test_requirements_are_one_list_for_pip_and_for_slicer():
    """pip's metadata of the installed core and the Slicer installer's list come from one file."""
    import re
    from importlib import metadata

    runtime = [req for req in metadata.requires("thinseg") or [] if "extra ==" not in req]
    declared = {re.split(r"[<>=!~ ;]", req)[0].lower() for req in runtime}
    from ThinSectionSegmentationLib import dependencies

    ours = {re.split(r"[<>=!~ ]", req)[0].lower() for _name, req in dependencies.REQUIREMENTS} | {"torch"}
    assert ours == declared
    assert ("PIL", "pillow>=10") in dependencies.REQUIREMENTS
    assert "xarray" not in declared  # only the tests read netCDF files through xarray


class _Installer:
    """Stands in for slicer.packaging.pip_ensure (Slicer 5.9+ signature): records its calls."""

    def __init__(self, fail: bool = False) -> None:
        self.calls, self.fail = [], fail

    def __call__(
        self,
        requirements,
        constraints=None,
        skip_packages=None,
        prompt_install=True,
        prompt_restart=True,
        requester=None,
        skip_in_testing=True,
        show_progress=True,
    ):
        self.calls.append(([str(r) for r in requirements], prompt_install, requester))
        if self.fail:
            raise RuntimeError("pip install exited with 1")


def _fake_missing(monkeypatch, installer):
    import types

    import slicer

    from ThinSectionSegmentationLib import dependencies

    state = {"missing": ["tqdm>=4.60", "zarr>=3"]}
    monkeypatch.setattr(dependencies, "missing_requirements", lambda *a: list(state["missing"]))
    monkeypatch.setattr(dependencies, "torch_missing", lambda: False)
    packaging = types.ModuleType("slicer.packaging")
    packaging.pip_ensure = installer
    monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)
    monkeypatch.setattr(slicer, "packaging", packaging, raising=False)
    return dependencies, state


def test_the_user_is_asked_once_and_the_installer_does_not_ask_again(monkeypatch):
    installer = _Installer()
    dependencies, state = _fake_missing(monkeypatch, installer)
    questions = []

    def confirm(text):
        questions.append(text)
        state["missing"] = []  # as if installed by the call that follows
        return True

    assert dependencies.ensure_installed(confirm) is True
    assert len(questions) == 1 and "tqdm, zarr" in questions[0]
    assert installer.calls == [(["tqdm>=4.60", "zarr>=3"], False, "Thin Section Segmentation")]


def test_declining_installs_nothing_and_a_failing_install_is_one_clear_error(monkeypatch):
    from thinseg.errors import ThinSegError

    installer = _Installer(fail=True)
    dependencies, _state = _fake_missing(monkeypatch, installer)
    assert dependencies.ensure_installed(lambda text: False) is False
    assert installer.calls == []
    with pytest.raises(ThinSegError, match="installing the Python packages failed: pip install exited with 1"):
        dependencies.ensure_installed(lambda text: True)
