"""Grains of one band of rows of a labelmap: found, split, measured.

A band is read with extra rows (a halo) above and below its own rows. A grain belongs to the
band whose own rows hold its first pixel (raster order), so every grain is measured exactly
once; it must lie whole in what was read, or the band is read again with a larger halo
(`BandGrains.needs_more_rows`). A grain is named across bands by the raster index of its first
pixel (`key`), which every band that holds the grain whole computes alike.

Touching grains of one mineral are split as Segment Inspector does, by a watershed of the
distance transform from its maxima, made scale-free: a neck splits a region where the distance
at the saddle is below `neck_ratio` times the smaller peak's (h-maxima of log(distance + 1)).
The maxima are found on every second row and column (4x fewer pixels, the same maxima for any
grain wider than a few pixels); only regions holding two or more get a full-resolution
watershed, in their own bounding box (scikit-image, which keeps the flood inside the region).

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
    contacts: npt.NDArray[np.float64] = field(default_factory=lambda: np.zeros((0, 0)))
    block_counts: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros((0, 0, 0), np.int64))
    overlay_labels: npt.NDArray[np.uint8] = field(default_factory=lambda: np.zeros((0, 0), np.uint8))
    overlay_outlines: npt.NDArray[np.bool_] = field(default_factory=lambda: np.zeros((0, 0), bool))
    small_grains: npt.NDArray[np.int64] = field(default_factory=lambda: np.zeros(0, np.int64))
    split_regions: int = 0


def regions(labels: npt.NDArray[np.uint8], classes: tuple[int, ...]) -> tuple[npt.NDArray[np.int32], int]:
    """Connected regions (4-connected) of each listed class, numbered 1.. across classes."""
    out = np.zeros(labels.shape, np.int32)
    total = 0
    present = np.flatnonzero(np.bincount(labels.ravel(), minlength=256))
    for value in classes:
        if value not in present:
            continue
        mask = labels == value
        lab, n = ndi.label(mask, structure=_FOUR)
        if n:
            out[mask] = lab[mask] + total
            total += n
    return out, total


def split_markers(
    labels: npt.NDArray[np.uint8], grain: npt.NDArray[np.bool_], neck_ratio: float
) -> npt.NDArray[np.int32]:
    """Watershed seeds on every second row and column: the h-maxima of log(distance + 1),
    distance from a pixel to the nearest pixel of another class (or of a non-grain class)."""
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
    domes = sitk.HConvex(distance, depth)
    tops = sitk.ConnectedComponent(domes >= depth * 0.999, True)
    markers: npt.NDArray[np.int32] = sitk.GetArrayFromImage(tops).astype(np.int32)
    markers[~inner] = 0
    return markers


def split_regions(
    region: npt.NDArray[np.int32], markers_half: npt.NDArray[np.int32], candidates: npt.NDArray[np.int64]
) -> tuple[npt.NDArray[np.int32], int]:
    """Regions holding two or more seeds cut by a watershed of their own distance transform."""
    ys, xs = np.nonzero(markers_half)
    seeds = markers_half[ys, xs]
    owner = region[ys * 2, xs * 2]
    keep = np.isin(owner, candidates)
    ys, xs, seeds, owner = ys[keep], xs[keep], seeds[keep], owner[keep]
    pairs = np.unique(np.stack([owner.astype(np.int64), seeds.astype(np.int64)]), axis=1)
    ids, counts = np.unique(pairs[0], return_counts=True)
    several = ids[counts >= 2]
    out = region.copy()
    if several.size == 0:
        return out, 0
    next_id = int(region.max()) + 1
    boxes = ndi.find_objects(region)
    by_owner = np.argsort(owner, kind="stable")
    owner_sorted = owner[by_owner]
    for rid in several:
        box = boxes[int(rid) - 1]
        assert box is not None
        y0, x0 = box[0].start, box[1].start
        mask = region[box] == rid
        lo, hi = np.searchsorted(owner_sorted, [rid, rid + 1])
        pick = by_owner[lo:hi]
        seed_img = np.zeros(mask.shape, np.int32)
        seed_img[ys[pick] * 2 - y0, xs[pick] * 2 - x0] = seeds[pick]
        distance = ndi.distance_transform_edt(mask)
        pieces = watershed(-distance, seed_img, mask=mask)
        values = np.unique(pieces[mask])
        view = out[box]
        for n, value in enumerate(values):
            if n == 0:
                continue  # the first piece keeps the region's number
            view[pieces == value] = next_id
            next_id += 1
    return out, int(several.size)


class Transitions(NamedTuple):
    """Pixel pairs of one direction that differ: the first pixel's row, the cells and the
    classes on both sides."""

    row: npt.NDArray[np.int64]
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
    """Per direction, the pixel pairs whose cells differ."""
    out = []
    for a_sl, b_sl in _DIRECTIONS:
        a, b = cells[a_sl], cells[b_sl]
        differ = a != b
        index = np.flatnonzero(differ)
        width = differ.shape[1]
        out.append(
            Transitions(
                index // width,
                a.ravel()[index].astype(np.int64),
                b.ravel()[index].astype(np.int64),
                labels[a_sl].ravel()[index],
                labels[b_sl].ravel()[index],
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
    grain_mask = is_grain_class[labels]
    region, n_regions = regions(labels, request.grain_classes)
    boxes = ndi.find_objects(region)
    first_rows = np.array([b[0].start if b is not None else rows for b in boxes], np.int64) + top
    owned = (first_rows >= own0) & (first_rows < own1)
    cut_below = top + rows < height
    if cut_below and n_regions:
        at_bottom = np.unique(region[-1])
        at_bottom = at_bottom[at_bottom > 0]
        if owned[at_bottom - 1].any():
            return BandGrains(needs_more_rows=True)
    result = BandGrains()
    if request.split and n_regions:
        markers = split_markers(labels, grain_mask, request.neck_ratio)
        candidates = np.flatnonzero(owned | _touching(region, owned)) + 1
        region, result.split_regions = split_regions(region, markers, candidates)
    grains = region
    # pixel pairs that differ in grain or, outside grains, in class (non-grain classes as -value)
    cells = np.where(grains > 0, grains, -labels.astype(np.int32))
    pairs = transitions(cells, labels)
    n_grains = int(grains.max())
    boxes = ndi.find_objects(grains)
    first_rows = np.array([b[0].start if b is not None else rows for b in boxes], np.int64) + top
    owned = (first_rows >= own0) & (first_rows < own1)
    area = np.bincount(grains.ravel(), minlength=n_grains + 1)[1:]
    keys = _first_pixel_keys(grains, boxes, top, width)
    crofton = np.zeros(n_grains + 1)
    for pair, weight in zip(pairs, DIRECTION_WEIGHTS):
        crofton += weight * (
            np.bincount(np.maximum(pair.a, 0), minlength=n_grains + 1)
            + np.bincount(np.maximum(pair.b, 0), minlength=n_grains + 1)
        )
    measured = np.flatnonzero(owned & (area >= request.min_pixels)) + 1
    small = np.concatenate([[False], owned & (area < request.min_pixels)])
    result.small_grains = np.bincount(labels.ravel()[small[grains.ravel()]], minlength=request.n_classes + 1).astype(
        np.int64
    )
    result.columns = _measure(grains, labels, boxes, measured, area, crofton, keys, top, request.section_shape)
    result.neighbour_pairs = _neighbour_pairs(pairs, keys, owned, area >= request.min_pixels)
    own = slice(own0 - top, own1 - top)
    result.class_pixels = np.bincount(labels[own].ravel(), minlength=request.n_classes + 1).astype(np.int64)
    result.contacts = _contacts(pairs, own0 - top, own1 - top, request.n_classes)
    result.block_counts = _row_block_counts(labels[own], request.block_px, request.n_classes)
    result.overlay_labels, result.overlay_outlines = _overlay(labels[own], grains[own], own0, request.overlay_factor)
    return result


def _touching(region: npt.NDArray[np.int32], owned: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Regions next to an owned region: split here too, so their grains get the keys their
    own band gives them."""
    mask = np.concatenate([[False], owned])[region]
    around = ndi.binary_dilation(mask, structure=_FOUR) & ~mask
    near = np.unique(region[around])
    out = np.zeros(owned.shape, bool)
    near = near[near > 0]
    out[near - 1] = True
    return out & ~owned


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
        ys, xs = np.nonzero(mask)
        y0, x0 = box[0].start, box[1].start
        cy, cx = ys.mean(), xs.mean()
        dy, dx = ys - cy, xs - cx
        myy, mxx, mxy = (dy * dy).mean() + 1 / 12, (dx * dx).mean() + 1 / 12, (dx * dy).mean()
        spread = math.sqrt(((mxx - myy) / 2) ** 2 + mxy**2)
        major, minor = 4 * math.sqrt((mxx + myy) / 2 + spread), 4 * math.sqrt(max((mxx + myy) / 2 - spread, 0.0))
        orientation = math.degrees(0.5 * math.atan2(-2 * mxy, mxx - myy))
        edge = _boundary(mask)
        by, bx = np.nonzero(edge)
        feret_max, feret_min, feret_angle = feret_diameters(by.astype(np.int64), bx.astype(np.int64))
        gy0 = top + y0
        cols["key"][i] = keys[gid]
        cols["class"][i] = labels[y0 + ys[0], x0 + xs[0]]
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
    listed: npt.NDArray[np.bool_],
) -> npt.NDArray[np.int64]:
    """(key of an owned grain, key of a grain it touches), both grains big enough to be listed."""
    a = np.concatenate([p.a for p in pairs[:2]])
    b = np.concatenate([p.b for p in pairs[:2]])
    both = (a > 0) & (b > 0)
    a, b = a[both], b[both]
    ok = np.concatenate([[False], listed])
    own = np.concatenate([[False], owned])
    keep = ok[a] & ok[b]
    a, b = a[keep], b[keep]
    forward = np.stack([a[own[a]], b[own[a]]], axis=1)
    backward = np.stack([b[own[b]], a[own[b]]], axis=1)
    ids = np.unique(np.concatenate([forward, backward]), axis=0)
    out: npt.NDArray[np.int64] = keys[ids] if ids.size else np.zeros((0, 2), np.int64)
    return out


def _contacts(pairs: list[Transitions], own0: int, own1: int, n_classes: int) -> npt.NDArray[np.float64]:
    """Crofton boundary length (pixels) between each pair of classes, over the band's own rows.

    The diagonal holds the boundaries between touching grains of one class."""
    side = n_classes + 1
    out = np.zeros((side, side))
    for pair, weight in zip(pairs, DIRECTION_WEIGHTS):
        keep = (pair.row >= own0) & (pair.row < own1)
        la = pair.class_a[keep].astype(np.int64)
        lb = pair.class_b[keep].astype(np.int64)
        counts = np.bincount(np.minimum(la, lb) * side + np.maximum(la, lb), minlength=side * side)
        out += weight * counts.reshape(side, side)
    out = np.triu(out) + np.triu(out, 1).T
    return out


def _row_block_counts(labels: npt.NDArray[np.uint8], block_px: int, n_classes: int) -> npt.NDArray[np.int64]:
    """Pixels per class in each row's stretches of block_px columns: (rows, blocks, classes + 1).
    The caller sums rows into square blocks, wherever the bands begin."""
    rows, width = labels.shape
    blocks = -(-width // block_px)
    side = n_classes + 1
    index = (np.arange(rows) * blocks)[:, None] + (np.arange(width) // block_px)[None, :]
    counts = np.bincount((index * side + labels).ravel(), minlength=rows * blocks * side)
    return counts.reshape(rows, blocks, side).astype(np.int64)


def _overlay(
    labels: npt.NDArray[np.uint8], grains: npt.NDArray[np.int32], first_row: int, factor: int
) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.bool_]]:
    """The band's own rows for a picture `factor` times smaller: the class of every factor-th
    row and column of the section, and per row whether a stretch of `factor` columns holds a
    grain outline (the caller merges rows)."""
    outline = np.zeros(grains.shape, bool)
    h = grains[:, 1:] != grains[:, :-1]
    outline[:, 1:] |= h
    outline[:, :-1] |= h
    v = grains[1:] != grains[:-1]
    outline[1:] |= v
    outline[:-1] |= v
    outline &= grains > 0
    start = -first_row % factor
    small_labels = labels[start::factor, ::factor].copy()
    rows, width = outline.shape
    padded = np.pad(outline, ((0, 0), (0, -width % factor)))
    per_row: npt.NDArray[np.bool_] = padded.reshape(rows, -1, factor).any(axis=2)
    return small_labels, per_row
