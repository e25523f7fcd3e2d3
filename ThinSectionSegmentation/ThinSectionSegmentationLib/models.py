"""The model selector's list: the bundled model plus user model folders, with their cards.

Models follow GeoSlicer's tag-folder layout: `<root>/ThinSectionEnv/<model>/{meta.json,
model.pth}`, found by `thinseg.model.discovery.find_bundles`. Listing reads `meta.json` only and
imports no torch (the panel lists models before the dependencies are installed), so a broken
`model.pth` shows up in the list and fails with the core's one-line message when used. The list
reads meta.json leniently (`thinseg.model.meta.summarize`: a field that breaks the model schema
is left out); only a meta.json that is not a readable JSON object marks the folder as unusable.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from thinseg.errors import ThinSegError
from thinseg.io.atomic import free_output_path
from thinseg.io.netcdf import sanitize_name
from thinseg.model.discovery import META_FILE, THIN_SECTION_TAG, find_bundles
from thinseg.model.meta import read_meta, summarize
from thinseg.resources import default_model_dir, models_root

CARD_FILES = ("MODEL_CARD.md", "README.md")
#: Environment variable with extra model roots (os.pathsep-separated), for scripted use.
USER_ROOTS_ENV = "THINSEG_MODEL_ROOTS"


def default_user_models_root() -> Path:
    """Where trained models go unless the user picks another folder."""
    return Path.home() / "ThinSectionSegmentation" / "Models"


@dataclass
class ModelInfo:
    """One entry of the model list: what meta.json says (empty where it says nothing usable)."""

    path: Path
    title: str
    description: str
    inputs: list[str]
    classes: list[str]
    colors: list[str]
    pixels_per_mm: float | None
    bundled: bool = False
    problem: str | None = None  # meta.json unreadable: listed, but marked
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        """Text for the model selector."""
        suffix = " (bundled)" if self.bundled else ""
        return f"{self.title}{suffix}" if not self.problem else f"{self.path.name} (unreadable meta.json)"

    @property
    def needs_xp(self) -> bool:
        """True when the model takes a second (XP) image."""
        return len(self.inputs) > 1


def read_model_info(path: str | os.PathLike[str], bundled: bool = False) -> ModelInfo:
    """The list entry of a model folder; never raises for a bad meta.json (see module doc)."""
    path = Path(path)
    try:
        meta = read_meta(path / META_FILE)
    except ThinSegError as error:
        return ModelInfo(path, path.name, "", [], [], [], None, bundled, problem=error.problem)
    usable = summarize(meta)
    return ModelInfo(
        path=path,
        title=str(meta.get("title") or path.name),
        description=str(meta.get("description") or ""),
        inputs=usable.inputs,
        classes=usable.class_names,
        colors=usable.class_colors,
        pixels_per_mm=usable.pixels_per_mm,
        bundled=bundled,
        extra={k: v for k, v in meta.items() if k in ("training", "thinseg")},
    )


def model_roots(user_roots: Iterable[str | os.PathLike[str]] = ()) -> list[Path]:
    """The bundled models root, then user roots (given, then $THINSEG_MODEL_ROOTS), deduplicated."""
    roots = [models_root()]
    roots += [Path(r).expanduser() for r in user_roots if str(r).strip()]
    roots += [Path(r).expanduser() for r in os.environ.get(USER_ROOTS_ENV, "").split(os.pathsep) if r.strip()]
    out: list[Path] = []
    seen: set[str] = set()
    for root in roots:
        key = os.path.normcase(str(root.resolve()) if root.exists() else str(root))
        if key not in seen:
            seen.add(key)
            out.append(root)
    return out


def list_models(user_roots: Iterable[str | os.PathLike[str]] = ()) -> list[ModelInfo]:
    """Every thin-section model under the roots; the bundled model first."""
    bundled_root = models_root()
    found: list[ModelInfo] = []
    seen: set[str] = set()
    for root in model_roots(user_roots):
        for path in find_bundles(root, tags=(THIN_SECTION_TAG,)):
            key = os.path.normcase(str(path.resolve()))
            if key in seen:
                continue
            seen.add(key)
            found.append(read_model_info(path, bundled=(root == bundled_root)))
    default = default_model_dir()
    found.sort(key=lambda m: (not m.bundled, m.path != default, m.title.lower()))
    return found


def model_card(info: ModelInfo | str | os.PathLike[str]) -> str:
    """Markdown shown under the selector: the folder's MODEL_CARD.md, else a summary of meta.json."""
    if not isinstance(info, ModelInfo):
        info = read_model_info(info)
    for name in CARD_FILES:
        card = info.path / name
        if card.is_file():
            try:
                return card.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                break
    if info.problem:
        return f"**{info.path.name}**\n\nmeta.json could not be read: {info.problem}"
    lines = [f"**{info.title}**", ""]
    if info.description:
        lines += [info.description, ""]
    lines.append(f"- Inputs: {', '.join(info.inputs) or 'unknown'}")
    if info.pixels_per_mm:
        lines.append(f"- Trained at {1000.0 / info.pixels_per_mm:.3g} um per pixel")
    lines.append(f"- Classes: {', '.join(info.classes) or 'unknown'}")
    lines.append(f"- Folder: `{info.path}`")
    return "\n".join(lines)


def new_model_dir(root: str | os.PathLike[str], name: str) -> Path:
    """`<root>/ThinSectionEnv/<name>` (GeoSlicer finds it there), numbered if taken."""
    safe = sanitize_name(name).strip("_") or "model"
    return free_output_path(Path(root) / THIN_SECTION_TAG / safe)
