"""Shared pytest set-up for every interpreter the suite runs on.

- The module folder goes on sys.path so `import thinseg` works without installing the package.
- Tests that need the Slicer host (the `slicer-core` wheel, VTK, PySide6) skip with a reason where
  that host cannot be installed, e.g. GeoSlicer's Python 3.9 stack, where `slicer-core` has no wheel;
  where `slicer` is importable nothing is skipped, so a missing host module stays a failure there.
- `geoslicer_python`: the GeoSlicer-stack interpreter that cross-stack tests run.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "ThinSectionSegmentation"))

#: Top-level modules that only the Slicer host provides (ThinSectionSegmentationLib imports slicer).
HOST_MODULES = frozenset({"slicer", "vtk", "qt", "ctk", "PySide6", "ThinSectionSegmentationLib"})
HOST_AVAILABLE = importlib.util.find_spec("slicer") is not None
#: Environment variable naming the Python of the GeoSlicer 2.8 stack (set by `make test`).
GEOSLICER_PYTHON_VARIABLE = "THINSEG_GEOSLICER_PYTHON"


def _host_reason() -> str:
    return f"needs the Slicer host (slicer-core), not installable on Python {sys.version_info[0]}.{sys.version_info[1]}"


def module_host_imports(path: Path) -> list[str]:
    """Host modules that a test file imports at module level (inside `if`/`try` too, not in functions)."""
    found: list[str] = []
    pending: list[ast.stmt] = list(ast.parse(path.read_text(encoding="utf-8"), str(path)).body)
    while pending:
        node = pending.pop(0)
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            if isinstance(node, (ast.If, ast.Try)):
                pending.extend(node.body + node.orelse)
            if isinstance(node, ast.Try):
                pending.extend(node.finalbody)
                for handler in node.handlers:
                    pending.extend(handler.body)
            continue
        found.extend(name for name in names if name.split(".", 1)[0] in HOST_MODULES)
    return found


class _NeedsHost(pytest.Module):
    """A test file whose module-level imports need the Slicer host: collected as one skip."""

    def collect(self) -> list[pytest.Item | pytest.Collector]:
        pytest.skip(f"{_host_reason()}: imports {', '.join(module_host_imports(self.path))}")


def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector) -> pytest.Module | None:
    if HOST_AVAILABLE or not module_host_imports(module_path):
        return None
    return _NeedsHost.from_parent(parent, path=module_path)


def _skip_if_host_missing(error: ModuleNotFoundError) -> None:
    if not HOST_AVAILABLE and (error.name or "").split(".", 1)[0] in HOST_MODULES:
        pytest.skip(f"{_host_reason()}: imports {error.name}")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    """A fixture importing the host where it is missing: skip (see module doc)."""
    try:
        return (yield)
    except ModuleNotFoundError as error:
        _skip_if_host_missing(error)
        raise


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> Iterator[object]:
    """A test importing the host inside its body where it is missing: skip (see module doc)."""
    try:
        return (yield)
    except ModuleNotFoundError as error:
        _skip_if_host_missing(error)
        raise


@pytest.fixture(scope="session")
def geoslicer_python() -> Path:
    """The GeoSlicer-stack interpreter named by THINSEG_GEOSLICER_PYTHON.

    Unset: the test skips (plain `pytest` runs without that stack). Set but not an executable file:
    the test fails, because `make test` promised that stack and it is broken."""
    value = os.environ.get(GEOSLICER_PYTHON_VARIABLE, "")
    if not value:
        pytest.skip(f"{GEOSLICER_PYTHON_VARIABLE} is not set (`make test` sets it to .venv-geoslicer/bin/python)")
    path = Path(value)
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"{GEOSLICER_PYTHON_VARIABLE}={value} is not an executable file", pytrace=False)
    return path
