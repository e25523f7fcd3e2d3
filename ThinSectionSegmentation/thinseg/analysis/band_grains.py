"""Grains of one band of rows of a labelmap: found, split, measured.

A band is read from two rows above its own rows down to a halo below them. A region (connected
pixels of one class) belongs to the band whose own rows hold its first pixel (raster order),
and so do the grains it is split into, so every grain is measured exactly once: a region that
reaches the first row read started above and is left to an earlier band. The regions a band
owns, and the grain regions next to them, must lie whole in what was read, or the band is read
again with a larger halo (`BandGrains.needs_more_rows`). A grain is named across bands by the
raster index of its first pixel (`key`), which every band that holds its region whole computes
alike; a band lists the neighbours whose regions it holds whole, and the band below or above
lists the rest, so the merged lists are complete.

Regions come from runs: each row's runs of one label, linked to the overlapping runs of the same
class in the rows above and below, joined by a sparse-graph connected components (4-connected;
the run graph is about a hundredth of the pixels, so this is many times faster than labelling
each class's pixels). Only a few passes touch every pixel read; the split, the transitions
below the band's own rows and the measures work on the regions the band owns and those next to
them, so the halo costs little more than its reading and labelling.

Touching grains of one mineral are split as Segment Inspector does, by a watershed of the
distance transform from its maxima, made scale-free: a neck splits a region where the distance
at the saddle is below `neck_ratio` times the smaller peak's (h-maxima of log(distance + 1)).
The maxima are found on every second row and column (4x fewer pixels, the same maxima for any
grain wider than a few pixels), on each region's own crop: the crops are packed on one canvas,
apart, so one pass of the image filters serves a band and a region's seeds depend on nothing
but the region. Only regions holding two or more seeds are flooded, in their crop (scikit-image's
watershed, which keeps the flood inside the region), and the cut is carried to full resolution.

Perimeters and contact lengths are Cauchy-Crofton estimates from pixel transitions in four
directions (as scikit-image's `perimeter_crofton`): unbiased over orientations, where counting
pixel edges overstates a diagonal boundary by up to 27%.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from scipy import ndimage as ndi
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components
from skimage.segmentation import watershed

from thinseg.analysis.shapes import feret_diameters

#: Crofton weights of the four transition directions: horizontal, vertical, two diagonals.
DIRECTION_WEIGHTS = np.array([1.0, 1.0, 1 / math.sqrt(2), 1 / math.sqrt(2)]) * (math.pi / 8)
_FOUR = ndi.generate_binary_structure(2, 1)


@dataclass(frozen=True)
class BandRequest:
    """What a worker needs for one band: the rows read and where they lie in the section."""

    labels: npt.NDArray[np.uint8]  # (rows read, W)
    first_row: int  # section row of labels[0]
    own_rows: tuple[int, int]  # section rows this band owns, [y0, y1)
    section_shape: tuple[int, int]
    grain_classes: tuple[int, ...]  # label values cut into grains
    n_classes: int
    neck_ratio: float
    split: bool
    min_pixels: int
    block_px: int
    overlay_factor: int


@dataclass
class BandGrains:
    """A band's grains (columns, one row per grain it owns) and its share of the pixel counts."""

    needs_more_rows: bool = False
    columns: dict[str, npt.NDArray[np.float64]] = field(default_factory=dict)
    neighbour_pairs: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros((0, 2), np.int64))
    class_pixels: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    contacts: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros((4, 0, 0), np.int64))
    block_counts: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros((0, 0, 0), np.int64))
    overlay_labels: npt.NDArray[np.uint8] = field(default_factory=lambda: np.zeros((0, 0), np.uint8))
    overlay_outlines: npt.NDArray[np.bool_] = field(default_factory=lambda: np.zeros((0, 0), bool))
    small_grains: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    split_regions: int = 0
    tallest: int = 0  # rows of the tallest region the band owns or holds next to one it owns


#: Most cells a band numbers in a 16-bit image (the split's pieces are numbered after them; an
#: image whose numbers would pass 65535 is widened to 32 bits).
_UINT16_CELLS = 60_000


class Runs(NamedTuple):
    """A band's runs (stretches of one label along a row, in raster order): first pixel (flat
    index), length and cell (0: not classified)."""

    starts: npt.NDArray[np.int64]
    lengths: npt.NDArray[np.int64]
    cell: npt.NDArray[np.integer[Any]]

    def paint(self, rows: int, width: int) -> npt.NDArray[np.integer[Any]]:
        """The cell numbers of the band's first `rows` rows (16-bit where they fit: the image is
        most of a band's memory)."""
        end = int(np.searchsorted(self.starts, rows * width))
        return np.repeat(self.cell[:end], self.lengths[:end]).reshape(rows, width)


@dataclass
class Cells:
    """A band's cells numbered 1..n: grain regions (or, after the split, grains), then one cell
    per other class present. Per cell (index cell - 1): class, bounding box (first row, end row,
    first column, end column), pixels, first pixel (flat index in the band, raster order) and
    runs (row stretches; pixels / runs is the mean chord across the cell). `image` holds the cell
    numbers of the band's first rows, as many as the analysis needs (`Runs.paint`)."""

    image: npt.NDArray[np.integer[Any]]
    cls: npt.NDArray[np.uint8]
    box: npt.NDArray[np.int64]
    area: npt.NDArray[np.int64]
    first: npt.NDArray[np.int64]
    runs: npt.NDArray[np.int64]

    @property
    def count(self) -> int:
        return int(self.cls.size)


def label_cells(labels: npt.NDArray[np.uint8], is_grain_class: npt.NDArray[np.bool_]) -> tuple[Cells, Runs]:
    """Connected regions (4-connected) of every grain class, numbered 1.. in raster order of
    their first pixels, then one cell per other class present (matrix: a continuous phase, never
    cut); label 0, not classified, stays 0. The cells come without an image (no rows painted)."""
    rows, width = labels.shape
    flat = labels.ravel()
    change = np.empty(flat.size, bool)
    change[0] = True
    np.not_equal(flat[1:], flat[:-1], out=change[1:])
    change[::width] = True  # runs end at each row's end
    starts = np.flatnonzero(change)
    del change
    run_class = flat[starts]
    lengths = np.diff(starts, append=flat.size)
    grain = is_grain_class[run_class]
    # runs of adjacent rows overlap where the first pixel of one lies in the other
    firsts, seconds = [], []
    for step, side in ((-width, starts >= width), (width, starts < flat.size - width)):
        mine = np.flatnonzero(grain & side)
        other = np.searchsorted(starts, starts[mine] + step, side="right") - 1
        same = run_class[other] == run_class[mine]
        firsts.append(mine[same])
        seconds.append(other[same])
    i, j = np.concatenate(firsts), np.concatenate(seconds)
    n_runs = starts.size
    graph = coo_matrix((np.ones(i.size, np.int8), (i, j)), shape=(n_runs, n_runs)).tocsr()
    component = connected_components(graph, directed=False)[1]
    run_cell = np.zeros(n_runs, np.int32)
    on = np.flatnonzero(grain)
    found, first_run = np.unique(component[on], return_index=True)
    number = np.empty(found.size, np.int32)
    number[np.argsort(first_run, kind="stable")] = np.arange(1, found.size + 1, dtype=np.int32)
    run_cell[on] = number[np.searchsorted(found, component[on])]
    classes = np.zeros(found.size, np.uint8)
    classes[number - 1] = run_class[on[first_run]]
    other = (~grain) & (run_class > 0)
    matrix = np.unique(run_class[other])
    run_cell[other] = found.size + 1 + np.searchsorted(matrix, run_class[other]).astype(np.int32)
    classes = np.concatenate([classes, matrix.astype(np.uint8)])
    small = classes.size < _UINT16_CELLS
    runs_of = Runs(starts, lengths, run_cell.astype(np.uint16) if small else run_cell)
    image = np.zeros((0, width), np.uint16 if small else np.int32)
    n = classes.size
    if n == 0:
        empty = np.zeros(0, np.int64)
        return Cells(image, classes, np.zeros((0, 4), np.int64), empty, empty, empty), runs_of
    keep = np.flatnonzero(run_cell)
    order = keep[np.argsort(run_cell[keep], kind="stable")]  # per cell, its runs in raster order
    cell = run_cell[order]
    group = np.flatnonzero(np.concatenate([[True], cell[1:] != cell[:-1]]))
    first = starts[order[group]].astype(np.int64)
    last = starts[order[np.append(group[1:], cell.size) - 1]]
    col0 = starts[order] % width
    box = np.stack(
        [
            first // width,
            last // width + 1,
            np.minimum.reduceat(col0, group),
            np.maximum.reduceat(col0 + lengths[order], group),
        ],
        axis=1,
    ).astype(np.int64)
    area = np.add.reduceat(lengths[order], group).astype(np.int64)
    runs = np.diff(group, append=cell.size).astype(np.int64)
    return Cells(image, classes, box, area, first, runs), runs_of


#: Zero pixels around each region's crop on the canvas of `dome_seeds`: more than a region's own
#: outline leaves between its inner pixels and another crop's, so no crop's distances or domes
#: see another's.
_GAP = 3


def _pack(shapes: list[tuple[int, int]]) -> tuple[list[tuple[int, int]], tuple[int, int]]:
    """Places boxes of the given shapes on shelves of a canvas, _GAP apart and from its edges;
    returns each box's top-left corner and the canvas's shape."""
    order = sorted(range(len(shapes)), key=lambda k: -shapes[k][0])
    area = sum((h + _GAP) * (w + _GAP) for h, w in shapes)
    side = max(max(w for _, w in shapes) + 2 * _GAP, int(math.sqrt(area) * 1.5))
    corners = [(0, 0)] * len(shapes)
    y = x = _GAP
    shelf = 0
    for k in order:
        h, w = shapes[k]
        if x + w + _GAP > side:
            y, x, shelf = y + shelf + _GAP, _GAP, 0
        corners[k] = (y, x)
        x += w + _GAP
        shelf = max(shelf, h)
    return corners, (y + shelf + _GAP, side)


def dome_seeds(
    crops: list[npt.NDArray[np.bool_]], neck_ratio: float, step: int = 2
) -> tuple[list[npt.NDArray[np.int32]], list[npt.NDArray[np.float32]]]:
    """Per crop (one region's pixels on every `step`-th row and column, its bounding box), the
    watershed seeds (numbered, 0 none) and landscape: the h-maxima of log(distance + 1), distance
    from a pixel to the nearest pixel outside the region in units of two pixels (the finest grid's
    spacing, so that the criterion is the same on every grid)."""
    inners = []
    for crop in crops:
        inner = crop.copy()  # region pixels whose four neighbours are in it too
        inner[1:] &= crop[:-1]
        inner[:-1] &= crop[1:]
        inner[:, 1:] &= crop[:, :-1]
        inner[:, :-1] &= crop[:, 1:]
        inner[[0, -1]] = False
        inner[:, [0, -1]] = False
        inners.append(inner)
    corners, shape = _pack([c.shape for c in crops])
    canvas = np.zeros(shape, np.uint8)
    for (y, x), inner in zip(corners, inners):
        canvas[y : y + inner.shape[0], x : x + inner.shape[1]] = inner
    image = sitk.GetImageFromArray(canvas)
    image.SetSpacing((step / 2, step / 2))
    distance = sitk.SignedMaurerDistanceMap(
        image, insideIsPositive=True, squaredDistance=False, useImageSpacing=True, backgroundValue=0
    )
    distance = sitk.Log(sitk.Maximum(distance, 0.0) + 1.0)
    depth = math.log(1.0 / neck_ratio)
    # f - hmax(f): each dome of height >= depth keeps a cap above its flattened level, one
    # connected cap however many equal peaks it holds; shallower domes' caps never reach depth
    domes = sitk.GetArrayFromImage(sitk.HConvex(distance, depth))
    caps = sitk.GetArrayFromImage(sitk.ConnectedComponent(sitk.GetImageFromArray((domes > 0).view(np.uint8)), True))
    deep = np.zeros(int(caps.max()) + 1, np.int32)
    deep[np.unique(caps[domes >= depth * 0.999])] = 1
    deep[0] = 0
    numbers = np.cumsum(deep, dtype=np.int32) * deep
    markers: npt.NDArray[np.int32] = numbers[caps]
    markers[canvas == 0] = 0
    landscape = sitk.GetArrayFromImage(distance).astype(np.float32, copy=False)
    seeds, lands = [], []
    for (y, x), crop in zip(corners, crops):
        window = (slice(y, y + crop.shape[0]), slice(x, x + crop.shape[1]))
        seeds.append(markers[window])
        lands.append(landscape[window])
    return seeds, lands


#: Most one-pixel growth steps that hand full-resolution pixels the half-resolution cut missed
#: to a neighbouring piece (slivers thinner than two pixels).
_FILL_STEPS = 64


#: Mean chord (pixels / runs) from which a region's seeds are sought on every 4th, then every
#: 8th row and column instead of every 2nd: its grains are wide enough (a chord of 96 px is a
#: disc of radius 60) that the coarser grid finds the same domes, in a quarter or a sixteenth of
#: the pixels. Steps are aligned to the section's rows, so a region's grid never depends on the
#: band that reads it.
_COARSER_CHORDS = (96.0, 192.0)


def _grid_step(area: int, runs: int) -> int:
    """Every how many rows and columns a region's seeds are sought (2, 4 or 8)."""
    chord = area / max(runs, 1)
    return 2 << sum(chord >= c for c in _COARSER_CHORDS)


def split_regions(
    cells: Cells, candidates: npt.NDArray[np.int64], neck_ratio: float, first_row: int = 0
) -> tuple[Cells, int, list[int]]:
    """Candidate regions holding two or more seeds cut by a watershed of the distance landscape.

    The cut is made on a grid of every second row and column (every 4th or 8th for regions of
    wide grains: `_COARSER_CHORDS`), 4x or more fewer pixels to flood, and carried to full
    resolution; region pixels the coarse grid missed join the piece next to them, and the pixels
    near the cut are flooded again there. Returns the cells renumbered (new pieces numbered after
    the last cell, with their boxes, pixels and first pixels), how many regions were cut and the
    region each number comes from. `first_row` is the section row of the band's first row."""
    image = cells.image
    width = image.shape[1]
    parents = list(range(1, cells.count + 1))
    by_step: dict[int, tuple[list[npt.NDArray[np.bool_]], list[tuple[int, int, int]]]] = {}
    for rid in candidates:
        y0, y1, x0, x1 = (int(v) for v in cells.box[rid - 1])
        step = _grid_step(int(cells.area[rid - 1]), int(cells.runs[rid - 1]))
        r0 = -(-(first_row + y0) // step) * step - first_row  # first grid row (section rows % step == 0)
        c0 = -(-x0 // step) * step
        if len(range(r0, y1, step)) < 3 or len(range(c0, x1, step)) < 3:
            continue  # no pixel with four neighbours in the region: no seed
        crops, chosen = by_step.setdefault(step, ([], []))
        crops.append(image[r0:y1:step, c0:x1:step] == rid)
        chosen.append((int(rid), r0, c0))
    boxes, classes, areas, firsts = [cells.box], [cells.cls], [cells.area], [cells.first.copy()]
    next_id = cells.count + 1
    n_split = 0
    for step, (crops, chosen) in sorted(by_step.items()):
        seeds, lands = dome_seeds(crops, neck_ratio, step)
        for (rid, r0, c0), crop, seed_img, land in zip(chosen, crops, seeds, lands):
            present = seed_img[seed_img > 0]
            if present.size == 0 or present.min() == present.max():
                continue
            n_split += 1
            y0, y1, x0, x1 = (int(v) for v in cells.box[rid - 1])
            pieces_grid = watershed(-land, seed_img, mask=crop)  # type: ignore[no-untyped-call]
            mask = image[y0:y1, x0:x1] == rid
            along = np.clip((np.arange(y0, y1) - r0) // step, 0, crop.shape[0] - 1)
            across = np.clip((np.arange(x0, x1) - c0) // step, 0, crop.shape[1] - 1)
            pieces = pieces_grid[np.ix_(along, across)].astype(np.int32, copy=False)
            pieces *= mask
            _fill_missed(pieces, mask)
            _recut_at_full_resolution(pieces, mask, step, _grid_cut_box(pieces_grid, r0 - y0, c0 - x0, step))
            inside = pieces[mask]
            tally = np.bincount(inside)
            values = np.flatnonzero(tally)  # the pieces' seed numbers, ascending: the first keeps `rid`
            if values.size < 2:
                continue
            m = len(values)
            numbers = np.zeros(int(values.max()) + 1, np.int32)
            numbers[values] = [rid, *range(next_id, next_id + m - 1)]
            if next_id + m > np.iinfo(image.dtype).max:
                image = image.astype(np.int32)
            view = image[y0:y1, x0:x1]
            view[mask] = numbers[inside]
            counts = tally[values]
            found = ndi.find_objects(pieces)
            piece_box = np.array(
                [
                    [
                        y0 + found[v - 1][0].start,
                        y0 + found[v - 1][0].stop,
                        x0 + found[v - 1][1].start,
                        x0 + found[v - 1][1].stop,
                    ]
                    for v in values
                ],
                np.int64,
            )
            # a piece's first pixel: in its box's first row, the first of its pixels
            piece_first = np.array(
                [(b[0] * width + b[2] + int(np.argmax(pieces[b[0] - y0] == v))) for v, b in zip(values, piece_box)],
                np.int64,
            )
            boxes[0][rid - 1] = piece_box[0]
            areas[0][rid - 1] = counts[0]
            firsts[0][rid - 1] = piece_first[0]
            boxes.append(piece_box[1:])
            areas.append(counts[1:].astype(np.int64))
            firsts.append(piece_first[1:].astype(np.int64))
            classes.append(np.full(m - 1, cells.cls[rid - 1], np.uint8))
            parents += [rid] * (m - 1)
            next_id += m - 1
    n_new = next_id - 1 - cells.count
    out = Cells(
        image,
        np.concatenate(classes),
        np.concatenate(boxes),
        np.concatenate(areas),
        np.concatenate(firsts),
        np.concatenate([cells.runs, np.zeros(n_new, np.int64)]),  # runs: of the regions only
    )
    return out, n_split, parents


def _grid_cut_box(pieces: npt.NDArray[np.int32], dy: int, dx: int, step: int) -> tuple[int, int, int, int]:
    """Where the cuts between pieces on a grid of every `step`-th row and column (its first
    point `dy`, `dx` from the box of the full-resolution pieces) can lie at full resolution:
    (first row, end row, first column, end column) in that box, `step` wider on every side."""
    cut = np.zeros(pieces.shape, bool)
    for a, b, first, second in (
        (pieces[:, :-1], pieces[:, 1:], cut[:, :-1], cut[:, 1:]),
        (pieces[:-1], pieces[1:], cut[:-1], cut[1:]),
    ):
        differ = (a != b) & (a > 0) & (b > 0)
        first |= differ
        second |= differ
    rows, cols = np.flatnonzero(cut.any(axis=1)), np.flatnonzero(cut.any(axis=0))
    if rows.size == 0:
        return (0, 0, 0, 0)
    return (
        dy + int(rows[0]) * step - step,
        dy + (int(rows[-1]) + 1) * step + step,
        dx + int(cols[0]) * step - step,
        dx + (int(cols[-1]) + 1) * step + step,
    )


def _recut_at_full_resolution(
    pieces: npt.NDArray[np.int32],
    mask: npt.NDArray[np.bool_],
    step: int = 2,
    within: tuple[int, int, int, int] | None = None,
) -> None:
    """Flood the pixels near the cuts between pieces again (`step` pixels on either side of a cut
    made on a grid of every `step`-th row and column, so that the cut is a line of the pixel
    grid, not a staircase of `step`-pixel steps), on the full-resolution distance transform of
    the region around the cuts. Cuts are sought `within` a box (rows, columns) when given: where
    the coarse grid's cuts lie."""
    height, width = pieces.shape
    wy0, wy1, wx0, wx1 = within if within is not None else (0, height, 0, width)
    wy0, wx0, wy1, wx1 = max(wy0, 0), max(wx0, 0), min(wy1, height), min(wx1, width)
    if wy1 <= wy0 or wx1 <= wx0:
        return
    part = pieces[wy0:wy1, wx0:wx1]
    cut = np.zeros(part.shape, bool)
    for a, b, first, second in (
        (part[:, :-1], part[:, 1:], cut[:, :-1], cut[:, 1:]),
        (part[:-1], part[1:], cut[:-1], cut[1:]),
    ):
        differ = (a != b) & (a > 0) & (b > 0)
        first |= differ
        second |= differ
    rows, cols = np.flatnonzero(cut.any(axis=1)) + wy0, np.flatnonzero(cut.any(axis=0)) + wx0
    if rows.size == 0:
        return
    # only the cut's surroundings: a box around it, step + 1 wider (seeds on its rim)
    pad = step + 1
    y0, y1 = max(0, int(rows[0]) - pad), min(height, int(rows[-1]) + pad + 1)
    x0, x1 = max(0, int(cols[0]) - pad), min(width, int(cols[-1]) + pad + 1)
    around = np.zeros((y1 - y0, x1 - x0), bool)
    oy0, oy1, ox0, ox1 = max(y0, wy0), min(y1, wy1), max(x0, wx0), min(x1, wx1)
    around[oy0 - y0 : oy1 - y0, ox0 - x0 : ox1 - x0] = cut[oy0 - wy0 : oy1 - wy0, ox0 - wx0 : ox1 - wx0]
    box = (slice(y0, y1), slice(x0, x1))
    sub_mask = mask[box]
    near = ndi.binary_dilation(around, structure=_FOUR, iterations=step) & sub_mask
    # the exact distance to the region's edge there (the box's own sides continue the region:
    # edge padding), whose ridge along the neck is sharp where a coarse one is flat
    distance = ndi.distance_transform_edt(np.pad(sub_mask, pad, mode="edge"))[pad:-pad, pad:-pad]
    sub = pieces[box]
    # flooded: the pixels near the cut and their rim of kept pixels, the seeds (pixels farther
    # off never take part in a flood from the rim)
    flood = ndi.binary_dilation(near, structure=_FOUR) & sub_mask
    seeds = np.where(flood & ~near, sub, 0)
    sub[flood] = watershed(-distance, seeds, mask=flood)[flood]  # type: ignore[no-untyped-call]


def _fill_missed(pieces: npt.NDArray[np.int32], mask: npt.NDArray[np.bool_]) -> None:
    """Region pixels without a piece take a 4-neighbour's piece, one pixel layer per step."""
    ys, xs = np.nonzero(mask & (pieces == 0))
    h, w = pieces.shape
    for _ in range(_FILL_STEPS):
        if ys.size == 0:
            return
        best = np.zeros(ys.size, np.int32)
        for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            ny, nx = np.clip(ys + dy, 0, h - 1), np.clip(xs + dx, 0, w - 1)
            np.maximum(best, pieces[ny, nx], out=best)
        pieces[ys, xs] = best
        left = best == 0
        ys, xs = ys[left], xs[left]
    if ys.size:
        present = pieces[mask & (pieces > 0)]
        pieces[ys, xs] = present[0] if present.size else 1


class Transitions(NamedTuple):
    """Pixel pairs of one direction that differ: the first pixel's row and column, the cells
    and the classes on both sides."""

    row: npt.NDArray[np.int64]
    col: npt.NDArray[np.int64]
    a: npt.NDArray[np.int64]
    b: npt.NDArray[np.int64]
    class_a: npt.NDArray[np.uint8]
    class_b: npt.NDArray[np.uint8]


def transitions(
    cells: npt.NDArray[np.integer[Any]], labels: npt.NDArray[np.uint8], first_row: int = 0, directions: int = 4
) -> list[Transitions]:
    """Per direction (horizontal, vertical, two diagonals), the pixel pairs whose cells (grains
    and matrix regions) differ; rows are numbered from `first_row`. The pairs are found on the
    flattened rows (a pixel's right, lower, lower-right and lower-left neighbours lie 1, W,
    W + 1 and W - 1 further on), leaving out pairs that would wrap round a row's end. Only the
    first `directions` directions when fewer are asked for."""
    width = cells.shape[1]
    flat, classes = cells.ravel(), labels.ravel()
    out = []
    for offset, wraps_at in ((1, width - 1), (width, -1), (width + 1, width - 1), (width - 1, 0))[:directions]:
        n = max(flat.size - offset, 0)
        index = np.flatnonzero(flat[:n] != flat[offset : offset + n])
        col = index % width
        if wraps_at >= 0:
            keep = col != wraps_at
            index, col = index[keep], col[keep]
        second = index + offset
        out.append(
            Transitions(
                index // width + first_row,
                col,
                flat[index].astype(np.int64),
                flat[second].astype(np.int64),
                classes[index],
                classes[second],
            )
        )
    return out


def _picked(pairs: Transitions, keep: npt.NDArray[np.bool_]) -> Transitions:
    return Transitions(
        pairs.row[keep], pairs.col[keep], pairs.a[keep], pairs.b[keep], pairs.class_a[keep], pairs.class_b[keep]
    )


def _joined(parts: list[list[Transitions]]) -> list[Transitions]:
    return [Transitions(*(np.concatenate(f) for f in zip(*same))) for same in zip(*parts)]


def analyze_band(request: BandRequest) -> BandGrains:
    """Find, split and measure the grains of one band (see the module's docstring)."""
    labels = request.labels
    rows, width = labels.shape
    top = request.first_row
    own0, own1 = request.own_rows
    height = request.section_shape[0]
    is_grain_class = np.zeros(256, bool)
    is_grain_class[list(request.grain_classes)] = True
    cells, runs = label_cells(labels, is_grain_class)
    n_regions = cells.count
    box_rows = cells.box[:, :2]
    is_grain = is_grain_class[cells.cls]
    cut_above = top > 0
    cut_below = top + rows < height
    # whole: neither reaches a row where the read stopped short of the section's edge
    from_above = (box_rows[:, 0] == 0) & cut_above
    whole = ~from_above & ~((box_rows[:, 1] == rows) & cut_below)
    owned = is_grain & ~from_above & (box_rows[:, 0] + top >= own0) & (box_rows[:, 0] + top < own1)
    # rows an owned region reaches, and one more (its pairs with the row below)
    reach = min(rows, int(box_rows[owned, 1].max()) + 1) if owned.any() else 0
    if (owned & ~whole).any():
        return BandGrains(needs_more_rows=True)
    cells.image = runs.paint(max(reach, min(rows, own1 - top + 1)), width)
    near = _touching(cells.image[max(0, own1 - top - 1) : reach], owned) & is_grain & ~from_above
    if (near & ~whole).any():
        return BandGrains(needs_more_rows=True)
    # the rows the analysis reads: those of the regions it splits, and the own rows' next row
    needed = max(cells.image.shape[0], int(box_rows[near, 1].max()) if near.any() else 0)
    if needed > cells.image.shape[0]:
        cells.image = runs.paint(needed, width)
    result = BandGrains()
    heights = box_rows[:, 1] - box_rows[:, 0]
    result.tallest = int(heights[owned | near].max()) if (owned | near).any() else 0
    parents: list[int] = list(range(1, n_regions + 1))
    if request.split and owned.any():
        candidates = np.flatnonzero(owned | near) + 1
        cells, _, parents = split_regions(cells, candidates, request.neck_ratio, top)
    grains = cells.image
    pid = np.asarray(parents, np.int64) - 1
    # regions cut into pieces, counted by the band that owns them (those next to them are cut
    # here only to name their grains)
    result.split_regions = int(np.count_nonzero(owned[np.unique(pid[n_regions:])]))
    owned, near, whole, is_grain = owned[pid], near[pid], whole[pid], is_grain[pid]
    grain_class = cells.cls
    n_cells = cells.count
    pairs = _band_transitions(grains, labels, own1 - top, reach, np.concatenate([[False], owned | near]))
    area = cells.area
    keys = np.concatenate([[-1], top * width + cells.first])
    crofton = np.zeros(n_cells + 1)
    for pair, weight in zip(pairs, DIRECTION_WEIGHTS):
        crofton += weight * (np.bincount(pair.a, minlength=n_cells + 1) + np.bincount(pair.b, minlength=n_cells + 1))
    # the section's edge closes the outline of a grain cut by it (one crossing per direction there)
    # (the rows painted hold every owned grain; the last row read is among them if one reaches it)
    last = [grains[-1]] if not cut_below and grains.shape[0] == rows else []
    border = [grains[:, 0], grains[:, -1]] + ([grains[0]] if top == 0 else []) + last
    crofton += (DIRECTION_WEIGHTS[0] + 2 * DIRECTION_WEIGHTS[2]) * np.bincount(
        np.concatenate(border), minlength=n_cells + 1
    )
    listed = is_grain & (area >= request.min_pixels)
    measured = np.flatnonzero(owned & listed) + 1
    small = owned & is_grain & (area < request.min_pixels)
    result.small_grains = np.bincount(grain_class[small], weights=area[small], minlength=request.n_classes + 1)
    result.small_grains = result.small_grains.astype(np.int64)
    unsplit = np.ones(n_cells, bool)
    unsplit[pid[n_regions:]] = False  # regions cut into pieces, and the pieces
    unsplit[n_regions:] = False
    result.columns = _measure(grains, cells, measured, crofton, keys, top, request.section_shape, runs, unsplit)
    result.neighbour_pairs = _neighbour_pairs(pairs, keys, owned & listed, listed & whole)
    own = slice(own0 - top, own1 - top)
    result.block_counts = _row_block_counts(labels[own], request.block_px, request.n_classes)
    result.class_pixels = _class_pixels(labels[own], request.n_classes)
    region_of = np.concatenate([[0], pid + 1])
    result.contacts = _contacts(
        pairs, (own0 - top, own1 - top), request.n_classes, region_of, np.concatenate([[False], owned])
    )
    result.overlay_labels, result.overlay_outlines = _overlay(
        labels, pairs, np.concatenate([[False], is_grain]), (own0 - top, own1 - top), top, request.overlay_factor
    )
    return result


def _band_transitions(
    grains: npt.NDArray[np.integer[Any]],
    labels: npt.NDArray[np.uint8],
    own_end: int,
    reach: int,
    kept: npt.NDArray[np.bool_],
) -> list[Transitions]:
    """Transitions of the band's own rows (and their pairs with the next row), then of the rows
    below, down to `reach`, among the `kept` cells only (the regions the band owns and those next
    to them): those rows serve only the owned grains' outlines, neighbours and inner contacts."""
    head = min(own_end + 1, labels.shape[0])
    upper = transitions(grains[:head], labels[:head])
    if head == labels.shape[0] or reach <= own_end:
        return upper
    keep = upper[0].row < own_end  # that row's own pairs are counted below
    upper[0] = _picked(upper[0], keep)
    below = [
        _picked(p, kept[p.a] | kept[p.b]) for p in transitions(grains[own_end:reach], labels[own_end:reach], own_end)
    ]
    return _joined([upper, below])


def _touching(region: npt.NDArray[np.integer[Any]], owned: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Regions next to an owned region: split here too, so their grains get the keys their
    own band gives them. Regions that start below the band's own rows meet owned ones only
    from the last own row down to the owned regions' last rows, so only those rows are passed."""
    is_owned = np.concatenate([[False], owned])
    out = np.zeros(owned.size + 1, bool)
    if region.shape[0]:
        for pair in transitions(region, np.zeros(region.shape, np.uint8), directions=2):
            out[pair.b[is_owned[pair.a]]] = True
            out[pair.a[is_owned[pair.b]]] = True
    return out[1:] & ~owned


class _RunShapes(NamedTuple):
    """Per cell, from its runs: pixel sums (rows, columns, their squares, their product;
    relative to the cell's box) and each row's first and last pixel (rows, columns)."""

    sums: npt.NDArray[np.float64]  # (cells, 5): y, x, yy, xx, xy
    ends: list[tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]]


def _run_shapes(runs: Runs, box: npt.NDArray[np.int64], ids: npt.NDArray[np.int64], width: int) -> _RunShapes:
    """The sums and row ends of the cells `ids` (ascending) in closed form over their runs: no
    pixel is visited, where a grain's pixels cost a pass each."""
    want = np.zeros(int(ids.max()) + 1 if ids.size else 1, bool)
    want[ids] = True
    pick = np.flatnonzero(want[np.minimum(runs.cell, want.size - 1)] & (runs.cell < want.size))
    cell = runs.cell[pick].astype(np.int64)
    order = np.argsort(cell, kind="stable")  # per cell, its runs in raster order
    pick, cell = pick[order], cell[order]
    start, n = runs.starts[pick], runs.lengths[pick].astype(np.float64)
    row, col = start // width - box[cell - 1, 0], start % width - box[cell - 1, 2]
    y, x = row.astype(np.float64), col.astype(np.float64)
    sx = n * x + n * (n - 1) / 2
    sums = [n * y, sx, n * y * y, n * x * x + x * n * (n - 1) + (n - 1) * n * (2 * n - 1) / 6, y * sx]
    slot = np.searchsorted(ids, cell)
    table = np.stack([np.bincount(slot, weights=w, minlength=ids.size) for w in sums], axis=1).astype(np.float64)
    new_row = np.flatnonzero(np.concatenate([[True], (cell[1:] != cell[:-1]) | (row[1:] != row[:-1])]))
    last = np.append(new_row[1:], cell.size) - 1
    split_at = np.searchsorted(cell[new_row], ids)
    ends = []
    for a, b in zip(split_at, np.append(split_at[1:], new_row.size)):
        first_runs, last_runs = pick[new_row[a:b]], pick[last[a:b]]
        rows = np.concatenate([row[new_row[a:b]], row[last[a:b]]])
        cols = np.concatenate(
            [runs.starts[first_runs] % width, runs.starts[last_runs] % width + runs.lengths[last_runs] - 1]
        )
        ends.append((rows.astype(np.int64), cols.astype(np.int64)))
    return _RunShapes(table, ends)


def _measure(
    grains: npt.NDArray[np.integer[Any]],
    cells: Cells,
    measured: npt.NDArray[np.int64],
    crofton: npt.NDArray[np.float64],
    keys: npt.NDArray[np.int64],
    top: int,
    section_shape: tuple[int, int],
    runs: Runs | None = None,
    from_runs: npt.NDArray[np.bool_] | None = None,
) -> dict[str, npt.NDArray[np.float64]]:
    """Per-grain columns in pixels (the caller converts to mm). Grains marked in `from_runs`
    (per cell: regions not split, whose runs are `runs`) are measured from their runs, the others
    from their pixels."""
    n = len(measured)
    cols = {
        name: np.zeros(n)
        for name in (
            "key",
            "class",
            "area_px",
            "row",
            "col",
            "perimeter_px",
            "feret_max_px",
            "feret_min_px",
            "feret_angle_deg",
            "orientation_deg",
            "major_axis_px",
            "minor_axis_px",
            "touches_edge",
        )
    }
    height, width = section_shape
    by_runs = measured[from_runs[measured - 1]] if runs is not None and from_runs is not None else measured[:0]
    shapes = _run_shapes(runs, cells.box, by_runs, grains.shape[1]) if runs is not None and by_runs.size else None
    slot = {int(g): k for k, g in enumerate(by_runs)}
    for i, gid in enumerate(measured):
        y0, y1, x0, x1 = (int(v) for v in cells.box[gid - 1])
        n_px = float(cells.area[gid - 1])
        k = slot.get(int(gid))
        if shapes is not None and k is not None:
            sy, sx, syy, sxx, sxy = (float(v) for v in shapes.sums[k])
            cy, cx = sy / n_px, sx / n_px
            myy = syy / n_px - cy * cy + 1 / 12
            mxx = sxx / n_px - cx * cx + 1 / 12
            mxy = sxy / n_px - cy * cx
            end_rows, end_cols = shapes.ends[k]
            end_cols = end_cols - x0
        else:
            ys, xs = np.nonzero(grains[y0:y1, x0:x1] == gid)
            fy, fx = ys.astype(np.float64), xs.astype(np.float64)
            cy, cx = float(fy.sum()) / n_px, float(fx.sum()) / n_px
            fy -= cy
            fx -= cx
            # element-wise sums, not BLAS dot products: a BLAS's own threads would contend with the workers
            myy = float((fy * fy).sum()) / n_px + 1 / 12
            mxx = float((fx * fx).sum()) / n_px + 1 / 12
            mxy = float((fy * fx).sum()) / n_px
            # the hull of a pixel set is the hull of each row's first and last pixels
            breaks = np.flatnonzero(ys[1:] != ys[:-1]) + 1  # nonzero lists pixels row by row
            ends = np.concatenate([[0], breaks, breaks - 1, [ys.size - 1]])
            end_rows, end_cols = ys[ends].astype(np.int64), xs[ends].astype(np.int64)
        spread = math.sqrt(((mxx - myy) / 2) ** 2 + mxy**2)
        major, minor = 4 * math.sqrt((mxx + myy) / 2 + spread), 4 * math.sqrt(max((mxx + myy) / 2 - spread, 0.0))
        orientation = math.degrees(0.5 * math.atan2(-2 * mxy, mxx - myy))
        feret_max, feret_min, feret_angle = feret_diameters(end_rows, end_cols)
        gy0 = top + y0
        cols["key"][i] = keys[gid]
        cols["class"][i] = cells.cls[gid - 1]
        cols["area_px"][i] = n_px
        cols["row"][i] = gy0 + cy
        cols["col"][i] = x0 + cx
        cols["perimeter_px"][i] = crofton[gid]
        cols["feret_max_px"][i] = feret_max
        cols["feret_min_px"][i] = feret_min
        cols["feret_angle_deg"][i] = feret_angle
        cols["orientation_deg"][i] = orientation
        cols["major_axis_px"][i] = major
        cols["minor_axis_px"][i] = minor
        cols["touches_edge"][i] = float(gy0 == 0 or top + y1 >= height or x0 == 0 or x1 >= width)
    return cols


def _neighbour_pairs(
    pairs: list[Transitions],
    keys: npt.NDArray[np.int64],
    owned: npt.NDArray[np.bool_],
    reliable: npt.NDArray[np.bool_],
) -> npt.NDArray[np.int64]:
    """(key of an owned grain, key of a grain it touches) for the touching grains this band
    holds whole (4-neighbours; both big enough to be listed)."""
    a = np.concatenate([p.a for p in pairs[:2]])
    b = np.concatenate([p.b for p in pairs[:2]])
    own = np.concatenate([[False], owned])
    ok = np.concatenate([[False], reliable])
    forward = own[a] & ok[b]
    backward = own[b] & ok[a]
    first = np.concatenate([a[forward], b[backward]])
    second = np.concatenate([b[forward], a[backward]])
    packed = np.unique(first << 32 | second)
    ids = np.stack([packed >> 32, packed & 0xFFFFFFFF], axis=1)
    out: npt.NDArray[np.int64] = keys[ids] if ids.size else np.zeros((0, 2), np.int64)
    return out


def _contacts(
    pairs: list[Transitions],
    own: tuple[int, int],
    n_classes: int,
    region_of: npt.NDArray[np.int64],
    owned: npt.NDArray[np.bool_],
) -> npt.NDArray[np.int64]:
    """Transitions between each pair of classes, per direction: (4, classes + 1, classes + 1)
    counts over the band's own rows, upper triangle (the caller weighs and mirrors them).

    The diagonal holds the boundaries between touching grains of one class. Those inside a
    region split into grains are counted whole by the band that owns the region, wherever their
    rows lie: no other band splits it alike."""
    own0, own1 = own
    side = n_classes + 1
    out = np.zeros((4, side, side), np.int64)
    for k, pair in enumerate(pairs):
        inside = region_of[pair.a] == region_of[pair.b]
        keep = np.where(inside, owned[pair.a], (pair.row >= own0) & (pair.row < own1))
        la = pair.class_a[keep].astype(np.int64)
        lb = pair.class_b[keep].astype(np.int64)
        counts = np.bincount(np.minimum(la, lb) * side + np.maximum(la, lb), minlength=side * side)
        out[k] = counts.reshape(side, side)
    return out


def contact_lengths(counts: npt.NDArray[np.int64]) -> npt.NDArray[np.float64]:
    """Crofton boundary lengths (pixels) from summed transition counts, made symmetric."""
    upper = np.tensordot(DIRECTION_WEIGHTS, counts.astype(np.float64), axes=1)
    lengths: npt.NDArray[np.float64] = np.triu(upper) + np.triu(upper, 1).T
    return lengths


def _row_block_counts(labels: npt.NDArray[np.uint8], block_px: int, n_classes: int) -> npt.NDArray[np.int64]:
    """Pixels per class on every second row and column, in each such row's stretches of
    block_px columns: (rows / 2, blocks, classes + 1). The caller sums rows into square blocks
    wherever the bands begin; the bootstrap needs block fractions, which a quarter of the
    pixels estimates as well (neighbouring pixels are nearly always alike)."""
    grid = labels[::2, ::2]
    starts = np.arange(0, grid.shape[1], block_px // 2)
    out = np.zeros((grid.shape[0], starts.size, n_classes + 1), np.int64)
    for value in range(n_classes + 1):
        hits = grid == value
        if hits.any():
            out[:, :, value] = np.add.reduceat(hits.view(np.uint8), starts, axis=1, dtype=np.int64)
    return out


def _class_pixels(labels: npt.NDArray[np.uint8], n_classes: int) -> npt.NDArray[np.int64]:
    """Exact pixels per label value 0..n_classes."""
    return np.array([np.count_nonzero(labels == value) for value in range(n_classes + 1)], np.int64)


def _overlay(
    labels: npt.NDArray[np.uint8],
    pairs: list[Transitions],
    is_grain: npt.NDArray[np.bool_],
    own: tuple[int, int],
    first_row: int,
    factor: int,
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.bool_]]:
    """The band's own rows for a picture `factor` times smaller: the class of every factor-th
    row and column of the section, and per own row whether a stretch of `factor` columns holds
    a grain outline (a grain pixel next to another cell; the caller merges rows)."""
    own0, own1 = own
    width = labels.shape[1]
    start = -(first_row + own0) % factor
    small_labels = labels[own0 + start : own1 : factor, ::factor].copy()
    per_row = np.zeros((own1 - own0, -(-width // factor)), bool)
    for pair, (dy, dx) in zip(pairs[:2], ((0, 1), (1, 0))):
        for rows, cols, cells in ((pair.row, pair.col, pair.a), (pair.row + dy, pair.col + dx, pair.b)):
            keep = is_grain[cells] & (rows >= own0) & (rows < own1)
            per_row[rows[keep] - own0, cols[keep] // factor] = True
    return small_labels, per_row
