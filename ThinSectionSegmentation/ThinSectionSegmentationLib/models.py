"""The model selector's list: the bundled model, user model folders and GeoSlicer's own model
folders, with their cards.

Models follow GeoSlicer's tag-folder layout: `<root>/ThinSectionEnv/Multiphase/<model>/{meta.json,
model.pth}` (the older `<root>/ThinSectionEnv/<model>` is still read), found by
`thinseg.model.discovery`; new models are written there, so GeoSlicer lists them too. GeoSlicer's
model roots (its "AIModelsPaths" setting, read by the panel and passed in) are searched as
GeoSlicer searches them for multiphase models, and only the models this package can run are
kept (`thinseg.model.meta.cannot_run`). Listing reads `meta.json` only and imports no torch (the
panel lists models before the dependencies are installed), so a broken `model.pth` shows up in
the list and fails with the core's one-line message when used. The list reads meta.json
leniently (`thinseg.model.meta.summarize`: a field that breaks the model schema is left out);
only a meta.json that is not a readable JSON object marks the folder as unusable.
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
from thinseg.model.discovery import META_FILE, find_geoslicer_models, find_thin_section_models, multiphase_model_dir
from thinseg.model.meta import cannot_run, read_meta, summarize
from thinseg.resources import default_model_dir, models_root

CARD_FILES = ("MODEL_CARD.md", "README.md")
#: Environment variable with extra model roots (os.pathsep-separated), for scripted use.
USER_ROOTS_ENV = "THINSEG_MODEL_ROOTS"
#: GeoSlicer's setting that holds its model roots (a list of folders).
GEOSLICER_MODEL_PATHS_SETTING = "AIModelsPaths"


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
    geoslicer: bool = False  # found under one of GeoSlicer's model roots

    @property
    def label(self) -> str:
        """Text for the model selector."""
        suffix = " (bundled)" if self.bundled else " (GeoSlicer)" if self.geoslicer else ""
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
    return _model_info(path, meta, bundled)


def _model_info(path: Path, meta: dict[str, Any], bundled: bool) -> ModelInfo:
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
    return _unique(roots)


def geoslicer_model_roots(setting: object) -> list[Path]:
    """GeoSlicer's model roots from the value of its "AIModelsPaths" setting: a list of folders,
    or, as Qt settings return a one-entry list, a single string; None or empty gives none."""
    if isinstance(setting, (str, os.PathLike)):
        setting = [setting]
    if not isinstance(setting, (list, tuple)):
        return []
    return _unique([Path(str(r)).expanduser() for r in setting if isinstance(r, (str, os.PathLike)) and str(r).strip()])


def _unique(roots: Iterable[Path]) -> list[Path]:
    out: list[Path] = []
    seen: set[str] = set()
    for root in roots:
        key = _key(root)
        if key not in seen:
            seen.add(key)
            out.append(root)
    return out


def _key(path: Path) -> str:
    return os.path.normcase(str(path.resolve()) if path.exists() else str(path))


def list_models(
    user_roots: Iterable[str | os.PathLike[str]] = (), geoslicer_roots: Iterable[str | os.PathLike[str]] = ()
) -> list[ModelInfo]:
    """Every thin-section model under the roots; the bundled model first.

    `geoslicer_roots`: GeoSlicer's model roots (its "AIModelsPaths" setting, see
    `geoslicer_model_roots`), searched for what GeoSlicer lists as multiphase models; those this
    package cannot run (3-D, other kinds, other inputs) are left out.
    """
    bundled_root = models_root()
    found: list[ModelInfo] = []
    seen: set[str] = set()

    def add(path: Path, info: ModelInfo | None) -> None:
        key = _key(path)
        if info is not None and key not in seen:
            seen.add(key)
            found.append(info)

    for root in model_roots(user_roots):
        for path in find_thin_section_models(root):
            add(path, read_model_info(path, bundled=(root == bundled_root)))
    for root in geoslicer_model_roots(list(geoslicer_roots)):
        for path in find_geoslicer_models(root):
            add(path, _geoslicer_model_info(path))
    default = default_model_dir()
    found.sort(key=lambda m: (not m.bundled, m.path != default, m.title.lower()))
    return found


def _geoslicer_model_info(path: Path) -> ModelInfo | None:
    """The list entry of a model in GeoSlicer's folders, or None when it is not a thin-section
    multiphase model this package runs (its meta.json says so) or its meta.json is unreadable."""
    try:
        meta = read_meta(path / META_FILE)
    except ThinSegError:
        return None
    if cannot_run(meta) is not None:
        return None
    info = _model_info(path, meta, bundled=False)
    info.geoslicer = True
    return info


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
    """`<root>/ThinSectionEnv/Multiphase/<name>` (GeoSlicer lists it there), numbered if taken."""
    safe = sanitize_name(name).strip("_") or "model"
    return free_output_path(multiphase_model_dir(root, safe))
