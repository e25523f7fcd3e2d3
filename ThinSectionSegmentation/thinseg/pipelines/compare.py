"""Score several models on the same labelled sections and write the comparison files.

The work behind `thinseg compare`: every model runs over the same sections (as in
`thinseg.pipelines.evaluate`), and the scores go side by side into JSON and text, with
per-class bars and comparison sheets (the regions where the models disagree most, under each
model) in PNG and one HTML page. The files appear all together or not at all.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from thinseg.data.inputs import open_data
from thinseg.data.sections import Section
from thinseg.errors import ThinSegError, failures_named
from thinseg.inference.device import select_device
from thinseg.inference.engine import InferenceOptions, Precision
from thinseg.jsonio import dumps
from thinseg.metrics import comparison_dict, format_comparison_table
from thinseg.metrics.evaluator import EvaluationReport
from thinseg.model.bundle import ModelBundle, load_bundle
from thinseg.pipelines.evaluate import (
    Log,
    SectionPrediction,
    check_mapping,
    check_models,
    check_sections,
    evaluate_models,
)
from thinseg.pipelines.outputs import OutputSet, unique_names
from thinseg.pipelines.segment import ProgressFactory
from thinseg.reports import plots
from thinseg.reports.comparison import Region, compare_sheet, write_comparison_html
from thinseg.reports.preview import RegionImage

#: Side of the regions shown on a comparison sheet, in section pixels.
REGION_SIDE = 256


@dataclass
class CompareOptions:
    """Several models on the same labelled sections; the defaults are those of `thinseg compare`.

    `sheets`: comparison sheets for the first N sections. `void_border_px` 0: no void-border scores.
    `precision` as for segmenting ("auto": bf16 where the hardware runs it natively, "fp32": exact).
    """

    models: Sequence[Path]
    data: Sequence[str | os.PathLike[str]]
    output: Path = Path("results/comparison")
    void_border_px: float = 2.0
    mapping: Path | None = None
    device: str = "auto"
    precision: Precision = "auto"
    sheets: int = 3
    overwrite: bool = False


@dataclass
class ComparisonFiles:
    """A finished comparison: the models by name, their reports, the text table and the files."""

    bundles: dict[str, ModelBundle]
    reports: dict[str, EvaluationReport]
    text: str
    written: list[Path]


def model_names(bundles: Sequence[ModelBundle]) -> list[str]:
    """Short distinct names: folder names, else parent/folder (run1/model vs run2/model), else
    titles, else numbered."""
    candidates = (
        [b.path.name for b in bundles],
        [f"{b.path.parent.name}/{b.path.name}" for b in bundles],
        [b.title for b in bundles],
    )
    for names in candidates:
        if len(set(names)) == len(names):
            return names
    return [f"{b.path.name} ({i})" for i, b in enumerate(bundles, 1)]


def compare_files(
    options: CompareOptions,
    *,
    progress: ProgressFactory | None = None,
    log: Log | None = None,
    on_start: Callable[[Mapping[str, ModelBundle], list[Section]], None] | None = None,
) -> ComparisonFiles:
    """Score every model and write comparison.json, comparison.txt, per-class bars, the sheets and
    comparison.html, all or none. Everything is checked (device, models, mapping table, sections,
    existing files) before a model runs; then `on_start(models by name, sections)` is told."""
    select_device(options.device)
    if not options.data:
        raise ThinSegError("no DATA given: list the labelled netCDF files or folders after the model folders")
    if len(options.models) < 2:
        raise ThinSegError("give at least two model folders to compare (one model: thinseg evaluate)")
    loaded = [load_bundle(d) for d in options.models]
    bundles = dict(zip(model_names(loaded), loaded))
    check_models(bundles)
    table = loaded[0].class_table
    check_mapping(options.mapping, table)
    sections = open_data(options.data)
    check_sections(sections, bundles)

    outputs = OutputSet(options.output, options.overwrite)
    files = {
        key: outputs.add(file)
        for key, file in (
            ("json", "comparison.json"),
            ("table", "comparison.txt"),
            ("bars", "per_class_scores.png"),
            ("html", "comparison.html"),
        )
    }
    sheet_names = [f"compare_{n}.png" for n in unique_names([s.name for s in sections])][: options.sheets]
    sheet_tmps = [outputs.add(n) for n in sheet_names]
    outputs.check()
    if log is not None:
        for note in outputs.notes:  # temporaries of interrupted runs swept from the output folder
            log(note)
    if on_start is not None:
        on_start(bundles, sections)
    sheets: list[tuple[str, Path, list[Region]]] = []

    def on_section(sp: SectionPrediction) -> None:
        if len(sheets) < len(sheet_tmps):
            path = sheet_tmps[len(sheets)]
            with failures_named(outputs.path(sheet_names[len(sheets)]), "cannot write the output"):
                regions = compare_sheet(
                    RegionImage(sp.images["PP"]),
                    sp.truth,
                    sp.preds,
                    table,
                    path,
                    size=REGION_SIDE,
                    title=f"{sp.name}: {' vs '.join(sp.preds)}",
                )
            sheets.append((sp.name, path, regions))

    try:
        reports = evaluate_models(
            bundles,
            sections,
            options.void_border_px,
            mapping_csv=options.mapping,
            options=InferenceOptions(device=options.device, precision=options.precision),
            progress=progress,
            on_section=on_section,
            log=log,
        )
        text = format_comparison_table(reports)
        doc = comparison_dict(reports)
        doc["model_folders"] = {name: str(b.path) for name, b in bundles.items()}
        doc["sections"] = [s.name for s in sections]
        doc["sheets"] = [
            {"section": name, "file": final, "regions_yx": [[r.y0, r.x0, r.height, r.width] for r in regions]}
            for (name, _tmp, regions), final in zip(sheets, sheet_names)
        ]
        files["json"].write_text(dumps(doc, indent=2) + "\n", encoding="utf-8")
        files["table"].write_text(text + "\n", encoding="utf-8")
        void = options.void_border_px > 0
        plots.plot_per_class_bars(reports, files["bars"], void_excluded=void, title=" vs ".join(reports))
        images = [
            (
                "per-class scores" + (f", void borders of {options.void_border_px:g} px excluded" if void else ""),
                files["bars"],
            )
        ]
        images += [(f"{name}: regions {', '.join(str(r) for r in regions)}", tmp) for name, tmp, regions in sheets]
        write_comparison_html(files["html"], reports, images, title=f"thinseg compare: {' vs '.join(reports)}")
        written = outputs.commit()
    except OSError as error:  # sections fail as ThinSegError: this is writing the comparison
        outputs.discard()
        raise ThinSegError.from_os_error(error, "cannot write the comparison", options.output) from error
    except BaseException:
        outputs.discard()
        raise
    return ComparisonFiles(bundles, reports, text, written)
