"""Build the panoramas band of rows by band: tiles evened out, overlaps feathered, rows streamed out.

Only the tiles that cross the current band are decoded and held (the band's tile row and the
next), so memory follows one row of tiles, not the panorama. In an overlap each tile counts with
a weight that rises linearly from its edge over the width of the overlap (feathering): a tile
edge leaves no step, and whatever the flat field left of a brightness difference is spread over
the overlap.

Seam visibility is measured on the evened-out PP tiles, where a seam would be sharpest: where
one tile pasted over its neighbour would end (a line just inside each edge of every overlap, the
neighbour on one side, the tile's own border on the other). The step across that line (mean of
`STEP_WIDTH` pixels after it minus before it) is compared with the same step across the same line
within each tile alone. Rock texture counts the same in both; a brightness mismatch (vignetting
left, exposure) or a misplacement only in the first. The ratio of their mean squares is 1 when a
cut could not be told from the rock; feathering then hides what is left further.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Optional, Protocol

import numpy as np
import numpy.typing as npt

from thinseg.stitching.flatfield import FlatField

Rgb = npt.NDArray[np.uint8]
TileImages = tuple[Rgb, Optional[Rgb]]


class RowSink(Protocol):
    """Where panorama rows go, top to bottom (a TIFF writer, a netCDF variable, an array)."""

    def write_rows(self, y0: int, band: Rgb) -> None: ...


class Cancelled(Exception):
    """Stitching was asked to stop."""


@dataclass
class SeamVisibility:
    """Mean squared step across the overlap midlines with one tile on each side (`seam_energy`)
    and with one tile on both (`inside_energy`); `ratio` 1 = seams invisible."""

    seam_energy: float
    inside_energy: float
    seam_samples: int

    @property
    def ratio(self) -> float:
        return self.seam_energy / self.inside_energy if self.inside_energy > 0 else float("nan")


@dataclass
class Composition:
    seams: SeamVisibility
    overview: Rgb
    overview_factor: int
    covered_fraction: float


def feather(shape: tuple[int, int], ramp: tuple[int, int]) -> npt.NDArray[np.float32]:
    """Weights (h, w): rising linearly over `ramp` (rows, cols) pixels from each edge, 1 inside."""

    def axis(n: int, width: int) -> npt.NDArray[np.float32]:
        distance = np.minimum(np.arange(n), np.arange(n)[::-1]).astype(np.float32) + 0.5
        return np.minimum(1.0, distance / max(1, width)).astype(np.float32)

    return np.asarray(np.outer(axis(shape[0], ramp[0]), axis(shape[1], ramp[1])), dtype=np.float32)


class ArraySink:
    """A panorama kept in memory (tests, small sets)."""

    def __init__(self, shape: tuple[int, int]) -> None:
        self.array = np.zeros((shape[0], shape[1], 3), dtype=np.uint8)

    def write_rows(self, y0: int, band: Rgb) -> None:
        self.array[y0 : y0 + band.shape[0]] = band


class _Held:
    """A decoded tile (PP, and XP when there is one) from row `first` on: as the bands move down,
    the rows above them are let go, so the tiles held take about half a row of tiles on average."""

    def __init__(self, images: TileImages) -> None:
        self.first = 0
        self.pp, self.xp = images

    def rows(self, r0: int, r1: int) -> Rgb:
        return self.pp[r0 - self.first : r1 - self.first]

    def xp_rows(self, r0: int, r1: int) -> Rgb | None:
        return self.xp[r0 - self.first : r1 - self.first] if self.xp is not None else None

    def drop_above(self, row: int, least: int) -> None:
        """Let go of the rows above `row` once at least `least` of them can go (each drop copies)."""
        if row - self.first >= least:
            cut = row - self.first
            self.pp = self.pp[cut:].copy()
            self.xp = self.xp[cut:].copy() if self.xp is not None else None
            self.first = row


#: Width (px) of the means compared across a seam line.
STEP_WIDTH = 4
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class _SeamMeter:
    """Seam visibility over the pairs of direct neighbours, each measured once, when both are decoded."""

    def __init__(self, positions: npt.NDArray[np.int64], tile_shape: tuple[int, int], flat: FlatField | None) -> None:
        self.positions, self.tile_shape, self.flat = positions, tile_shape, flat
        self.sums = {"seam": [0.0, 0], "inside": [0.0, 0]}
        h, w = tile_shape
        self.pending: list[tuple[int, int, int]] = []  # (a, b, axis): b right of (axis 1) or below (axis 0) a
        n = len(positions)
        for a in range(n):
            for b in range(n):
                dy, dx = (int(v) for v in positions[b] - positions[a])
                if 0 < dx < w - 2 * STEP_WIDTH and abs(dy) < h // 2:
                    self.pending.append((a, b, 1))
                elif 0 < dy < h - 2 * STEP_WIDTH and abs(dx) < w // 2:
                    self.pending.append((a, b, 0))

    def _grey(self, image: Rgb, gain: npt.NDArray[np.float32] | None) -> npt.NDArray[np.float32]:
        values = image.astype(np.float32) if gain is None else image / gain
        return np.asarray(values @ _LUMA, dtype=np.float32)

    def measure_ready(self, cache: dict[int, _Held]) -> None:
        left = []
        for a, b, axis in self.pending:
            if a in cache and b in cache:
                self._pair(cache[a], cache[b], self.positions[b] - self.positions[a], axis)
            else:
                left.append((a, b, axis))
        self.pending = left

    def _step(
        self, held: _Held, rows: tuple[int, int], cols: tuple[int, int], axis: int
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]] | None:
        """Means of the first and second halves (along `axis`) of a tile's grey region, or None
        when rows above it were already dropped."""
        if rows[0] < held.first:
            return None
        region = held.rows(rows[0], rows[1])[:, cols[0] : cols[1]]
        gain = self.flat.gain[rows[0] : rows[1], cols[0] : cols[1]] if self.flat is not None else None
        grey = self._grey(region, gain)
        k = STEP_WIDTH
        if axis == 1:
            return grey[:, :k].mean(axis=1), grey[:, k:].mean(axis=1)
        return grey[:k].mean(axis=0), grey[k:].mean(axis=0)

    def _pair(self, a: _Held, b: _Held, offset: npt.NDArray[np.int64], axis: int) -> None:
        """Steps across the two edges of the overlap of a and b (b after a along `axis`), each line
        `STEP_WIDTH` px inside the overlap so both tiles cover both sides of it."""
        h, w = self.tile_shape
        dy, dx = int(offset[0]), int(offset[1])
        k = STEP_WIDTH
        if axis == 1:  # b to the right: vertical lines through the rows both hold
            r0, r1 = max(0, dy, a.first, b.first + dy), min(h, dy + h)
            if r1 - r0 < 8:
                return
            lines = [
                ((r0, r1), (line - k, line + k), (r0 - dy, r1 - dy), (line - dx - k, line - dx + k))
                for line in (dx + k, w - k)
            ]
        else:  # b below: horizontal lines through the columns both hold
            c0, c1 = max(0, dx), min(w, dx + w)
            if c1 - c0 < 8:
                return
            lines = [
                ((line - k, line + k), (c0, c1), (line - dy - k, line - dy + k), (c0 - dx, c1 - dx))
                for line in (dy + k, h - k)
            ]
        for number, (rows_a, cols_a, rows_b, cols_b) in enumerate(lines):
            steps_a = self._step(a, rows_a, cols_a, axis)
            steps_b = self._step(b, rows_b, cols_b, axis)
            if steps_a is None or steps_b is None:
                continue
            (a_before, a_after), (b_before, b_after) = steps_a, steps_b
            # what pasting shows: a before the line and b after it at b's edge; b before, a after at a's edge
            pasted = b_after - a_before if number == 0 else a_after - b_before
            self._add("seam", pasted)
            self._add("inside", a_after - a_before)
            self._add("inside", b_after - b_before)

    def _add(self, kind: str, steps: npt.NDArray[np.float32]) -> None:
        self.sums[kind][0] += float(np.sum(steps.astype(np.float64) ** 2))
        self.sums[kind][1] += int(steps.size)

    def result(self) -> SeamVisibility:
        seam, inside = self.sums["seam"], self.sums["inside"]
        return SeamVisibility(seam[0] / max(1, seam[1]), inside[0] / max(1, inside[1]), int(seam[1]))


def compose(
    positions: npt.NDArray[np.int64],
    tile_shape: tuple[int, int],
    read: Callable[[int], TileImages],
    pp_sinks: Sequence[RowSink],
    xp_sinks: Sequence[RowSink] = (),
    *,
    flat_pp: FlatField | None = None,
    flat_xp: FlatField | None = None,
    ramp: tuple[int, int] = (64, 64),
    band_rows: int = 256,
    overview_side: int = 2048,
    progress: Callable[[int, int], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> Composition:
    """Blend the tiles at integer (y, x) `positions` (non-negative) into panoramas written to the sinks."""
    h, w = tile_shape
    height = int(positions[:, 0].max()) + h
    width = int(positions[:, 1].max()) + w
    factor = max(1, -(-max(height, width) // overview_side))
    band_rows = max(factor, band_rows - band_rows % factor)
    weights = feather(tile_shape, ramp)
    # One factor per pixel: the feather weight over the gain (a tile pixel is multiplied once).
    scale_pp = weights[:, :, None] / flat_pp.gain if flat_pp is not None else np.repeat(weights[:, :, None], 3, axis=2)
    scale_xp = weights[:, :, None] / flat_xp.gain if flat_xp is not None else np.repeat(weights[:, :, None], 3, axis=2)
    overview = np.zeros((-(-height // factor), -(-width // factor), 3), dtype=np.uint8)
    meter = _SeamMeter(positions, tile_shape, flat_pp)
    order = np.argsort(positions[:, 0], kind="stable")
    cache: dict[int, _Held] = {}
    covered_pixels = 0
    bands = list(range(0, height, band_rows))
    with_xp = bool(xp_sinks)
    for done, y0 in enumerate(bands):
        if cancel is not None and cancel():
            raise Cancelled()
        y1 = min(height, y0 + band_rows)
        rows = y1 - y0
        acc_pp = np.zeros((rows, width, 3), dtype=np.float32)
        acc_xp = np.zeros((rows, width, 3), dtype=np.float32) if with_xp else None
        wsum = np.zeros((rows, width), dtype=np.float32)
        crossing = [int(k) for k in order if positions[k, 0] < y1 and positions[k, 0] + h > y0]
        for k in list(cache):
            if positions[k, 0] + h <= y0:
                del cache[k]
        for k in crossing:
            if k not in cache:
                cache[k] = _Held(read(k))
        meter.measure_ready(cache)
        for k in crossing:
            ty, tx = (int(v) for v in positions[k])
            r0, r1 = max(y0, ty) - ty, min(y1, ty + h) - ty
            out = slice(r0 + ty - y0, r1 + ty - y0)
            held = cache[k]
            acc_pp[out, tx : tx + w] += held.rows(r0, r1) * scale_pp[r0:r1]
            xp_rows = held.xp_rows(r0, r1)
            if acc_xp is not None and xp_rows is not None:
                acc_xp[out, tx : tx + w] += xp_rows * scale_xp[r0:r1]
            wsum[out, tx : tx + w] += weights[r0:r1]
            held.drop_above(r1, h // 4)
        covered = wsum > 0
        covered_pixels += int(covered.sum())
        scale = np.where(covered, 1.0 / np.maximum(wsum, 1e-12), 0.0).astype(np.float32)[:, :, None]
        acc_pp *= scale
        pp_band = _to_uint8(acc_pp)
        for sink in pp_sinks:
            sink.write_rows(y0, pp_band)
        if acc_xp is not None:
            acc_xp *= scale
            xp_band = _to_uint8(acc_xp)
            for sink in xp_sinks:
                sink.write_rows(y0, xp_band)
        overview[y0 // factor : -(-y1 // factor)] = pp_band[::factor, ::factor]
        if progress is not None:
            progress(done + 1, len(bands))
    return Composition(meter.result(), overview, factor, covered_pixels / float(height * width))


def _to_uint8(values: npt.NDArray[np.float32]) -> Rgb:
    np.rint(values, out=values)
    np.clip(values, 0, 255, out=values)
    return values.astype(np.uint8)
