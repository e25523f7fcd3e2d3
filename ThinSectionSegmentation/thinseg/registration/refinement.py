"""Automatic refinement: multi-resolution EM climb of mutual information, optional B-spline.

Starting from any transform T0 (landmarks, coarse search), a correction C is fitted so that
T = C o T0 maximises the mutual information between PP/XP colour clusters and QEMSCAN labels
(`objective`). Levels go from blurred label maps (wide capture range) to sharp ones (accuracy);
within a level, PMI is re-estimated from the current alignment and L-BFGS climbs the smooth
score. The result is checked on the full working grid with hard nearest-neighbour labels, the
same measure as the starting value, and a fit that got worse is refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from thinseg.errors import ThinSegError
from thinseg.registration.corrections import BSplineCorrection, LinearCorrection
from thinseg.registration.features import Scene
from thinseg.registration.metric import OUTSIDE, contingency, measure
from thinseg.registration.objective import Sampler, blurred_channels, pmi_table, score_maps
from thinseg.registration.optimize import lbfgs
from thinseg.registration.sitk_transforms import (
    SectionTransform,
    change_summary,
    compose,
    image_center_mm,
    linear_matrix,
    make_linear,
    map_grid_mm,
)

#: (label-map blur in QEMSCAN px, sample points, EM rounds) per level, coarse to fine.
LINEAR_LEVELS = ((2.0, 30_000, 3), (1.0, 80_000, 2), (0.5, 150_000, 2))
BSPLINE_LEVELS = ((1.0, 40_000, 2), (0.5, 80_000, 1))
#: L2 penalty per B-spline coefficient (QEMSCAN px^2, against a score in nats): keeps the
#: free-form stage from fitting noise where the section has no local distortion.
BSPLINE_PENALTY = 1e-4
#: A refined fit whose mutual information drops by more than this (bits) counts as diverged.
DIVERGENCE_TOLERANCE = 0.005


@dataclass
class RefineResult:
    """transform: refined; metric_*: mutual information (bits) of colour clusters and labels on
    the working grid; change: how far the mapping moved (see transforms.change_summary)."""

    transform: SectionTransform
    metric_initial: float
    metric_final: float
    change: dict[str, float]
    history: list[dict] = field(default_factory=list)


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


def climb(
    scene: Scene, q0_all: np.ndarray, model, theta: np.ndarray, levels, *, seed: int = 0, penalty: float = 0.0
) -> tuple[np.ndarray, list[dict]]:
    """EM climb of `model` (a correction of the points q0) over `levels`; returns the
    parameters and a log. Each level draws its own random subset of work pixels."""
    rng = np.random.default_rng(seed)
    clusters_all = scene.clusters.ravel()
    history = []
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

            def objective(t: np.ndarray) -> tuple[float, np.ndarray]:
                value, grad_q = sampler(model.apply(t, base))
                n = len(value)
                f = -value.sum() / n + penalty * float(t @ t)
                g = -model.gradient(base, grad_q) / n + 2 * penalty * t
                return f, g

            before = model.apply(theta, base)
            theta, value, _evals = lbfgs(objective, theta, max_iter=40)
            moved = float(np.abs(model.apply(theta, base) - before).max())
            history.append({"sigma_qemscan_px": sigma, "points": len(pick), "score": float(-value), "moved_px": moved})
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
    levels=LINEAR_LEVELS,
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


def _bspline_stage(scene: Scene, linear: SectionTransform, mesh: int, seed: int) -> tuple[SectionTransform, list[dict]]:
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
