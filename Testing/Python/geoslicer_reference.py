"""GeoSlicer's own code as a test oracle: load its unmodified files from outside the repository.

GeoSlicer 2.8.9's files (Apache-2.0) are kept read-only beside the checkout, never copied into
it. A test loads one of them as a module, with the smallest stand-ins for the host modules
(`slicer.app`, `qt`, other `ltrace` modules) that a real MRML scene cannot provide, and runs it
on our outputs: what GeoSlicer does with them is then known, not guessed.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

#: Set this to the GeoSlicer reference folder (holding `src/`) when it is neither beside the
#: checkout (`../shared/reference/geoslicer-2.8.9`) nor inside it (`shared/...`).
REFERENCE_ENV = "THINSEG_GEOSLICER_REFERENCE"
_RELATIVE = Path("reference") / "geoslicer-2.8.9"


def reference_root() -> Path | None:
    """The GeoSlicer reference folder, or None when it is not on this machine."""
    named = os.environ.get(REFERENCE_ENV)
    candidates = [Path(named)] if named else [REPO.parent / "shared" / _RELATIVE, REPO / "shared" / _RELATIVE]
    return next((c for c in candidates if (c / "src").is_dir()), None)


def reference_file(relative: str) -> Path:
    """A file of the reference (e.g. "src/ltrace/ltrace/slicer/netcdf.py"); skips the test when
    the reference is not on this machine, saying where it looked and what to set."""
    root = reference_root()
    if root is None:
        pytest.skip(f"GeoSlicer reference files not found beside or inside {REPO}; set {REFERENCE_ENV}")
    path = root / relative
    assert path.is_file(), f"{path} is missing from the GeoSlicer reference folder"
    return path


@contextmanager
def stand_ins(modules: Mapping[str, types.ModuleType]) -> Iterator[None]:
    """Put host modules that only exist inside GeoSlicer into sys.modules for the duration, and
    restore whatever was there before."""
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


def load_reference_module(relative: str, name: str | None = None) -> types.ModuleType:
    """Execute one reference file as a fresh module (call it inside `stand_ins` when the file
    imports host modules at its top)."""
    path = reference_file(relative)
    module_name = name or f"geoslicer_reference_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
