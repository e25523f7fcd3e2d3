"""Small pictures of large sections: nearest-neighbour previews, read band by band from a source.

A gigapixel PP image is never held whole for a picture: `read_preview` reads it in windows
and keeps only the pixels the preview shows, the same pixels `shrink` picks from an array,
so a preview of a source and of its labels line up exactly.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import numpy.typing as npt

from thinseg.inference.resample import nearest_index


class RegionReader(Protocol):
    """An RGB image read by region (a RasterSource, a ResampledSource, ...)."""

    shape: tuple[int, int]

    def read(self, y0: int, y1: int, x0: int = 0, x1: int | None = None) -> np.ndarray: ...


class RegionSliceable(Protocol):
    """An (H, W, 3) image that gives its windows as arrays: a numpy array or a `RegionImage`."""

    @property
    def shape(self) -> tuple[int, ...]: ...

    def __getitem__(self, key: tuple[slice, slice], /) -> np.ndarray: ...


def preview_shape(shape: tuple[int, ...], max_side: int) -> tuple[int, int]:
    """The (H, W) an image of `shape` shrinks to so that its longer side is at most `max_side`."""
    h, w = int(shape[0]), int(shape[1])
    scale = min(1.0, max_side / max(h, w))
    if scale >= 1.0:
        return h, w
    return max(1, int(round(h * scale))), max(1, int(round(w * scale)))


def shrink(array: np.ndarray, max_side: int) -> np.ndarray:
    """Nearest-neighbour downsample so the longer side is at most `max_side` (no copy if small)."""
    h, w = array.shape[:2]
    oh, ow = preview_shape((h, w), max_side)
    if (oh, ow) == (h, w):
        return array
    return array[np.ix_(nearest_index(oh, h), nearest_index(ow, w))]


def read_preview(
    source: RegionReader, max_side: int, band_rows: int = 2048, band_cols: int = 2048
) -> npt.NDArray[np.uint8]:
    """The RGB image of `source` as `shrink` would shrink it (same pixels picked), read in
    windows of `band_rows` x `band_cols`, so what is held besides the preview is the same for
    any width of the section."""
    height, width = source.shape
    shape = preview_shape((height, width), max_side)
    if shape == (height, width):
        return np.asarray(source.read(0, height, 0, width), dtype=np.uint8)
    rows, cols = nearest_index(shape[0], height), nearest_index(shape[1], width)
    out = np.empty((shape[0], shape[1], 3), np.uint8)
    for y0 in range(0, height, band_rows):
        y1 = min(height, y0 + band_rows)
        sel = np.nonzero((rows >= y0) & (rows < y1))[0]
        if not sel.size:
            continue
        for x0 in range(0, width, band_cols):
            x1 = min(width, x0 + band_cols)
            picked = np.nonzero((cols >= x0) & (cols < x1))[0]
            if picked.size:
                window = np.asarray(source.read(y0, y1, x0, x1))
                out[sel[0] : sel[-1] + 1, picked[0] : picked[-1] + 1] = window[rows[sel] - y0][:, cols[picked] - x0]
    return out


class RegionImage:
    """An RGB source seen as an array that reads only the windows it is sliced with
    (`image[y0:y1, x0:x1]`), for comparison sheets, which crop a few regions of the PP."""

    ndim = 3

    def __init__(self, source: RegionReader) -> None:
        self.source = source
        self.shape = (int(source.shape[0]), int(source.shape[1]), 3)

    def __getitem__(self, key: tuple[slice, slice]) -> npt.NDArray[np.uint8]:
        if not (isinstance(key, tuple) and len(key) == 2 and all(isinstance(k, slice) for k in key)):
            raise TypeError("RegionImage supports image[y0:y1, x0:x1] only")
        ys, xs = key
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.shape[1])
        if ys.step not in (None, 1) or xs.step not in (None, 1):
            raise TypeError("RegionImage supports unit steps only")
        return np.asarray(self.source.read(y0, max(y0, y1), x0, max(x0, x1)), dtype=np.uint8)
