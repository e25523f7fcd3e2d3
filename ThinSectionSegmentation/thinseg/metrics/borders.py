"""Void borders: leave out a band around class boundaries when scoring.

QEMSCAN maps are coarse and never register perfectly onto the optical image, so truth near a
grain edge is unreliable by a few pixels; scoring those pixels measures registration, not the
model. A pixel is left out when a pixel of ANOTHER class lies within `width_px` of it
(Euclidean distance between pixel centres). A straight boundary therefore loses `width_px`
pixels on each side (a band 2 * width_px wide); pixels meeting another class only at a corner
are sqrt(2) away and survive width 1 (width 1.5 removes them too).

Label 0 (no truth) is not a class: by default its edge is no boundary, because 0 mostly marks
areas outside the scan or outside the rock, and shrinking every grain away from them would
waste good truth. `unlabelled_is_boundary=True` treats it as one more class (for maps where 0
marks unresolved mixed pixels between grains). Either way, pixels whose truth is 0 are never kept.

Implementation: a disk-shaped max and min filter of the labels (the disk as a stack of
horizontal runs, each a 1-D running filter), so the cost grows with the width, not its square,
and stays a few passes over uint8 data; row bands bound the memory.
"""

from __future__ import annotations

import math

import numpy as np
import numpy.typing as npt


def _disk_runs(width_px: float) -> list[tuple[int, int]]:
    """(dy, half-width in x) of the rows of the disk of radius width_px on the pixel grid."""
    r = int(math.floor(width_px + 1e-9))
    return [(dy, int(math.floor(math.sqrt(max(width_px * width_px - dy * dy, 0.0)) + 1e-9))) for dy in range(-r, r + 1)]


def _disk_filter(labels: np.ndarray, runs: list[tuple[int, int]], use_max: bool, outside: int) -> np.ndarray:
    """Max (or min) of `labels` over a disk around each pixel; outside the image counts as `outside`."""
    # deferred: scipy.ndimage costs ~0.25 s at import, and `thinseg segment` imports this package
    # (for the class counts of its mineralogy report) without ever drawing void borders
    from scipy import ndimage

    filter1d = ndimage.maximum_filter1d if use_max else ndimage.minimum_filter1d
    combine = np.maximum if use_max else np.minimum
    h = labels.shape[0]
    rows_by_half: dict[int, np.ndarray] = {}
    out = np.full(labels.shape, outside, labels.dtype)
    for dy, half in runs:
        if half not in rows_by_half:
            rows_by_half[half] = filter1d(labels, size=2 * half + 1, axis=1, mode="constant", cval=outside)
        rows = rows_by_half[half]
        # out[y] combines rows[y + dy]
        if dy >= 0:
            combine(out[: h - dy], rows[dy:], out=out[: h - dy])
        else:
            combine(out[-dy:], rows[: h + dy], out=out[-dy:])
    return out


def void_border_mask(
    truth: np.ndarray,
    width_px: float,
    unlabelled_is_boundary: bool = False,
    band_rows: int = 2048,
) -> np.ndarray:
    """Boolean (H, W) mask, True where a pixel is scored: labelled and clear of other classes.

    Works in row bands with a margin of `width_px` rows, so memory stays bounded for whole
    sections and the result does not depend on `band_rows`.
    """
    truth = np.asarray(truth)
    if truth.ndim != 2:
        raise ValueError(f"truth must be 2-D (H, W), got shape {truth.shape}")
    keep: npt.NDArray[np.bool_] = truth != 0
    if width_px < 1 or truth.size == 0:  # no other pixel centre is closer than 1
        return keep
    if truth.dtype != np.uint8:
        if truth.min() < 0 or truth.max() > 255:
            raise ValueError("truth labels must be 0..255")
        truth = truth.astype(np.uint8)
    runs = _disk_runs(width_px)
    margin = max(abs(dy) for dy, _ in runs)
    height = truth.shape[0]
    for y0 in range(0, height, band_rows):
        y1 = min(height, y0 + band_rows)
        a0, a1 = max(0, y0 - margin), min(height, y1 + margin)
        strip = truth[a0:a1]
        # 0 never wins a max; mapped to 255 it never wins a min: both see labelled pixels only
        high = _disk_filter(strip, runs, use_max=True, outside=0)
        low = _disk_filter(np.where(strip == 0, np.uint8(255), strip), runs, use_max=False, outside=255)
        # a labelled pixel lies in its own disk, so low <= label <= high; equality = one class
        near_other = (high != strip) | (low != strip)
        if unlabelled_is_boundary:
            near_other |= _disk_filter(strip, runs, use_max=False, outside=255) == 0
        keep[y0:y1] &= ~near_other[y0 - a0 : y1 - a0]
    return keep
