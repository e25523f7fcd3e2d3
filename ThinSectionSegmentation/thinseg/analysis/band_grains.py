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

Touching grains of one mineral are split as Segment Inspector does, by a watershed of the
distance transform from its maxima, made scale-free: a neck splits a region where the distance
at the saddle is below `neck_ratio` times the smaller peak's (h-maxima of log(distance + 1)).
The maxima are found on every second row and column (4x fewer pixels, the same maxima for any
grain wider than a few pixels); only regions holding two or more are flooded, on that grid, in
their own bounding box (scikit-image's watershed, which keeps the flood inside the region), and
the cut is carried to full resolution.

Perimeters and contact lengths are Cauchy-Crofton estimates from pixel transitions in four
directions (as scikit-image's `perimeter_crofton`): unbiased over orientations, where counting
pixel edges overstates a diagonal boundary by up to 27%.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from scipy import ndimage as ndi
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


def regions(
    labels: npt.NDArray[np.uint8], n_classes: int, is_grain_class: npt.NDArray[np.bool_]
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.uint8]]:
    """Cells: connected regions (4-connected) of every grain class, numbered 1.., then one
    cell per other class (matrix: a continuous phase, never cut); label 0, not classified,
    stays 0. Returns them and each cell's class (index 0 unused)."""
    out = np.zeros(labels.shape, np.int32)
    classes = [np.zeros(1, np.uint8)]
    total = 0
    for value in range(1, n_classes + 1):
        if not is_grain_class[value]:
            continue
        mask = labels == value
        components = sitk.ConnectedComponentImageFilter()  # 4-connected; a third less CPU than scipy's label
        image = components.Execute(sitk.GetImageFromArray(mask.view(np.uint8)))
        numbered = sitk.GetArrayViewFromImage(image)  # a view: `image` must outlive it
        n = int(components.GetObjectCount())
        if n:
            out += numbered.view(np.int32)  # values < 2**31: the same bits
            np.add(out, np.int32(total), out=out, where=mask)
            total += n
            classes.append(np.full(n, value, np.uint8))
    for value in range(1, n_classes + 1):
        if is_grain_class[value]:
            continue
        total += 1
        out[labels == value] = total
        classes.append(np.full(1, value, np.uint8))
    return out, np.concatenate(classes)


def split_markers(
    labels: npt.NDArray[np.uint8], grain: npt.NDArray[np.bool_], neck_ratio: float
) -> tuple[npt.NDArray[np.int32], npt.NDArray[np.float32]]:
    """Watershed seeds and landscape on every second row and column: the h-maxima of
    log(distance + 1), distance from a pixel to the nearest pixel of another class (or of a
    non-grain class); returns (seeds numbered 1.., log distance)."""
    half = np.ascontiguousarray(labels[::2, ::2])
    inner = grain[::2, ::2].copy()
    h = half[:, 1:] != half[:, :-1]
    inner[:, 1:] &= ~h
    inner[:, :-1] &= ~h
    v = half[1:] != half[:-1]
    inner[1:] &= ~v
    inner[:-1] &= ~v
    image = sitk.GetImageFromArray(inner.astype(np.uint8))
    distance = sitk.SignedMaurerDistanceMap(
        image, insideIsPositive=True, squaredDistance=False, useImageSpacing=False, backgroundValue=0
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
    markers[~inner] = 0
    landscape: npt.NDArray[np.float32] = sitk.GetArrayFromImage(distance).astype(np.float32, copy=False)
    return markers, landscape


#: Most one-pixel growth steps that hand full-resolution pixels the half-resolution cut missed
#: to a neighbouring piece (slivers thinner than two pixels).
_FILL_STEPS = 64


def split_regions(
    region: npt.NDArray[np.int32],
    markers_half: npt.NDArray[np.int32],
    landscape_half: npt.NDArray[np.float32],
    candidates: npt.NDArray[np.int64],
    boxes: list[tuple[slice, slice] | None],
) -> tuple[npt.NDArray[np.int32], int, list[tuple[slice, slice] | None], list[int]]:
    """Regions holding two or more seeds cut by a watershed of the distance landscape.

    The cut is made on every second row and column (4x fewer pixels to flood) and carried to
    full resolution; region pixels the coarse grid missed join the piece next to them. Returns
    the regions renumbered (new pieces numbered after the last region), how many were cut,
    every number's bounding box and the region each number comes from."""
    ys, xs = np.nonzero(markers_half)
    seeds = markers_half[ys, xs]
    owner = region[ys * 2, xs * 2].astype(np.int64)
    is_candidate = np.zeros(int(region.max()) + 1, bool)
    is_candidate[candidates] = True
    keep = is_candidate[owner]
    ys, xs, seeds, owner = ys[keep], xs[keep], seeds[keep], owner[keep]
    pairs = np.unique(owner << 32 | seeds.astype(np.int64))
    ids, counts = np.unique(pairs >> 32, return_counts=True)
    several = ids[counts >= 2]
    out = region  # renumbered in place: other regions' pixels never change
    boxes = list(boxes)
    parents = list(range(1, len(boxes) + 1))
    if several.size == 0:
        return out, 0, boxes, parents
    next_id = len(boxes) + 1
    region_half = region[::2, ::2]
    by_owner = np.argsort(owner, kind="stable")
    owner_sorted = owner[by_owner]
    for rid in several:
        box = boxes[int(rid) - 1]
        assert box is not None
        y0, y1, x0, x1 = box[0].start, box[0].stop, box[1].start, box[1].stop
        hy0, hy1, hx0, hx1 = y0 // 2, (y1 + 1) // 2, x0 // 2, (x1 + 1) // 2
        mask_half = region_half[hy0:hy1, hx0:hx1] == rid
        lo, hi = np.searchsorted(owner_sorted, [rid, rid + 1])
        pick = by_owner[lo:hi]
        seed_img = np.zeros(mask_half.shape, np.int32)
        seed_img[ys[pick] - hy0, xs[pick] - hx0] = seeds[pick]
        land_half = landscape_half[hy0:hy1, hx0:hx1]
        pieces_half = watershed(-land_half, seed_img, mask=mask_half)  # type: ignore[no-untyped-call]
        mask = region[box] == rid
        pieces = pieces_half[np.ix_(np.arange(y0, y1) // 2 - hy0, np.arange(x0, x1) // 2 - hx0)]
        pieces[~mask] = 0
        _fill_missed(pieces, mask)
        _recut_at_full_resolution(pieces, mask)
        values = np.unique(pieces[mask])
        if values.size < 2:
            continue
        local = np.zeros(int(values.max()) + 1, np.int32)
        local[values] = np.arange(1, len(values) + 1)
        local_pieces = local[pieces]
        numbers = np.array([0, int(rid)] + list(range(next_id, next_id + len(values) - 1)), np.int32)
        view = out[box]
        view[mask] = numbers[local_pieces[mask]]
        for n, piece_box in enumerate(ndi.find_objects(local_pieces)):
            assert piece_box is not None
            shifted = (
                slice(y0 + piece_box[0].start, y0 + piece_box[0].stop),
                slice(x0 + piece_box[1].start, x0 + piece_box[1].stop),
            )
            if n == 0:
                boxes[int(rid) - 1] = shifted
            else:
                boxes.append(shifted)
                parents.append(int(rid))
        next_id += len(values) - 1
    return out, int(several.size), boxes, parents


#: Pixels on either side of a cut made on the coarse grid that are flooded again at full
#: resolution, so that the cut is a line of the pixel grid, not a staircase of 2-pixel steps.
_RECUT_PX = 2


def _recut_at_full_resolution(pieces: npt.NDArray[np.int32], mask: npt.NDArray[np.bool_]) -> None:
    """Flood the pixels near the cuts between pieces again, on the full-resolution distance
    transform of the region around the cuts."""
    cut = np.zeros(pieces.shape, bool)
    for a, b, first, second in (
        (pieces[:, :-1], pieces[:, 1:], cut[:, :-1], cut[:, 1:]),
        (pieces[:-1], pieces[1:], cut[:-1], cut[1:]),
    ):
        differ = (a != b) & (a > 0) & (b > 0)
        first |= differ
        second |= differ
    rows, cols = np.nonzero(cut)
    if rows.size == 0:
        return
    # only the cut's surroundings: a box around it, _RECUT_PX + 1 wider (seeds on its rim)
    pad = _RECUT_PX + 1
    height, width = pieces.shape
    y0, y1 = max(0, int(rows.min()) - pad), min(height, int(rows.max()) + pad + 1)
    x0, x1 = max(0, int(cols.min()) - pad), min(width, int(cols.max()) + pad + 1)
    box = (slice(y0, y1), slice(x0, x1))
    sub_mask = mask[box]
    near = ndi.binary_dilation(cut[box], structure=_FOUR, iterations=_RECUT_PX) & sub_mask
    # the exact distance to the region's edge there (the box's own sides continue the region:
    # edge padding), whose ridge along the neck is sharp where a coarse one is flat
    distance = ndi.distance_transform_edt(np.pad(sub_mask, pad, mode="edge"))[pad:-pad, pad:-pad]
    sub = pieces[box]
    seeds = np.where(near, 0, sub)
    sub[...] = watershed(-distance, seeds, mask=sub_mask)  # type: ignore[no-untyped-call]


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


#: The four directions' (first pixel, second pixel) slices: horizontal, vertical, two diagonals.
_DIRECTIONS = (
    ((slice(None), slice(None, -1)), (slice(None), slice(1, None))),
    ((slice(None, -1), slice(None)), (slice(1, None), slice(None))),
    ((slice(None, -1), slice(None, -1)), (slice(1, None), slice(1, None))),
    ((slice(None, -1), slice(1, None)), (slice(1, None), slice(None, -1))),
)


def transitions(cells: npt.NDArray[np.int32], labels: npt.NDArray[np.uint8]) -> list[Transitions]:
    """Per direction, the pixel pairs whose cells (grains and matrix regions) differ."""
    out = []
    for a_sl, b_sl in _DIRECTIONS:
        a, b = cells[a_sl], cells[b_sl]
        r, c = np.nonzero(a != b)
        out.append(
            Transitions(
                r, c, a[r, c].astype(np.int64), b[r, c].astype(np.int64), labels[a_sl][r, c], labels[b_sl][r, c]
            )
        )
    return out


def analyze_band(request: BandRequest) -> BandGrains:
    """Find, split and measure the grains of one band (see the module's docstring)."""
    labels = request.labels
    rows, width = labels.shape
    top = request.first_row
    own0, own1 = request.own_rows
    height = request.section_shape[0]
    is_grain_class = np.zeros(256, bool)
    is_grain_class[list(request.grain_classes)] = True
    region, region_class = regions(labels, request.n_classes, is_grain_class)
    n_regions = region_class.size - 1
    boxes = ndi.find_objects(region, max_label=n_regions)  # absent cells too (None)
    box_rows = np.array([[b[0].start, b[0].stop] if b is not None else [rows, rows] for b in boxes], np.int64)
    box_rows = box_rows.reshape(-1, 2)
    is_grain = is_grain_class[region_class[1:]]
    cut_above = top > 0
    cut_below = top + rows < height
    # whole: neither reaches a row where the read stopped short of the section's edge
    from_above = (box_rows[:, 0] == 0) & cut_above
    whole = ~from_above & ~((box_rows[:, 1] == rows) & cut_below)
    owned = is_grain & ~from_above & (box_rows[:, 0] + top >= own0) & (box_rows[:, 0] + top < own1)
    near = _touching(region[max(0, own1 - top - 1) :], owned) & is_grain & ~from_above
    if ((owned | near) & ~whole).any():
        return BandGrains(needs_more_rows=True)
    result = BandGrains()
    heights = box_rows[:, 1] - box_rows[:, 0]
    result.tallest = int(heights[owned | near].max()) if (owned | near).any() else 0
    parents: list[int] = list(range(1, n_regions + 1))
    if request.split and owned.any():
        markers, landscape = split_markers(labels, is_grain_class[labels], request.neck_ratio)
        candidates = np.flatnonzero(owned | near) + 1
        region, result.split_regions, boxes, parents = split_regions(region, markers, landscape, candidates, boxes)
    grains = region
    pid = np.asarray(parents, np.int64) - 1
    owned, whole, is_grain = owned[pid], whole[pid], is_grain[pid]
    grain_class = region_class[pid + 1]
    n_cells = len(boxes)
    pairs = transitions(grains, labels)
    area = _counts(grains, n_cells + 1)[1:]
    keys = _first_pixel_keys(grains, boxes, top, width)
    crofton = np.zeros(n_cells + 1)
    for pair, weight in zip(pairs, DIRECTION_WEIGHTS):
        crofton += weight * (np.bincount(pair.a, minlength=n_cells + 1) + np.bincount(pair.b, minlength=n_cells + 1))
    # the section's edge closes the outline of a grain cut by it (one crossing per direction there)
    border = [grains[:, 0], grains[:, -1]] + ([grains[0]] if top == 0 else []) + ([grains[-1]] if not cut_below else [])
    crofton += (DIRECTION_WEIGHTS[0] + 2 * DIRECTION_WEIGHTS[2]) * np.bincount(
        np.concatenate(border), minlength=n_cells + 1
    )
    listed = is_grain & (area >= request.min_pixels)
    measured = np.flatnonzero(owned & listed) + 1
    small = owned & is_grain & (area < request.min_pixels)
    result.small_grains = np.bincount(grain_class[small], weights=area[small], minlength=request.n_classes + 1)
    result.small_grains = result.small_grains.astype(np.int64)
    result.columns = _measure(grains, labels, boxes, measured, area, crofton, keys, top, request.section_shape)
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


def _counts(cells: npt.NDArray[np.int32], size: int, rows: int = 256) -> npt.NDArray[np.int64]:
    """Pixels per cell number, counted a few rows at a time (a whole band cast to 64-bit
    integers at once would take 8 bytes per pixel)."""
    out = np.zeros(size, np.int64)
    for y in range(0, cells.shape[0], rows):
        out += np.bincount(cells[y : y + rows].ravel(), minlength=size)
    return out


def _touching(region: npt.NDArray[np.int32], owned: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Regions next to an owned region: split here too, so their grains get the keys their
    own band gives them. Regions that start below the band's own rows meet owned ones only
    from the last own row down, so only those rows are passed."""
    is_owned = np.concatenate([[False], owned])
    out = np.zeros(owned.size + 1, bool)
    for a, b in ((region[:, :-1], region[:, 1:]), (region[:-1], region[1:])):
        r, c = np.nonzero(a != b)
        first, second = a[r, c], b[r, c]
        out[second[is_owned[first]]] = True
        out[first[is_owned[second]]] = True
    return out[1:] & ~owned


def _first_pixel_keys(
    grains: npt.NDArray[np.int32], boxes: list[tuple[slice, slice] | None], top: int, width: int
) -> npt.NDArray[np.int64]:
    """Each grain's first pixel (raster order) as a section-wide flat index; index 0 unused."""
    keys = np.full(len(boxes) + 1, -1, np.int64)
    for n, box in enumerate(boxes, 1):
        if box is None:
            continue
        y = box[0].start
        row = grains[y, box[1]]
        x = box[1].start + int(np.argmax(row == n))
        keys[n] = (top + y) * width + x
    return keys


def _measure(
    grains: npt.NDArray[np.int32],
    labels: npt.NDArray[np.uint8],
    boxes: list[tuple[slice, slice] | None],
    measured: npt.NDArray[np.int64],
    area: npt.NDArray[np.int64],
    crofton: npt.NDArray[np.float64],
    keys: npt.NDArray[np.int64],
    top: int,
    section_shape: tuple[int, int],
) -> dict[str, npt.NDArray[np.float64]]:
    """Per-grain columns in pixels (the caller converts to mm)."""
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
    for i, gid in enumerate(measured):
        box = boxes[int(gid) - 1]
        assert box is not None
        mask = grains[box] == gid
        y0, x0 = box[0].start, box[1].start
        weights = mask.astype(np.float64)
        n_px = float(area[gid - 1])
        yy = np.arange(mask.shape[0], dtype=np.float64)
        xx = np.arange(mask.shape[1], dtype=np.float64)
        per_row, per_col = weights.sum(axis=1), weights.sum(axis=0)
        cy, cx = float(per_row @ yy) / n_px, float(per_col @ xx) / n_px
        dy, dx = yy - cy, xx - cx
        myy = float(per_row @ (dy * dy)) / n_px + 1 / 12
        mxx = float(per_col @ (dx * dx)) / n_px + 1 / 12
        mxy = float(dy @ (weights @ dx)) / n_px
        spread = math.sqrt(((mxx - myy) / 2) ** 2 + mxy**2)
        major, minor = 4 * math.sqrt((mxx + myy) / 2 + spread), 4 * math.sqrt(max((mxx + myy) / 2 - spread, 0.0))
        orientation = math.degrees(0.5 * math.atan2(-2 * mxy, mxx - myy))
        edge = _boundary(mask)
        by, bx = np.nonzero(edge)
        feret_max, feret_min, feret_angle = feret_diameters(by.astype(np.int64), bx.astype(np.int64))
        gy0 = top + y0
        cols["key"][i] = keys[gid]
        cols["class"][i] = labels[y0, x0 + int(np.argmax(mask[0]))]
        cols["area_px"][i] = area[gid - 1]
        cols["row"][i] = gy0 + cy
        cols["col"][i] = x0 + cx
        cols["perimeter_px"][i] = crofton[gid]
        cols["feret_max_px"][i] = feret_max
        cols["feret_min_px"][i] = feret_min
        cols["feret_angle_deg"][i] = feret_angle
        cols["orientation_deg"][i] = orientation
        cols["major_axis_px"][i] = major
        cols["minor_axis_px"][i] = minor
        cols["touches_edge"][i] = float(
            gy0 == 0 or gy0 + mask.shape[0] >= height or x0 == 0 or x0 + mask.shape[1] >= width
        )
    return cols


def _boundary(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Pixels of the mask with a 4-neighbour outside it (the image border counts as outside)."""
    padded = np.pad(mask, 1)
    inner = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    out: npt.NDArray[np.bool_] = mask & ~inner
    return out


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
