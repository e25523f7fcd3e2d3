"""The Slicer extension's files: CMake lists every Python file; the core imports no Slicer/Qt."""

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "ThinSectionSegmentation"


def test_top_level_cmake_is_a_slicer_extension():
    text = (REPO / "CMakeLists.txt").read_text()
    assert "find_package(Slicer REQUIRED)" in text
    assert "add_subdirectory(ThinSectionSegmentation)" in text
    for key in (
        "EXTENSION_HOMEPAGE",
        "EXTENSION_CATEGORY",
        "EXTENSION_CONTRIBUTORS",
        "EXTENSION_DESCRIPTION",
        "EXTENSION_ICONURL",
    ):
        assert re.search(rf"set\({key} ", text), key


def test_module_cmake_lists_every_python_file():
    text = (MODULE / "CMakeLists.txt").read_text()
    assert "slicerMacroBuildScriptedModule(" in text
    listed = set(re.findall(r"^\s+(\S+\.py)\s*$", text, flags=re.M))
    on_disk = {p.relative_to(MODULE).as_posix() for p in MODULE.rglob("*.py") if "__pycache__" not in p.parts}
    assert listed == on_disk, (
        f"run scripts/update_module_cmake.py; missing {sorted(on_disk - listed)}, stale {sorted(listed - on_disk)}"
    )


def _imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_core_library_imports_no_slicer_or_qt():
    forbidden = {"slicer", "qt", "ctk", "vtk", "PySide6", "PyQt5", "PythonQt", "SampleData"}
    for path in (MODULE / "thinseg").rglob("*.py"):
        bad = _imported_modules(path) & forbidden
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def test_core_imports_cleanly_in_a_fresh_interpreter():
    code = (
        "import sys; import thinseg, thinseg.pipelines.segment, thinseg.cli.main; "
        "assert 'slicer' not in sys.modules and 'qt' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env={"PYTHONPATH": str(MODULE), "PATH": ""})


def test_a_built_wheel_carries_the_bundled_model_and_sample(tmp_path):
    """`pip install .` (not editable) must segment with the bundled model, as a checkout does."""
    import os

    # building without isolation uses this interpreter's setuptools (GeoSlicer 2.8 pins 61.3.1)
    pytest.importorskip("setuptools", minversion="68", reason="pyproject.toml's build needs setuptools>=68")
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(REPO)],
        check=True,
        capture_output=True,
        cwd=tmp_path,
    )
    wheel = next(wheels.glob("thinseg-*.whl"))
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
        check=True,
        capture_output=True,
    )
    code = (
        "from thinseg.resources import default_model_dir, sample_dir\n"
        "from thinseg.model.bundle import load_bundle\n"
        "b = load_bundle(default_model_dir())\n"
        "print(default_model_dir()); print(sample_dir()); print(b.class_table.names)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(target))
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True, env=env, cwd=tmp_path
    )
    model_dir, sample, names = out.stdout.splitlines()
    assert model_dir.startswith(str(target / "thinseg" / "_resources" / "Models"))
    assert (Path(sample) / "sample_PP.jpg").is_file() and Path(sample).is_relative_to(target)
    assert names == "['Calcite', 'Dolomite', 'Mg-Clay minerals', 'Pores', 'Quartz', 'Others']"


def test_license_file_matches_the_declared_licence():
    """pyproject.toml declares Apache-2.0; the LICENSE file beside it must be that licence's text."""
    declared = (REPO / "pyproject.toml").read_text(encoding="utf-8")
    assert 'license = { text = "Apache-2.0" }' in declared
    text = (REPO / "LICENSE").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
