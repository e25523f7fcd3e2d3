"""The registration transform: a SimpleITK transform from image mm to QEMSCAN mm, plus helpers.

`SectionTransform` bundles the ITK object with the grid geometry so that callers can map
pixel points, measure the target registration error (TRE) against a known truth and compare
two transforms, without caring whether the ITK object is linear, a thin-plate spline sampled
as a displacement field, or a composite with a B-spline stage.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from thinseg.registration.grids import Geometry, grid_points

FloatArray = npt.NDArray[np.float64]

LINEAR_KINDS = ("similarity", "affine")
KINDS = ("similarity", "affine", "tps")


@dataclass
class SectionTransform:
    """`itk` maps IMAGE physical points (mm) to QEMSCAN physical points (mm).

    kind: "similarity", "affine" or "tps", with "+bspline" appended when a free-form stage
    sits on top. `details` carries what the JSON sidecar records (landmarks, TPS weights ...).
    """

    kind: str
    itk: sitk.Transform
    geometry: Geometry
    details: dict[str, Any] = field(default_factory=dict)

    def map_image_px(self, pts_px: np.ndarray) -> np.ndarray:
        """QEMSCAN pixel positions of image pixel points (n, 2) -> (n, 2)."""
        g = self.geometry
        return g.qemscan_mm_to_px(map_points_mm(self.itk, g.image_px_to_mm(pts_px)))

    @property
    def is_linear(self) -> bool:
        return linear_matrix(self.itk) is not None

    def linear_px(self) -> np.ndarray:
        """3x3 matrix image px -> QEMSCAN px of the linear part (the whole transform if linear)."""
        m = linear_matrix(self.itk)
        if m is None:
            m = linear_matrix(first_linear(self.itk))
        g = self.geometry
        to_mm = np.diag([g.image_mm_per_pixel, g.image_mm_per_pixel, 1.0])
        to_px = np.diag([1 / g.qemscan_mm_per_pixel, 1 / g.qemscan_mm_per_pixel, 1.0])
        out: FloatArray = to_px @ m @ to_mm
        return out


def downcast(tx: sitk.Transform) -> Any:
    """The transform as its concrete SimpleITK class (known only at run time, hence Any)."""
    return tx.Downcast() if hasattr(tx, "Downcast") else tx


def linear_matrix(tx: sitk.Transform) -> FloatArray | None:
    """3x3 homogeneous matrix (mm -> mm) of a linear ITK transform, None if not linear."""
    sub = downcast(tx)
    if isinstance(sub, sitk.TranslationTransform):
        m = np.eye(3)
        m[:2, 2] = sub.GetOffset()
        return m
    if not hasattr(sub, "GetMatrix") or not hasattr(sub, "GetCenter"):
        return None
    a = np.array(sub.GetMatrix(), dtype=np.float64).reshape(2, 2)
    c = np.array(sub.GetCenter(), dtype=np.float64)
    t = np.array(sub.GetTranslation(), dtype=np.float64)
    m = np.eye(3)
    m[:2, :2] = a
    m[:2, 2] = t + c - a @ c
    return m


def first_linear(tx: sitk.Transform) -> sitk.Transform:
    """The outermost linear transform of a composite (the one applied last)."""
    for sub in composite_parts(tx):
        if linear_matrix(sub) is not None:
            return sub
    whole: sitk.Transform = downcast(tx)
    return whole


def composite_parts(tx: sitk.Transform) -> list[sitk.Transform]:
    """The transforms of a composite, each as its concrete class (application order is right
    to left); [] for a transform that is not a composite."""
    tx = downcast(tx)
    if not isinstance(tx, sitk.CompositeTransform):
        return []
    count = tx.GetNumberOfTransforms()
    return [downcast(tx.GetNthTransform(i)) for i in range(count)]


def map_points_mm(tx: sitk.Transform, pts_mm: npt.ArrayLike) -> FloatArray:
    """Apply an ITK transform to (n, 2) points; vectorised for linear transforms."""
    pts = np.asarray(pts_mm, dtype=np.float64).reshape(-1, 2)
    m = linear_matrix(tx)
    if m is not None:
        out: FloatArray = pts @ m[:2, :2].T + m[:2, 2]
        return out
    mapped = [tx.TransformPoint((float(x), float(y))) for x, y in pts]
    return np.array(mapped, dtype=np.float64).reshape(-1, 2)


def make_linear(kind: str, m_mm: np.ndarray, center_mm: np.ndarray) -> sitk.Transform:
    """ITK object for a 3x3 mm->mm matrix: Similarity2DTransform or AffineTransform about `center`.

    A similarity is stored as such (4 parameters) so that refinement keeps it a similarity.
    """
    a = np.asarray(m_mm[:2, :2], dtype=np.float64)
    c = np.asarray(center_mm, dtype=np.float64)
    offset = m_mm[:2, 2]
    translation = a @ c + offset - c
    if kind == "similarity":
        scale = math.sqrt(abs(np.linalg.det(a)))
        angle = math.atan2(a[1, 0], a[0, 0])
        similarity: sitk.Transform = sitk.Similarity2DTransform(scale, angle, tuple(translation), tuple(c))
        return similarity
    affine = sitk.AffineTransform(2)
    affine.SetCenter(tuple(c))
    affine.SetMatrix(tuple(a.ravel()))
    affine.SetTranslation(tuple(translation))
    return affine


def px_matrix_to_mm(m_px: np.ndarray, geometry: Geometry) -> np.ndarray:
    """Image px -> QEMSCAN px matrix, re-expressed as image mm -> QEMSCAN mm."""
    g = geometry
    to_px = np.diag([1 / g.image_mm_per_pixel, 1 / g.image_mm_per_pixel, 1.0])
    to_mm = np.diag([g.qemscan_mm_per_pixel, g.qemscan_mm_per_pixel, 1.0])
    return to_mm @ np.asarray(m_px, dtype=np.float64) @ to_px


def image_center_mm(geometry: Geometry) -> np.ndarray:
    h, w = geometry.image_shape
    return np.array([(w - 1) / 2, (h - 1) / 2]) * geometry.image_mm_per_pixel


def from_px_matrix(m_px: np.ndarray, geometry: Geometry, kind: str = "affine") -> SectionTransform:
    """SectionTransform for a linear image px -> QEMSCAN px matrix (e.g. a known truth)."""
    m_mm = px_matrix_to_mm(m_px, geometry)
    return SectionTransform(kind, make_linear(kind, m_mm, image_center_mm(geometry)), geometry)


def from_qemscan_to_image(qemscan_to_image: np.ndarray, geometry: Geometry) -> SectionTransform:
    """The transform recorded by the synthetic generator ([x_img, y_img, 1] = A @ [x_q, y_q, 1])."""
    return from_px_matrix(np.linalg.inv(np.asarray(qemscan_to_image, dtype=np.float64)), geometry)


def displacement_px(a: SectionTransform, b: SectionTransform, n: int = 64) -> np.ndarray:
    """Distances (QEMSCAN px) between where `a` and `b` send an n x n lattice over the image."""
    pts = grid_points(a.geometry.image_shape, n)
    out: FloatArray = np.linalg.norm(a.map_image_px(pts) - b.map_image_px(pts), axis=1)
    return out


def target_registration_error(estimate: SectionTransform, qemscan_to_image: np.ndarray, n: int = 64) -> float:
    """Mean distance (QEMSCAN px) between recovered and true positions over the whole image."""
    truth = from_qemscan_to_image(qemscan_to_image, estimate.geometry)
    return float(displacement_px(estimate, truth, n).mean())


def describe_linear(m_px: np.ndarray) -> dict[str, float]:
    """Rotation (deg), mean scale, shear and translation of an image px -> QEMSCAN px matrix."""
    a = m_px[:2, :2]
    u, s, vt = np.linalg.svd(a)
    r = u @ vt
    return {
        "rotation_deg": math.degrees(math.atan2(r[1, 0], r[0, 0])),
        "scale": float(math.sqrt(abs(np.linalg.det(a)))),
        "anisotropy": float(s[0] / s[1]) if s[1] > 0 else float("inf"),
        "translation_x_px": float(m_px[0, 2]),
        "translation_y_px": float(m_px[1, 2]),
    }


def change_summary(initial: SectionTransform, final: SectionTransform, n: int = 64) -> dict[str, float]:
    """How far refinement moved the mapping: displacement over the image (QEMSCAN px) and the
    change of rotation/scale/translation of the linear parts."""
    d = displacement_px(initial, final, n)
    a, b = describe_linear(initial.linear_px()), describe_linear(final.linear_px())
    h, w = initial.geometry.image_shape
    centre = np.array([[(w - 1) / 2, (h - 1) / 2]])
    return {
        "mean_displacement_qemscan_px": float(d.mean()),
        "max_displacement_qemscan_px": float(d.max()),
        "centre_shift_qemscan_px": float(np.linalg.norm(final.map_image_px(centre) - initial.map_image_px(centre))),
        "rotation_change_deg": b["rotation_deg"] - a["rotation_deg"],
        "scale_change_ratio": b["scale"] / a["scale"],
    }


def map_grid_mm(tx: sitk.Transform, shape: tuple[int, int], origin_mm: float, spacing_mm: float) -> np.ndarray:
    """(h, w, 2) images of the points of a regular grid (pixel (i, j) at origin + spacing*(j, i))."""
    h, w = shape
    m = linear_matrix(tx)
    if m is not None:
        ys, xs = np.meshgrid(
            origin_mm + spacing_mm * np.arange(h), origin_mm + spacing_mm * np.arange(w), indexing="ij"
        )
        return np.stack([m[0, 0] * xs + m[0, 1] * ys + m[0, 2], m[1, 0] * xs + m[1, 1] * ys + m[1, 2]], axis=-1)
    field = sitk.TransformToDisplacementField(
        tx, sitk.sitkVectorFloat64, [w, h], [origin_mm, origin_mm], [spacing_mm, spacing_mm], [1, 0, 0, 1]
    )
    disp = sitk.GetArrayFromImage(field)
    ys, xs = np.meshgrid(origin_mm + spacing_mm * np.arange(h), origin_mm + spacing_mm * np.arange(w), indexing="ij")
    out: FloatArray = disp + np.stack([xs, ys], axis=-1)
    return out


def compose(outer: sitk.Transform, inner: sitk.Transform) -> sitk.Transform:
    """outer o inner as ONE flat ITK transform: nested composites are flattened and neighbouring
    linear parts multiplied together, so the .tfm stays simple and `first_linear` finds the
    whole linear part (e.g. a refinement's correction times a thin-plate spline's affine)."""
    parts: list[sitk.Transform] = []
    for tx in (outer, inner):
        tx = downcast(tx)
        if isinstance(tx, sitk.CompositeTransform):
            flat = sitk.CompositeTransform(tx)
            flat.FlattenTransform()
            parts += composite_parts(flat)
        else:
            parts.append(tx)
    merged: list[sitk.Transform] = []
    for tx in parts:  # application order is right to left: merged[-1] o tx
        m = linear_matrix(tx)
        prev = linear_matrix(merged[-1]) if merged else None
        if m is not None and prev is not None:
            kind = (
                "similarity" if all(isinstance(t, sitk.Similarity2DTransform) for t in (merged[-1], tx)) else "affine"
            )
            center = np.array(merged[-1].GetCenter()) if hasattr(merged[-1], "GetCenter") else np.zeros(2)
            merged[-1] = make_linear(kind, prev @ m, center)
        else:
            merged.append(tx)
    if len(merged) == 1:
        return merged[0]
    composite: sitk.Transform = sitk.CompositeTransform(merged)
    return composite
