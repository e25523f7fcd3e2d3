"""Finding model folders on disk without importing torch (model selectors list them at start-up).

GeoSlicer's convention: `<root>/<environment>/<tag>/<model>/{meta.json, model.pth}`, and the tag
(the name of the folder holding the model folder) says what the model is for. GeoSlicer lists
thin-section multiphase models by the tag `Multiphase`, at any depth under each of its model
roots (`<root>/ThinSectionEnv/Multiphase/<model>`); models are written there. Folders of the
older layout, `<root>/ThinSectionEnv/<model>`, are still found.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

META_FILE = "meta.json"
WEIGHTS_FILE = "model.pth"
#: GeoSlicer's environment folder of thin-section models.
THIN_SECTION_ENV = "ThinSectionEnv"
#: GeoSlicer's tag of multiphase (mineral) segmentation models.
MULTIPHASE_TAG = "Multiphase"
#: Tags of thin-section multiphase model folders: GeoSlicer's, then the older layout's.
THIN_SECTION_TAGS = (MULTIPHASE_TAG, THIN_SECTION_ENV)


def find_bundles(root: Path | str, tags: Iterable[str] | None = None) -> list[Path]:
    """Model folders under `root`: folders holding both files, whose parent is named by one of
    `tags` when given. Hidden folders (temporary writes among them) are skipped. Sorted."""
    root = Path(root)
    if not root.is_dir():
        return []
    wanted = set(tags) if tags is not None else None
    found = []
    for folder in [root, *root.rglob("*")]:
        if not folder.is_dir() or any(part.startswith(".") for part in folder.relative_to(root).parts):
            continue
        if wanted is not None and folder.parent.name not in wanted:
            continue
        if (folder / META_FILE).is_file() and (folder / WEIGHTS_FILE).is_file():
            found.append(folder)
    return sorted(found)


def find_thin_section_models(root: Path | str) -> list[Path]:
    """Thin-section multiphase model folders under `root`: GeoSlicer's layout and the older one."""
    return find_bundles(root, tags=THIN_SECTION_TAGS)


def find_geoslicer_models(root: Path | str) -> list[Path]:
    """The folders GeoSlicer lists as multiphase models under one of its model roots (tag
    `Multiphase` at any depth) that hold a model.pth (GeoSlicer also lists Keras models)."""
    return find_bundles(root, tags=(MULTIPHASE_TAG,))


def multiphase_model_dir(root: Path | str, name: str) -> Path:
    """Where a thin-section multiphase model named `name` goes under a model root, for GeoSlicer
    to list it: `<root>/ThinSectionEnv/Multiphase/<name>`."""
    return Path(root) / THIN_SECTION_ENV / MULTIPHASE_TAG / name
