"""Thin-plate spline between landmark sets, and its ITK form (affine + sampled displacement).

SimpleITK has no thin-plate-spline transform class, so the spline is stored for resampling as
``Composite([affine, displacement field])``: the affine part exactly, the bending part sampled on
a grid over the image (linear interpolation between nodes). The analytic spline is kept in the
JSON sidecar so that it can be rebuilt exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from thinseg.errors import ThinSegError

#: Longest side, in nodes, of the displacement grid that samples the spline's bending part.
MAX_FIELD_NODES = 512


def _kernel(r2: np.ndarray) -> np.ndarray:
    """U(r) = r^2 log r^2 (0 at r = 0): the 2-D thin-plate bending-energy kernel."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = r2 * np.log(r2)
    return np.where(r2 > 0, out, 0.0)


@dataclass(frozen=True)
class ThinPlateSpline:
    """f(p) = A p + t + sum_i w_i U(|p - c_i|), interpolating `centers` -> targets (2-D)."""

    centers: np.ndarray  # (n, 2) source points, normalised units
    weights: np.ndarray  # (n, 2)
    affine: np.ndarray  # (3, 2): rows for x, y, 1
    shift: np.ndarray  # (2,) normalisation: p_norm = (p - shift) / scale
    scale: float

    @classmethod
    def fit(cls, src: np.ndarray, dst: np.ndarray, regularization: float = 0.0) -> ThinPlateSpline:
        src = np.asarray(src, dtype=np.float64).reshape(-1, 2)
        dst = np.asarray(dst, dtype=np.float64).reshape(-1, 2)
        n = len(src)
        shift = src.mean(axis=0)
        scale = float(np.abs(src - shift).max()) or 1.0
        c = (src - shift) / scale
        k = _kernel(((c[:, None, :] - c[None, :, :]) ** 2).sum(-1)) + regularization * np.eye(n)
        p = np.hstack([c, np.ones((n, 1))])
        system = np.zeros((n + 3, n + 3))
        system[:n, :n], system[:n, n:], system[n:, :n] = k, p, p.T
        rhs = np.zeros((n + 3, 2))
        rhs[:n] = dst
        if np.linalg.matrix_rank(p) < 3:
            raise ThinSegError("the landmarks are collinear: a thin-plate spline needs them spread over the image")
        sol = np.linalg.solve(system, rhs)
        return cls(c, sol[:n], sol[n:], shift, scale)

    def __call__(self, pts: np.ndarray) -> np.ndarray:
        return self.affine_part(pts) + self.bending_part(pts)

    def affine_part(self, pts: np.ndarray) -> np.ndarray:
        q = (np.asarray(pts, dtype=np.float64).reshape(-1, 2) - self.shift) / self.scale
        return q @ self.affine[:2] + self.affine[2]

    def bending_part(self, pts: np.ndarray) -> np.ndarray:
        q = (np.asarray(pts, dtype=np.float64).reshape(-1, 2) - self.shift) / self.scale
        out = np.zeros((len(q), 2))
        for start in range(0, len(q), 65536):  # bounded memory on dense grids
            block = q[start : start + 65536]
            u = _kernel(((block[:, None, :] - self.centers[None, :, :]) ** 2).sum(-1))
            out[start : start + 65536] = u @ self.weights
        return out

    def affine_matrix(self) -> np.ndarray:
        """3x3 matrix of the affine part in the ORIGINAL (un-normalised) units."""
        a = self.affine[:2].T / self.scale
        m = np.eye(3)
        m[:2, :2] = a
        m[:2, 2] = self.affine[2] - a @ self.shift
        return m

    def to_dict(self) -> dict:
        return {
            "centers": self.centers.tolist(),
            "weights": self.weights.tolist(),
            "affine": self.affine.tolist(),
            "shift": self.shift.tolist(),
            "scale": self.scale,
        }


def tps_to_itk(
    spline_mm: ThinPlateSpline, image_shape: tuple[int, int], image_mm_per_pixel: float
) -> tuple[sitk.Transform, np.ndarray]:
    """ITK ``Composite([affine, displacement])`` of a spline acting in mm (image -> QEMSCAN).

    With T = A(p + d(p)), the field holds d = A^-1 (bending part). Returns the transform and
    the affine part's 3x3 matrix. The field covers the image plus one node of margin.
    """
    m = spline_mm.affine_matrix()
    affine = sitk.AffineTransform(2)
    affine.SetMatrix(tuple(m[:2, :2].ravel()))
    affine.SetTranslation(tuple(m[:2, 2]))
    h, w = image_shape
    extent = np.array([w - 1, h - 1], dtype=np.float64) * image_mm_per_pixel
    step = max(float(extent.max()) / (MAX_FIELD_NODES - 3), 4 * image_mm_per_pixel)
    nodes = np.ceil(extent / step).astype(int) + 3  # one node of margin each side
    origin = -step * np.ones(2)
    xs = origin[0] + step * np.arange(nodes[0])
    ys = origin[1] + step * np.arange(nodes[1])
    gy, gx = np.meshgrid(ys, xs, indexing="ij")
    pts = np.stack([gx.ravel(), gy.ravel()], axis=1)
    bend = spline_mm.bending_part(pts) @ np.linalg.inv(m[:2, :2]).T
    field = sitk.GetImageFromArray(bend.reshape(nodes[1], nodes[0], 2), isVector=True)
    field.SetOrigin(tuple(origin))
    field.SetSpacing((step, step))
    disp = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    return sitk.CompositeTransform([affine, disp]), m
