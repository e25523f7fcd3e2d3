"""Shape measures of one grain that need its outline: Feret diameters from the convex hull.

The outline is taken as the corners of the grain's boundary pixels, so a grain of one pixel
has Feret diameters of 1 pixel (and sqrt(2) across), as a caliper laid on the pixel squares
would read. Maximum Feret is the longest distance between hull vertices; minimum Feret is the
rotating-calipers width (the smallest, over the hull's edges, of the largest distance of a
vertex from the edge's line), exact for a convex polygon.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy.spatial import ConvexHull, QhullError

#: Offsets of a pixel's four corners from its centre (rows, columns).
_CORNERS = np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])


def hull_vertices(points: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    """The convex hull's vertices of (N, 2) points, in order; the points themselves when they
    are fewer than three or collinear."""
    if len(points) < 3:
        return points
    try:
        hull = ConvexHull(points)
    except QhullError:
        return points
    vertices: npt.NDArray[np.float64] = points[hull.vertices]
    return vertices


def pixel_corners(rows: npt.ArrayLike, cols: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """The corners of the given pixels as (4N, 2) row/column points (shared corners repeat,
    which the hull does not mind)."""
    centres = np.stack([rows, cols], axis=1).astype(np.float64)
    corners: npt.NDArray[np.float64] = (centres[:, None, :] + _CORNERS[None, :, :]).reshape(-1, 2)
    return corners


def feret_diameters(rows: npt.NDArray[np.int64], cols: npt.NDArray[np.int64]) -> tuple[float, float, float]:
    """(max Feret, min Feret, angle of the max Feret in degrees) of the pixels, in pixels.

    Pass the boundary pixels (the hull of a region is the hull of its boundary). The angle is
    counter-clockwise from the image's x axis (rows grow downwards), in (-90, 90]."""
    # the hull of the pixel squares is the hull of the corners of the pixels on the centres' hull
    centres = hull_vertices(np.stack([rows, cols], axis=1).astype(np.float64))
    vertices = hull_vertices(pixel_corners(centres[:, 0], centres[:, 1]))
    diff = vertices[:, None, :] - vertices[None, :, :]
    dist2 = (diff**2).sum(axis=2)
    i, j = np.unravel_index(int(np.argmax(dist2)), dist2.shape)
    longest = float(np.sqrt(dist2[i, j]))
    d_row, d_col = vertices[j] - vertices[i]
    angle = float(np.degrees(np.arctan2(-d_row, d_col)))
    if angle <= -90:
        angle += 180
    elif angle > 90:
        angle -= 180
    n = len(vertices)
    if n < 3:
        return longest, 1.0, angle
    edges = np.roll(vertices, -1, axis=0) - vertices
    lengths = np.hypot(edges[:, 0], edges[:, 1])
    keep = lengths > 0
    normals = np.stack([-edges[keep, 1], edges[keep, 0]], axis=1) / lengths[keep, None]
    rel = vertices[None, :, :] - vertices[keep][:, None, :]
    widths = np.abs((rel * normals[:, None, :]).sum(axis=2)).max(axis=1)
    return longest, float(widths.min()), angle
