"""Run models over labelled sections and score them: the work behind `thinseg evaluate` and
`thinseg compare`, usable as it is by the Slicer logic and scripts. `evaluate_files` is the
whole `thinseg evaluate`: score one model and write the report files.

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

import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from thinseg.classes.table import ClassTable
from thinseg.data.inputs import open_data
from thinseg.data.mapping import build_mapping, load_mapping_csv, mapping_for
from thinseg.data.section_images import open_ppxp
from thinseg.data.sections import Section, canonical_role, open_sections
from thinseg.errors import ThinSegError, failures_named
from thinseg.inference.device import select_device
from thinseg.inference.engine import (
    CancelFn,
    InferenceOptions,
    Precision,
    SegmentationResult,
    Segmenter,
    resolve_min_region,
)
from thinseg.inference.resample import resampling_factor, segment_at_model_resolution
from thinseg.inference.tta import resolve_mode
from thinseg.io.images import RasterSource
from thinseg.jsonio import dumps
from thinseg.metrics.borders import void_border_mask
from thinseg.metrics.evaluator import EvaluationReport, Evaluator
from thinseg.model.bundle import ModelBundle, load_bundle
from thinseg.pipelines.outputs import OutputSet, unique_names
from thinseg.pipelines.segment import ProgressFactory, check_thin_section_model, model_mm_per_pixel
from thinseg.reports import plots
from thinseg.reports.errors import MAX_PANEL_SIDE, draw_error_overlay
from thinseg.resources import default_model_dir
from thinseg.training.targets import section_scale as _section_scale

if TYPE_CHECKING:
    from typing_extensions import TypeAlias  # typing has it from Python 3.10 only

#: Where messages go (a line each), e.g. printed by the command line.
Log = Callable[[str], None]
#: A mapping table: a CSV file of mineral,class rows (None: QEMSCAN names by name).
MappingCsv: TypeAlias = "str | os.PathLike[str] | None"


@dataclass
class SectionPrediction:
    """One section as scored: truth in the models' classes (0 = no truth), each model's labels on
    the section grid, the void-border mask (True = scored; None without void borders) and the
    section's images ("PP", "XP": region readers, open only during `on_section`)."""

    name: str
    section: Section
    truth: np.ndarray
    preds: dict[str, np.ndarray]
    keep: np.ndarray | None
    images: dict[str, RasterSource] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)  # inference time per model


def section_path(section: Section) -> Path | None:
    """The file a section is reported under (netCDF file, PP image), if it has one."""
    path = getattr(section, "path", None)
    if path is None:
        files = getattr(section, "files", None)
        path = files.get("PP") if isinstance(files, dict) else None
    return Path(path) if path is not None else None


def model_roles(bundle: ModelBundle) -> list[str]:
    """The section image ("PP"/"XP") that feeds each model input, in the model's order.

    Names GeoSlicer uses (PP, PX, XP) decide; other names go by position (PP first)."""
    roles = []
    for position, name in enumerate(bundle.input_names):
        try:
            roles.append(canonical_role(name))
        except ThinSegError:
            roles.append("PP" if position == 0 else "XP")
    return roles


def section_roles(section: Section) -> set[str]:
    """The images ("PP", "XP") a section has, without opening files (netCDF and file sections
    name them; other sections are asked)."""
    named = getattr(section, "vars", None)
    if not isinstance(named, dict):
        named = getattr(section, "files", None)
    if isinstance(named, dict):
        return set(named)
    return {r for r in ("PP", "XP") if section.source(r) is not None}


@contextmanager
def open_images(section: Section, roles: Sequence[str]) -> Iterator[dict[str, RasterSource]]:
    """Region readers for `roles` of a section, opened here and closed at exit (a netCDF or
    image-file section's own lazy sources stay unopened: nothing is left open afterwards).
    The PP image of a netCDF or image-file section is opened in any case."""
    wanted = list(dict.fromkeys(roles))
    netcdf_vars, files = getattr(section, "vars", None), getattr(section, "files", None)
    netcdf_path = getattr(section, "path", None)
    with ExitStack() as stack:
        found: dict[str, RasterSource | None] = {}
        if isinstance(netcdf_vars, dict) and netcdf_path is not None:
            pair = stack.enter_context(open_ppxp(netcdf_path, variables=netcdf_vars, with_xp="XP" in wanted))
            found = {"PP": pair.pp, "XP": pair.xp}
        elif isinstance(files, dict):
            pair = stack.enter_context(open_ppxp(files["PP"], files.get("XP"), with_xp="XP" in wanted))
            found = {"PP": pair.pp, "XP": pair.xp}
        images: dict[str, RasterSource] = {}
        for role in wanted:
            source = found[role] if role in found else section.source(role)
            if source is None:
                raise ThinSegError(f"section {section.name!r} has no {role} image", section_path(section))
            images[role] = source
        yield images


def section_scale(section: Section, bundle: ModelBundle) -> float:
    """Section pixels per model pixel (1.0 when the pixel sizes match or one is unknown)."""
    return _section_scale(section, model_mm_per_pixel(bundle))


def section_truth(section: Section, class_table: ClassTable, mapping_csv: MappingCsv = None) -> np.ndarray:
    """The section's labelmap in the classes of `class_table` (0 = no truth), mapped as training
    maps it: same classes -> unchanged; other names (QEMSCAN minerals) by name and the table."""
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
    segmenter: Segmenter,
    section: Section,
    images: Mapping[str, RasterSource | None],
    roles: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel: CancelFn | None = None,
) -> tuple[np.ndarray, list[str]]:
    """(labels on the section grid, messages): the model over the whole section (`images`: role
    -> region reader, see `open_images`), at the model's resolution when the section's pixel
    size differs (labels mapped back by nearest neighbour)."""
    result, messages = predict_section_result(segmenter, section, images, roles, progress, cancel)
    return result.labels, messages


def predict_section_result(
    segmenter: Segmenter,
    section: Section,
    images: Mapping[str, RasterSource | None],
    roles: Sequence[str] | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancel: CancelFn | None = None,
) -> tuple[SegmentationResult, list[str]]:
    """As `predict_section`, with the engine's whole result on the section grid (labels, and the
    confidence map when the segmenter's options ask for it)."""
    bundle = segmenter.bundle
    roles = list(roles or model_roles(bundle))
    sources = [images.get(r) for r in roles]
    missing = [r for r, source in zip(roles, sources) if source is None]
    if missing:
        raise ThinSegError(
            f"section {section.name!r} has no {'/'.join(missing)} image; model {bundle.title!r} "
            f"needs {'+'.join(roles)}",
            section_path(section),
        )
    messages: list[str] = []
    model_mm = model_mm_per_pixel(bundle)
    mm = section.mm_per_pixel
    factor = resampling_factor(mm, model_mm, section_path(section))
    if factor is not None:
        messages.append(f"{section.name}: resampling from {mm:g} to the model's {model_mm:g} mm/px and back")
    present = [source for source in sources if source is not None]
    result = segment_at_model_resolution(segmenter, present, factor, progress=progress, cancel=cancel)
    return result, messages


def check_models(bundles: Mapping[str, ModelBundle]) -> None:
    """Models scored together must be thin-section models predicting the same classes."""
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


def check_mapping(path: MappingCsv, class_table: ClassTable) -> None:
    """Read the mapping table up front and resolve every row against the model's classes, so a
    bad table fails before any model runs (not at the first section that uses the bad row)."""
    if path is None:
        return
    rows = load_mapping_csv(path)
    names = list(rows)[:255]
    try:
        build_mapping(ClassTable.from_names_colors(names, ["#000000"] * len(names)), class_table, rows)
    except ThinSegError as error:
        raise ThinSegError(error.problem, path) from None


def check_sections(sections: Sequence[Section], bundles: Mapping[str, ModelBundle]) -> None:
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
    bundles: Mapping[str, ModelBundle],
    sections: Sequence[str | os.PathLike[str] | Section],
    void_border_px: float = 2.0,
    *,
    mapping_csv: MappingCsv = None,
    options: InferenceOptions | None = None,
    progress: ProgressFactory | None = None,
    cancel: CancelFn | None = None,
    on_section: Callable[[SectionPrediction], None] | None = None,
    log: Log | None = None,
) -> dict[str, EvaluationReport]:
    """Score each model (name -> ModelBundle) on the same sections (paths or Section objects).

    void_border_px: band around truth class boundaries left out of the "-vb" scores, in model
    pixels (as in training; scaled when a section's pixel size differs). options: the
    InferenceOptions for every model (default: the engine's, device auto). Sections are read one
    at a time; each runs through every model before the next one is read.
    """
    say = log or _silent
    check_models(bundles)
    opened = open_sections(list(sections))
    check_sections(opened, bundles)
    first = next(iter(bundles.values()))
    table = first.class_table
    # the confidence map (winning-class probability) feeds the calibration (ECE) of each report
    scoring = replace(options or InferenceOptions(), with_confidence=True)
    segmenters = {name: Segmenter(bundle, scoring) for name, bundle in bundles.items()}
    for name, segmenter in segmenters.items():
        for message in segmenter.messages:
            say(f"{name}: {message}" if len(bundles) > 1 else message)
    evaluators = {name: Evaluator(table, void_border_px) for name in bundles}
    for section in opened:  # every section has truth before any model runs (labelmaps are cheap)
        with failures_named(section_path(section)):
            section_truth(section, table, mapping_csv)
    roles = list(dict.fromkeys(["PP"] + [r for b in bundles.values() for r in model_roles(b)]))
    for section in opened:
        with failures_named(section_path(section)):
            truth = section_truth(section, table, mapping_csv)  # read before the images are opened
            preds: dict[str, np.ndarray] = {}
            seconds: dict[str, float] = {}
            keep_by_scale: dict[float, np.ndarray | None] = {}
            with open_images(section, roles) as images:
                for name, segmenter in segmenters.items():
                    label = f"{name}: {section.name}" if len(bundles) > 1 else section.name
                    callback = progress(label, section.shape[0] * section.shape[1]) if progress is not None else None
                    start = time.perf_counter()
                    result, messages = predict_section_result(
                        segmenter, section, images, progress=callback, cancel=cancel
                    )
                    pred = result.labels
                    seconds[name] = time.perf_counter() - start
                    for message in messages:
                        say(message)
                    scale = section_scale(section, bundles[name])
                    if scale not in keep_by_scale:
                        keep_by_scale[scale] = section_keep(truth, void_border_px, scale)
                    evaluators[name].add_section(
                        section.name, truth, pred, keep_by_scale[scale], confidence=result.confidence
                    )
                    del result
                    preds[name] = pred
                if on_section is not None:
                    keep = next(iter(keep_by_scale.values()))
                    on_section(SectionPrediction(section.name, section, truth, preds, keep, images, seconds))
            del truth, preds
    return {name: evaluator.report(model=name) for name, evaluator in evaluators.items()}


def evaluate_model(
    bundle: ModelBundle,
    sections: Sequence[str | os.PathLike[str] | Section],
    void_border_px: float = 2.0,
    *,
    name: str | None = None,
    **kwargs: Any,
) -> EvaluationReport:
    """One model on a dataset (see `evaluate_models`); the report is named `name` or the model title."""
    key = name or bundle.title
    return evaluate_models({key: bundle}, sections, void_border_px, **kwargs)[key]


def _silent(_message: str) -> None:
    """The default log: say nothing."""


# --- `thinseg evaluate`: one model, report files -------------------------------------------

#: Longest side of each panel of the per-section overlays (truth | prediction | errors).
OVERLAY_SIDE = MAX_PANEL_SIDE


@dataclass
class EvaluateOptions:
    """One model on labelled sections; the defaults are those of `thinseg evaluate`.

    `model` None: the bundled model. `overlays`: pictures truth | prediction | errors for the
    first N sections. `void_border_px` 0: no void-border scores. `precision` as for segmenting
    ("auto": bf16 where the hardware runs it natively, "fp32": exact).
    """

    data: Sequence[str | os.PathLike[str]]
    model: Path | None = None
    output: Path = Path("results/evaluation")
    void_border_px: float = 2.0
    mapping: Path | None = None
    device: str = "auto"
    precision: Precision = "auto"
    overlays: int = 3
    tta: str = "auto"  # test-time augmentation; "auto": the model's meta.json recommendation
    min_region: int | str = "auto"  # minimum-region sieve in model pixels; "auto": the model's recommendation
    overwrite: bool = False


@dataclass
class EvaluationFiles:
    """A finished evaluation: the model, its report, the text table and the files written."""

    model_dir: Path
    bundle: ModelBundle
    sections: list[Section]
    report: EvaluationReport
    text: str
    written: list[Path]


def section_lines(report: EvaluationReport) -> str:
    """Per-section headline scores (all labelled pixels)."""
    width = max(12, *(len(s.name) for s in report.sections))
    lines = [f"{'section':<{width}} {'pixels':>12} {'accuracy%':>10} {'mean IoU':>9}"]
    for s in report.sections:
        lines.append(f"{s.name:<{width}} {s.evaluated_pixels:>12,} {100 * s.pixel_accuracy:>10.2f} {s.mean_iou:>9.3f}")
    return "\n".join(lines)


def evaluate_files(
    options: EvaluateOptions,
    *,
    progress: ProgressFactory | None = None,
    log: Log | None = None,
    on_start: Callable[[ModelBundle, Path, list[Section]], None] | None = None,
) -> EvaluationFiles:
    """Score one model and write evaluation.json, evaluation.txt, the confusion matrices, per-class
    bars, the fractions scatter, the reliability diagram and the first sections' overlays, all or
    none. Everything is checked (device, model, mapping table, sections, existing files) before
    the model runs; then `on_start(bundle, model folder, sections)` is told what is about to run."""
    select_device(options.device)
    model_dir = options.model or default_model_dir()
    bundle = load_bundle(model_dir)
    name = bundle.title
    check_models({name: bundle})
    tta = resolve_mode(options.tta, bundle.test_time_augmentation)  # as the segmenter will resolve it
    min_region = resolve_min_region(options.min_region, bundle)
    check_mapping(options.mapping, bundle.class_table)
    sections = open_data(options.data)
    check_sections(sections, {name: bundle})

    outputs = OutputSet(options.output, options.overwrite)
    void = options.void_border_px > 0
    files = {
        key: outputs.add(file)
        for key, file in (
            ("json", "evaluation.json"),
            ("table", "evaluation.txt"),
            ("confusion", "confusion_matrix.png"),
            ("bars", "per_class_scores.png"),
            ("fractions", "fractions.png"),
            ("reliability", "reliability.png"),
        )
    }
    if void:
        files["confusion_all"] = outputs.add("confusion_matrix_all_pixels.png")
    overlay_names = [f"overlay_{n}.png" for n in unique_names([s.name for s in sections])][: options.overlays]
    overlay_tmps = [outputs.add(n) for n in overlay_names]
    outputs.check()
    if log is not None:
        for note in outputs.notes:  # temporaries of interrupted runs swept from the output folder
            log(note)
    if on_start is not None:
        on_start(bundle, Path(model_dir), sections)
    done = [0]

    def on_section(sp: SectionPrediction) -> None:
        index = done[0]
        done[0] += 1
        if index < len(overlay_tmps):
            with failures_named(outputs.path(overlay_names[index]), "cannot write the output"):
                draw_error_overlay(
                    overlay_tmps[index],
                    sp.truth,
                    sp.preds[name],
                    bundle.class_table,
                    sp.images["PP"],  # read band by band at panel size
                    keep=sp.keep,
                    title=f"{sp.name}: {name}",
                    max_panel_side=OVERLAY_SIDE,
                )

    try:
        report = evaluate_model(
            bundle,
            sections,
            options.void_border_px,
            name=name,
            mapping_csv=options.mapping,
            options=InferenceOptions(
                device=options.device, precision=options.precision, tta=tta, min_region=min_region
            ),
            progress=progress,
            on_section=on_section,
            log=log,
        )
        text = report.format_table() + "\n" + section_lines(report)
        doc = report.to_dict()
        doc["model_folder"] = str(model_dir)
        doc["mapping_csv"] = str(options.mapping) if options.mapping else None
        doc["section_files"] = [str(section_path(s) or s.name) for s in sections]
        doc["test_time_augmentation"] = tta  # which mode every prediction (and so every score) used
        doc["min_region_px"] = min_region  # the sieve every prediction went through (0: none)
        files["json"].write_text(dumps(doc, indent=2) + "\n", encoding="utf-8")
        files["table"].write_text(text + "\n", encoding="utf-8")
        n = len(report.sections)
        excluded = report.confusion_void_excluded
        if void and excluded is not None:
            plots.plot_confusion(
                excluded,
                bundle.class_table,
                files["confusion"],
                title=f"{name} on {n} section(s), void borders of {options.void_border_px:g} px excluded",
            )
            plots.plot_confusion(
                report.confusion,
                bundle.class_table,
                files["confusion_all"],
                title=f"{name} on {n} section(s), all labelled pixels",
            )
        else:
            plots.plot_confusion(
                report.confusion,
                bundle.class_table,
                files["confusion"],
                title=f"{name} on {n} section(s), all labelled pixels",
            )
        plots.plot_per_class_bars({name: report}, files["bars"], void_excluded=void, title=name)
        plots.plot_fractions_scatter(
            report.true_fractions,
            report.pred_fractions,
            bundle.class_table,
            files["fractions"],
            report.fraction_stats,
            title=f"{name}: mineral fractions per section",
        )
        if report.calibration is not None:  # evaluate_models always asks the engine for confidence
            plots.plot_reliability(report.calibration, files["reliability"], title=f"{name}: reliability")
        written = outputs.commit()
    except OSError as error:  # sections fail as ThinSegError: this is writing the report
        outputs.discard()
        raise ThinSegError.from_os_error(error, "cannot write the report", options.output) from error
    except BaseException:
        outputs.discard()
        raise
    return EvaluationFiles(Path(model_dir), bundle, sections, report, text, written)
