"""How far one tile lies from its neighbour: phase correlation of the strips they share.

Only the strips that can overlap are correlated (the nominal overlap grown by the largest stage
error), so a pair costs two small FFTs, not two tile-sized ones. Phase correlation
(scikit-image's `phase_cross_correlation`) gives the shift modulo the strip size; each of the
aliased shifts within the search margin is scored by the normalised cross-correlation (NCC) of the
pixels the two tiles then share, the best is climbed to its NCC maximum pixel by pixel, and
its NCC is the pair's weight in the global fit (MIST's scheme).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from thinseg.io.netcdf import Window

FloatImage = npt.NDArray[np.float32]

#: Fewest shared pixels for a pair's NCC to count (a sliver of overlap correlates by chance).
MIN_SHARED_PIXELS = 2000


@dataclass(frozen=True)
class PairShift:
    """Tile `j`'s top-left minus tile `i`'s (dy, dx) in pixels, and how sure: NCC of the shared pixels."""

    i: int
    j: int
    offset: tuple[float, float]
    score: float
    shared_pixels: int


def overlap_windows(shape: tuple[int, int], offset: npt.ArrayLike, margin: int) -> tuple[Window, Window]:
    """The parts of tile a and of tile b (both of `shape`, b at `offset` from a) that can overlap
    when the offset is wrong by up to `margin` pixels on each axis."""
    h, w = shape
    dy, dx = (int(round(float(v))) for v in np.asarray(offset, dtype=np.float64))
    a = Window(max(0, dy - margin), min(h, dy + h + margin), max(0, dx - margin), min(w, dx + w + margin))
    b = Window(max(0, -dy - margin), min(h, -dy + h + margin), max(0, -dx - margin), min(w, -dx + w + margin))
    return a, b


def gray(image: npt.NDArray[np.uint8] | FloatImage) -> FloatImage:
    """Luminance (Rec. 601 weights) as float32."""
    rgb = np.asarray(image, dtype=np.float32)
    return np.asarray(rgb[..., 0] * 0.299 + rgb[..., 1] * 0.587 + rgb[..., 2] * 0.114, dtype=np.float32)


def ncc(a: FloatImage, b: FloatImage) -> float:
    """Normalised cross-correlation of two equally shaped arrays (0 for flat ones)."""
    a = a - a.mean(dtype=np.float64)
    b = b - b.mean(dtype=np.float64)
    den = float(np.sqrt(np.sum(a * a, dtype=np.float64) * np.sum(b * b, dtype=np.float64)))
    return float(np.sum(a * b, dtype=np.float64) / den) if den > 0 else 0.0


def _shared(a: FloatImage, b: FloatImage, at: tuple[int, int]) -> tuple[FloatImage, FloatImage] | None:
    """The pixels of `a` and `b` that coincide when b's (0, 0) lies at `at` in a."""
    y, x = at
    ya0, ya1 = max(0, y), min(a.shape[0], y + b.shape[0])
    xa0, xa1 = max(0, x), min(a.shape[1], x + b.shape[1])
    if ya1 <= ya0 or xa1 <= xa0:
        return None
    return a[ya0:ya1, xa0:xa1], b[ya0 - y : ya1 - y, xa0 - x : xa1 - x]


def _score(a: FloatImage, b: FloatImage, at: tuple[int, int], min_shared: int) -> tuple[float, int]:
    shared = _shared(a, b, at)
    if shared is None or shared[0].size < min_shared:
        return -1.0, 0 if shared is None else int(shared[0].size)
    return ncc(*shared), int(shared[0].size)


def _padded(image: FloatImage, shape: tuple[int, int]) -> FloatImage:
    out = np.zeros(shape, dtype=np.float32)
    out[: image.shape[0], : image.shape[1]] = image - image.mean(dtype=np.float64)
    return out


def phase_peak(a: FloatImage, b: FloatImage) -> npt.NDArray[np.float64]:
    """Where b's content lies in a (dy, dx), modulo their shape: scikit-image's phase correlation."""
    from skimage.registration import phase_cross_correlation  # deferred: scikit-image costs ~0.3 s

    result = phase_cross_correlation(a, b)  # type: ignore[no-untyped-call]
    return np.asarray(result[0], dtype=np.float64)


def measure_shift(
    crop_a: FloatImage,
    crop_b: FloatImage,
    windows: tuple[Window, Window],
    nominal: npt.ArrayLike,
    margin: int,
    min_shared: int = MIN_SHARED_PIXELS,
) -> tuple[tuple[float, float], float, int]:
    """Tile b's offset from tile a, its NCC and shared pixel count, from the two crops that
    `overlap_windows` cut (`crop_a` = tile a's window, `crop_b` = tile b's), searching
    `margin` pixels around `nominal`. NCC -1 when no candidate shares enough pixels."""
    win_a, win_b = windows
    nominal_yx = np.asarray(nominal, dtype=np.float64)
    shape = (max(crop_a.shape[0], crop_b.shape[0]), max(crop_a.shape[1], crop_b.shape[1]))
    if min(crop_a.shape) < 8 or min(crop_b.shape) < 8:
        return (float(nominal_yx[0]), float(nominal_yx[1])), -1.0, 0
    peak = phase_peak(_padded(crop_a, shape), _padded(crop_b, shape))
    # b's (0, 0) lies at `at` in crop a <=> b's tile origin lies at win_a + at - win_b in tile a.
    to_offset = np.array([win_a.y0 - win_b.y0, win_a.x0 - win_b.x0], dtype=np.float64)
    best: tuple[float, int, tuple[int, int]] = (-2.0, 0, (0, 0))
    for ky, kx in itertools.product((-1, 0, 1), repeat=2):
        at = (int(round(peak[0])) + ky * shape[0], int(round(peak[1])) + kx * shape[1])
        if np.any(np.abs(np.array(at) + to_offset - nominal_yx) > margin + 1):
            continue
        score, shared = _score(crop_a, crop_b, at, min_shared)
        if score > best[0]:
            best = (score, shared, at)
    if best[0] <= -1.0:
        return (float(nominal_yx[0]), float(nominal_yx[1])), -1.0, 0
    score, shared, at = _climb(crop_a, crop_b, best[2], best[0], min_shared)
    offset = np.array(at, dtype=np.float64) + to_offset
    return (float(offset[0]), float(offset[1])), score, shared


def _climb(
    a: FloatImage, b: FloatImage, at: tuple[int, int], score: float, min_shared: int, steps: int = 4
) -> tuple[float, int, tuple[int, int]]:
    """Move to the NCC maximum among the 8 neighbouring shifts until none is better (a noisy or
    vignetted phase-correlation peak can sit one pixel off)."""
    shared = _score(a, b, at, min_shared)[1]
    for _ in range(steps):
        moves = [(at[0] + dy, at[1] + dx) for dy, dx in itertools.product((-1, 0, 1), repeat=2) if dy or dx]
        scored = [(*_score(a, b, m, min_shared), m) for m in moves]
        top = max(scored, key=lambda s: s[0])
        if top[0] <= score:
            break
        score, shared, at = top
    return score, shared, at
