"""Registration and training jobs described by plain JSON, run by `worker.py` in a separate
process (or in-process from the console). Imports only the core and the standard library: no
Slicer, no VTK, no Qt, so Slicer's Python can run it as a script.

A job folder holds `job.json`, the inputs the panel exported (GeoSlicer netCDF) and, when done,
the outputs; the panel imports them only after the process exits with status 0, so a failed or
cancelled job leaves the scene as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from thinseg.jsonio import json_default

Emit = Callable[..., None]


def emit_stdout(event: str, **data: Any) -> None:
    """One "@thinseg {json}" line on stdout (parsed by process.OutputParser)."""
    print("@thinseg " + json.dumps({"event": event, **data}, default=json_default), flush=True)


def _finite(value: Any) -> Any:
    """NaN/inf -> None so the JSON is standard."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_finite(data), indent=2, default=json_default), encoding="utf-8")
    os.replace(tmp, path)


# -- registration -------------------------------------------------------------------------------


def register_arrays(
    pp,
    xp,
    qemscan_labels,
    table,
    *,
    image_mm_per_pixel: float,
    qemscan_mm_per_pixel: float,
    landmarks=None,
    kind: str = "similarity",
    refine: bool = True,
    bspline: bool = False,
    progress: Callable[[str], None] | None = None,
):
    """`thinseg.registration.register_section` with the panel's options."""
    from thinseg.registration import register_section

    return register_section(
        pp,
        xp,
        qemscan_labels,
        table,
        image_mm_per_pixel=image_mm_per_pixel,
        qemscan_mm_per_pixel=qemscan_mm_per_pixel,
        landmarks=landmarks,
        kind=kind,
        refine=refine,
        bspline=bspline,
        progress=progress,
    )


def landmark_pairs(job_landmarks: dict | None):
    if not job_landmarks:
        return None
    from thinseg.registration import LandmarkPairs

    return LandmarkPairs(
        np.asarray(job_landmarks["qemscan_px"], dtype=np.float64).reshape(-1, 2),
        np.asarray(job_landmarks["image_px"], dtype=np.float64).reshape(-1, 2),
        [str(n) for n in job_landmarks.get("names", [])],
    )


def write_transform(folder: Path, stem: str, result) -> Path:
    """`<stem>.tfm` (ITK) and `<stem>.json` (thinseg record), readable by output.load_transform."""
    import SimpleITK as sitk

    from thinseg.registration.output import transform_json

    tfm, record = folder / f"{stem}.tfm", folder / f"{stem}.json"
    tmp = folder / f".{stem}.partial.tfm"
    sitk.WriteTransform(result.transform.itk, str(tmp))
    os.replace(tmp, tfm)
    write_json(record, transform_json(result.transform, result))
    return record


def run_register_job(job: dict, folder: Path, emit: Emit = emit_stdout) -> dict:
    """Register the QEMSCAN labelmap of `job["input"]` onto its PP image; writes
    `job["output"]` (the registered labelmap on the PP grid, GeoSlicer netCDF), the transform
    (`transform.tfm` + `transform.json`) and `summary.json`."""
    from thinseg.io.netcdf import NetcdfWriter, open_netcdf_image, read_labelmap

    source = folder / job["input"]

    def read_rgb(var: str | None):
        if not var:
            return None, None
        image = open_netcdf_image(source, var)
        try:
            return image.read(0, image.shape[0]), image
        finally:
            image.close()

    emit("stage", text="reading the images")
    pp, pp_info = read_rgb(job["pp"])
    xp, _ = read_rgb(job.get("xp"))
    labels, table, q_mm, _origin = read_labelmap(source, job["qemscan"])
    image_mm = float(job.get("image_mm_per_pixel") or pp_info.mm_per_pixel)
    qemscan_mm = float(job.get("qemscan_mm_per_pixel") or q_mm)
    result = register_arrays(
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
        progress=lambda text: emit("stage", text=text),
    )
    emit("stage", text="writing the results")
    out = folder / job["output"]
    origin = pp_info.origin_mm or (0.0, 0.0, 0.0)
    xp_aligned_variable = None
    with NetcdfWriter(out) as writer:
        writer.add_labelmap(job.get("name") or "QEMSCAN_registered", result.labels, result.table, image_mm, origin)
        if result.xp_was_aligned:  # XP was offset from PP: the scene gets the aligned copy
            xp_aligned_variable = writer.add_rgb_image("XP_aligned", result.xp, image_mm, origin)
    write_transform(folder, "transform", result)
    summary = {
        "xp_aligned_variable": xp_aligned_variable,
        "warnings": result.warnings,
        "landmarks": result.landmark_fit.report() if result.landmark_fit else None,
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
        emit("warning", text=warning)
    return summary


# -- training -----------------------------------------------------------------------------------


def train_config(job: dict, folder: Path):
    """A TrainConfig from the panel's options (sections: netCDF files in or outside `folder`)."""
    from thinseg.training import TrainConfig

    sections = [str((folder / s) if not os.path.isabs(s) else s) for s in job["sections"]]
    kwargs: dict[str, Any] = dict(
        output_dir=Path(job["run_dir"]),
        sections=sections,
        val_fraction=float(job.get("val_fraction", 0.2)),
        epochs=int(job.get("epochs", 20)),
        model_name=str(job.get("model_name", "model")),
        title=str(job.get("title") or job.get("model_name", "model")),
        description=str(job.get("description", "")),
        device=str(job.get("device", "auto")),
        overwrite=True,
        progress=True,
    )
    for key in (
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
    ):
        if job.get(key) is not None:
            kwargs[key] = int(job[key])
    if job.get("lr") is not None:
        kwargs["lr"] = float(job["lr"])
    if job.get("inputs"):
        kwargs["inputs"] = tuple(job["inputs"])
    if job.get("init_from"):
        kwargs["init_from"] = Path(job["init_from"])
    return TrainConfig(**kwargs)


def run_train_job(job: dict, folder: Path, emit: Emit = emit_stdout) -> dict:
    """Train, then move the exported bundle to `job["model_dir"]` (a new folder under a model
    root's ThinSectionEnv/, where the model selector and GeoSlicer find it)."""
    from thinseg.errors import ThinSegError
    from thinseg.training import train

    config = train_config(job, folder)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    result = train(config, log=log)
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
    for extra in ("training_log.csv", "training_curves.png", "split.json"):
        if (config.output_dir / extra).is_file():
            shutil.copy2(config.output_dir / extra, target / extra)
    summary = {
        "model_dir": str(target),
        "best_epoch": result.best_epoch,
        "best_mean_iou": result.best_mean_iou,
        "epochs_run": result.epochs_run,
        "stopped_early": result.stopped_early,
    }
    write_json(folder / "summary.json", summary)
    emit("model", path=str(target))
    return summary
