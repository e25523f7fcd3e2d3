"""QEMSCAN-like mineral map: the exact labels, coarsened by majority and misaligned by a known
similarity transform, as an automated-mineralogy scan of the same section would be.

Transform convention (pixel-centre coordinates, x = column, y = row; pixel (i, j) has its
centre at x = j, y = i, in both grids):

    [x_img, y_img, 1]^T = A @ [x_q, y_q, 1]^T,
    A = [[s*f*R, c_img + t - s*f*R @ c_q], [0, 0, 1]],   R = [[cos a, -sin a], [sin a, cos a]]

with f = qemscan_mm_per_pixel / mm_per_pixel (nominal size ratio), s the scale error, a the
rotation (positive from +x towards +y, i.e. clockwise on screen), t the translation in image
pixels, c_img = ((W-1)/2, (H-1)/2) the image centre and c_q the QEMSCAN grid centre. So the
QEMSCAN centre lands on the image centre shifted by t, and the grid is made just big enough
(plus a margin) to contain the whole sample, 0 = outside the sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from thinseg.classes.files import qemscan_palette
from thinseg.classes.table import ClassTable, rgb_to_hex
from thinseg.synth.grains import CALCITE, CLAY, DOLOMITE, FELDSPAR, OTHERS, PORE, QUARTZ

#: QEMSCAN minerals in map-value order (1, 2, ...) and the class (label value) each belongs to.
#: The order follows GeoSlicer's palette, not the class table, so consumers must map values.
QEMSCAN_MINERALS: tuple[tuple[str, int], ...] = (
    ("Pores", PORE),
    ("Quartz", QUARTZ),
    ("Calcite (0-1% MgO)", CALCITE),
    ("Dolomite", DOLOMITE),
    ("Mg-Clay minerals", CLAY),
    ("Pyrite", OTHERS),
    ("K-Feldspar", OTHERS),
)
_PYRITE, _K_FELDSPAR = 6, 7


def qemscan_table() -> ClassTable:
    colours = {en: rgb for _pt, en, rgb in qemscan_palette()}
    names = [n for n, _ in QEMSCAN_MINERALS]
    return ClassTable.from_names_colors(names, [rgb_to_hex(colours[n]) for n in names])


def qemscan_to_class() -> dict[int, int]:
    """QEMSCAN map value -> class label value."""
    return {value: cls for value, (_name, cls) in enumerate(QEMSCAN_MINERALS, 1)}


def fine_qemscan_values(labels: np.ndarray, gid: np.ndarray, subtype: np.ndarray) -> np.ndarray:
    """QEMSCAN mineral value of every image pixel: Others split into pyrite (opaque grains) and
    K-feldspar (turbid grains), matching how they were drawn."""
    lut = np.zeros(7, np.uint8)
    for value, (_name, cls) in enumerate(QEMSCAN_MINERALS, 1):
        if value != _K_FELDSPAR:
            lut[cls] = value
    out: npt.NDArray[np.uint8] = lut[labels]
    others = np.flatnonzero(labels.ravel() == OTHERS)
    feldspar = subtype[gid.ravel()[others]] == FELDSPAR
    out.ravel()[others[feldspar]] = _K_FELDSPAR
    return out


@dataclass(frozen=True)
class Misalignment:
    rotation_deg: float
    scale: float
    translation_px: tuple[float, float]  # (tx, ty) in image pixels


def draw_misalignment(
    rng: np.random.Generator,
    width: int,
    enabled: bool,
    rotation_deg: float | None,
    scale: float | None,
    translation_px: tuple[float, float] | None,
) -> Misalignment:
    """Random rotation (+-8 deg), scale (+-10 %) and shift (+-5 % of the width) when enabled;
    explicit values always win, so tests can pin any part of the transform."""
    rot = rng.uniform(-8.0, 8.0)
    sc = rng.uniform(0.9, 1.1)
    tr = rng.uniform(-0.05, 0.05, 2) * width
    if not enabled:
        rot, sc, tr = 0.0, 1.0, np.zeros(2)
    return Misalignment(
        rotation_deg=float(rot if rotation_deg is None else rotation_deg),
        scale=float(sc if scale is None else scale),
        translation_px=(float(tr[0]), float(tr[1]))
        if translation_px is None
        else (float(translation_px[0]), float(translation_px[1])),
    )


def qemscan_transform(
    image_shape: tuple[int, int], factor: float, mis: Misalignment, margin_fraction: float = 0.03
) -> tuple[np.ndarray, tuple[int, int]]:
    """(A, (h_q, w_q)): QEMSCAN->image matrix and a grid that holds the whole image plus a margin."""
    if mis.scale <= 0:
        raise ValueError(f"scale must be positive, got {mis.scale}")
    h, w = image_shape
    a = np.deg2rad(mis.rotation_deg)
    lin = factor * mis.scale * np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    centre = np.array([(w - 1) / 2.0, (h - 1) / 2.0]) + np.asarray(mis.translation_px, float)
    corners = np.array([[-0.5, -0.5], [w - 0.5, -0.5], [-0.5, h - 0.5], [w - 0.5, h - 0.5]])
    rel = np.linalg.solve(lin, (corners - centre).T)  # corners in QEMSCAN units from its centre
    half = np.abs(rel).max(axis=1)
    margin = max(2.0, margin_fraction * half.max() * 2)
    half_x, half_y = (int(np.ceil(v + margin)) for v in half)
    c_q = np.array([half_x, half_y], float)
    A = np.eye(3)
    A[:2, :2] = lin
    A[:2, 2] = centre - lin @ c_q
    return A, (2 * half_y + 1, 2 * half_x + 1)


def coarse_majority(fine: np.ndarray, A: np.ndarray, q_shape: tuple[int, int], n_values: int) -> np.ndarray:
    """Each QEMSCAN pixel takes the most frequent fine value over its footprint in the image
    (k x k points spread over the pixel, mapped through A; 0 outside the image)."""
    h, w = fine.shape
    h_q, w_q = q_shape
    k = int(np.clip(np.ceil(np.sqrt(abs(np.linalg.det(A[:2, :2])))), 2, 10))
    off = (np.arange(k) + 0.5) / k - 0.5
    oy, ox = (v.ravel() for v in np.meshgrid(off, off, indexing="ij"))
    cols = np.arange(w_q, dtype=np.float64)[None, :, None] + ox[None, None, :]
    out = np.zeros(q_shape, np.uint8)
    rows_per_chunk = max(1, 2_000_000 // (w_q * k * k))
    for r0 in range(0, h_q, rows_per_chunk):
        r1 = min(h_q, r0 + rows_per_chunk)
        rows = np.arange(r0, r1, dtype=np.float64)[:, None, None] + oy[None, None, :]
        xi = np.rint(A[0, 0] * cols + A[0, 1] * rows + A[0, 2]).astype(np.int64)
        yi = np.rint(A[1, 0] * cols + A[1, 1] * rows + A[1, 2]).astype(np.int64)
        inside = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
        flat = np.where(inside, yi * w + xi, 0)
        vals = np.where(inside, fine.ravel()[flat], 0).reshape(-1, k * k)
        # per-pixel histogram in one bincount: bin = pixel * (n_values + 1) + value
        bins = vals + (np.arange(len(vals)) * (n_values + 1))[:, None]
        counts = np.bincount(bins.ravel(), minlength=len(vals) * (n_values + 1))
        out[r0:r1] = counts.reshape(r1 - r0, w_q, n_values + 1).argmax(axis=-1)
    return out
