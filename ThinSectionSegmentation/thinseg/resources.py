"""Where the bundled model and sample live, in a source checkout, a Slicer install or a wheel."""

from __future__ import annotations

import os
from pathlib import Path

#: The bundled model: <models root>/<environment>/<tag>/<name>, GeoSlicer's tag-folder layout.
BUNDLED_MODEL_ENV = "ThinSectionEnv"
BUNDLED_MODEL_TAG = "Multiphase"
BUNDLED_MODEL_NAME = "thinseg-synthetic-unet"


def resources_dir() -> Path:
    """`Resources/` of the extension: $THINSEG_RESOURCES, a packaged copy, or the checkout's."""
    env = os.environ.get("THINSEG_RESOURCES")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    for candidate in (
        here / "_resources",  # a wheel that carries them
        here.parent / "ThinSectionSegmentationResources",  # installed Slicer extension (CMake install)
    ):
        if candidate.is_dir():
            return candidate
    return here.parents[1] / "Resources"  # source checkout


def models_root() -> Path:
    """The bundled models' root (holding ThinSectionEnv/Multiphase/)."""
    return resources_dir() / "Models"


def default_model_dir() -> Path:
    """The bundled model's folder."""
    return models_root() / BUNDLED_MODEL_ENV / BUNDLED_MODEL_TAG / BUNDLED_MODEL_NAME


def sample_dir() -> Path:
    """The bundled sample section: PP, XP, a QEMSCAN map and the exact labels."""
    return resources_dir() / "Sample"
