"""Labelmaps of grains whose sizes are known exactly: digital discs, ellipses, touching pairs of
discs and rectangle mosaics, placed with a seeded generator.

A pixel belongs to a shape when its centre (row + 0, col + 0) lies inside it. Angles are
counter-clockwise from the image's +x axis, rows growing downwards (as a petrographer reads the
picture), so an ellipse at +30 degrees rises to the right.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from thinseg.classes.table import ClassTable

#: Matrix (label 1) and three grain minerals (labels 2..4).
CLASSES = ClassTable.from_names_colors(
    ["Matrix", "Quartz", "Feldspar", "Lithic"], ["#8c6e5a", "#ffd700", "#f08080", "#556b2f"]
)
MATRIX, QUARTZ, FELDSPAR, LITHIC = 1, 2, 3, 4
GRAIN_LABELS = (QUARTZ, FELDSPAR, LITHIC)


def disc(shape: tuple[int, int], cy: float, cx: float, r: float) -> np.ndarray:
    """Pixels whose centres lie within `r` of (cy, cx)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r


def ellipse(shape: tuple[int, int], cy: float, cx: float, a: float, b: float, angle_deg: float) -> np.ndarray:
    """Pixels whose centres lie in the ellipse of semi-axes a (long) and b, the long axis at
    `angle_deg` counter-clockwise from +x (rows grow downwards)."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    dx, up = xx - cx, -(yy - cy)
    t = math.radians(angle_deg)
    u = dx * math.cos(t) + up * math.sin(t)
    v = -dx * math.sin(t) + up * math.cos(t)
    return (u / a) ** 2 + (v / b) ** 2 <= 1.0


@dataclass
class Disc:
    cy: float
    cx: float
    r: float
    label: int


def scatter_discs(
    shape: tuple[int, int],
    radii: list[float],
    rng: np.random.Generator,
    *,
    gap: float = 3.0,
    margin: float = 2.0,
) -> list[Disc]:
    """Discs of the given radii at random positions, none touching another (at least `gap`
    pixels apart) nor the image's edge, each of a random grain label."""
    placed: list[Disc] = []
    for r in sorted(radii, reverse=True):
        for _ in range(2000):
            cy = rng.uniform(r + margin, shape[0] - 1 - r - margin)
            cx = rng.uniform(r + margin, shape[1] - 1 - r - margin)
            if all(math.hypot(cy - d.cy, cx - d.cx) > r + d.r + gap for d in placed):
                placed.append(Disc(cy, cx, r, int(rng.choice(GRAIN_LABELS))))
                break
        else:
            raise RuntimeError(f"no room for a disc of radius {r} in {shape}")
    return placed


def paint_discs(shape: tuple[int, int], discs: list[Disc]) -> np.ndarray:
    """Matrix everywhere, each disc in its label."""
    labels = np.full(shape, MATRIX, np.uint8)
    for d in discs:
        labels[disc(shape, d.cy, d.cx, d.r)] = d.label
    return labels


@dataclass
class Pair:
    """Two overlapping discs of one class: centres, radii, and the pixels on each side of the
    chord through their intersection (what a perfect split gives each)."""

    centres: tuple[tuple[float, float], tuple[float, float]]
    radii: tuple[float, float]
    neck_half_width: float
    union: np.ndarray
    shares: tuple[np.ndarray, np.ndarray]


def touching_pair(
    shape: tuple[int, int], cy: float, cx: float, r1: float, r2: float, neck: float, angle_deg: float
) -> Pair:
    """Discs of radii r1 and r2 overlapping so that their intersection's chord has half-width
    `neck`; the pair's midpoint of centres at (cy, cx), its axis at `angle_deg`."""
    x1 = math.sqrt(r1 * r1 - neck * neck)  # chord's distance from the first centre
    x2 = math.sqrt(r2 * r2 - neck * neck)
    d = x1 + x2
    t = math.radians(angle_deg)
    ux, uy = math.cos(t), -math.sin(t)  # along the axis, in (col, row)
    c1 = (cy - uy * d / 2, cx - ux * d / 2)
    c2 = (cy + uy * d / 2, cx + ux * d / 2)
    union = disc(shape, c1[0], c1[1], r1) | disc(shape, c2[0], c2[1], r2)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    along = (xx - c1[1]) * ux + (yy - c1[0]) * uy
    return Pair((c1, c2), (r1, r2), neck, union, (union & (along < x1), union & (along >= x1)))


def convex_blob(shape: tuple[int, int], cy: float, cx: float, radius: float, rng: np.random.Generator) -> np.ndarray:
    """A convex polygon: the hull of 12 points on a randomly stretched circle of about `radius`."""
    angles = np.sort(rng.uniform(0, 2 * math.pi, 12))
    radii = radius * rng.uniform(0.75, 1.0, 12)
    stretch = rng.uniform(1.0, 1.8)
    turn = rng.uniform(0, math.pi)
    px = radii * np.cos(angles) * stretch
    py = radii * np.sin(angles)
    pts = np.stack([px * math.cos(turn) - py * math.sin(turn), px * math.sin(turn) + py * math.cos(turn)], axis=1)
    from scipy.spatial import ConvexHull  # deferred: scipy only for the blobs

    hull = pts[ConvexHull(pts).vertices]  # counter-clockwise in (x, y)
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    inside = np.ones(shape, bool)
    for (x0, y0), (x1, y1) in zip(hull, np.roll(hull, -1, axis=0)):
        inside &= (x1 - x0) * ((yy - cy) - y0) - (y1 - y0) * ((xx - cx) - x0) >= 0
    return inside


def rectangle_mosaic(
    shape: tuple[int, int], rng: np.random.Generator, cells: tuple[int, int] = (6, 7)
) -> tuple[np.ndarray, np.ndarray]:
    """Rectangles tiling the image on a random grid; labels (i + 2 j) mod 3 + 2 for the cell in
    grid row j, column i, so that cells sharing an edge differ in class while some sharing only
    a corner do not. Returns (labels, cell index per pixel: j * columns + i)."""
    rows, cols = (
        np.round((np.arange(1, n) + rng.uniform(-0.3, 0.3, n - 1)) * size / n).astype(int)
        for n, size in zip(cells, shape)
    )
    j = np.searchsorted(rows, np.arange(shape[0]), side="right")
    i = np.searchsorted(cols, np.arange(shape[1]), side="right")
    cell = j[:, None] * cells[1] + i[None, :]
    labels = ((i[None, :] + 2 * j[:, None]) % 3 + 2).astype(np.uint8)
    return labels, cell
