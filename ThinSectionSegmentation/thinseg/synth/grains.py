"""Grain geometry: a rough power-diagram partition, grain bodies inside it and the label map.

Seeds sit on a jittered square grid of cell `cell` px, so the nearest seed of any pixel is
among the 3 x 3 cells around its own; the partition is computed one grid row at a time with
broadcasting (no per-grain arrays of image size, cost ~9 cheap passes over the pixels).
Each grain then gets a body (ellipse or, for dolomite, a rhomb around its seed) clipped by its
cell; what is left between bodies is intergranular space: blue-epoxy pores or Mg-clay matrix,
with clay coatings around some grains. Body size is set by one threshold chosen from the
quantile that gives the requested intergranular area, so the class weights hold closely.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy.ndimage import gaussian_filter

from thinseg.synth.noise import smooth_noise

CALCITE, DOLOMITE, CLAY, PORE, QUARTZ, OTHERS = 1, 2, 3, 4, 5, 6

#: Share of each class's area that forms whole grains (the rest fills intergranular space):
#: moldic pores and clay peloids are grain-shaped, the rest of pores and clay lies between grains.
GRAIN_SHARE = np.array([1.0, 1.0, 0.3, 0.25, 1.0, 1.0])

#: Others split into these sub-types (also their QEMSCAN minerals).
OPAQUE, FELDSPAR = 0, 1

_RHOMB_HALF_ANGLE = np.deg2rad(52.5)  # slab normals at +-52.5 deg: a 75/105 degree rhomb
_RHOMB_AREA_MATCH = np.float32(np.sqrt(4.0 / np.sin(2 * _RHOMB_HALF_ANGLE) / np.pi))


@dataclass
class Grains:
    """Per-grain parameters, indexed by grain id (= flat index in the seed grid)."""

    cx: np.ndarray
    cy: np.ndarray
    radius: np.ndarray  # body size (px)
    angle: np.ndarray  # long-axis orientation (rad)
    elong: np.ndarray  # aspect factor >= 1
    mineral: np.ndarray  # class value 1..6 of the body
    subtype: np.ndarray  # for Others: OPAQUE or FELDSPAR
    coat: np.ndarray  # clay-coating thickness, in units of `key` (0 = none)

    def __len__(self) -> int:
        return len(self.cx)


@dataclass
class Geometry:
    gid: np.ndarray  # (H, W) int32 grain id of the cell each pixel lies in
    key: np.ndarray  # (H, W) float32 body distance, < 1 inside the grain body
    labels: np.ndarray  # (H, W) uint8 class values 1..6
    grains: Grains
    cell: int


def build_geometry(rng: np.random.Generator, shape: tuple[int, int], cell: int, weights: np.ndarray) -> Geometry:
    """Partition, body shapes and labels for a section of `shape` with grains ~`cell` px apart."""
    h, w = shape
    gh, gw = -(-h // cell) + 2, -(-w // cell) + 2
    grains = _draw_grains(rng, gh, gw, cell)
    xw, yw = _warped_coordinates(rng, shape, cell)
    gid = _partition(xw, yw, grains, gh, gw, cell)
    areas = np.bincount(gid.ravel(), minlength=len(grains)).astype(np.float64)
    weights = np.asarray(weights, dtype=np.float64) / np.sum(weights)
    grain_w = weights * GRAIN_SHARE
    inter_w = weights - grain_w
    grains.mineral[:] = _assign_minerals(rng, areas, grain_w, (gh, gw))
    key = _body_key(xw, yw, gid, grains)
    del xw, yw
    key += smooth_noise(rng, shape, 4.0) * np.float32(1.2 / (0.5 * cell))  # ~1 px ragged outlines
    key /= _body_threshold(key, inter_w.sum())
    labels = grains.mineral[gid]
    _fill_intergranular(rng, labels, key, gid, grains, inter_w, cell)
    return Geometry(gid=gid, key=key, labels=labels, grains=grains, cell=cell)


def _draw_grains(rng: np.random.Generator, gh: int, gw: int, cell: int) -> Grains:
    n = gh * gw
    jy, jx = rng.uniform(-0.36, 0.36, (2, gh, gw))
    iy, ix = np.mgrid[0:gh, 0:gw]
    size = np.exp(rng.normal(0.0, 0.25, n)).clip(0.55, 1.6)
    elong = 1.0 + rng.gamma(2.0, 0.12, n).clip(0, 0.9)
    coat = np.where(rng.random(n) < 0.45, rng.uniform(0.06, 0.16, n), 0.0)
    return Grains(
        cx=((ix - 1 + 0.5 + jx) * cell).ravel().astype(np.float32),
        cy=((iy - 1 + 0.5 + jy) * cell).ravel().astype(np.float32),
        radius=(0.5 * cell * size).astype(np.float32),
        angle=rng.uniform(0, np.pi, n).astype(np.float32),
        elong=elong.astype(np.float32),
        mineral=np.zeros(n, np.uint8),
        subtype=(rng.random(n) < 0.5).astype(np.uint8),
        coat=coat.astype(np.float32),
    )


def _warped_coordinates(rng: np.random.Generator, shape: tuple[int, int], cell: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates displaced by smooth noise (~9 % of a grain): irregular grain outlines."""
    h, w = shape
    amplitude = np.float32(0.09 * cell)
    xw = smooth_noise(rng, shape, 0.35 * cell)
    xw *= amplitude
    xw += np.arange(w, dtype=np.float32)[None, :]
    yw = smooth_noise(rng, shape, 0.35 * cell)
    yw *= amplitude
    yw += np.arange(h, dtype=np.float32)[:, None]
    return xw, yw


def _partition(xw: np.ndarray, yw: np.ndarray, grains: Grains, gh: int, gw: int, cell: int) -> np.ndarray:
    """Nearest seed in the power distance |p - c|^2 - r^2 (bigger grains get bigger cells),
    searched among the 3 x 3 grid cells around each pixel's own, one grid row at a time."""
    h, w = xw.shape
    nbx = gw - 2
    wp = nbx * cell
    cx = grains.cx.reshape(gh, gw)
    cy = grains.cy.reshape(gh, gw)
    r2 = grains.radius.reshape(gh, gw) ** 2
    power = 0.6 * (r2 - r2.mean())
    gid = np.empty((h, w), np.int32)
    cols = np.arange(nbx)
    for bi in range(gh - 2):
        r0, r1 = bi * cell, min(h, (bi + 1) * cell)
        bx = _pad_cols(xw[r0:r1], wp).reshape(r1 - r0, nbx, cell)
        by = _pad_cols(yw[r0:r1], wp).reshape(r1 - r0, nbx, cell)
        best = np.full(bx.shape, np.inf, np.float32)
        best_id = np.zeros(bx.shape, np.int32)
        for di in (-1, 0, 1):
            gi = bi + 1 + di
            for dj in (-1, 0, 1):
                sl = slice(1 + dj, 1 + dj + nbx)
                dx = bx - cx[gi, sl][None, :, None]
                dy = by - cy[gi, sl][None, :, None]
                dx *= dx
                dy *= dy
                dx += dy
                dx -= power[gi, sl][None, :, None]
                closer = dx < best
                np.copyto(best, dx, where=closer)
                ids = (gi * gw + 1 + dj + cols).astype(np.int32)
                np.copyto(best_id, np.broadcast_to(ids[None, :, None], best_id.shape), where=closer)
        gid[r0:r1] = best_id.reshape(r1 - r0, wp)[:, :w]
    return gid


def _pad_cols(a: np.ndarray, width: int) -> np.ndarray:
    if a.shape[1] == width:
        return a
    return np.pad(a, ((0, 0), (0, width - a.shape[1])), mode="edge")


def _assign_minerals(
    rng: np.random.Generator, areas: np.ndarray, grain_w: np.ndarray, grid: tuple[int, int]
) -> np.ndarray:
    """Class per grain so that class areas follow `grain_w`: grains are ordered by a smooth
    random field (minerals cluster in patches, as after dolomitisation or cementation) plus
    jitter, then cut into consecutive runs of the wanted cumulative area."""
    n = len(areas)
    mineral = np.zeros(n, np.uint8)
    if grain_w.sum() <= 0:
        return mineral
    patch = gaussian_filter(rng.standard_normal(grid), 1.2, mode="wrap").ravel()
    patch /= patch.std() + 1e-12
    order_key = patch + 1.2 * rng.standard_normal(n)
    present = np.flatnonzero(areas > 0)
    order = present[np.argsort(order_key[present], kind="stable")]
    class_order = rng.permutation(6) + 1
    share = grain_w[class_order - 1]
    bounds = np.cumsum(share) / share.sum()
    a = areas[order] / areas[order].sum()
    mid = np.cumsum(a) - a / 2
    run = np.minimum(np.searchsorted(bounds, mid), 5)
    run = _give_every_class_a_grain(run, mid, bounds, share)
    mineral[order] = class_order[run]
    return mineral


def _give_every_class_a_grain(run: np.ndarray, mid: np.ndarray, bounds: np.ndarray, share: np.ndarray) -> np.ndarray:
    """A class with a small weight can fall between two grain midpoints; hand it the nearest grain."""
    run = run.copy()
    lower = np.concatenate([[0.0], bounds[:-1]])
    for k in np.flatnonzero(share > 0):
        if np.any(run == k):
            continue
        counts = np.bincount(run, minlength=6)
        movable = counts[run] > 1
        if not movable.any():
            continue
        centre = 0.5 * (lower[k] + bounds[k])
        candidates = np.flatnonzero(movable)
        run[candidates[np.argmin(np.abs(mid[candidates] - centre))]] = k
    return run


def _body_key(xw: np.ndarray, yw: np.ndarray, gid: np.ndarray, grains: Grains) -> np.ndarray:
    """Distance of each pixel from its grain's seed in the grain's own shape metric, divided by
    the grain size: ellipses for most grains, rhombs for dolomite. Done in row strips so the
    dozen temporaries stay small."""
    key = np.empty(gid.shape, np.float32)
    rows = max(1, 1_000_000 // gid.shape[1])
    for r0 in range(0, gid.shape[0], rows):
        sl = slice(r0, r0 + rows)
        key[sl] = _body_key_strip(xw[sl], yw[sl], gid[sl], grains)
    return key


def _body_key_strip(xw: np.ndarray, yw: np.ndarray, gid: np.ndarray, grains: Grains) -> np.ndarray:
    dx = xw - grains.cx[gid]
    dy = yw - grains.cy[gid]
    ca = np.cos(grains.angle)[gid]
    sa = np.sin(grains.angle)[gid]
    u = dx * ca + dy * sa
    v = dy * ca - dx * sa
    e = grains.elong[gid]
    key = np.hypot(u / e, v * e)
    rhomb = np.flatnonzero(grains.mineral[gid.ravel()] == DOLOMITE)
    if rhomb.size:
        uu, vv, ee = u.ravel()[rhomb], v.ravel()[rhomb], np.sqrt(e.ravel()[rhomb])
        c, s = np.float32(np.cos(_RHOMB_HALF_ANGLE)), np.float32(np.sin(_RHOMB_HALF_ANGLE))
        a, b = uu / ee * c, vv * ee * s
        key.ravel()[rhomb] = np.maximum(np.abs(a + b), np.abs(a - b)) * _RHOMB_AREA_MATCH
    key /= grains.radius[gid]
    result: npt.NDArray[np.float32] = key
    return result


def _body_threshold(key: np.ndarray, inter_fraction: float) -> np.float32:
    """Key value below which a pixel is grain, chosen so that `inter_fraction` of the area is left over."""
    sample = key.ravel()[:: max(1, key.size // 400_000)]
    threshold: np.float32
    if inter_fraction <= 0:
        threshold = np.float32(sample.max() * 1.05 + 1e-6)
    else:
        threshold = np.float32(np.quantile(sample, 1.0 - min(inter_fraction, 0.98)))
    return threshold


def _fill_intergranular(
    rng: np.random.Generator,
    labels: np.ndarray,
    key: np.ndarray,
    gid: np.ndarray,
    grains: Grains,
    inter_w: np.ndarray,
    cell: int,
) -> None:
    """Intergranular pixels (key >= 1) become Mg-clay or pore: clay coats some grains and fills
    patches given by a smooth field; the split is a quantile so the clay/pore areas are as asked."""
    inter = np.flatnonzero(key.ravel() >= 1.0)
    if inter.size == 0:
        return
    clay_w, pore_w = inter_w[CLAY - 1], inter_w[PORE - 1]
    if clay_w + pore_w <= 0:
        labels.ravel()[inter] = PORE
        return
    score = smooth_noise(rng, labels.shape, 0.8 * cell).ravel()[inter]
    coat = grains.coat[gid.ravel()[inter]]
    score += np.where(key.ravel()[inter] < 1.0 + coat, 4.0, 0.0).astype(np.float32)
    clay_fraction = clay_w / (clay_w + pore_w)
    if clay_fraction <= 0:
        cut = np.inf
    elif clay_fraction >= 1:
        cut = -np.inf
    else:
        cut = np.quantile(score[:: max(1, score.size // 400_000)], 1.0 - clay_fraction)
    labels.ravel()[inter] = np.where(score > cut, CLAY, PORE)
