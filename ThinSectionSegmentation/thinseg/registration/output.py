"""Files of a registration, written all-or-nothing.

Per section (stem S, folder F):
- S_registration.tfm   the ITK transform (image mm -> QEMSCAN mm, SimpleITK.ReadTransform)
- S_registration.json  kind, matrices, landmarks and residuals, metric values, XP offset
- S_qemscan_on_pp.tif  the QEMSCAN map resampled onto the PP grid (paletted, zlib)
- S_registered.nc      GeoSlicer netCDF: PP, XP (aligned) and the registered labelmap with
                       its mineral names and colours (the training input of retraining)
- S_overlay_before.png / S_overlay_after.png  label boundaries over PP, start and result
Every file is written under a hidden temporary name (`thinseg.io.atomic.AtomicOutput`) and
only renamed once all are complete; on any failure all of them are removed.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from PIL import Image

import thinseg
from thinseg.classes.table import ClassTable
from thinseg.errors import ThinSegError
from thinseg.io.atomic import AtomicOutput
from thinseg.io.netcdf import NetcdfWriter
from thinseg.jsonio import dumps, finite
from thinseg.registration.grids import Geometry
from thinseg.registration.sitk_transforms import SectionTransform, composite_parts, downcast, linear_matrix
from thinseg.registration.stages import RegistrationResult
from thinseg.registration.warp import resample_labels

FORMAT = "thinseg-registration/1"
CONVENTION = (
    "maps IMAGE (PP) physical points to QEMSCAN physical points (ITK fixed -> moving); physical = "
    "mm_per_pixel * (column, row) from the centre of pixel (0, 0), identity direction, LPS"
)
NO_LABELS = "the registration result has no resampled labels (register with resample=True)"
#: Longest side of the overlay pictures.
OVERLAY_SIDE = 2048


@dataclass
class OutputPaths:
    """The files `write_outputs` wrote (None: not written)."""

    tfm: Path
    json: Path
    labels_tif: Path
    netcdf: Path | None
    overlay_before: Path | None
    overlay_after: Path


def transform_json(transform: SectionTransform, result: RegistrationResult | None = None) -> dict[str, Any]:
    """JSON record of a transform (and of the registration that produced it); NaN -> None."""
    g = transform.geometry
    parts = []
    for sub in composite_parts(transform.itk) or [downcast(transform.itk)]:
        entry: dict[str, Any] = {"class": sub.GetName()}
        if isinstance(sub, sitk.DisplacementFieldTransform):
            entry["parameters"] = "sampled field, see the .tfm file"
        else:
            entry["parameters"] = list(sub.GetParameters())
            entry["fixed_parameters"] = list(sub.GetFixedParameters())
        parts.append(entry)
    doc = {
        "format": FORMAT,
        "convention": CONVENTION,
        "kind": transform.kind,
        "image": {"shape": list(g.image_shape), "mm_per_pixel": g.image_mm_per_pixel},
        "qemscan": {"shape": list(g.qemscan_shape), "mm_per_pixel": g.qemscan_mm_per_pixel},
        "matrix_image_px_to_qemscan_px": transform.linear_px().tolist(),
        "linear_only": transform.is_linear,
        "itk": parts,
        "details": transform.details,
    }
    m = linear_matrix(transform.itk)
    if m is not None:
        doc["matrix_image_mm_to_qemscan_mm"] = m.tolist()
    if result is not None:
        doc["registration"] = result.summary()
    record: dict[str, Any] = finite(doc)
    return record


def load_transform(json_path: str | os.PathLike[str]) -> SectionTransform:
    """Read back a transform written by `write_outputs` (the .tfm next to the JSON)."""
    json_path = Path(json_path)
    try:
        doc = json.loads(json_path.read_text(encoding="utf-8"))
        g = Geometry(
            tuple(doc["image"]["shape"]),
            doc["image"]["mm_per_pixel"],
            tuple(doc["qemscan"]["shape"]),
            doc["qemscan"]["mm_per_pixel"],
        )
        kind = doc["kind"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ThinSegError(f"not a thinseg registration record ({error})", json_path) from None
    tfm = json_path.with_suffix(".tfm")
    try:
        itk = sitk.ReadTransform(str(tfm))
    except RuntimeError:
        raise ThinSegError("cannot read the ITK transform next to the record", tfm) from None
    return SectionTransform(kind, itk, g, doc.get("details", {}))


def boundary_overlay(
    pp_preview: npt.NDArray[np.uint8], labels: npt.NDArray[np.uint8], table: ClassTable
) -> npt.NDArray[np.uint8]:
    """PP with the outline of every label region drawn in its class colour (white for 0)."""
    lut = np.array(table.lut(background=(255, 255, 255)), dtype=np.uint8)
    edge = np.zeros(labels.shape, dtype=bool)
    edge[:, :-1] |= labels[:, :-1] != labels[:, 1:]
    edge[:-1, :] |= labels[:-1, :] != labels[1:, :]
    out: npt.NDArray[np.uint8] = pp_preview.copy()
    out[edge] = lut[np.minimum(labels[edge], len(lut) - 1)]
    return out


def _write_overlay(
    path: Path, pp: np.ndarray, qemscan: np.ndarray, transform: SectionTransform, table: ClassTable
) -> None:
    step = max(1, int(np.ceil(max(pp.shape[:2]) / OVERLAY_SIDE)))
    preview = np.ascontiguousarray(pp[::step, ::step])
    labels = resample_labels(qemscan, transform, step=step)[: preview.shape[0], : preview.shape[1]]
    Image.fromarray(boundary_overlay(preview, labels, table)).save(path, format="PNG")


def _write_labels_tif(path: Path, labels: np.ndarray, table: ClassTable, mm_per_pixel: float) -> None:
    import tifffile  # deferred: tifffile costs ~70 ms and is needed only here

    cmap = np.zeros((3, 256), dtype=np.uint16)
    for k, rgb in enumerate(table.lut()):
        cmap[:, k] = np.array(rgb, dtype=np.uint16) * 257
    tifffile.imwrite(
        path,
        labels,
        photometric="palette",
        colormap=cmap,
        compression="zlib",
        resolution=(10.0 / mm_per_pixel, 10.0 / mm_per_pixel),
        resolutionunit="CENTIMETER",
        description=json.dumps({"classes": table.geoslicer_labels()}),
        tile=(512, 512),
    )


def write_outputs(
    result: RegistrationResult,
    folder: str | os.PathLike[str],
    stem: str,
    pp: np.ndarray,
    qemscan: np.ndarray,
    *,
    netcdf: bool = True,
    overwrite: bool = False,
) -> OutputPaths:
    """Write every output file of `result` (see module doc); nothing is left on failure."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if result.labels is None:
        raise ValueError(NO_LABELS)
    refined = result.refinement is not None
    paths = OutputPaths(
        tfm=folder / f"{stem}_registration.tfm",
        json=folder / f"{stem}_registration.json",
        labels_tif=folder / f"{stem}_qemscan_on_pp.tif",
        netcdf=folder / f"{stem}_registered.nc" if netcdf else None,
        overlay_before=folder / f"{stem}_overlay_before.png" if refined else None,
        overlay_after=folder / f"{stem}_overlay_after.png" if refined else folder / f"{stem}_overlay.png",
    )
    finals = [
        p
        for p in (paths.tfm, paths.json, paths.labels_tif, paths.netcdf, paths.overlay_before, paths.overlay_after)
        if p
    ]
    if not overwrite:
        taken = [p.name for p in finals if p.exists()]
        if taken:
            raise ThinSegError(f"output exists already ({', '.join(taken)}); remove it or allow overwriting", folder)
    outputs = {p: AtomicOutput(p) for p in finals}
    tmp = {p: out.tmp for p, out in outputs.items()}
    g = result.geometry
    try:
        tmp[paths.tfm].write_bytes(transform_bytes(result.transform.itk))
        doc = transform_json(result.transform, result)
        doc["files"] = {k: (v.name if v else None) for k, v in vars(paths).items()}
        tmp[paths.json].write_text(dumps(doc, indent=2), encoding="utf-8")
        _write_labels_tif(tmp[paths.labels_tif], result.labels, result.table, g.image_mm_per_pixel)
        if paths.overlay_before is not None:
            _write_overlay(tmp[paths.overlay_before], pp, qemscan, result.initial, result.table)
        _write_overlay(tmp[paths.overlay_after], pp, qemscan, result.transform, result.table)
        if paths.netcdf is not None:
            _write_netcdf(tmp[paths.netcdf], stem, pp, result)
        for out in outputs.values():
            out.commit()
    except BaseException:
        for out in outputs.values():
            out.discard()
        raise
    return paths


def transform_bytes(itk: sitk.Transform) -> bytes:
    """The ITK text (.tfm) form of a transform (SimpleITK picks the format by file extension,
    so it is written under a .tfm name in a scratch folder)."""
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / "transform.tfm"
        sitk.WriteTransform(itk, str(path))
        return path.read_bytes()


def _write_netcdf(path: Path, stem: str, pp: np.ndarray, result: RegistrationResult) -> None:
    if result.labels is None:
        raise ValueError(NO_LABELS)
    mm = result.geometry.image_mm_per_pixel
    attrs = {"thinseg_version": thinseg.__version__, "thinseg_registration": FORMAT}
    with NetcdfWriter(path, attrs=attrs) as writer:
        pp_name = writer.add_rgb_image(f"{stem}_PP", pp, mm)
        if result.xp is not None:
            writer.add_rgb_image(f"{stem}_XP", result.xp, mm)
        writer.add_labelmap(
            f"{stem}_QEMSCAN",
            result.labels,
            result.table,
            mm,
            reference=pp_name,
            attrs={"registration": f"{result.transform.kind}; mutual information {result.metric_final:.3f} bits"},
        )
