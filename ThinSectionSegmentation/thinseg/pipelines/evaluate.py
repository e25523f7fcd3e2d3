"""Run models over labelled sections and score them: the work behind `thinseg evaluate` and
`thinseg compare`, usable as it is by the Slicer logic and scripts.

    from thinseg.pipelines.evaluate import evaluate_model, evaluate_models
    report = evaluate_model(load_bundle(model_dir), ["S1.nc", "S2.nc"], void_border_px=2)
    print(report.format_table())

Sections are what training reads (`thinseg.training.open_sections`: GeoSlicer netCDF files with
PP, XP and a labelmap on the PP grid, or section folders); their truth is mapped to the model's
classes exactly as training maps it (QEMSCAN mineral names by name, an optional mapping table),
and each model runs over WHOLE sections with the tiled inference engine, resampled to the
model's resolution when the section's pixel size differs (labels mapped back), as in
`thinseg segment`. One confusion matrix per model is summed over the whole dataset.

Every section must open and carry the model's inputs and some truth before any model runs: a
dataset score over the sections that happened to work would be silently different.

Predictions are not kept: `on_section` sees each section's truth, predictions, void-border
mask and open PP/XP images while they exist (pictures are drawn from there), so memory stays at
one section. Image files are opened per section and closed when it is done.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from thinseg.errors import ThinSegError
from thinseg.metrics.borders import void_border_mask
from thinseg.metrics.evaluator import EvaluationReport, Evaluator

#: Given (what is being segmented, pixel count), returns the per-tile callback (done, total);
#: the same factory `thinseg.pipelines.segment.segment_sections` takes.
ProgressFactory = Callable[[str, int], Callable[[int, int], None]]
Log = Callable[[str], None]


@dataclass
class SectionPrediction:
    """One section as scored: truth in the models' classes (0 = no truth), each model's labels on
    the section grid, the void-border mask (True = scored; None without void borders) and the
    section's images ("PP", "XP": region readers, open only during `on_section`)."""

    name: str
    section: Any  # the thinseg.training Section
    truth: np.ndarray
    preds: dict[str, np.ndarray]
    keep: np.ndarray | None
    images: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # inference time per model


def section_path(section: Any) -> Path | None:
    """The file a section is reported under (netCDF file, PP image), if it has one."""
    path = getattr(section, "path", None)
    if path is None:
        files = getattr(section, "files", None)
        path = files.get("PP") if isinstance(files, dict) else None
    return Path(path) if path is not None else None


def model_roles(bundle) -> list[str]:
    """The section image ("PP"/"XP") that feeds each model input, in the model's order.

    Names GeoSlicer uses (PP, PX, XP) decide; other names go by position (PP first)."""
    from thinseg.data.sections import canonical_role

    roles = []
    for position, name in enumerate(bundle.input_names):
        try:
            roles.append(canonical_role(name))
        except ThinSegError:
            roles.append("PP" if position == 0 else "XP")
    return roles


def section_roles(section: Any) -> set[str]:
    """The images ("PP", "XP") a section has, without opening files (netCDF and file sections
    name them; other sections are asked)."""
    named = getattr(section, "vars", None)
    if not isinstance(named, dict):
        named = getattr(section, "files", None)
    if isinstance(named, dict):
        return set(named)
    return {r for r in ("PP", "XP") if section.source(r) is not None}


@contextmanager
def open_images(section: Any, roles: Sequence[str]) -> Iterator[dict[str, Any]]:
    """Region readers for `roles` of a section, opened here and closed at exit (a netCDF or
    image-file section's own lazy sources stay unopened: nothing is left open afterwards)."""
    from thinseg.io.images import open_image
    from thinseg.io.netcdf import open_netcdf_image

    with ExitStack() as stack:
        images: dict[str, Any] = {}
        for role in dict.fromkeys(roles):
            netcdf_vars, files = getattr(section, "vars", None), getattr(section, "files", None)
            if isinstance(netcdf_vars, dict) and getattr(section, "path", None) is not None and role in netcdf_vars:
                source = open_netcdf_image(section.path, netcdf_vars[role])
                stack.callback(source.close)
            elif isinstance(files, dict) and role in files:
                source = open_image(files[role], role=f"{role} image")
                stack.callback(source.close)
            else:
                source = section.source(role)
            if source is None:
                raise ThinSegError(f"section {section.name!r} has no {role} image", section_path(section))
            images[role] = source
        yield images


def _model_mm_per_pixel(bundle) -> float | None:
    return 1.0 / bundle.pixels_per_mm if bundle.pixels_per_mm else None


def section_scale(section: Any, bundle) -> float:
    """Section pixels per model pixel (1.0 when the pixel sizes match or one is unknown)."""
    from thinseg.training.prepare import section_scale as _scale

    return _scale(section, _model_mm_per_pixel(bundle))


def section_truth(section: Any, class_table, mapping_csv: Any = None) -> np.ndarray:
    """The section's labelmap in the classes of `class_table` (0 = no truth), mapped as training
    maps it: same classes -> unchanged; other names (QEMSCAN minerals) by name and the table."""
    from thinseg.data.mapping import mapping_for

    path = section_path(section)
    labels = section.read_labels()
    if labels.shape != tuple(section.shape):
        raise ThinSegError(
            f"section {section.name!r}: labels {labels.shape} are not on the image grid {section.shape}", path
        )
    if len(section.class_table) == 0 and labels.any():
        raise ThinSegError(
            f"section {section.name!r}: its labelmap names no classes (no 'labels' attribute), "
            "so its values cannot be matched to the model's classes",
            path,
        )
    truth = mapping_for(section.class_table, class_table, mapping_csv).apply(labels)
    if not truth.any():
        raise ThinSegError(
            f"section {section.name!r}: no labelled pixel belongs to a model class "
            f"({', '.join(class_table.names)}); check its labelmap or the mapping table",
            path,
        )
    return truth


def section_keep(truth: np.ndarray, void_border_px: float, scale: float = 1.0) -> np.ndarray | None:
    """Void-border mask; `void_border_px` is in model pixels, `scale` section px per model px."""
    if void_border_px <= 0:
        return None
    return void_border_mask(truth, void_border_px * scale)


def predict_section(
    segmenter,
    section: Any,
    images: Mapping[str, Any],
    roles: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel=None,
) -> tuple[np.ndarray, list[str]]:
    """(labels on the section grid, messages): the model over the whole section (`images`: role
    -> region reader, see `open_images`), at the model's resolution when the section's pixel
    size differs (labels mapped back by nearest neighbour)."""
    from thinseg.inference.resample import ResampledSource, labels_to_grid, needs_resampling

    bundle = segmenter.bundle
    roles = list(roles or model_roles(bundle))
    missing = [r for r in roles if images.get(r) is None]
    if missing:
        raise ThinSegError(
            f"section {section.name!r} has no {'/'.join(missing)} image; model {bundle.title!r} "
            f"needs {'+'.join(roles)}",
            section_path(section),
        )
    sources = [images[r] for r in roles]
    messages: list[str] = []
    model_mm = _model_mm_per_pixel(bundle)
    mm = section.mm_per_pixel
    if mm and model_mm and needs_resampling(mm, model_mm):
        sources = [ResampledSource(s, mm / model_mm) for s in sources]
        messages.append(f"{section.name}: resampling from {mm:g} to the model's {model_mm:g} mm/px and back")
    result = segmenter.segment(sources, progress=progress, cancel=cancel)
    labels = result.labels
    if labels.shape != tuple(section.shape):
        labels = labels_to_grid(labels, tuple(section.shape))
    return labels, messages


def check_models(bundles: Mapping[str, Any]) -> None:
    """Models scored together must be thin-section models predicting the same classes."""
    from thinseg.pipelines.segment import check_thin_section_model

    if not bundles:
        raise ThinSegError("no model to evaluate")
    for bundle in bundles.values():
        check_thin_section_model(bundle)
    first_name, first = next(iter(bundles.items()))
    for name, bundle in bundles.items():
        if bundle.class_table.names != first.class_table.names:
            raise ThinSegError(
                f"the models predict different classes ({first_name}: {', '.join(first.class_table.names)}; "
                f"{name}: {', '.join(bundle.class_table.names)}); only models with the same classes can be compared",
                bundle.path,
            )


def check_sections(sections: Sequence[Any], bundles: Mapping[str, Any]) -> None:
    """Every section has every image the models need (checked before any model runs)."""
    if not sections:
        raise ThinSegError("no sections to evaluate")
    for bundle in bundles.values():
        roles = model_roles(bundle)
        for section in sections:
            missing = [r for r in roles if r not in section_roles(section)]
            if missing:
                raise ThinSegError(
                    f"section {section.name!r} has no {'/'.join(missing)} image; model "
                    f"{bundle.title!r} needs {'+'.join(roles)}",
                    section_path(section),
                )


def evaluate_models(
    bundles: Mapping[str, Any],
    sections: Sequence[Any],
    void_border_px: float = 2.0,
    *,
    mapping_csv: Any = None,
    options=None,
    progress: ProgressFactory | None = None,
    cancel=None,
    on_section: Callable[[SectionPrediction], None] | None = None,
    log: Log | None = None,
) -> dict[str, EvaluationReport]:
    """Score each model (name -> ModelBundle) on the same sections (paths or Section objects).

    void_border_px: band around truth class boundaries left out of the "-vb" scores, in model
    pixels (as in training; scaled when a section's pixel size differs). options: the
    InferenceOptions for every model (default: the engine's, device auto). Sections are read one
    at a time; each runs through every model before the next one is read.
    """
    from thinseg.data.sections import open_sections
    from thinseg.inference.engine import InferenceOptions, Segmenter

    say = log or (lambda _m: None)
    check_models(bundles)
    opened = open_sections(list(sections))
    check_sections(opened, bundles)
    first = next(iter(bundles.values()))
    table = first.class_table
    segmenters = {name: Segmenter(bundle, options or InferenceOptions()) for name, bundle in bundles.items()}
    for name, segmenter in segmenters.items():
        for message in segmenter.messages:
            say(f"{name}: {message}" if len(bundles) > 1 else message)
    evaluators = {name: Evaluator(table, void_border_px) for name in bundles}
    for section in opened:  # every section has truth before any model runs (labelmaps are cheap)
        section_truth(section, table, mapping_csv)
    roles = list(dict.fromkeys(["PP"] + [r for b in bundles.values() for r in model_roles(b)]))
    for section in opened:
        truth = section_truth(section, table, mapping_csv)  # read before the images are opened
        preds: dict[str, np.ndarray] = {}
        seconds: dict[str, float] = {}
        keep_by_scale: dict[float, np.ndarray | None] = {}
        with open_images(section, roles) as images:
            for name, segmenter in segmenters.items():
                label = f"{name}: {section.name}" if len(bundles) > 1 else section.name
                callback = progress(label, section.shape[0] * section.shape[1]) if progress is not None else None
                start = time.perf_counter()
                pred, messages = predict_section(segmenter, section, images, progress=callback, cancel=cancel)
                seconds[name] = time.perf_counter() - start
                for message in messages:
                    say(message)
                scale = section_scale(section, bundles[name])
                if scale not in keep_by_scale:
                    keep_by_scale[scale] = section_keep(truth, void_border_px, scale)
                evaluators[name].add_section(section.name, truth, pred, keep_by_scale[scale])
                preds[name] = pred
            if on_section is not None:
                keep = next(iter(keep_by_scale.values()))
                on_section(SectionPrediction(section.name, section, truth, preds, keep, images, seconds))
        del truth, preds
    return {name: evaluator.report(model=name) for name, evaluator in evaluators.items()}


def evaluate_model(
    bundle, sections: Sequence[Any], void_border_px: float = 2.0, *, name: str | None = None, **kwargs: Any
) -> EvaluationReport:
    """One model on a dataset (see `evaluate_models`); the report is named `name` or the model title."""
    key = name or bundle.title
    return evaluate_models({key: bundle}, sections, void_border_px, **kwargs)[key]


# --- pictures of large sections without reading them whole ------------------------------------


def preview_shape(shape: tuple[int, int], max_side: int) -> tuple[int, int]:
    """The size `thinseg.reports.plots.preview` shrinks an (H, W) image to."""
    h, w = shape
    scale = min(1.0, max_side / max(h, w))
    if scale >= 1.0:
        return h, w
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def read_preview(source, max_side: int, band_rows: int = 2048) -> np.ndarray:
    """The image of `source` as `plots.preview` would shrink it (same pixels picked), read band
    by band so a gigapixel PP is never held whole."""
    from thinseg.inference.resample import nearest_index

    height, width = source.shape
    shape = preview_shape((height, width), max_side)
    if shape == (height, width):
        return np.asarray(source.read(0, height, 0, width))
    rows, cols = nearest_index(shape[0], height), nearest_index(shape[1], width)
    out = np.empty((shape[0], shape[1], 3), np.uint8)
    for y0 in range(0, height, band_rows):
        y1 = min(height, y0 + band_rows)
        sel = np.nonzero((rows >= y0) & (rows < y1))[0]
        if sel.size:
            out[sel] = np.asarray(source.read(y0, y1, 0, width))[rows[sel] - y0][:, cols]
    return out


class RegionImage:
    """An RGB source seen as an array that reads only the windows it is sliced with
    (`image[ys, xs]`), for `compare.compare_sheet`, which crops a few regions of the PP."""

    ndim = 3

    def __init__(self, source) -> None:
        self.source = source
        self.shape = (int(source.shape[0]), int(source.shape[1]), 3)

    def __getitem__(self, key) -> np.ndarray:
        if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, slice) for k in key)):
            raise TypeError("RegionImage supports image[y0:y1, x0:x1] only")
        ys, xs = key
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.shape[1])
        if ys.step not in (None, 1) or xs.step not in (None, 1):
            raise TypeError("RegionImage supports unit steps only")
        return np.asarray(self.source.read(y0, max(y0, y1), x0, max(x0, x1)))
