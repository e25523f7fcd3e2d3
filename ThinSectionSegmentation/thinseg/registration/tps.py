"""Thin-plate spline between landmark sets, and its ITK form (affine + sampled displacement).

The spline is solved and evaluated by scipy's `RBFInterpolator` (thin-plate kernel with a
degree-1 polynomial, which is exactly the thin-plate spline). SimpleITK has no thin-plate-spline
transform class, so for resampling the spline is stored as ``Composite([affine, displacement
field])``: the affine part exactly, the bending part sampled on a grid over the image (linear
interpolation between nodes). The analytic spline is kept in the JSON sidecar (`to_dict`) so
that it can be rebuilt exactly.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from scipy.interpolate import RBFInterpolator

from thinseg.errors import ThinSegError

FloatArray = npt.NDArray[np.float64]

#: Longest side, in nodes, of the displacement grid that samples the spline's bending part.
MAX_FIELD_NODES = 512


def _polynomial_part(rbf: RBFInterpolator) -> FloatArray:
    """(3, 2) affine part of a fitted degree-1 interpolant: rows for x, y, 1 (its own units).

    scipy does not publish the fitted coefficients; they are the private ``_coeffs`` (kernel
    weights, then one row per monomial of ``powers``, evaluated at ``(p - _shift) / _scale``),
    part of the interpolator's pickled state since scipy 1.7.
    """
    coeffs = np.asarray(rbf._coeffs, dtype=np.float64)
    shift = np.asarray(rbf._shift, dtype=np.float64)
    scale = np.asarray(rbf._scale, dtype=np.float64)
    powers = np.asarray(rbf.powers)
    if powers.shape != (3, 2) or coeffs.shape[0] != len(rbf.y) + 3:
        raise RuntimeError("unexpected scipy RBFInterpolator layout: expected a degree-1 polynomial in 2-D")
    affine = np.zeros((3, coeffs.shape[1]))
    for power, c in zip(powers.tolist(), coeffs[len(rbf.y) :]):
        if power == [0, 0]:
            affine[2] += c
        else:
            axis = power.index(1)
            affine[axis] += c / scale[axis]
            affine[2] -= c * shift[axis] / scale[axis]
    return affine


@dataclass(frozen=True)
class ThinPlateSpline:
    """f(p) = A p + t + sum_i w_i U(|p - c_i|), interpolating `centers` -> targets (2-D).

    U(r) = r^2 log r^2, in normalised units p_norm = (p - shift) / scale. `interpolant` is the
    scipy interpolator (kernel r^2 log r, so its kernel weights are 2 w); `weights` and
    `affine` are read from it once, at fitting.
    """

    interpolant: RBFInterpolator
    centers: FloatArray  # (n, 2) source points, normalised units
    weights: FloatArray  # (n, 2)
    affine: FloatArray  # (3, 2): rows for x, y, 1
    shift: FloatArray  # (2,) normalisation: p_norm = (p - shift) / scale
    scale: float

    @classmethod
    def fit(cls, src: npt.ArrayLike, dst: npt.ArrayLike, regularization: float = 0.0) -> ThinPlateSpline:
        """The spline through the pairs src -> dst ((n, 2) each); `regularization` is added to
        the diagonal of the U kernel matrix (0: exact interpolation)."""
        src = np.asarray(src, dtype=np.float64).reshape(-1, 2)
        dst = np.asarray(dst, dtype=np.float64).reshape(-1, 2)
        shift = src.mean(axis=0)
        scale = float(np.abs(src - shift).max()) or 1.0
        c = (src - shift) / scale
        if np.linalg.matrix_rank(np.hstack([c, np.ones((len(c), 1))])) < 3:
            raise ThinSegError("the landmarks are collinear: a thin-plate spline needs them spread over the image")
        # scipy's kernel r^2 log r is U / 2, so its smoothing is half the U-matrix regularisation
        try:
            rbf = RBFInterpolator(c, dst, kernel="thin_plate_spline", degree=1, smoothing=regularization / 2)
        except np.linalg.LinAlgError:
            raise ThinSegError(
                "the landmarks do not determine a thin-plate spline: two of them are the same point"
            ) from None
        weights = np.asarray(rbf._coeffs[: len(c)], dtype=np.float64) / 2
        return cls(rbf, c, weights, _polynomial_part(rbf), shift, scale)

    def _normalise(self, pts: npt.ArrayLike) -> FloatArray:
        return (np.asarray(pts, dtype=np.float64).reshape(-1, 2) - self.shift) / self.scale

    def __call__(self, pts: npt.ArrayLike) -> FloatArray:
        """f at (m, 2) points."""
        return np.asarray(self.interpolant(self._normalise(pts)), dtype=np.float64)

    def affine_part(self, pts: npt.ArrayLike) -> FloatArray:
        """A p + t at (m, 2) points."""
        q = self._normalise(pts)
        return np.asarray(q @ self.affine[:2] + self.affine[2], dtype=np.float64)

    def bending_part(self, pts: npt.ArrayLike) -> FloatArray:
        """f - (A p + t) at (m, 2) points: the non-affine part."""
        return self(pts) - self.affine_part(pts)

    def affine_matrix(self) -> FloatArray:
        """3x3 matrix of the affine part in the ORIGINAL (un-normalised) units."""
        a = self.affine[:2].T / self.scale
        m = np.eye(3)
        m[:2, :2] = a
        m[:2, 2] = self.affine[2] - a @ self.shift
        return m

    def to_dict(self) -> dict[str, Any]:
        """JSON record: enough to rebuild the spline exactly (U(r) = r^2 log r^2)."""
        return {
            "centers": self.centers.tolist(),
            "weights": self.weights.tolist(),
            "affine": self.affine.tolist(),
            "shift": self.shift.tolist(),
            "scale": self.scale,
        }


def tps_to_itk(
    spline_mm: ThinPlateSpline, image_shape: tuple[int, int], image_mm_per_pixel: float
) -> tuple[sitk.Transform, FloatArray]:
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
