"""`generate_section`: a synthetic PP/XP thin-section pair with exact labels and a QEMSCAN-like map.

Used to train and test the segmentation model and to measure registration error, because real
sections never come with exact per-pixel truth or a known QEMSCAN-to-image transform.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from thinseg.classes.table import ClassTable
from thinseg.synth.grains import build_geometry
from thinseg.synth.qemscan_like import (
    QEMSCAN_MINERALS,
    coarse_majority,
    draw_misalignment,
    fine_qemscan_values,
    qemscan_table,
    qemscan_to_class,
    qemscan_transform,
)
from thinseg.synth.render import render

#: Relative areas of Calcite, Dolomite, Mg-Clay minerals, Pores, Quartz, Others: a mixed
#: carbonate/siliciclastic reservoir rock in which every class shows up in a 1024^2 section.
DEFAULT_CLASS_WEIGHTS = (0.30, 0.14, 0.15, 0.15, 0.18, 0.08)

#: Resolution (mm/px) the textures were designed at; other resolutions scale them.
REFERENCE_MM_PER_PIXEL = 0.00132


@dataclass
class SyntheticSection:
    """A generated section. `labels` use the class order of `thinseg.classes.files.default_class_table()`.

    qemscan_to_image is the 3x3 matrix A with [x_img, y_img, 1]^T = A @ [x_q, y_q, 1]^T in
    pixel-centre coordinates (pixel (i, j) centre: x = j, y = i); see `thinseg.synth.qemscan_like`.
    qemscan_mm_per_pixel is the nominal QEMSCAN pixel size; the true one includes the scale error
    hidden in A (as with a miscalibrated scan), so registration must recover it.
    """

    pp: np.ndarray
    xp: np.ndarray
    labels: np.ndarray
    mm_per_pixel: float
    qemscan: np.ndarray
    qemscan_table: ClassTable
    qemscan_mm_per_pixel: float
    qemscan_to_image: np.ndarray
    image_to_class: dict[int, int]


def generate_section(
    height: int,
    width: int,
    seed: int = 0,
    *,
    mm_per_pixel: float = 0.00132,
    qemscan_mm_per_pixel: float = 0.01,
    class_weights: Sequence[float] | None = None,
    grain_size_mm: float = 0.15,
    misalignment: bool = True,
    rotation_deg: float | None = None,
    scale: float | None = None,
    translation_px: tuple[float, float] | None = None,
) -> SyntheticSection:
    """Generate a section deterministically from `seed`.

    class_weights: relative areas of the six classes (default DEFAULT_CLASS_WEIGHTS).
    misalignment: draw a random QEMSCAN rotation (+-8 deg), scale (+-10 %) and translation
    (+-5 % of the width); False gives only the resolution change. rotation_deg, scale and
    translation_px ((tx, ty) image pixels) override the drawn values either way.
    """
    weights = _check_inputs(height, width, mm_per_pixel, qemscan_mm_per_pixel, grain_size_mm, class_weights)
    geo_rng, render_rng, q_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(3))
    cell = max(12, int(round(grain_size_mm / mm_per_pixel)))
    geom = build_geometry(geo_rng, (height, width), cell, weights)
    pp, xp = render(render_rng, geom, REFERENCE_MM_PER_PIXEL / mm_per_pixel)

    mis = draw_misalignment(q_rng, width, misalignment, rotation_deg, scale, translation_px)
    A, q_shape = qemscan_transform((height, width), qemscan_mm_per_pixel / mm_per_pixel, mis)
    fine = fine_qemscan_values(geom.labels, geom.gid, geom.grains.subtype)
    qemscan = coarse_majority(fine, A, q_shape, len(QEMSCAN_MINERALS))
    return SyntheticSection(
        pp=pp,
        xp=xp,
        labels=geom.labels,
        mm_per_pixel=float(mm_per_pixel),
        qemscan=qemscan,
        qemscan_table=qemscan_table(),
        qemscan_mm_per_pixel=float(qemscan_mm_per_pixel),
        qemscan_to_image=A,
        image_to_class=qemscan_to_class(),
    )


def _check_inputs(
    height: int,
    width: int,
    mm_per_pixel: float,
    qemscan_mm_per_pixel: float,
    grain_size_mm: float,
    class_weights: Sequence[float] | None,
) -> np.ndarray:
    if height < 8 or width < 8:
        raise ValueError(f"section must be at least 8 x 8 pixels, got {height} x {width}")
    for name, v in (
        ("mm_per_pixel", mm_per_pixel),
        ("qemscan_mm_per_pixel", qemscan_mm_per_pixel),
        ("grain_size_mm", grain_size_mm),
    ):
        if not v > 0:
            raise ValueError(f"{name} must be positive, got {v}")
    weights = np.asarray(DEFAULT_CLASS_WEIGHTS if class_weights is None else class_weights, dtype=np.float64)
    if weights.shape != (6,) or np.any(weights < 0) or not weights.sum() > 0:
        raise ValueError(f"class_weights must be 6 non-negative numbers with a positive sum, got {class_weights!r}")
    return weights


def render_labels_rgb(
    labels: np.ndarray, table: ClassTable, background: tuple[int, int, int] = (0, 0, 0)
) -> np.ndarray:
    """(H, W, 3) uint8 colour picture of a label map (value k -> colour of class k, 0 -> background)."""
    lut = np.array(table.lut(background), np.uint8)
    picture: npt.NDArray[np.uint8] = lut[np.minimum(labels, len(lut) - 1)]
    return picture
