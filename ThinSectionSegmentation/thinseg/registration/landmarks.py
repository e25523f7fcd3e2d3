"""Least-squares transforms from landmark pairs, with per-landmark residuals and outlier flags.

A person clicks the same feature in the QEMSCAN map and in the PP image; one wrong click is the
usual failure of hand registration, so besides fitting, each landmark gets a residual in image
pixels and a leave-one-out check that names the click that disagrees with the others.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from thinseg.errors import ThinSegError
from thinseg.registration.grids import Geometry, inside
from thinseg.registration.sitk_transforms import (
    KINDS,
    SectionTransform,
    image_center_mm,
    make_linear,
    px_matrix_to_mm,
)
from thinseg.registration.tps import ThinPlateSpline, tps_to_itk

if TYPE_CHECKING:
    from typing_extensions import TypeAlias  # typing has it from Python 3.10 only

FloatArray = npt.NDArray[np.float64]
#: A fitted landmark map image px -> QEMSCAN px: a 3x3 matrix or a thin-plate spline.
PxModel: TypeAlias = "FloatArray | ThinPlateSpline"

#: Fewest pairs accepted per kind (>= 3; >= 4 for affine, so that one wrong click can still be
#: detected). With 3 pairs a thin-plate spline is an exact fit: residuals are 0 and no click
#: can be checked (no outliers).
MIN_PAIRS = {"similarity": 3, "affine": 4, "tps": 3}
#: Pairs that determine each kind exactly (used for leave-one-out fits).
EXACT_PAIRS = {"similarity": 2, "affine": 3, "tps": 3}
#: Most pairs accepted: far more than anyone clicks, and the leave-one-out check of a thin-plate
#: spline costs n fits of an n x n system per flagged click.
MAX_PAIRS = 500
#: Two clicks closer than this (px) are the same point: a thin-plate spline through both is singular.
SAME_POINT_PX = 1e-6


@dataclass
class LandmarkFit:
    """The fitted transform and, per landmark (input order), its residuals in IMAGE pixels.

    residuals_px: distance between the clicked image point and where the fit puts the QEMSCAN
    click (0 for an interpolating TPS). loo_px: the same against a fit WITHOUT that landmark,
    NaN when too few remain. outliers: indices of the clicks flagged as wrong.
    """

    transform: SectionTransform
    residuals_px: np.ndarray
    loo_px: np.ndarray
    outliers: list[int]
    tolerance_px: float
    names: list[str] = field(default_factory=list)

    def report(self) -> list[dict[str, Any]]:
        """Per landmark: name, residual, leave-one-out error and outlier flag (JSON-ready)."""
        return [
            {
                "index": i,
                "name": self.names[i] if i < len(self.names) else str(i + 1),
                "residual_px": float(self.residuals_px[i]),
                "leave_one_out_px": None if np.isnan(self.loo_px[i]) else float(self.loo_px[i]),
                "outlier": i in self.outliers,
            }
            for i in range(len(self.residuals_px))
        ]


def fit_px(src: np.ndarray, dst: np.ndarray, kind: str) -> PxModel:
    """Least-squares map of (n, 2) image px -> QEMSCAN px: a 3x3 matrix or a ThinPlateSpline."""
    if kind == "tps":
        return ThinPlateSpline.fit(src, dst)
    n = len(src)
    if kind == "similarity":
        mu_s, mu_d = src.mean(0), dst.mean(0)
        s, d = src - mu_s, dst - mu_d
        # complex least squares: d = z * s with z = scale * e^{i angle}
        zs, zd = s[:, 0] + 1j * s[:, 1], d[:, 0] + 1j * d[:, 1]
        denom = float(np.vdot(zs, zs).real)
        if denom <= 0:
            raise ThinSegError("the landmarks coincide: place them far apart over the section")
        z = np.vdot(zs, zd) / denom
        a = np.array([[z.real, -z.imag], [z.imag, z.real]])
        m = np.eye(3)
        m[:2, :2] = a
        m[:2, 2] = mu_d - a @ mu_s
        return m
    if kind == "affine":
        p = np.hstack([src, np.ones((n, 1))])
        if np.linalg.matrix_rank(p) < 3:
            raise ThinSegError("the landmarks are collinear: an affine fit needs them spread over the section")
        sol, *_ = np.linalg.lstsq(p, dst, rcond=None)
        m = np.eye(3)
        m[:2, :] = sol.T
        return m
    raise ThinSegError(f"unknown transform kind {kind!r} (choose from {', '.join(KINDS)})")


def _apply(model: PxModel, pts: np.ndarray) -> FloatArray:
    if isinstance(model, ThinPlateSpline):
        return model(pts)
    out: FloatArray = pts @ model[:2, :2].T + model[:2, 2]
    return out


def _jacobian(model: PxModel) -> FloatArray:
    return model.affine_matrix()[:2, :2] if isinstance(model, ThinPlateSpline) else model[:2, :2]


def _residuals_image_px(model: PxModel, src: np.ndarray, dst: np.ndarray) -> FloatArray:
    """Misfit (QEMSCAN px) brought back to image px through the local linear part."""
    inv = np.linalg.inv(_jacobian(model))
    out: FloatArray = np.linalg.norm((_apply(model, src) - dst) @ inv.T, axis=1)
    return out


def find_outliers(src: np.ndarray, dst: np.ndarray, kind: str, tolerance_px: float) -> tuple[list[int], np.ndarray]:
    """Indices of clicks inconsistent with the rest, and the leave-one-out errors (image px).

    Repeatedly: for each remaining landmark fit the others; the landmark whose removal leaves
    the most consistent set (smallest rms misfit of the others; for a TPS, which always fits the
    others exactly, the largest prediction error) is flagged if the others predict it worse than
    `tolerance_px`. Stops while the remaining set still over-determines the fit.
    """
    loo = np.full(len(src), np.nan)
    active = list(range(len(src)))
    flagged: list[int] = []
    while len(active) - 1 >= EXACT_PAIRS[kind]:  # each leave-one-out fit is still determined
        pred, rms = _leave_one_out(src, dst, kind, active)
        if not flagged:
            loo[active] = [pred[i] for i in active]
        # naming the culprit needs the remaining set to over-determine the fit
        valid = [i for i in active if np.isfinite(pred[i])]
        if not valid or len(active) - 1 < EXACT_PAIRS[kind] + 1:
            break
        if kind == "tps":
            worst = max(valid, key=lambda i: pred[i])
        else:
            worst = min(valid, key=lambda i: (rms[i], -pred[i]))
        if pred[worst] <= tolerance_px:
            break
        flagged.append(worst)
        active.remove(worst)
    return sorted(flagged), loo


def _leave_one_out(
    src: np.ndarray, dst: np.ndarray, kind: str, active: list[int]
) -> tuple[dict[int, float], dict[int, float]]:
    """Per landmark i: prediction error of the fit without i, and that fit's rms misfit (image px)."""
    pred: dict[int, float] = {}
    rms: dict[int, float] = {}
    for i in active:
        rest = [j for j in active if j != i]
        try:
            model = fit_px(src[rest], dst[rest], kind)
            pred[i] = float(_residuals_image_px(model, src[[i]], dst[[i]])[0])
            rms[i] = float(np.sqrt(np.mean(_residuals_image_px(model, src[rest], dst[rest]) ** 2)))
        except (ThinSegError, np.linalg.LinAlgError):
            pred[i], rms[i] = np.nan, np.inf
    return pred, rms


def check_landmarks(
    qemscan_px: np.ndarray,
    image_px: np.ndarray,
    kind: str,
    geometry: Geometry,
    path: str | os.PathLike[str] | None = None,
    names: list[str] | None = None,
) -> tuple[FloatArray, FloatArray]:
    """Validate shapes, count and positions; raise ThinSegError naming the offending landmarks
    (by their names where the file gives them, else by number)."""
    if kind not in KINDS:
        raise ThinSegError(f"unknown transform kind {kind!r} (choose from {', '.join(KINDS)})", path)
    q = np.asarray(qemscan_px, dtype=np.float64)
    p = np.asarray(image_px, dtype=np.float64)
    if q.ndim != 2 or q.shape[1] != 2 or q.shape != p.shape:
        raise ThinSegError(f"landmarks must be matching (n, 2) point lists, got {q.shape} and {p.shape}", path)
    if len(q) < MIN_PAIRS[kind]:
        raise ThinSegError(
            f"{len(q)} landmark pair(s) given, {_article(kind)} {kind} transform needs at least {MIN_PAIRS[kind]}", path
        )
    if len(q) > MAX_PAIRS:
        raise ThinSegError(f"{len(q)} landmark pairs given, more than the {MAX_PAIRS} a fit accepts", path)
    if not (np.isfinite(q).all() and np.isfinite(p).all()):
        raise ThinSegError("landmark coordinates must be finite numbers", path)
    bad_q = np.flatnonzero(~inside(q, geometry.qemscan_shape))
    bad_p = np.flatnonzero(~inside(p, geometry.image_shape))

    def label(i: int | np.integer[Any]) -> str:
        return str(names[i]) if names and i < len(names) and names[i] else str(i + 1)

    if len(bad_q):
        raise ThinSegError(
            f"landmark(s) {', '.join(label(i) for i in bad_q)} lie outside the QEMSCAN map "
            f"({geometry.qemscan_shape[1]} x {geometry.qemscan_shape[0]} px)",
            path,
        )
    if len(bad_p):
        raise ThinSegError(
            f"landmark(s) {', '.join(label(i) for i in bad_p)} lie outside the PP image "
            f"({geometry.image_shape[1]} x {geometry.image_shape[0]} px)",
            path,
        )
    for points, where in ((p, "PP image"), (q, "QEMSCAN map")):
        same = same_points(points)
        if same is not None:
            i, j = same
            x, y = points[i]
            raise ThinSegError(
                f"landmarks {label(i)} and {label(j)} are the same point ({x:g}, {y:g}) of the {where}: "
                "remove one of them or move it to its own feature",
                path,
            )
        if kind != "similarity" and _collinear(points):
            raise ThinSegError(
                f"the landmarks' points on the {where} are collinear: {_article(kind)} {kind} fit needs them"
                " spread over the section (or use --transform similarity)",
                path,
            )
    return q, p


def _article(kind: str) -> str:
    return "an" if kind == "affine" else "a"


def same_points(points: np.ndarray) -> tuple[int, int] | None:
    """The first two indices of `points` ((n, 2) px) that are the same point, or None."""
    keys = np.round(np.asarray(points, dtype=np.float64) / SAME_POINT_PX)
    _, first, inverse = np.unique(keys, axis=0, return_index=True, return_inverse=True)
    inverse = np.asarray(inverse).reshape(-1)
    repeated = np.flatnonzero(first[inverse] != np.arange(len(keys)))
    if not len(repeated):
        return None
    j = int(repeated[0])
    return int(first[inverse[j]]), j


def _collinear(points: np.ndarray) -> bool:
    """Whether (n, 2) points lie on one line (or one point): no affine map is fixed by them."""
    centred = points - points.mean(axis=0)
    scale = float(np.abs(centred).max())
    return scale == 0 or int(np.linalg.matrix_rank(centred / scale, tol=1e-9)) < 2


def fit_landmarks(
    qemscan_px: np.ndarray,
    image_px: np.ndarray,
    geometry: Geometry,
    kind: str = "similarity",
    *,
    tolerance_px: float | None = None,
    names: list[str] | None = None,
    path: str | os.PathLike[str] | None = None,
) -> LandmarkFit:
    """Fit image -> QEMSCAN from pairs of (x, y) pixel points (QEMSCAN click, image click).

    tolerance_px: leave-one-out error (image px) above which a click is flagged; default 1.5
    QEMSCAN pixels, far above a careful click's error and far below a wrong feature's.
    """
    q, p = check_landmarks(qemscan_px, image_px, kind, geometry, path, names)
    tol = 1.5 * geometry.ratio if tolerance_px is None else float(tolerance_px)
    try:
        return _fit_checked(q, p, geometry, kind, tol, list(names or []), path)
    except ThinSegError as error:
        raise ThinSegError.from_exception(error, path) from None
    except np.linalg.LinAlgError:
        raise ThinSegError(
            f"the landmarks do not determine a {kind} transform (they are too close together or on one line)", path
        ) from None


def _fit_checked(
    q: FloatArray,
    p: FloatArray,
    g: Geometry,
    kind: str,
    tol: float,
    names: list[str],
    path: str | os.PathLike[str] | None,
) -> LandmarkFit:
    """The fit of landmarks that passed `check_landmarks`."""
    model = fit_px(p, q, kind)
    if not isinstance(model, ThinPlateSpline) and np.linalg.det(model[:2, :2]) <= 0:
        raise ThinSegError("the landmarks imply a mirrored QEMSCAN map: check that the pairs match", path)
    residuals = _residuals_image_px(model, p, q)
    outliers, loo = find_outliers(p, q, kind, tol)
    details: dict[str, Any] = {"landmarks": {"qemscan_px": q.tolist(), "image_px": p.tolist(), "names": names}}
    if isinstance(model, ThinPlateSpline):  # kind "tps"
        spline_mm = ThinPlateSpline.fit(g.image_px_to_mm(p), g.qemscan_px_to_mm(q))
        itk, _ = tps_to_itk(spline_mm, g.image_shape, g.image_mm_per_pixel)
        details["tps_mm"] = spline_mm.to_dict()
    else:
        itk = make_linear(kind, px_matrix_to_mm(model, g), image_center_mm(g))
    transform = SectionTransform(kind, itk, g, details)
    return LandmarkFit(transform, residuals, loo, outliers, tol, names)
