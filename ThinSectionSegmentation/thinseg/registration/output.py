"""Files of a registration, written all-or-nothing.

Per section (stem S, folder F):
- S_registration.tfm   the ITK transform (image mm -> QEMSCAN mm, SimpleITK.ReadTransform)
- S_registration.json  kind, matrices, landmarks and residuals, metric values, XP offset
- S_qemscan_on_pp.tif  the QEMSCAN map resampled onto the PP grid (paletted, zlib)
- S_registered.nc      GeoSlicer netCDF: PP, XP (aligned) and the registered labelmap with
                       its mineral names and colours (the training input of retraining)
- S_overlay_before.png / S_overlay_after.png  label boundaries over PP, start and result, each
                       titled (section, transform, stage, metric) with a legend of the minerals
                       and of the landmark markers
Every file is written under a hidden temporary name (`thinseg.io.atomic.AtomicOutput`) and
only renamed once all are complete; on any failure all of them are removed.
"""

from __future__ import annotations

import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

import thinseg
from thinseg.classes.table import ClassTable
from thinseg.errors import ThinSegError
from thinseg.io.atomic import AtomicOutput, commit_unique
from thinseg.io.netcdf import NetcdfWriter
from thinseg.jsonio import dumps, finite, loads
from thinseg.registration.grids import Geometry
from thinseg.registration.landmarks import FloatArray, LandmarkFit
from thinseg.registration.sitk_transforms import SectionTransform, composite_parts, downcast, linear_matrix
from thinseg.registration.stages import RegistrationResult
from thinseg.registration.warp import resample_labels

if TYPE_CHECKING:
    from matplotlib.figure import Figure

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
        rows = landmark_residuals(result)
        if rows is not None:
            doc["registration"]["landmarks"] = rows
    record: dict[str, Any] = finite(doc)
    return record


def load_transform(json_path: str | os.PathLike[str]) -> SectionTransform:
    """Read back a transform written by `write_outputs` (the .tfm next to the JSON)."""
    json_path = Path(json_path)
    try:
        doc = loads(json_path.read_text(encoding="utf-8"))
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


def transform_residuals_px(transform: SectionTransform, qemscan_px: np.ndarray, image_px: np.ndarray) -> FloatArray:
    """Per pair, how far (image px) `transform` puts the QEMSCAN click from the image click: the
    misfit in QEMSCAN px brought back through the transform's linear part (for a linear transform
    exactly the image-px distance between the image click and the mapped-back QEMSCAN click)."""
    p = np.asarray(image_px, dtype=np.float64).reshape(-1, 2)
    q = np.asarray(qemscan_px, dtype=np.float64).reshape(-1, 2)
    inv = np.linalg.inv(transform.linear_px()[:2, :2])
    out: FloatArray = np.linalg.norm((transform.map_image_px(p) - q) @ inv.T, axis=1)
    return out


def landmark_residuals(result: RegistrationResult) -> list[dict[str, Any]] | None:
    """The landmark fit's report rows with the residuals of the landmark fit AND of the final
    (refined) transform side by side, in image px and um, so that a person sees whether the
    refinement moved away from the clicks (None without landmarks). `residual_px` stays the
    fit's residual (what the outlier check is based on)."""
    fit = result.landmark_fit
    if fit is None:
        return None
    marks = fit.transform.details["landmarks"]
    q, p = np.asarray(marks["qemscan_px"], dtype=np.float64), np.asarray(marks["image_px"], dtype=np.float64)
    if result.transform is fit.transform:
        final = np.asarray(fit.residuals_px, dtype=np.float64)
    else:
        final = transform_residuals_px(result.transform, q, p)
    um = 1000.0 * result.geometry.image_mm_per_pixel
    rows = fit.report()
    for row, f, image_xy, qemscan_xy in zip(rows, final, p, q):
        row["image_px"] = [float(v) for v in image_xy]
        row["qemscan_px"] = [float(v) for v in qemscan_xy]
        row["residual_fit_px"] = row["residual_px"]
        row["residual_fit_um"] = row["residual_px"] * um
        row["residual_final_px"] = float(f)
        row["residual_final_um"] = float(f) * um
    return rows


def _inverse_points(transform: SectionTransform, qemscan_px: np.ndarray, steps: int = 20) -> FloatArray:
    """Image px that `transform` maps onto `qemscan_px` (Newton steps with its linear part, exact
    at once for a linear transform)."""
    m = transform.linear_px()
    inv = np.linalg.inv(m[:2, :2])
    x: FloatArray = (qemscan_px - m[:2, 2]) @ inv.T
    if not transform.is_linear:
        for _ in range(steps):
            x = x - (transform.map_image_px(x) - qemscan_px) @ inv.T
    return x


@dataclass
class OverlayTexts:
    """What a registration overlay says: title lines and what its landmark markers mean."""

    title: str
    subtitle: str
    legend_title: str = "QEMSCAN classes (outline colour)"


def overlay_texts(stem: str, result: RegistrationResult, stage: str) -> OverlayTexts:
    """Title of the overlay of `stage` ("start" or "final") of `result`."""
    refined = result.refinement is not None
    if stage == "start":
        transform = result.initial
        what = "landmark fit" if result.landmark_fit is not None else "automatic start (coarse search)"
        subtitle = f"before refinement; mutual information {_bits(result.metric_initial)} bits"
    else:
        transform = result.transform
        if refined:
            what = "after refinement"
            subtitle = (
                f"mutual information {_bits(result.metric_initial)} -> {_bits(result.metric_final)} bits; "
                f"match contrast {result.contrast:.2f} (about 1 = no match)"
            )
        else:
            what = "landmark fit (not refined)"
            subtitle = f"mutual information {_bits(result.metric_final)} bits"
    return OverlayTexts(f"{stem}: {transform.kind} transform, {what}", subtitle)


def _bits(value: float) -> str:
    return f"{value:.3f}" if np.isfinite(value) else "-"


def overlay_figure(
    preview: np.ndarray,
    labels: np.ndarray,
    table: ClassTable,
    texts: OverlayTexts,
    landmarks: tuple[np.ndarray, np.ndarray] | None = None,
    scale: float = 1.0,
) -> Figure:
    """The overlay picture as a matplotlib Figure: PP (`preview`) with the outlines of `labels`
    in class colours, a two-line title, and a legend of the classes present (and, with
    `landmarks` = (image clicks, where the transform puts the QEMSCAN clicks) in full-size image
    px, of the two markers). `scale`: preview px per image px."""
    # deferred: matplotlib costs about 0.5 s and only the overlays need it
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D  # deferred as above
    from matplotlib.patches import Patch  # deferred as above

    image = boundary_overlay(preview, labels, table)
    h, w = image.shape[:2]
    u = max(1.0, max(h, w) / 900)  # text and markers grow with the picture, to stay readable
    dpi = 100
    legend_w, title_h = round(320 * u), round(70 * u)
    fig_w, fig_h = w + legend_w, max(h, round(360 * u)) + title_h
    fig = Figure(figsize=(fig_w / dpi, fig_h / dpi), dpi=dpi, facecolor="white")
    ax = fig.add_axes((0, (fig_h - title_h - h) / fig_h, w / fig_w, h / fig_h))
    ax.imshow(image, interpolation="nearest")
    ax.set_xlim(-0.5, w - 0.5)
    ax.set_ylim(h - 0.5, -0.5)
    ax.set_axis_off()
    ax.set_title(f"{texts.title}\n{texts.subtitle}", fontsize=12 * u, loc="left", pad=8 * u)
    present = set(np.unique(labels).tolist())
    handles: list[Patch | Line2D] = [
        Patch(facecolor=cls.color, edgecolor="0.3", label=cls.name)
        for k, cls in enumerate(table.classes, start=1)
        if k in present
    ]
    if landmarks is not None:
        clicks, mapped = (np.asarray(a, dtype=np.float64) * scale for a in landmarks)
        size, width = 9 * u, 2 * u
        click_style = {"marker": "o", "markersize": size, "markerfacecolor": "none", "markeredgewidth": width}
        mapped_style = {"marker": "x", "markersize": size, "markeredgewidth": width}
        for (x0, y0), (x1, y1) in zip(clicks, mapped):
            ax.plot([x0, x1], [y0, y1], color="black", linewidth=u)
        # a white halo under each marker keeps it visible on dark grains and pores
        ax.plot(
            clicks[:, 0],
            clicks[:, 1],
            linestyle="",
            **{**click_style, "markeredgewidth": 2 * width},
            markeredgecolor="white",
        )
        ax.plot(clicks[:, 0], clicks[:, 1], linestyle="", markeredgecolor="black", **click_style)
        ax.plot(
            mapped[:, 0], mapped[:, 1], linestyle="", color="white", **{**mapped_style, "markeredgewidth": 2 * width}
        )
        ax.plot(mapped[:, 0], mapped[:, 1], linestyle="", color="magenta", **mapped_style)
        handles += [
            Line2D([], [], linestyle="", markeredgecolor="black", label="landmark clicked on PP", **click_style),
            Line2D(
                [],
                [],
                linestyle="",
                color="magenta",
                label="its QEMSCAN click, placed\nby this transform",
                **mapped_style,
            ),
        ]
    fig.legend(
        handles=handles,
        loc="upper left",
        bbox_to_anchor=((w + 10 * u) / fig_w, (fig_h - title_h) / fig_h),
        frameon=False,
        fontsize=10 * u,
        title=texts.legend_title,
        title_fontsize=10 * u,
    )
    return fig


def _write_overlay(
    path: Path,
    pp: np.ndarray,
    qemscan: np.ndarray,
    transform: SectionTransform,
    table: ClassTable,
    texts: OverlayTexts,
    fit: LandmarkFit | None,
) -> None:
    step = max(1, int(np.ceil(max(pp.shape[:2]) / OVERLAY_SIDE)))
    preview = np.ascontiguousarray(pp[::step, ::step])
    labels = resample_labels(qemscan, transform, step=step)[: preview.shape[0], : preview.shape[1]]
    marks = None
    if fit is not None:
        d = fit.transform.details["landmarks"]
        q, p = np.asarray(d["qemscan_px"], dtype=np.float64), np.asarray(d["image_px"], dtype=np.float64)
        marks = (p, _inverse_points(transform, q))
    fig = overlay_figure(preview, labels, table, texts, marks, scale=1.0 / step)
    fig.savefig(path, dpi=fig.dpi, format="png", facecolor="white")


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
        fit = result.landmark_fit
        if paths.overlay_before is not None:
            texts = overlay_texts(stem, result, "start")
            _write_overlay(tmp[paths.overlay_before], pp, qemscan, result.initial, result.table, texts, fit)
        texts = overlay_texts(stem, result, "final")
        _write_overlay(tmp[paths.overlay_after], pp, qemscan, result.transform, result.table, texts, fit)
        if paths.netcdf is not None:
            _write_netcdf(tmp[paths.netcdf], stem, pp, result)
        if overwrite:
            for out in outputs.values():
                out.commit()
        else:  # another run may have written the same files meanwhile: refused, never replaced
            commit_unique(list(outputs.values()), lambda _n: finals, tries=1)
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
