"""Pixel and physical coordinates of the two grids that registration relates.

Conventions, used by every module of this package and by the files it writes:

- A point in pixels is ``(x, y)`` = (column, row), measured from the CENTRE of pixel (0, 0).
- Physical coordinates are millimetres: ``p_mm = mm_per_pixel * (x, y)`` on each grid, i.e.
  origin 0 at the centre of pixel (0, 0), identity direction, isotropic spacing. This is the
  ITK/LPS geometry of a GeoSlicer thin-section node whose origin is 0.
- The registration transform maps IMAGE (PP) physical points to QEMSCAN physical points, the
  ITK "fixed -> moving" direction used to resample the QEMSCAN map onto the PP grid.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from thinseg import limits


@dataclass(frozen=True)
class Geometry:
    """Sizes and spacings of the PP image grid (fixed) and the QEMSCAN grid (moving)."""

    image_shape: tuple[int, int]  # (H, W)
    image_mm_per_pixel: float
    qemscan_shape: tuple[int, int]  # (h, w)
    qemscan_mm_per_pixel: float

    def __post_init__(self) -> None:
        # finite and sane, whoever passes them (command line, job file, a registration record)
        limits.check_mm_per_pixel(self.image_mm_per_pixel, "PP image pixel size")
        limits.check_mm_per_pixel(self.qemscan_mm_per_pixel, "QEMSCAN pixel size")

    @property
    def ratio(self) -> float:
        """QEMSCAN pixel size in image pixels (about 7.6 for 10 um vs 1.32 um)."""
        return self.qemscan_mm_per_pixel / self.image_mm_per_pixel

    def image_px_to_mm(self, pts: np.ndarray) -> np.ndarray:
        return np.asarray(pts, dtype=np.float64) * self.image_mm_per_pixel

    def qemscan_px_to_mm(self, pts: np.ndarray) -> np.ndarray:
        return np.asarray(pts, dtype=np.float64) * self.qemscan_mm_per_pixel

    def qemscan_mm_to_px(self, pts: np.ndarray) -> np.ndarray:
        return np.asarray(pts, dtype=np.float64) / self.qemscan_mm_per_pixel

    def image_mm_to_px(self, pts: np.ndarray) -> np.ndarray:
        return np.asarray(pts, dtype=np.float64) / self.image_mm_per_pixel


def inside(pts_px: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """True for points within the pixel area of a grid (edges of the border pixels included)."""
    pts = np.asarray(pts_px, dtype=np.float64).reshape(-1, 2)
    h, w = shape
    return (pts[:, 0] >= -0.5) & (pts[:, 0] <= w - 0.5) & (pts[:, 1] >= -0.5) & (pts[:, 1] <= h - 0.5)


def grid_points(shape: tuple[int, int], n: int = 64) -> np.ndarray:
    """An n x n lattice of (x, y) pixel points spanning a grid, for error measures over an image."""
    h, w = shape
    ys, xs = np.meshgrid(np.linspace(0, h - 1, n), np.linspace(0, w - 1, n), indexing="ij")
    return np.stack([xs.ravel(), ys.ravel()], axis=1)
