"""Parametrised corrections applied on the QEMSCAN side of a transform: T = C o T0.

Refinement never edits the starting transform; it composes a correction after it, in QEMSCAN
pixels, so the same code refines a similarity, an affine or a thin-plate spline. Parameters
are scaled so that one unit moves points by about one QEMSCAN pixel (well-conditioned L-BFGS).
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from scipy import sparse

FloatArray = npt.NDArray[np.float64]


class LinearCorrection:
    """q = c + M (q0 - c) + t, with M = I + [[a, -b], [b, a]] / rho (similarity) or I + D / rho."""

    def __init__(self, kind: str, center: np.ndarray, rho: float) -> None:
        self.kind = kind
        self.center = np.asarray(center, dtype=np.float64)
        self.rho = float(rho)
        self.size = 4 if kind == "similarity" else 6

    def identity(self) -> np.ndarray:
        return np.zeros(self.size)

    def matrix(self, theta: np.ndarray) -> np.ndarray:
        """3x3 homogeneous matrix (QEMSCAN px -> QEMSCAN px)."""
        if self.kind == "similarity":
            a, b, tx, ty = theta
            m2 = np.eye(2) + np.array([[a, -b], [b, a]]) / self.rho
        else:
            m2 = np.eye(2) + np.asarray(theta[:4]).reshape(2, 2) / self.rho
            tx, ty = theta[4:]
        m = np.eye(3)
        m[:2, :2] = m2
        m[:2, 2] = self.center + np.array([tx, ty]) - m2 @ self.center
        return m

    def apply(self, theta: np.ndarray, q0: np.ndarray) -> np.ndarray:
        m = self.matrix(theta)
        return _affine_points(m, q0)

    def gradient(self, q0: np.ndarray, gq: np.ndarray) -> np.ndarray:
        """d(sum of scores)/d(theta) from the per-point score gradients gq = d score / d q."""
        d = (q0 - self.center) / self.rho
        gx, gy = gq[:, 0], gq[:, 1]
        if self.kind == "similarity":
            return np.array(
                [
                    (gx * d[:, 0] + gy * d[:, 1]).sum(),
                    (-gx * d[:, 1] + gy * d[:, 0]).sum(),
                    gx.sum(),
                    gy.sum(),
                ]
            )
        return np.array(
            [(gx * d[:, 0]).sum(), (gx * d[:, 1]).sum(), (gy * d[:, 0]).sum(), (gy * d[:, 1]).sum(), gx.sum(), gy.sum()]
        )


def _affine_points(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    """pts (P, 2) through a 3x3 matrix, elementwise: a (P, 2) x (2, 2) matmul would go through
    threaded BLAS, which is slow for such thin products on a busy machine."""
    x, y = pts[:, 0], pts[:, 1]
    return np.stack([m[0, 0] * x + m[0, 1] * y + m[0, 2], m[1, 0] * x + m[1, 1] * y + m[1, 2]], axis=1)


def _cubic_weights(t: np.ndarray) -> np.ndarray:
    """(P, 4) uniform cubic B-spline weights of the 4 supporting nodes (ITK's convention)."""
    t2, t3 = t * t, t * t * t
    return np.stack([(1 - t) ** 3 / 6, (3 * t3 - 6 * t2 + 4) / 6, (-3 * t3 + 3 * t2 + 3 * t + 1) / 6, t3 / 6], axis=1)


class BSplineCorrection:
    """q = q1 + b(q1): cubic B-spline displacement (QEMSCAN px) over a box, laid out exactly as
    ITK's BSplineTransform (node grid origin = box origin - spacing, mesh + 3 nodes per side)."""

    def __init__(self, box_min: np.ndarray, box_max: np.ndarray, mesh: tuple[int, int]) -> None:
        self.box_min = np.asarray(box_min, dtype=np.float64)
        self.extent = np.maximum(np.asarray(box_max, dtype=np.float64) - self.box_min, 1e-6)
        self.mesh = (int(mesh[0]), int(mesh[1]))  # (x, y)
        self.spacing = self.extent / np.array(self.mesh)
        self.nodes = (self.mesh[0] + 3, self.mesh[1] + 3)
        self.size = 2 * self.nodes[0] * self.nodes[1]
        # (points, basis, transposed basis) of the last points seen
        self._cache: tuple[np.ndarray, sparse.csr_matrix, sparse.csr_matrix] | None = None

    def identity(self) -> np.ndarray:
        return np.zeros(self.size)

    def _bases(self, q1: np.ndarray) -> tuple[sparse.csr_matrix, sparse.csr_matrix]:
        """Sparse (P, nodes) matrix of B-spline weights of the points q1, and its transpose
        (cached: q1 is fixed during a climb, so apply/gradient are two sparse products)."""
        if self._cache is not None and self._cache[0] is q1:
            return self._cache[1], self._cache[2]
        u = (q1 - self.box_min) / self.spacing + 1.0  # continuous index into the node grid
        u = np.clip(u, 1.0, np.array(self.mesh) + 1.0 - 1e-9)
        f = np.floor(u)
        wx, wy = _cubic_weights(u[:, 0] - f[:, 0]), _cubic_weights(u[:, 1] - f[:, 1])
        ix = f[:, 0].astype(np.intp) - 1
        iy = f[:, 1].astype(np.intp) - 1
        nx = self.nodes[0]
        idx = (iy[:, None, None] + np.arange(4)[None, :, None]) * nx + (ix[:, None, None] + np.arange(4)[None, None, :])
        w = wy[:, :, None] * wx[:, None, :]
        rows = np.repeat(np.arange(len(q1)), 16)
        basis = sparse.csr_matrix((w.ravel(), (rows, idx.ravel())), shape=(len(q1), self.size // 2))
        self._cache = (q1, basis, basis.T.tocsr())
        return basis, self._cache[2]

    def apply(self, theta: np.ndarray, q1: np.ndarray) -> FloatArray:
        n = self.size // 2
        out: FloatArray = q1 + self._bases(q1)[0] @ np.ascontiguousarray(theta.reshape(2, n).T)
        return out

    def gradient(self, q1: np.ndarray, gq: np.ndarray) -> FloatArray:
        out: FloatArray = (self._bases(q1)[1] @ gq).T.ravel()
        return out

    def to_itk(self, theta: np.ndarray, qemscan_mm: float) -> sitk.BSplineTransform:
        """The same displacement as an ITK transform acting on QEMSCAN mm."""
        tx = sitk.BSplineTransform(2, 3)
        tx.SetTransformDomainOrigin(tuple(self.box_min * qemscan_mm))
        tx.SetTransformDomainPhysicalDimensions(tuple(self.extent * qemscan_mm))
        tx.SetTransformDomainMeshSize(list(self.mesh))
        tx.SetTransformDomainDirection((1.0, 0.0, 0.0, 1.0))
        tx.SetParameters(tuple(float(v) for v in np.asarray(theta) * qemscan_mm))
        return tx
