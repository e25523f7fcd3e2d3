"""Segmentation, registration and training jobs described by a plain JSON file (`job.json`).

A job folder holds `job.json`, the inputs the Slicer panel exported (GeoSlicer netCDF) and,
when done, the outputs and `summary.json`; the panel imports them only after the process exits
with status 0, so a failed or cancelled job leaves the scene as it was. While it runs, a job
reports through typed events (thinseg.jobs.events): progress, stages, epochs, warnings.

Start-up stays light: torch (segmentation, training) and SimpleITK (registration) are imported
by the job that needs them, so the Slicer panel can import this module before they are installed.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from thinseg.classes.files import read_model_classes
from thinseg.classes.table import ClassTable
from thinseg.errors import ThinSegError
from thinseg.io.atomic import write_bytes_atomic
from thinseg.io.netcdf import NetcdfImageSource, NetcdfWriter, open_netcdf_image, read_labelmap
from thinseg.jobs.events import (
    Emit,
    EpochEvent,
    MessageEvent,
    ProgressEvent,
    StageEvent,
    WarningEvent,
    emit_stdout,
    finite_or_none,
)
from thinseg.jsonio import write_json
from thinseg.limits import check_mm_per_pixel

if TYPE_CHECKING:
    from thinseg.pipelines.segment import SectionResult, SegmentRun
    from thinseg.registration.landmark_io import LandmarkPairs
    from thinseg.registration.stages import RegistrationResult
    from thinseg.training.config import TrainConfig, TrainResult

#: How section messages that are warnings begin (as the command line prints them).
WARNING_PREFIX = "warning: "
#: A job as read from job.json.
Job = dict[str, Any]
#: A finished job's summary (also written to summary.json).
Summary = dict[str, Any]
#: Seconds between two progress events of the same work (the first and the last always go out).
PROGRESS_INTERVAL = 0.25


class _Throttle:
    """Lets a progress event through at the start, at the end, and every PROGRESS_INTERVAL s."""

    def __init__(self) -> None:
        self._last: float | None = None

    def due(self, done: int, total: int) -> bool:
        now = time.monotonic()
        if self._last is not None and done < total and now - self._last < PROGRESS_INTERVAL:
            return False
        self._last = now
        return True


# -- segmentation -------------------------------------------------------------------------------


def _tile_progress(emit: Emit) -> Callable[[str, int], Callable[[int, int], None]]:
    """The pipeline's progress factory: per section, tile progress events with MPix/s."""

    def factory(name: str, pixels: int) -> Callable[[int, int], None]:
        start, throttle = time.perf_counter(), _Throttle()
        emit(StageEvent(f"segmenting {name}"))

        def update(done: int, total: int) -> None:
            if throttle.due(done, total):
                seconds = max(time.perf_counter() - start, 1e-9)
                rate = pixels * done / max(total, 1) / seconds / 1e6
                emit(ProgressEvent(name, done, total, unit="tiles", rate=rate, rate_unit="MPix/s"))

        return update

    return factory


def _section_summary(result: SectionResult) -> Summary:
    return {
        "section": result.section.name,
        "netcdf": result.netcdf.name,
        "seconds": result.seconds,
        "megapixels": result.megapixels,
        "tiles": result.tiles,
        "percent": {area.name: area.percent for area in result.mineralogy.areas},
    }


def run_segment_job(job: Job, folder: Path, emit: Emit = emit_stdout) -> Summary:
    """Segment the job's section (`job["inputs"]`: GeoSlicer netCDF files in the folder) with
    `job["model_dir"]` into `job["output"]` (netCDF: the inputs, the labelmap, the confidence
    map when asked for) and `summary.json`."""
    # deferred: the segmentation pipeline imports torch (1-2 s), loaded only by segmentation jobs
    from thinseg.inference.engine import InferenceOptions
    from thinseg.pipelines.segment import SegmentOptions, segment_files

    probabilities = bool(job.get("probabilities", False))
    options = SegmentOptions(
        pp_pattern=str(job.get("pp_pattern", "PP")),
        xp_pattern=str(job.get("xp_pattern", "XP")),
        overwrite=True,
        probabilities=probabilities,
        inference=InferenceOptions(
            device=str(job.get("device", "auto")),
            with_confidence=probabilities,
            tile=int(job["tile"]) if job.get("tile") else None,
            tta=str(job.get("tta", "auto")),
            min_region=job.get("min_region", "auto"),  # checked by the Segmenter
        ),
    )

    def on_start(run: SegmentRun) -> None:
        emit(MessageEvent(f"model: {run.bundle.title} ({run.model_dir})"))
        for message in run.segmenter.messages if run.segmenter is not None else []:
            emit(MessageEvent(message))

    emit(StageEvent("loading the model"))
    model_dir = Path(job["model_dir"]) if job.get("model_dir") else None
    run = segment_files(
        [folder / name for name in job["inputs"]],
        options,
        folder / job["output"],
        model_dir,
        on_start=on_start,
        progress=_tile_progress(emit),
    )
    if run.problems:
        raise ThinSegError(run.problems[0].problem, run.problems[0].path)
    if run.failures:
        raise run.failures[0][1]
    if not run.results:
        raise ThinSegError("nothing to segment", folder / "job.json")
    sections = [_section_summary(r) for r in run.results]
    for result in run.results:  # notes; those `thinseg segment` prints as warnings (out of depth) are warnings
        for message in result.messages[len(run.segmenter.messages) if run.segmenter else 0 :]:
            text = message.removeprefix(WARNING_PREFIX)
            emit(WarningEvent(text) if text != message else MessageEvent(message))
    summary: Summary = {"output": job["output"], "model": run.bundle.title, "sections": sections}
    summary["test_time_augmentation"] = run.segmenter.tta if run.segmenter is not None else None
    summary["min_region_px"] = run.segmenter.min_region if run.segmenter is not None else None
    write_json(folder / "summary.json", summary)
    return summary


# -- registration -------------------------------------------------------------------------------


def landmark_pairs(job_landmarks: dict[str, Any] | None) -> LandmarkPairs | None:
    """The job's landmark pixels ({"qemscan_px", "image_px", "names"}) as LandmarkPairs."""
    if not job_landmarks:
        return None
    from thinseg.registration import LandmarkPairs  # deferred: the registration package loads SimpleITK

    return LandmarkPairs(
        np.asarray(job_landmarks["qemscan_px"], dtype=np.float64).reshape(-1, 2),
        np.asarray(job_landmarks["image_px"], dtype=np.float64).reshape(-1, 2),
        [str(n) for n in job_landmarks.get("names", [])],
    )


def write_transform(folder: Path, stem: str, result: RegistrationResult) -> Path:
    """`<stem>.tfm` (ITK) and `<stem>.json` (thinseg record), readable by output.load_transform."""
    # deferred: imports SimpleITK, which only registration jobs need
    from thinseg.registration.output import transform_bytes, transform_json

    tfm, record = folder / f"{stem}.tfm", folder / f"{stem}.json"
    write_bytes_atomic(tfm, transform_bytes(result.transform.itk))
    write_json(record, transform_json(result.transform, result))
    return record


def _read_rgb(path: Path, variable: str | None) -> tuple[npt.NDArray[np.uint8] | None, NetcdfImageSource | None]:
    """The whole RGB image `variable` of a netCDF file and its source (for spacing/origin)."""
    if not variable:
        return None, None
    image = open_netcdf_image(path, variable)
    try:
        return image.read(0, image.shape[0]), image
    finally:
        image.close()


def _pixel_size(value: float | str | None, what: str, source: Path) -> float:
    """A pixel size in mm from job.json or the file; an error naming the image when unknown or
    outside the sane range."""
    if value is None:
        raise ThinSegError(f"the pixel size of the {what} is unknown", source)
    try:
        number = float(value)
    except ValueError:
        raise ThinSegError(f"the pixel size of the {what} is not a number: {value!r}", source) from None
    return check_mm_per_pixel(number, f"the pixel size of the {what},", source)


def run_register_job(job: Job, folder: Path, emit: Emit = emit_stdout) -> Summary:
    """Register the QEMSCAN labelmap of `job["input"]` onto its PP image; writes
    `job["output"]` (the registered labelmap on the PP grid, GeoSlicer netCDF), the transform
    (`transform.tfm` + `transform.json`) and `summary.json`."""
    source = folder / job["input"]
    emit(StageEvent("reading the images"))
    pp, pp_info = _read_rgb(source, job["pp"])
    if pp is None or pp_info is None:
        raise ThinSegError("the job names no PP image", folder / "job.json")
    xp, _ = _read_rgb(source, job.get("xp"))
    labels, table, q_mm, _origin = read_labelmap(source, job["qemscan"])
    image_mm = _pixel_size(job.get("image_mm_per_pixel") or pp_info.mm_per_pixel, "PP image", source)
    qemscan_mm = _pixel_size(job.get("qemscan_mm_per_pixel") or q_mm, "QEMSCAN map", source)
    from thinseg.registration import register_section  # deferred: SimpleITK is loaded only by registration jobs
    from thinseg.registration.output import landmark_residuals  # deferred as above

    result = register_section(
        pp,
        xp,
        labels,
        table,
        image_mm_per_pixel=image_mm,
        qemscan_mm_per_pixel=qemscan_mm,
        landmarks=landmark_pairs(job.get("landmarks")),
        kind=job.get("kind", "similarity"),
        refine=bool(job.get("refine", True)),
        bspline=bool(job.get("bspline", False)),
        progress=lambda text: emit(StageEvent(text)),
    )
    emit(StageEvent("writing the results"))
    out = folder / job["output"]
    origin = pp_info.origin_mm or (0.0, 0.0, 0.0)
    xp_aligned_variable = None
    if result.labels is None:
        raise ThinSegError("the registration produced no labelmap", folder)
    with NetcdfWriter(out) as writer:
        writer.add_labelmap(job.get("name") or "QEMSCAN_registered", result.labels, result.table, image_mm, origin)
        if result.xp_was_aligned and result.xp is not None:  # XP was offset from PP: the scene gets the aligned copy
            xp_aligned_variable = writer.add_rgb_image("XP_aligned", result.xp, image_mm, origin)
    write_transform(folder, "transform", result)
    summary: Summary = {
        "xp_aligned_variable": xp_aligned_variable,
        "warnings": result.warnings,
        "landmarks": landmark_residuals(result),  # fit and final (refined) residuals side by side
        "metric_initial": result.metric_initial,
        "metric_final": result.metric_final,
        "overlap": result.overlap,
        "contrast": result.contrast,
        "kind": result.transform.kind,
        "xp_offset": list(result.xp_offset),
        "seconds": result.seconds,
    }
    write_json(folder / "summary.json", summary)
    for warning in result.warnings:
        emit(WarningEvent(warning))
    return summary


# -- training -----------------------------------------------------------------------------------

#: Integer options of job.json passed on to TrainConfig when given.
_INT_OPTIONS = (
    "patch_size",
    "batch_size",
    "steps_per_epoch",
    "base_channels",
    "depth",
    "num_res_units",
    "warmup_steps",
    "val_tile",
    "val_overlap",
    "patience",
    "seed",
    "members",
)


def _job_path(folder: Path, name: str) -> Path:
    return Path(name) if os.path.isabs(name) else folder / name


def _job_classes(value: Any, folder: Path) -> ClassTable:
    """The new model's classes: {"names", "colors"} (what the panel writes) or a class file
    (as `thinseg train --classes` reads it)."""
    if isinstance(value, dict):
        try:
            return ClassTable.from_names_colors([str(n) for n in value["names"]], [str(c) for c in value["colors"]])
        except (KeyError, TypeError, ValueError) as error:
            raise ThinSegError(
                f"'classes' needs names and #rrggbb colours of equal number ({error})", folder / "job.json"
            ) from None
    return read_model_classes(_job_path(folder, str(value)))


def train_config(job: Job, folder: Path) -> TrainConfig:
    """A TrainConfig from the panel's options (sections: netCDF files in or outside `folder`).
    `classes`, `mapping_csv`, `pixels_per_mm` and `inputs` are `thinseg train`'s --classes,
    --mapping, --model-mm-per-pixel (as its inverse) and --pp-only, with the same conflicts."""
    from thinseg.training import TrainConfig  # deferred: the training package imports torch
    from thinseg.training.config import MEMBER_SPLITS
    from thinseg.training.recipes import recipe_settings  # deferred: with the training package

    sections = [str((folder / s) if not os.path.isabs(s) else s) for s in job["sections"]]
    kwargs: dict[str, Any] = recipe_settings(str(job.get("recipe", "unet")))  # `thinseg train --recipe`
    kwargs.update(
        output_dir=Path(job["run_dir"]),
        sections=sections,
        val_fraction=float(job.get("val_fraction", 0.2)),
        epochs=int(job.get("epochs", kwargs.get("epochs", 20))),
        model_name=str(job.get("model_name", "model")),
        title=str(job.get("title") or job.get("model_name", "model")),
        description=str(job.get("description", "")),
        device=str(job.get("device", "auto")),
        overwrite=True,
        progress=False,  # no progress bars: the job reports through events
    )
    for key in _INT_OPTIONS:
        if job.get(key) is not None:
            kwargs[key] = int(job[key])
    if job.get("lr") is not None:
        kwargs["lr"] = float(job["lr"])
    if job.get("inputs"):
        kwargs["inputs"] = tuple(job["inputs"])
    if job.get("member_split"):
        split = str(job["member_split"])
        if split not in MEMBER_SPLITS:
            raise ThinSegError(
                f"'member_split' is one of {', '.join(MEMBER_SPLITS)}, not {split!r}", folder / "job.json"
            )
        kwargs["member_split"] = split
    if job.get("init_from"):
        kwargs["init_from"] = Path(job["init_from"])
        if job.get("members") is None:
            kwargs["members"] = 1  # the recipe's ensemble is of new networks; fine-tuning trains one
        for key, what in (("classes", "classes"), ("inputs", "inputs")):
            if job.get(key):
                raise ThinSegError(
                    f"'{key}' and 'init_from': a fine-tuned model keeps the {what} of the model it starts from",
                    folder / "job.json",
                )
    if job.get("classes"):
        kwargs["class_table"] = _job_classes(job["classes"], folder)
    if job.get("mapping_csv"):
        kwargs["mapping_csv"] = _job_path(folder, str(job["mapping_csv"]))
    if job.get("pixels_per_mm") is not None:
        pixels_per_mm = float(job["pixels_per_mm"])
        if not pixels_per_mm > 0:
            raise ThinSegError(f"'pixels_per_mm' must be positive, not {job['pixels_per_mm']}", folder / "job.json")
        kwargs["pixels_per_mm"] = pixels_per_mm
    return TrainConfig(**kwargs)


def run_train_job(job: Job, folder: Path, emit: Emit = emit_stdout) -> Summary:
    """Train, then move the exported bundle to `job["model_dir"]` (a new folder under a model
    root's ThinSectionEnv/Multiphase/, where the model selector and GeoSlicer find it). Batches and
    epochs are reported as progress and epoch events, the trainer's log lines as messages."""
    from thinseg.training import train  # deferred: torch costs 1-2 s at start-up

    config = train_config(job, folder)
    epochs, current, throttle = config.epochs * max(1, config.members), [1], _Throttle()  # members in turn

    def on_step(done: int, total: int) -> None:
        if throttle.due(done, total):
            name = f"epoch {current[0]}/{epochs}"
            emit(ProgressEvent(name, done, total, unit="batches", epoch=current[0], epochs=epochs))

    def on_epoch(row: dict[str, Any], best: bool) -> None:
        current[0] = int(row["epoch"]) + 1
        seconds = float(row.get("train_seconds") or 0.0) + float(row.get("val_seconds") or 0.0)
        emit(
            EpochEvent(
                epoch=int(row["epoch"]),
                epochs=epochs,
                loss=finite_or_none(row.get("train_loss")),
                val_mean_iou=finite_or_none(row.get("val_mean_iou")),
                best=best,
                lr=finite_or_none(row.get("lr")),
                samples_per_s=finite_or_none(row.get("train_samples_per_s")),
                seconds=seconds,
            )
        )

    emit(StageEvent("preparing the training sections"))
    result = train(config, log=lambda text: emit(MessageEvent(text)), on_step=on_step, on_epoch=on_epoch)
    if result.model_dir is None or not Path(result.model_dir).is_dir():
        raise ThinSegError("training finished without exporting a model", config.output_dir)
    target = Path(job["model_dir"])
    if target.exists():
        raise ThinSegError("a model folder already exists here", target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(result.model_dir, target)
    except OSError:
        shutil.copytree(result.model_dir, target)
    for source, name in training_records(result):
        shutil.copy2(source, target / name)
    summary: Summary = {
        "model_dir": str(target),
        "best_epoch": result.best_epoch,
        "best_mean_iou": result.best_mean_iou,
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
    }
    if result.member_scores is not None:  # an ensemble: member 1's epoch is not the model's
        summary.update(best_epoch=None, member_val_mean_iou=list(result.member_scores))
    write_json(folder / "summary.json", summary)
    return summary


def training_records(result: TrainResult) -> list[tuple[Path, str]]:
    """The log, curves and split of a run, as (file, its name beside the model): the model folder
    is what the user keeps of a panel training. An ensemble's logs and curves are its members'
    (`training_log_member-1.csv`, ...); they share the run's split."""
    wanted = [(result.output_dir / name, name) for name in ("training_log.csv", "training_curves.png", "split.json")]
    if result.members_dir is not None and result.members_dir.is_dir():
        for member in sorted(p for p in result.members_dir.iterdir() if p.is_dir()):
            wanted += [
                (member / "training_log.csv", f"training_log_{member.name}.csv"),
                (member / "training_curves.png", f"training_curves_{member.name}.png"),
            ]
    return [(source, name) for source, name in wanted if source.is_file()]


#: The tasks `python -m thinseg.jobs TASK job.json` runs.
TASKS: dict[str, Callable[[Job, Path], Summary]] = {
    "segment": run_segment_job,
    "register": run_register_job,
    "train": run_train_job,
}
