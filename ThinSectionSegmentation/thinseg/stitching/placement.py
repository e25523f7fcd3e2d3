"""From tile files to tile positions: read, even out, correlate neighbours, fit all positions.

The PP tiles decide where tiles lie (XP goes dark wherever a grain is at extinction); a pair whose
PP overlap is featureless is tried on XP. Both panoramas are then built at the same positions, so
they lie on each other pixel for pixel. With a layout (a grid from the names, a tile-position
file) only the neighbours the layout names are correlated, a tile's strips are kept only until
its neighbours have been read, and memory follows one row of tiles. Without one, every pair is
tried on reduced copies first (time grows with the square of the tile count) and the pairs that
overlap are measured at full resolution.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from thinseg.errors import ThinSegError
from thinseg.io.images import open_image
from thinseg.io.netcdf import Window
from thinseg.stitching.compose import Cancelled
from thinseg.stitching.flatfield import FlatField, OverlapGainFit, estimate_flat_field, flat_field_from_reference
from thinseg.stitching.layout import grid_positions, read_tile_configuration
from thinseg.stitching.pairwise import (
    FloatImage,
    PairShift,
    gray,
    measure_shift,
    overlap_windows,
    phase_peak,
)
from thinseg.stitching.solve import Placement, solve_positions
from thinseg.stitching.tiles import Tile, grid_from_names, grid_from_order

Rgb = npt.NDArray[np.uint8]
Progress = Callable[[int, int], None]

#: Tiles read to estimate the flat field (evenly spread over the set).
FLAT_FIELD_SAMPLE = 48
#: Reduced side for trying every pair without a layout.
SEARCH_SIDE = 256
#: Without a layout nothing bounds where a tile may go: a pair counts only when it correlates
#: this well (true neighbours of textured rock reach 0.8-0.99; an unrelated field 0.5 by chance).
MIN_SCORE_WITHOUT_LAYOUT = 0.6
#: Share of a tile two nominal footprints must share for the pair to be correlated.
MIN_NOMINAL_OVERLAP = 0.03


@dataclass(frozen=True)
class PlacementOptions:
    """How positions are found. `layout`: "grid" (from names, or numbered names with `columns`),
    "auto" (from the images alone), a TileConfiguration file, or None (grid when the names give one,
    else auto). `overlap`: nominal share of a tile neighbours share; `max_shift`: the largest
    stage error searched, as a share of a tile; `flat_field`: "auto", "none" or a blank-field image."""

    layout: str | None = None
    overlap: float = 0.15
    max_shift: float = 0.1
    columns: int | None = None
    serpentine: bool = False
    flat_field: str = "auto"
    min_score: float = 0.3
    drop_unlinked: bool = False
    workers: int = 1


@dataclass
class TilePlan:
    """Where every tile goes (integer top-left (y, x) in the panorama), which tiles are used, and why."""

    tiles: list[Tile]
    tile_shape: tuple[int, int]
    positions: npt.NDArray[np.int64]
    used: npt.NDArray[np.bool_]
    placement: Placement
    layout: str
    flat_pp: FlatField | None
    flat_xp: FlatField | None
    warnings: list[str] = field(default_factory=list)

    @property
    def panorama_shape(self) -> tuple[int, int]:
        kept = self.positions[self.used]
        return int(kept[:, 0].max()) + self.tile_shape[0], int(kept[:, 1].max()) + self.tile_shape[1]


def read_rgb(path: Path, role: str, shape: tuple[int, int] | None = None) -> Rgb:
    """A whole tile, refused in one line when it is not the size of the first tile."""
    source = open_image(path, role=role)
    try:
        if shape is not None and tuple(source.shape) != tuple(shape):
            raise ThinSegError(
                f"{role} is {source.shape[1]} x {source.shape[0]} px while the first tile is "
                f"{shape[1]} x {shape[0]} px: all tiles must have one size",
                path,
            )
        return np.asarray(source.read(0, source.shape[0]), dtype=np.uint8)
    finally:
        source.close()


def tile_size(tile: Tile) -> tuple[int, int]:
    source = open_image(tile.pp, role="PP tile")
    try:
        return int(source.shape[0]), int(source.shape[1])
    finally:
        source.close()


def _sample(n: int, k: int) -> list[int]:
    return sorted({int(round(v)) for v in np.linspace(0, n - 1, min(n, k))})


def reference_flat_field(shape: tuple[int, int], how: str) -> FlatField | None:
    """The gain of a blank-field image (`how` names it) for PP and XP alike (the same lamp and
    objective light both); None for "none" and for "auto" (fitted from the overlaps later)."""
    if how in ("none", "auto"):
        return None
    if how:
        reference = Path(how)
        image = read_rgb(reference, "flat-field reference image")
        if image.shape[:2] != shape:
            raise ThinSegError(
                f"flat-field reference image is {image.shape[1]} x {image.shape[0]} px, the tiles "
                f"{shape[1]} x {shape[0]} px",
                reference,
            )
        return flat_field_from_reference(image, shape)
    return None


def median_flat_fields(tiles: Sequence[Tile], shape: tuple[int, int]) -> tuple[FlatField | None, FlatField | None]:
    """PP and XP gains from the median of a spread sample of the tiles: when overlaps are too few to fit."""
    picks = [tiles[k] for k in _sample(len(tiles), FLAT_FIELD_SAMPLE)]
    flat_pp = estimate_flat_field((read_rgb(t.pp, "PP tile", shape) for t in picks), shape)
    with_xp = [t.xp for t in picks if t.xp is not None]
    flat_xp = estimate_flat_field((read_rgb(p, "XP tile", shape) for p in with_xp), shape) if with_xp else None
    return flat_pp, flat_xp


def nominal_layout(
    tiles: Sequence[Tile], shape: tuple[int, int], options: PlacementOptions
) -> tuple[npt.NDArray[np.float64] | None, str]:
    """Nominal (y, x) of every tile and where they came from, or None for "find them in the images"."""
    layout = options.layout
    if layout not in (None, "grid", "auto"):
        return read_tile_configuration(layout, tiles), f"tile positions from {Path(layout).name}"
    if layout == "auto":
        return None, "positions from the images alone"
    if options.columns is not None:
        places = grid_from_order(tiles, options.columns, options.serpentine)
        how = "serpentine" if options.serpentine else "row by row"
        return grid_positions(places, shape, options.overlap), f"grid of {options.columns} columns, {how}"
    named = grid_from_names(tiles)
    if named is not None:
        return grid_positions(named, shape, options.overlap), "grid from the tile names"
    if layout == "grid":
        raise ThinSegError(
            f"the tile names carry no grid place (r<row>_c<col> or x<col>_y<row>), e.g. {tiles[0].pp.name}: "
            "give --columns N for numbered tiles, a tile-position file, or --layout auto"
        )
    return None, "positions from the images alone"


def neighbour_pairs(
    nominal: npt.NDArray[np.float64], shape: tuple[int, int], least: float = MIN_NOMINAL_OVERLAP
) -> list[tuple[int, int]]:
    """Pairs of tiles whose nominal footprints share at least `least` of a tile."""
    h, w = shape
    pairs = []
    order = np.argsort(nominal[:, 0], kind="stable")
    for a_pos, i in enumerate(order):
        for j in order[a_pos + 1 :]:
            dy = nominal[j, 0] - nominal[i, 0]
            if dy >= h:
                break
            dx = abs(nominal[j, 1] - nominal[i, 1])
            if dx < w and (h - abs(dy)) * (w - dx) >= least * h * w:
                pairs.append((int(min(i, j)), int(max(i, j))))
    return sorted(pairs)


@dataclass
class _Prepared:
    """One tile's evened-out grey strips, one per neighbour it shares an overlap with (uint8: a
    quarter of float32's memory)."""

    pp: dict[tuple[int, int], npt.NDArray[np.uint8]]
    xp: dict[tuple[int, int], npt.NDArray[np.uint8]]


@dataclass
class GainFits:
    """The overlap fits of the PP and XP gains, fed by every reliable pair as it is measured."""

    pp: OverlapGainFit
    xp: OverlapGainFit

    #: Pairs less sure than this might be misplaced: their pixels stay out of the fit.
    least_score = 0.6

    def add(
        self, pair: tuple[int, int], strips: dict[int, _Prepared], windows: tuple[Window, Window], shift: PairShift
    ) -> None:
        if shift.score < self.least_score:
            return
        i, j = pair
        offset = (int(round(shift.offset[0])), int(round(shift.offset[1])))
        a, b = (windows[0].y0, windows[0].x0), (windows[1].y0, windows[1].x0)
        self.pp.add(strips[i].pp[pair], a, strips[j].pp[pair], b, offset)
        if pair in strips[i].xp and pair in strips[j].xp:
            self.xp.add(strips[i].xp[pair], a, strips[j].xp[pair], b, offset)


def _grey_u8(image: Rgb, flat: FlatField | None) -> npt.NDArray[np.uint8]:
    values = gray(flat.correct(image) if flat is not None else image)
    return np.asarray(np.clip(np.rint(values), 0, 255), dtype=np.uint8)


def _strips(
    k: int,
    tile: Tile,
    shape: tuple[int, int],
    windows: dict[tuple[int, int], tuple[Window, Window]],
    flat_pp: FlatField | None,
    flat_xp: FlatField | None,
) -> _Prepared:
    def cut(image: npt.NDArray[np.uint8]) -> dict[tuple[int, int], npt.NDArray[np.uint8]]:
        out = {}
        for pair, (win_i, win_j) in windows.items():
            if k in pair:
                win = win_i if pair[0] == k else win_j
                out[pair] = np.ascontiguousarray(image[win.y0 : win.y1, win.x0 : win.x1])
        return out

    pp = cut(_grey_u8(read_rgb(tile.pp, "PP tile", shape), flat_pp))
    xp = cut(_grey_u8(read_rgb(tile.xp, "XP tile", shape), flat_xp)) if tile.xp is not None else {}
    return _Prepared(pp, xp)


def _prefetched(
    work: Callable[[int], _Prepared], workers: int, order: Sequence[int]
) -> Iterator[tuple[int, _Prepared]]:
    """`work(k)` for k in `order`, `workers` threads ahead at most (decoding releases the GIL)."""
    if workers <= 1:
        for k in order:
            yield k, work(k)
        return
    with ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[tuple[int, Future[_Prepared]]] = deque()
        ahead = iter(order)
        for k in itertools.islice(ahead, workers * 2):
            pending.append((k, pool.submit(work, k)))
        while pending:
            k, future = pending.popleft()
            result = future.result()
            nxt = next(ahead, None)
            if nxt is not None:
                pending.append((nxt, pool.submit(work, nxt)))
            yield k, result


def _measure(
    pair: tuple[int, int],
    strips: dict[int, _Prepared],
    windows: tuple[Window, Window],
    nominal_offset: npt.NDArray[np.float64],
    margin: int,
    min_score: float,
    fits: GainFits | None = None,
) -> PairShift:
    i, j = pair
    as_float = [strips[i].pp[pair].astype(np.float32), strips[j].pp[pair].astype(np.float32)]
    offset, score, shared = measure_shift(as_float[0], as_float[1], windows, nominal_offset, margin)
    if score < min_score and pair in strips[i].xp and pair in strips[j].xp:
        xp_a: FloatImage = strips[i].xp[pair].astype(np.float32)
        xp_b: FloatImage = strips[j].xp[pair].astype(np.float32)
        xp_offset, xp_score, xp_shared = measure_shift(xp_a, xp_b, windows, nominal_offset, margin)
        if xp_score > score:
            offset, score, shared = xp_offset, xp_score, xp_shared
    shift = PairShift(i, j, offset, score, shared)
    if fits is not None:
        fits.add(pair, strips, windows, shift)
    return shift


def measure_layout_pairs(
    tiles: Sequence[Tile],
    shape: tuple[int, int],
    nominal: npt.NDArray[np.float64],
    options: PlacementOptions,
    flat_pp: FlatField | None,
    flat_xp: FlatField | None,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
    fits: GainFits | None = None,
) -> list[PairShift]:
    """Shifts of the neighbours a layout names, reading each tile once, in rows of the layout."""
    margin = int(round(options.max_shift * max(shape)))
    pairs = neighbour_pairs(nominal, shape)
    windows = {p: overlap_windows(shape, nominal[p[1]] - nominal[p[0]], margin) for p in pairs}
    remaining = dict.fromkeys(range(len(tiles)), 0)
    for i, j in pairs:
        remaining[i] += 1
        remaining[j] += 1
    order = [int(k) for k in np.lexsort((nominal[:, 1], nominal[:, 0]))]
    strips: dict[int, _Prepared] = {}
    read: set[int] = set()
    shifts: list[PairShift] = []

    def work(k: int) -> _Prepared:
        return _strips(k, tiles[k], shape, windows, flat_pp, flat_xp)

    for done, (k, prepared) in enumerate(_prefetched(work, options.workers, order)):
        if cancel is not None and cancel():
            raise Cancelled()
        strips[k] = prepared
        read.add(k)
        for pair in [p for p in pairs if k in p and (p[0] if p[1] == k else p[1]) in read]:
            shifts.append(
                _measure(
                    pair, strips, windows[pair], nominal[pair[1]] - nominal[pair[0]], margin, options.min_score, fits
                )
            )
            for t in pair:
                remaining[t] -= 1
                if remaining[t] == 0:
                    strips.pop(t, None)
        if progress is not None:
            progress(done + 1, len(tiles))
    return shifts


def _reduced_detail(image: npt.NDArray[np.uint8], factor: int) -> FloatImage:
    """`image` reduced `factor` times by block means, its smooth part (vignetting the tiles share,
    which would pull every correlation to zero shift) taken away."""
    from scipy.ndimage import gaussian_filter  # deferred: scipy.ndimage costs ~0.1 s

    h, w = (image.shape[0] // factor) * factor, (image.shape[1] // factor) * factor
    small = image[:h, :w].astype(np.float32).reshape(h // factor, factor, w // factor, factor).mean(axis=(1, 3))
    return np.asarray(small - gaussian_filter(small, max(small.shape) / 16.0), dtype=np.float32)


def measure_all_pairs(
    tiles: Sequence[Tile],
    shape: tuple[int, int],
    options: PlacementOptions,
    flat_pp: FlatField | None,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
    fits: GainFits | None = None,
) -> list[PairShift]:
    """Without a layout: every pair on reduced PP copies, the overlapping ones again at full size."""
    factor = max(1, max(shape) // SEARCH_SIDE)
    min_score = max(options.min_score, MIN_SCORE_WITHOUT_LAYOUT)
    greys = [_grey_u8(read_rgb(t.pp, "PP tile", shape), flat_pp) for t in tiles]
    small = [_reduced_detail(g, factor) for g in greys]
    small_shape = small[0].shape
    padded_shape = (small_shape[0] * 2, small_shape[1] * 2)
    least = int(MIN_NOMINAL_OVERLAP * small_shape[0] * small_shape[1])
    shifts: list[PairShift] = []
    total = len(tiles) * (len(tiles) - 1) // 2
    margin = 2 * factor + 2
    for done, (i, j) in enumerate(itertools.combinations(range(len(tiles)), 2), start=1):
        if cancel is not None and cancel():
            raise Cancelled()
        a = np.zeros(padded_shape, np.float32)
        b = np.zeros(padded_shape, np.float32)
        a[: small_shape[0], : small_shape[1]] = small[i] - small[i].mean()
        b[: small_shape[0], : small_shape[1]] = small[j] - small[j].mean()
        peak = phase_peak(a, b)
        rough = np.array([_unwrap(peak[0], padded_shape[0]), _unwrap(peak[1], padded_shape[1])])
        low_window = (Window.whole(small_shape), Window.whole(small_shape))
        low_offset, low_score, _ = measure_shift(small[i], small[j], low_window, rough, 2, least)
        if low_score >= min_score:
            nominal = np.asarray(low_offset) * factor
            windows = overlap_windows(shape, nominal, margin)
            wa, wb = windows
            crop_a = greys[i][wa.y0 : wa.y1, wa.x0 : wa.x1].astype(np.float32)
            crop_b = greys[j][wb.y0 : wb.y1, wb.x0 : wb.x1].astype(np.float32)
            offset, score, shared = measure_shift(crop_a, crop_b, windows, nominal, margin)
            shift = PairShift(i, j, offset, score, shared)
            if fits is not None:
                pair = (i, j)
                strips = {
                    i: _Prepared({pair: crop_a.astype(np.uint8)}, {}),
                    j: _Prepared({pair: crop_b.astype(np.uint8)}, {}),
                }
                fits.add(pair, strips, windows, shift)
            shifts.append(shift)
        if progress is not None and (done % 64 == 0 or done == total):
            progress(done, total)
    return shifts


def _unwrap(value: float, size: int) -> float:
    return value - size if value > size / 2 else value


def plan_tiles(
    tiles: Sequence[Tile],
    options: PlacementOptions,
    progress: Progress | None = None,
    cancel: Callable[[], bool] | None = None,
) -> TilePlan:
    """Positions for `tiles`: flat fields, layout, neighbour shifts, global fit, and what to warn about."""
    if not tiles:
        raise ThinSegError("no tiles given")
    shape = tile_size(tiles[0])
    flat_pp = flat_xp = reference_flat_field(shape, options.flat_field)
    fits = GainFits(OverlapGainFit(shape), OverlapGainFit(shape)) if options.flat_field == "auto" else None
    nominal, layout = nominal_layout(tiles, shape, options)
    if len(tiles) == 1:
        placement = Placement(np.zeros((1, 2)), np.ones(1, dtype=bool))
    elif nominal is not None:
        shifts = measure_layout_pairs(tiles, shape, nominal, options, flat_pp, flat_xp, progress, cancel, fits)
        placement = solve_positions(len(tiles), shifts, nominal, min_score=options.min_score)
    else:
        shifts = measure_all_pairs(tiles, shape, options, flat_pp, progress, cancel, fits)
        min_score = max(options.min_score, MIN_SCORE_WITHOUT_LAYOUT)
        placement = solve_positions(len(tiles), shifts, None, min_score=min_score)
    if fits is not None:
        flat_pp, flat_xp = fits.pp.flat_field(), fits.xp.flat_field()
        if flat_pp is None:
            flat_pp, median_xp = median_flat_fields(tiles, shape)
            flat_xp = flat_xp or median_xp
        if flat_xp is None and any(t.xp is not None for t in tiles):
            flat_xp = flat_pp  # XP overlaps too dark or not correlated: the same lamp and objective light both
    used = np.ones(len(tiles), dtype=bool) if nominal is not None else placement.linked.copy()
    warnings = []
    unlinked = [t.pp.name for t, ok in zip(tiles, placement.linked) if not ok]
    if unlinked and nominal is not None:
        warnings.append(
            f"{len(unlinked)} tile(s) share no reliable overlap with the others and are placed by the layout only: "
            + _names(unlinked)
        )
    elif unlinked:
        if not options.drop_unlinked:
            raise ThinSegError(
                f"{len(unlinked)} tile(s) overlap no other tile, so they cannot be placed: {_names(unlinked)} "
                "(give a layout, or --drop-unlinked to leave them out)",
                tiles[int(np.flatnonzero(~placement.linked)[0])].pp,
            )
        warnings.append(f"{len(unlinked)} tile(s) overlap no other tile and are left out: {_names(unlinked)}")
    positions = np.rint(placement.positions).astype(np.int64)
    positions -= positions[used].min(axis=0)
    return TilePlan(list(tiles), shape, positions, used, placement, layout, flat_pp, flat_xp, warnings)


def _names(names: Sequence[str], most: int = 8) -> str:
    shown = ", ".join(names[:most])
    return shown + (f" and {len(names) - most} more" if len(names) > most else "")
