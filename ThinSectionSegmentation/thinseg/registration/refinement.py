"""Automatic refinement: multi-resolution EM climb of mutual information, optional B-spline.

Starting from any transform T0 (landmarks, coarse search), a correction C is fitted so that
T = C o T0 maximises the mutual information between PP/XP colour clusters and QEMSCAN labels
(`objective`). Levels go from blurred label maps (wide capture range) to sharp ones (accuracy);
within a level, PMI is re-estimated from the current alignment and L-BFGS (scipy's L-BFGS-B
without bounds) climbs the smooth score. The result is checked on the full working grid with
hard nearest-neighbour labels, the same measure as the starting value, and a fit that got
worse is refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt
from scipy.optimize import minimize

from thinseg.errors import ThinSegError
from thinseg.registration.corrections import BSplineCorrection, LinearCorrection
from thinseg.registration.features import Scene
from thinseg.registration.metric import OUTSIDE, contingency, measure
from thinseg.registration.objective import Sampler, blurred_channels, pmi_table, score_maps
from thinseg.registration.sitk_transforms import (
    SectionTransform,
    change_summary,
    compose,
    image_center_mm,
    linear_matrix,
    make_linear,
    map_grid_mm,
)

FloatArray = npt.NDArray[np.float64]
#: One refinement level: (label-map blur in QEMSCAN px, sample points, EM rounds).
Level = tuple[float, int, int]

#: Levels of the linear stage, coarse to fine.
LINEAR_LEVELS: tuple[Level, ...] = ((2.0, 30_000, 3), (1.0, 80_000, 2), (0.5, 150_000, 2))
BSPLINE_LEVELS: tuple[Level, ...] = ((1.0, 40_000, 2), (0.5, 80_000, 1))
#: L2 penalty per B-spline coefficient (QEMSCAN px^2, against a score in nats): keeps the
#: free-form stage from fitting noise where the section has no local distortion.
BSPLINE_PENALTY = 1e-4
#: Stopping rule of each L-BFGS climb: at most 40 iterations, 8 stored corrections, and stop
#: once an iteration lowers the objective by no more than 1e-10 relative or the largest
#: gradient component is below 1e-8. Parameters are in units of about one QEMSCAN pixel, so
#: L-BFGS-B's first step (unit length along the steepest descent) is a sensible first move.
LBFGS_OPTIONS: dict[str, float | int] = {"maxiter": 40, "maxcor": 8, "ftol": 1e-10, "gtol": 1e-8}
#: A refined fit whose mutual information drops by more than this (bits) counts as diverged.
DIVERGENCE_TOLERANCE = 0.005


@dataclass
class RefineResult:
    """transform: refined; metric_*: mutual information (bits) of colour clusters and labels on
    the working grid; change: how far the mapping moved (see sitk_transforms.change_summary)."""

    transform: SectionTransform
    metric_initial: float
    metric_final: float
    change: dict[str, float]
    history: list[dict[str, Any]] = field(default_factory=list)


def _work_points_q(scene: Scene, transform: SectionTransform) -> np.ndarray:
    """QEMSCAN px position of every work pixel under `transform`: (h_w * w_w, 2)."""
    g = scene.grid
    mm = map_grid_mm(transform.itk, g.shape, g.origin_mm, g.spacing_mm)
    return mm.reshape(-1, 2) / scene.qemscan_mm_per_pixel


def _nearest_labels(labels: np.ndarray, q: np.ndarray) -> np.ndarray:
    h, w = labels.shape
    xi = np.rint(q[:, 0]).astype(np.intp)
    yi = np.rint(q[:, 1]).astype(np.intp)
    ok = (xi >= 0) & (xi < w) & (yi >= 0) & (yi < h)
    out = np.full(len(q), OUTSIDE, dtype=np.uint8)
    out[ok] = labels[yi[ok], xi[ok]]
    return out


class Correction(Protocol):
    """A parametrised correction of QEMSCAN points (see `corrections`)."""

    def identity(self) -> FloatArray:
        """Parameters of the identity correction."""
        ...

    def apply(self, theta: FloatArray, q: FloatArray) -> FloatArray:
        """The corrected points (P, 2)."""
        ...

    def gradient(self, q: FloatArray, gq: FloatArray) -> FloatArray:
        """d(sum of scores)/d(theta) from the per-point score gradients gq (P, 2)."""
        ...


def _objective(
    theta: FloatArray, sampler: Sampler, model: Correction, base: FloatArray, penalty: float
) -> tuple[float, FloatArray]:
    """Minus the mean score of the points `base` under correction `theta`, plus the L2
    penalty, and its gradient."""
    value, grad_q = sampler(model.apply(theta, base))
    n = len(value)
    f = -value.sum() / n + penalty * float(theta @ theta)
    g = -model.gradient(base, grad_q) / n + 2 * penalty * theta
    return float(f), g


def climb(
    scene: Scene,
    q0_all: FloatArray,
    model: Correction,
    theta: FloatArray,
    levels: Sequence[Level],
    *,
    seed: int = 0,
    penalty: float = 0.0,
) -> tuple[FloatArray, list[dict[str, Any]]]:
    """EM climb of `model` (a correction of the points q0) over `levels`; returns the
    parameters and a log. Each level draws its own random subset of work pixels."""
    rng = np.random.default_rng(seed)
    clusters_all = scene.clusters.ravel()
    history: list[dict[str, Any]] = []
    for sigma, n_points, rounds in levels:
        pick = rng.choice(len(q0_all), size=min(n_points, len(q0_all)), replace=False)
        pick = pick[np.lexsort((pick, clusters_all[pick]))]  # by cluster, then raster: cache-friendly reads
        base = q0_all[pick]
        cl = clusters_all[pick]
        channels = blurred_channels(scene.labels, scene.n_labels, sigma)
        for _ in range(rounds):
            table = contingency(
                cl, _nearest_labels(scene.labels, model.apply(theta, base)), scene.n_clusters, scene.n_labels
            )
            sampler = Sampler(score_maps(channels, pmi_table(table)), cl)
            before = model.apply(theta, base)
            fit = minimize(
                _objective,
                theta,
                args=(sampler, model, base, penalty),
                jac=True,
                method="L-BFGS-B",
                options=LBFGS_OPTIONS,
            )
            theta = np.asarray(fit.x, dtype=np.float64)
            moved = float(np.abs(model.apply(theta, base) - before).max())
            history.append(
                {"sigma_qemscan_px": sigma, "points": len(pick), "score": float(-fit.fun), "moved_px": moved}
            )
            if moved < 0.01:
                break
    return theta, history


def _compose_linear(scene: Scene, initial: SectionTransform, corr_px: np.ndarray, kind: str) -> SectionTransform:
    """T = C o T0 as an ITK transform (one linear transform when T0 is linear)."""
    g = initial.geometry
    s = g.qemscan_mm_per_pixel
    corr_mm = np.diag([s, s, 1.0]) @ corr_px @ np.diag([1 / s, 1 / s, 1.0])
    m0 = linear_matrix(initial.itk)
    if m0 is not None:
        out_kind = "similarity" if (kind == "similarity" and initial.kind == "similarity") else "affine"
        itk = make_linear(out_kind, corr_mm @ m0, image_center_mm(g))
        return SectionTransform(out_kind, itk, g, dict(initial.details))
    itk = compose(make_linear("affine", corr_mm, image_center_mm(g)), initial.itk)
    return SectionTransform(initial.kind, itk, g, dict(initial.details))


def refine(
    scene: Scene,
    initial: SectionTransform,
    *,
    kind: str | None = None,
    bspline: bool = False,
    bspline_mesh: int = 6,
    levels: Sequence[Level] = LINEAR_LEVELS,
    check: bool = True,
    seed: int = 0,
) -> RefineResult:
    """Refine `initial` on a prepared scene (`features.prepare_scene`).

    kind: "similarity" or "affine" correction (default: similarity for a similarity start,
    affine otherwise). bspline: add a free-form stage (mesh cells per side) for local distortion.
    check: refuse (ThinSegError) a result whose mutual information is lower than the start's.
    """
    kind = kind or ("similarity" if initial.kind == "similarity" else "affine")
    metric_initial, _ = measure(scene, initial)
    q0_all = _work_points_q(scene, initial)
    center = q0_all.mean(axis=0)
    rho = float(np.sqrt(((q0_all - center) ** 2).sum(axis=1).mean()))
    model = LinearCorrection(kind, center, rho)
    theta, history = climb(scene, q0_all, model, model.identity(), levels, seed=seed)
    result = _compose_linear(scene, initial, model.matrix(theta), kind)
    if bspline:
        result, more = _bspline_stage(scene, result, bspline_mesh, seed)
        history += more
    metric_final, _ = measure(scene, result)
    if check and metric_final < metric_initial - DIVERGENCE_TOLERANCE:
        raise ThinSegError(
            f"automatic refinement diverged: mutual information fell from {metric_initial:.3f} to "
            f"{metric_final:.3f} bits; check the landmarks or register without refinement"
        )
    if metric_final < metric_initial:  # within noise of the start: keep the start
        result, metric_final = initial, metric_initial
    result = SectionTransform(result.kind, result.itk, result.geometry, {**result.details, "refined": True})
    return RefineResult(result, metric_initial, metric_final, change_summary(initial, result), history)


def _bspline_stage(
    scene: Scene, linear: SectionTransform, mesh: int, seed: int
) -> tuple[SectionTransform, list[dict[str, Any]]]:
    """Free-form B-spline correction on the QEMSCAN side: T = B o linear."""
    g = linear.geometry
    q1_all = _work_points_q(scene, linear)
    h, w = g.image_shape
    corners = np.array([[-0.5, -0.5], [w - 0.5, -0.5], [-0.5, h - 0.5], [w - 0.5, h - 0.5]])
    cq = linear.map_image_px(corners)
    lo, hi = cq.min(axis=0) - 1.0, cq.max(axis=0) + 1.0
    model = BSplineCorrection(lo, hi, (mesh, mesh))
    theta, history = climb(
        scene, q1_all, model, model.identity(), BSPLINE_LEVELS, seed=seed + 1, penalty=BSPLINE_PENALTY
    )
    bs = model.to_itk(theta, g.qemscan_mm_per_pixel)
    itk = compose(bs, linear.itk)
    details = dict(linear.details)
    details["bspline"] = {"mesh": [mesh, mesh], "domain_qemscan_px": [lo.tolist(), hi.tolist()]}
    return SectionTransform(linear.kind + "+bspline", itk, g, details), history
