"""Vignetting: the gain of each camera pixel, from the tiles themselves or a blank-field image.

A microscope lights the middle of a field more than its corners, so every tile carries the same
smooth dark rim and a panorama built from raw tiles shows a grid of darker lines. Dividing each
tile by the field's relative gain removes it. The gain is a low-order 2-D polynomial in the
logarithm (illumination is smooth), scaled to a mean of 1 so the panorama keeps its brightness.
It is found in one of three ways:

- from the overlaps (`OverlapGainFit`): a rock point seen by two tiles at two places of the
  field differs only by the gain at those places, so log(a) - log(b) over all shared pixels fixes
  the polynomial (Goldman's vignetting estimate); exact with a dozen tiles, since the rock cancels;
- from the per-pixel median of many tiles (`estimate_flat_field`), the rock averaging out: when
  the tiles share too little to fit;
- from a photograph of a blank field (`flat_field_from_reference`), as a mirror or empty-slide
  calibration gives, dust and all left out by the polynomial.
 (BaSiC would also estimate a dark field, but it needs JAX, which GeoSlicer's
Python 3.9 cannot run; a bright-field photograph's dark offset is negligible.)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

#: The fit runs on this many rows/columns (the tile reduced by block means): gains are smooth.
FIT_SIDE = 96
#: Degree of the polynomial in (x, y): enough for a cos^4-like fall-off with an off-centre lamp.
DEGREE = 4


@dataclass(frozen=True)
class FlatField:
    """Relative gain (h, w, 3), mean 1 per channel: a tile divided by it is evenly lit."""

    gain: npt.NDArray[np.float32]

    def correct(self, tile: npt.NDArray[np.uint8], rows: slice = slice(None)) -> npt.NDArray[np.float32]:
        """`tile` (or its `rows`) divided by the gain, as float32 grey levels (may exceed 255)."""
        return np.asarray(tile, dtype=np.float32) / self.gain[rows]

    @property
    def strength(self) -> float:
        """Darkest corner relative to the brightest point (0 = even light), for the report."""
        lum = self.gain.mean(axis=2)
        return float(1.0 - lum.min() / lum.max())


def _reduced(image: npt.NDArray[np.uint8], factor: int) -> npt.NDArray[np.float32]:
    h, w = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    blocks = np.asarray(image[:h, :w], dtype=np.float32).reshape(h // factor, factor, w // factor, factor, -1)
    return np.asarray(blocks.mean(axis=(1, 3)), dtype=np.float32)


def _factor(shape: tuple[int, int]) -> int:
    return max(1, max(shape) // FIT_SIDE)


def _unit(size: int) -> npt.NDArray[np.float64]:
    """The centres of `size` cells spread over [-1, 1]: where the polynomial is evaluated."""
    return np.asarray((np.arange(size) + 0.5) / size * 2 - 1, dtype=np.float64)


def _exponents(constant: bool, degree: int = DEGREE) -> list[tuple[int, int]]:
    """(a, b) of the terms x^a y^b, a + b <= degree, in the one order fits and evaluations share."""
    return [(a, b) for a in range(degree + 1) for b in range(degree + 1 - a) if constant or a or b]


def _terms(
    y: npt.NDArray[np.float64], x: npt.NDArray[np.float64], constant: bool = True, degree: int = DEGREE
) -> npt.NDArray[np.float64]:
    """The polynomial's terms x^a y^b (a + b <= degree) at points (y, x) in [-1, 1], one column
    each; without the constant for the overlap fit, which cannot see it."""
    xs, ys = [np.ones_like(x)], [np.ones_like(y)]
    for _ in range(degree):  # powers by repeated products: float ** int is slow
        xs.append(xs[-1] * x)
        ys.append(ys[-1] * y)
    return np.stack([xs[a] * ys[b] for a, b in _exponents(constant, degree)], axis=1)


def _gain(coefficients: npt.NDArray[np.float64], shape: tuple[int, int], constant: bool) -> npt.NDArray[np.float32]:
    """exp(polynomial) on every pixel of a tile, scaled to mean 1; evaluated term by term as outer
    products of a column and a row, so no (h * w, terms) matrix is built at full size."""
    yv, xv = _unit(shape[0]), _unit(shape[1])
    value = np.zeros(shape, dtype=np.float64)
    for coefficient, (a, b) in zip(coefficients, _exponents(constant)):
        value += coefficient * np.outer(yv**b, xv**a)
    return np.asarray(np.exp(value - np.log(np.mean(np.exp(value)))), dtype=np.float32)


def _fitted_gain(reduced: npt.NDArray[np.float32], shape: tuple[int, int]) -> FlatField:
    """Fit log(reduced) per channel with the polynomial and evaluate it on the full tile grid."""
    log = np.log(np.maximum(reduced.astype(np.float64), 1.0))
    yy, xx = np.meshgrid(_unit(reduced.shape[0]), _unit(reduced.shape[1]), indexing="ij")
    design = _terms(yy.ravel(), xx.ravel())
    coefficients = np.asarray(np.linalg.lstsq(design, log.reshape(-1, log.shape[2]), rcond=None)[0], dtype=np.float64)
    channels = [_gain(coefficients[:, channel], shape, constant=True) for channel in range(log.shape[2])]
    return FlatField(np.stack(channels, axis=2))


def estimate_flat_field(tiles: Iterable[npt.NDArray[np.uint8]], shape: tuple[int, int]) -> FlatField | None:
    """The gain from the per-pixel median of `tiles` (reduced copies are kept, not the tiles);
    None for fewer than 3 tiles, whose median is mostly rock."""
    factor = _factor(shape)
    reduced = [_reduced(tile, factor) for tile in tiles]
    if len(reduced) < 3:
        return None
    median = np.median(np.stack(reduced), axis=0).astype(np.float32)
    return _fitted_gain(median, shape)


def flat_field_from_reference(image: npt.NDArray[np.uint8], shape: tuple[int, int]) -> FlatField:
    """The gain from a photograph of a blank field (an empty slide, a mirror) of the tiles' size."""
    return _fitted_gain(_reduced(image, _factor(shape)), shape)


#: Pixels darker or brighter than this say little about the gain (noise floor, clipping).
_DARKEST, _BRIGHTEST = 12.0, 243.0
#: Fewest shared pixel pairs for an overlap fit (else the median of the tiles is used).
MIN_FIT_SAMPLES = 5000
#: Shared pixels sampled per pair of tiles.
PAIR_SAMPLES = 20000


@dataclass
class OverlapGainFit:
    """Accumulates, pair of tiles by pair, the least-squares equations of the log-gain polynomial
    from the pixels two tiles share; `flat_field()` solves them. Memory: a few small matrices."""

    shape: tuple[int, int]
    step: int = 3
    samples: int = 0
    normal: npt.NDArray[np.float64] = field(init=False)
    rhs: npt.NDArray[np.float64] = field(init=False)

    def __post_init__(self) -> None:
        n = _terms(np.zeros(1), np.zeros(1), constant=False).shape[1]
        self.normal = np.zeros((n, n))
        self.rhs = np.zeros(n)

    def add(
        self,
        a: npt.NDArray[np.uint8],
        origin_a: tuple[int, int],
        b: npt.NDArray[np.uint8],
        origin_b: tuple[int, int],
        offset: tuple[int, int],
    ) -> None:
        """Grey crops `a` of tile a (top-left `origin_a` in that tile) and `b` of tile b, b lying at
        integer `offset` (dy, dx) from a: their shared pixels enter the fit."""
        h, w = self.shape
        at_y = offset[0] + origin_b[0] - origin_a[0]
        at_x = offset[1] + origin_b[1] - origin_a[1]
        ya0, ya1 = max(0, at_y), min(a.shape[0], at_y + b.shape[0])
        xa0, xa1 = max(0, at_x), min(a.shape[1], at_x + b.shape[1])
        if ya1 - ya0 < self.step or xa1 - xa0 < self.step:
            return
        # Sample a grid of at most ~PAIR_SAMPLES shared pixels: the gain is smooth, more add nothing.
        step = max(self.step, int(np.sqrt((ya1 - ya0) * (xa1 - xa0) / PAIR_SAMPLES)) + 1)
        rows = np.arange(ya0, ya1, step)
        cols = np.arange(xa0, xa1, step)
        va = a[np.ix_(rows, cols)].astype(np.float64)
        vb = b[np.ix_(rows - at_y, cols - at_x)].astype(np.float64)
        keep = (va > _DARKEST) & (va < _BRIGHTEST) & (vb > _DARKEST) & (vb < _BRIGHTEST)
        if not keep.any():
            return
        rr, cc = np.meshgrid(rows, cols, indexing="ij")
        ys, xs = _unit(h), _unit(w)
        ty_a, tx_a = ys[rr[keep] + origin_a[0]], xs[cc[keep] + origin_a[1]]
        ty_b, tx_b = ys[rr[keep] - at_y + origin_b[0]], xs[cc[keep] - at_x + origin_b[1]]
        design = _terms(ty_a, tx_a, constant=False) - _terms(ty_b, tx_b, constant=False)
        target = np.log(va[keep]) - np.log(vb[keep])
        self.normal += design.T @ design
        self.rhs += design.T @ target
        self.samples += int(keep.sum())

    def flat_field(self) -> FlatField | None:
        """The fitted gain (the same on the three channels: vignetting is grey), or None when too
        few shared pixels were seen."""
        if self.samples < MIN_FIT_SAMPLES:
            return None
        ridge = 1e-6 * np.trace(self.normal) / len(self.rhs)
        coefficients = np.linalg.solve(self.normal + ridge * np.eye(len(self.rhs)), self.rhs)
        gain = _gain(coefficients, self.shape, constant=False)
        return FlatField(np.repeat(gain[:, :, None], 3, axis=2))
