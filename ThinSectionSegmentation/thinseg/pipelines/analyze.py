"""`thinseg analyze`: grain analysis of labelmaps -> grains.csv, summary.json, report.html.

Each labelmap gets its own folder under the output folder (named after the labelmap), written
whole or not at all: its files are made in a hidden temporary folder that takes the final name
at the end, and an existing folder is replaced only with `overwrite`. A labelmap that fails is
reported in one line and the others go on.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from thinseg import jsonio
from thinseg.analysis import GrainAnalysis, GrainOptions, LabelmapSource, analyze, open_labelmap
from thinseg.analysis.scan import Progress
from thinseg.errors import ThinSegError, failures_named
from thinseg.io.atomic import atomic_directory, sweep_stale_temporaries
from thinseg.io.images import RasterSource
from thinseg.reports.grain_report import grain_overview_image, grain_report_html

#: Files of one labelmap's result folder.
GRAINS_CSV, SUMMARY_JSON, REPORT_HTML, OVERVIEW_PNG = "grains.csv", "summary.json", "report.html", "overview.png"


@dataclass(frozen=True)
class AnalyzeOptions:
    """What `thinseg analyze` was asked (paths as given)."""

    inputs: Sequence[str | os.PathLike[str]]
    output: Path
    classes: Path | None = None
    mm_per_pixel: float | None = None
    variable: str | None = None
    pp: Path | None = None
    grains: GrainOptions = field(default_factory=GrainOptions)
    overwrite: bool = False


@dataclass
class AnalyzeRun:
    """Result folders written, and the inputs that failed with their one-line reasons."""

    written: list[tuple[GrainAnalysis, Path]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)


def pp_overview(pp: RasterSource, factor: int, band_rows: int = 1024) -> npt.NDArray[np.uint8]:
    """Every `factor`-th row and column of the PP image, read by bands (a gigapixel PP never
    lies in memory whole)."""
    height = pp.shape[0]
    rows = []
    step = max(factor, band_rows - band_rows % factor)
    for y0 in range(0, height, step):
        band = pp.read(y0, min(height, y0 + step))
        rows.append(band[::factor, ::factor])
    return np.ascontiguousarray(np.concatenate(rows))


def write_result(analysis: GrainAnalysis, folder: Path, overwrite: bool) -> Path:
    """The result folder of one labelmap, whole (see the module docstring)."""
    pp_small = None
    pp = analysis.source.open_pp()
    if pp is not None:
        try:
            pp_small = pp_overview(pp, analysis.scan.overview_factor)
        finally:
            pp.close()
    overview = grain_overview_image(analysis, pp_small)
    folder.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temporaries(folder.parent)
    try:
        with atomic_directory(folder, overwrite=overwrite) as tmp:
            (tmp / GRAINS_CSV).write_text(analysis.table.csv_text(), encoding="utf-8")
            jsonio.write_json(tmp / SUMMARY_JSON, analysis.summary)
            _write_png(tmp / OVERVIEW_PNG, overview)
            (tmp / REPORT_HTML).write_text(grain_report_html(analysis, pp_small), encoding="utf-8")
    except FileExistsError:
        raise ThinSegError("the result folder exists: pass --overwrite to replace it", folder) from None
    return folder


def _write_png(path: Path, image: npt.NDArray[np.uint8]) -> None:
    from PIL import Image  # deferred: Pillow is needed only when a picture is written

    Image.fromarray(image).save(path)


def result_folder(output: Path, source: LabelmapSource, taken: set[str]) -> Path:
    """output/<labelmap name>; a name met twice in one run gets its parent folder's name too."""
    name = source.name
    if name in taken and source.path is not None:
        name = f"{source.path.parent.name}_{name}"
    taken.add(name)
    return output / name


def analyze_files(
    options: AnalyzeOptions,
    *,
    progress: Callable[[str, int], Progress] | None = None,
    log: Callable[[str], None] | None = None,
) -> AnalyzeRun:
    """Analyse every input into its own result folder (see the module docstring)."""
    run = AnalyzeRun()
    taken: set[str] = set()
    for item in options.inputs:
        path = Path(item)
        try:
            with failures_named(path):
                source = open_labelmap(
                    path,
                    classes=options.classes,
                    mm_per_pixel=options.mm_per_pixel,
                    variable=options.variable,
                    pp=options.pp,
                )
                folder = result_folder(options.output, source, taken)
                if folder.exists() and not options.overwrite:
                    raise ThinSegError("the result folder exists: pass --overwrite to replace it", folder)
                bar = progress(source.name, source.shape[0] * source.shape[1]) if progress else None
                analysis = analyze(source, options.grains, progress=bar)
            with failures_named(folder, "cannot write the output"):
                run.written.append((analysis, write_result(analysis, folder, options.overwrite)))
        except ThinSegError as error:
            run.failed.append((str(path), error.problem))
            if log is not None:
                log(f"error: {error}")
    return run
