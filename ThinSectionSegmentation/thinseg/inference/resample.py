"""Run a model at its training resolution on sections imaged at another one.

A network trained at 0.00132 mm/px sees grains of a certain size in pixels; feeding it 0.002
mm/px images shrinks every grain and degrades the result. The section is resampled lazily, band
by band, to the model's grid, and the labels are mapped back to the original grid by nearest
neighbour, so outputs always match the input pixels. Pixels that are not square (e.g. 0.01 mm
wide and 0.02 mm tall) are resampled per axis, so the model sees square pixels of its own size.

A factor beyond `limits.MAX_RESAMPLING_FACTOR` either way is refused before anything is
allocated: a section 1 mm/px against a 0.00132 mm/px model would be upsampled 758 times per
axis, which is a wrong spacing (index coordinates, a typo), not a scan to segment.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Union

import numpy as np
import numpy.typing as npt
from PIL import Image

from thinseg.inference.engine import (
    Bundle,
    CancelFn,
    ProgressFn,
    RowSink,
    RunStats,
    SegmentationResult,
    Segmenter,
    Source,
)
from thinseg.limits import check_resampling

#: Relative spacing difference below which resampling would only blur the image.
RESAMPLE_TOLERANCE = 0.01

#: Model pixels per input pixel: one factor for both axes, or (rows, columns).
Factor = Union[float, tuple[float, float]]


def needs_resampling(input_mm_per_pixel: float, model_mm_per_pixel: float | None) -> bool:
    """Whether the pixel sizes differ by more than the tolerance (False when the model's is unknown)."""
    if model_mm_per_pixel is None or input_mm_per_pixel <= 0:
        return False
    return abs(input_mm_per_pixel / model_mm_per_pixel - 1.0) > RESAMPLE_TOLERANCE


def resampling_factor(
    input_mm_per_pixel: float | None,
    model_mm_per_pixel: float | None,
    path: str | os.PathLike[str] | None = None,
) -> float | None:
    """Model pixels per input pixel (input spacing / model spacing), or None when the input is
    used as it is: spacings within the tolerance, or either one unknown. A factor beyond the
    resampling bound is refused naming `path` and both spacings."""
    if not input_mm_per_pixel or model_mm_per_pixel is None:
        return None
    if not needs_resampling(input_mm_per_pixel, model_mm_per_pixel):
        return None
    factor = input_mm_per_pixel / model_mm_per_pixel
    return check_resampling(factor, path, _what(input_mm_per_pixel, model_mm_per_pixel))


def _what(spacing: float, model_mm_per_pixel: float, side: str = "") -> str:
    """The section as a resampling refusal names it: its spacing and the model's."""
    if side:
        return f"section, with pixels {spacing:g} mm {side} (the model's {model_mm_per_pixel:g} mm),"
    return f"section at {spacing:g} mm/px (the model's is {model_mm_per_pixel:g} mm/px)"


def resampling_factors(
    spacing_xy: tuple[float, float] | None,
    model_mm_per_pixel: float | None,
    path: str | os.PathLike[str] | None = None,
) -> tuple[float, float] | None:
    """(rows, columns) model pixels per input pixel for pixels `spacing_xy` = (width, height) mm,
    or None when the input is used as it is (both within the tolerance, or a spacing unknown).
    An axis within the tolerance keeps its pixels (factor 1); a factor beyond the resampling
    bound is refused naming `path` and the spacing."""
    if spacing_xy is None or model_mm_per_pixel is None:
        return None
    sx, sy = (float(v) for v in spacing_xy)
    if not (sx > 0 and sy > 0):
        return None
    if not needs_resampling(sx, model_mm_per_pixel) and not needs_resampling(sy, model_mm_per_pixel):
        return None

    model = model_mm_per_pixel

    def axis(spacing: float, side: str) -> float:
        if not needs_resampling(spacing, model):
            return 1.0
        return check_resampling(spacing / model, path, _what(spacing, model, "" if sx == sy else side))

    return axis(sy, "high"), axis(sx, "wide")


def factor_pair(factor: Factor) -> tuple[float, float]:
    """(rows, columns) of a factor given for both axes or per axis."""
    if isinstance(factor, tuple):
        fy, fx = factor
        return float(fy), float(fx)
    return float(factor), float(factor)


def resampled_shape(shape: tuple[int, int], factor: Factor) -> tuple[int, int]:
    """The (H, W) of an image seen at `factor` times its resolution (at least one pixel)."""
    fy, fx = factor_pair(factor)
    return max(1, int(round(shape[0] * fy))), max(1, int(round(shape[1] * fx)))


class ResampledSource:
    """A source seen at `factor` times its resolution (factor = input spacing / model spacing,
    one for both axes or (rows, columns)).

    Pixel edges map exactly: output column u covers input columns [u/f, (u+1)/f). Each read
    pulls the matching input region plus a margin and resizes it with an antialiasing filter.
    """

    MARGIN = 4

    def __init__(self, source: Source, factor: Factor) -> None:
        self.source = source
        self.factors = factor_pair(factor)
        for f in self.factors:  # before the resampled size is worked out or anything allocated
            check_resampling(f, getattr(source, "path", None), "image")
        h, w = source.shape
        self.shape = resampled_shape((h, w), self.factors)
        # exact per-axis factors so that the last output pixel ends at the last input pixel
        self._fy = self.shape[0] / h
        self._fx = self.shape[1] / w

    def read(self, y0: int, y1: int, x0: int = 0, x1: int | None = None) -> np.ndarray:
        x1 = self.shape[1] if x1 is None else x1
        h, w = self.source.shape
        sy0, sy1 = y0 / self._fy, y1 / self._fy
        sx0, sx1 = x0 / self._fx, x1 / self._fx
        ry0 = max(0, int(math.floor(sy0)) - self.MARGIN)
        ry1 = min(h, int(math.ceil(sy1)) + self.MARGIN)
        rx0 = max(0, int(math.floor(sx0)) - self.MARGIN)
        rx1 = min(w, int(math.ceil(sx1)) + self.MARGIN)
        region = np.ascontiguousarray(self.source.read(ry0, ry1, rx0, rx1))
        image = Image.fromarray(region)
        box = (sx0 - rx0, sy0 - ry0, sx1 - rx0, sy1 - ry0)
        resized = image.resize(
            (x1 - x0, y1 - y0),
            resample=Image.Resampling.BILINEAR if min(self.factors) > 1 else Image.Resampling.LANCZOS,
            box=box,
        )
        return np.array(resized)  # a writable array the caller owns (Pillow's buffer is read-only)


def nearest_index(n_out: int, n_in: int) -> npt.NDArray[np.int64]:
    """For each of n_out pixels, the nearest of n_in pixels covering the same extent."""
    return np.minimum(((np.arange(n_out) + 0.5) * (n_in / n_out)).astype(np.int64), n_in - 1)


@dataclass(frozen=True)
class PickedWindow:
    """Where a window of one grid lands on a grid picked from it by `nearest_index`: output
    pixels from (y0, x0), taken from the window's `rows` and `cols` (window-relative)."""

    y0: int
    x0: int
    rows: npt.NDArray[np.int64]
    cols: npt.NDArray[np.int64]

    def take(self, window: np.ndarray) -> np.ndarray:
        """The picked pixels of `window`, contiguous."""
        return np.ascontiguousarray(window[self.rows][:, self.cols])


def picked_window(
    rows: npt.NDArray[np.int64], cols: npt.NDArray[np.int64], y0: int, x0: int, shape: tuple[int, int]
) -> PickedWindow | None:
    """The output pixels that the (sorted) picks `rows` and `cols` take from a window of
    `shape` at (y0, x0) of the input grid; None when they take none."""
    a, b = (int(v) for v in np.searchsorted(rows, (y0, y0 + shape[0]), side="left"))
    c, d = (int(v) for v in np.searchsorted(cols, (x0, x0 + shape[1]), side="left"))
    if b <= a or d <= c:
        return None
    return PickedWindow(a, c, rows[a:b] - y0, cols[c:d] - x0)


def labels_to_grid(labels: np.ndarray, shape: tuple[int, int], band_rows: int = 1024) -> np.ndarray:
    """Nearest-neighbour map of a label (or uint8 confidence) image onto another grid size."""
    rows = nearest_index(shape[0], labels.shape[0])
    cols = nearest_index(shape[1], labels.shape[1])
    out = np.empty(shape, dtype=labels.dtype)
    for y0 in range(0, shape[0], band_rows):
        y1 = min(shape[0], y0 + band_rows)
        out[y0:y1] = labels[rows[y0:y1]][:, cols]
    return out


def segment_at_model_resolution(
    segmenter: Segmenter[Bundle],
    sources: Sequence[Source],
    factor: Factor | None,
    *,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
) -> SegmentationResult:
    """Segment `sources` seen at `factor` times their resolution (None: as they are) and return
    labels and confidence on the sources' own grid (nearest neighbour), so outputs always match
    the input pixels. `factor` is usually `resampling_factors(section spacing, model spacing)`
    (per axis) or `resampling_factor(...)` (square pixels)."""
    height, width = sources[0].shape
    run = list(sources) if factor is None else [ResampledSource(s, factor) for s in sources]
    result = segmenter.segment(run, progress=progress, cancel=cancel)
    if result.labels.shape != (height, width):
        confidence = result.confidence
        result = dataclasses.replace(
            result,
            labels=labels_to_grid(result.labels, (height, width)),
            confidence=labels_to_grid(confidence, (height, width)) if confidence is not None else None,
        )
    return result


class GridSink:
    """Maps rows finished on the model's grid (run_h x run_w) onto the section's grid (height x
    width) by nearest neighbour, as `labels_to_grid` does for whole maps, and passes them on:
    the picked model rows and columns only grow along the section, so each output pixel is sent
    once, in the order the engine sends its own (bands, or bands of stripes)."""

    def __init__(self, sink: RowSink, shape: tuple[int, int], run_shape: tuple[int, int]) -> None:
        self.sink = sink
        self.rows = nearest_index(shape[0], run_shape[0])
        self.cols = nearest_index(shape[1], run_shape[1])

    def write_rows(
        self, y0: int, labels: npt.NDArray[np.uint8], confidence: npt.NDArray[np.uint8] | None, x0: int = 0
    ) -> None:
        picked = picked_window(self.rows, self.cols, y0, x0, labels.shape)
        if picked is not None:
            confidence = picked.take(confidence) if confidence is not None else None
            self.sink.write_rows(picked.y0, picked.take(labels), confidence, picked.x0)


def stream_at_model_resolution(
    segmenter: Segmenter[Bundle],
    sources: Sequence[Source],
    factor: Factor | None,
    sink: RowSink,
    *,
    progress: ProgressFn | None = None,
    cancel: CancelFn | None = None,
) -> RunStats:
    """`segment_at_model_resolution` with the rows (on the sources' own grid) handed to `sink`
    as they are finished, so no map of the whole section is held."""
    height, width = sources[0].shape
    if factor is None:
        return segmenter.stream(list(sources), sink, progress=progress, cancel=cancel)
    run = [ResampledSource(s, factor) for s in sources]
    return segmenter.stream(run, GridSink(sink, (height, width), run[0].shape), progress=progress, cancel=cancel)
