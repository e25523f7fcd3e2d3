"""Finding model folders on disk without importing torch (model selectors list them at start-up).

GeoSlicer's convention: `<root>/<TAG>/<model>/{meta.json, model.pth}`; the tag (parent folder
name) says what the model is for, `ThinSectionEnv` for thin-section multiphase models.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

META_FILE = "meta.json"
WEIGHTS_FILE = "model.pth"
THIN_SECTION_TAG = "ThinSectionEnv"


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
