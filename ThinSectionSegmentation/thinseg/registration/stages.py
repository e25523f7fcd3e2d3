"""`register_section`: QEMSCAN map -> PP grid, from landmarks and/or automatic refinement.

Steps: check the inputs; align XP to PP if they are offset; start from the landmark fit or,
without landmarks, from the coarse search; refine automatically (optional B-spline); check the
overlap (and, without landmarks, that the match is real); resample the QEMSCAN map onto the PP
grid with nearest neighbour. Nothing is written here (see `output.write_outputs`), so a
failure at any step leaves no files behind.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from thinseg.classes.table import ClassTable
from thinseg.errors import ThinSegError
from thinseg.registration.coarse import DEFAULT_SEARCH, CoarseResult, SearchRange, coarse_search
from thinseg.registration.features import Scene, prepare_scene
from thinseg.registration.grids import Geometry, grid_points
from thinseg.registration.landmark_io import LandmarkPairs
from thinseg.registration.landmarks import LandmarkFit, fit_landmarks
from thinseg.registration.metric import match_contrast, measure
from thinseg.registration.ppxp import XpAlignment, estimate_xp_alignment
from thinseg.registration.refinement import LINEAR_LEVELS, RefineResult
from thinseg.registration.refinement import refine as refine_transform
from thinseg.registration.sitk_transforms import SectionTransform, change_summary, describe_linear
from thinseg.registration.warp import resample_labels

#: Least share of the image that must land on labelled QEMSCAN pixels.
MIN_OVERLAP = 0.2
#: Least match contrast (see metric.match_contrast) accepted without landmarks; unrelated
#: image/map pairs score about 1, real matches about 5.
MIN_CONTRAST = 2.0


@dataclass
class RegistrationResult:
    """Everything `register_section` found. `labels`: (H, W) uint8 QEMSCAN values (classes of
    `table`) on the PP grid, 0 = no QEMSCAN data; `xp`: XP on the PP grid (shifted if needed)."""

    transform: SectionTransform
    initial: SectionTransform
    labels: np.ndarray | None
    table: ClassTable
    geometry: Geometry
    landmark_fit: LandmarkFit | None = None
    coarse: CoarseResult | None = None
    refinement: RefineResult | None = None
    metric_initial: float = float("nan")  # mutual information, bits
    metric_final: float = float("nan")
    overlap: float = float("nan")  # share of the image on labelled QEMSCAN pixels
    contrast: float = float("nan")  # match contrast (~1 = no match)
    xp_offset: tuple[int, int] = (0, 0)  # (dy, dx): xp[y, x] showed pp[y - dy, x - dx]
    xp_peak: float = float("nan")  # z-score of the XP/PP match
    xp_alignment: XpAlignment | None = None  # the full rigid XP placement (rotation too)
    xp: np.ndarray | None = None
    warnings: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    @property
    def xp_was_aligned(self) -> bool:
        """True when `xp` is a moved copy of the XP given (the photographs were offset)."""
        return self.xp_alignment is not None and not self.xp_alignment.is_identity

    def summary(self) -> dict[str, Any]:
        """JSON-friendly report (the transform's own parameters are in output.transform_json)."""
        out: dict[str, Any] = {
            "kind": self.transform.kind,
            "metric": "mutual information (bits) of PP/XP colour clusters and QEMSCAN labels",
            "metric_initial": self.metric_initial,
            "metric_final": self.metric_final,
            "overlap": self.overlap,
            "match_contrast": self.contrast,
            "xp_offset_px": {"dy": self.xp_offset[0], "dx": self.xp_offset[1], "score": self.xp_peak},
            "xp_alignment": self.xp_alignment.as_dict() if self.xp_alignment is not None else None,
            "linear_part": describe_linear(self.transform.linear_px()),
            "warnings": list(self.warnings),
            "seconds": dict(self.seconds),
        }
        if self.refinement is not None:
            out["change"] = self.refinement.change
        if self.landmark_fit is not None:
            out["landmarks"] = self.landmark_fit.report()
        if self.coarse is not None:
            out["coarse_search"] = {
                "rotation_deg": self.coarse.rotation_deg,
                "scale": self.coarse.scale,
                "translation_px": list(self.coarse.translation_px),
                "significance": self.coarse.significance,
            }
        return out


def _check_inputs(pp: np.ndarray, xp: np.ndarray | None, qemscan: np.ndarray, table: ClassTable) -> None:
    if pp.ndim != 3 or pp.shape[2] != 3 or pp.dtype != np.uint8:
        raise ThinSegError(f"the PP image must be 8-bit RGB (H, W, 3), got {pp.dtype} {pp.shape}")
    if xp is not None and (xp.shape != pp.shape or xp.dtype != np.uint8):
        raise ThinSegError(f"the XP image must be 8-bit RGB of the PP's size {pp.shape}, got {xp.dtype} {xp.shape}")
    if qemscan.ndim != 2 or qemscan.size == 0:
        raise ThinSegError(f"the QEMSCAN map must be a 2-D label image, got shape {qemscan.shape}")
    top = int(qemscan.max())
    if top == 0:
        raise ThinSegError("the QEMSCAN map has no labelled pixel")
    if top > len(table):
        raise ThinSegError(f"the QEMSCAN map has label value {top} but its table lists {len(table)} classes")


def image_overlap(transform: SectionTransform, qemscan: np.ndarray, n: int = 96) -> float:
    """Share of an n x n lattice over the image that lands on a labelled QEMSCAN pixel."""
    q = np.rint(transform.map_image_px(grid_points(transform.geometry.image_shape, n))).astype(np.intp)
    h, w = qemscan.shape
    ok = (q[:, 0] >= 0) & (q[:, 0] < w) & (q[:, 1] >= 0) & (q[:, 1] < h)
    hits = np.zeros(len(q), dtype=bool)
    hits[ok] = qemscan[q[ok, 1], q[ok, 0]] > 0
    return float(hits.mean())


def _require_overlap(transform: SectionTransform, qemscan: np.ndarray, minimum: float, when: str) -> float:
    share = image_overlap(transform, qemscan)
    if share < minimum:
        raise ThinSegError(
            f"the QEMSCAN map and the PP image do not overlap {when}: {100 * share:.0f}% of the image "
            f"falls on the map (at least {100 * minimum:.0f}% needed)"
        )
    return share


def register_section(
    pp: np.ndarray,
    xp: np.ndarray | None,
    qemscan: np.ndarray,
    table: ClassTable,
    *,
    image_mm_per_pixel: float,
    qemscan_mm_per_pixel: float,
    landmarks: LandmarkPairs | tuple[np.ndarray, np.ndarray] | None = None,
    kind: str = "similarity",
    refine: bool = True,
    bspline: bool = False,
    bspline_mesh: int = 6,
    search: SearchRange = DEFAULT_SEARCH,
    align_xp: bool = True,
    min_overlap: float = MIN_OVERLAP,
    resample: bool = True,
    progress: Callable[[str], None] | None = None,
) -> RegistrationResult:
    """Register a QEMSCAN label map (`qemscan`, values = classes of `table`) to a PP image.

    landmarks: pairs (QEMSCAN px, image px) as LandmarkPairs or a tuple of two (n, 2) arrays;
    kind: "similarity", "affine" or "tps" for the landmark fit; refinement keeps a similarity a
    similarity and corrects the others with an affine. Without landmarks the coarse search covers
    `search`, refinement is required and kind is "similarity" or "affine".
    bspline: add a free-form stage (bspline_mesh cells per side) for local distortion.
    Raises ThinSegError (one line) for every bad input; writes nothing.
    """
    say = progress or (lambda _msg: None)
    seconds: dict[str, float] = {}
    clock = time.perf_counter()
    _check_inputs(pp, xp, qemscan, table)
    geometry = Geometry(
        tuple(pp.shape[:2]), float(image_mm_per_pixel), tuple(qemscan.shape), float(qemscan_mm_per_pixel)
    )
    warnings: list[str] = []
    if landmarks is None and not refine:
        raise ThinSegError("without landmarks the automatic refinement is needed (give landmarks or allow refinement)")
    if landmarks is None and kind not in ("similarity", "affine"):
        raise ThinSegError(f"a {kind} transform needs landmarks; without them use similarity or affine")
    correction = "similarity" if kind == "similarity" else "affine"

    xp_alignment: XpAlignment | None = None
    xp_offset, xp_peak, xp_aligned = (0, 0), float("nan"), xp
    if xp is not None and align_xp:
        say("checking the XP/PP offset")
        xp_alignment = estimate_xp_alignment(pp, xp)
        xp_peak = xp_alignment.score
        if not xp_alignment.reliable:
            warnings.append(xp_alignment.describe())
        elif not xp_alignment.is_identity:
            xp_offset = (int(round(xp_alignment.dy)), int(round(xp_alignment.dx)))
            xp_aligned = xp_alignment.apply(xp)
            warnings.append(xp_alignment.describe())
    seconds["xp_check"] = time.perf_counter() - clock

    fit: LandmarkFit | None = None
    coarse: CoarseResult | None = None
    scene: Scene | None = None
    if landmarks is not None:
        q_px, img_px, names, path = _landmark_arrays(landmarks)
        say("fitting the landmarks")
        fit = fit_landmarks(q_px, img_px, geometry, kind, names=names, path=path)
        for i in fit.outliers:
            name = fit.names[i] if i < len(fit.names) else str(i + 1)
            warnings.append(
                f"landmark {name} disagrees with the others by {fit.loo_px[i]:.1f} image px: check that click"
            )
        initial = fit.transform
        _require_overlap(initial, qemscan, min_overlap, "at the landmark positions")
    t = time.perf_counter()
    if refine or landmarks is None:
        say("preparing the colour clusters")
        scene = prepare_scene(
            pp, xp_aligned, qemscan, geometry.image_mm_per_pixel, geometry.qemscan_mm_per_pixel, n_labels=len(table)
        )
    seconds["features"] = time.perf_counter() - t
    if landmarks is None:
        assert scene is not None  # prepared above: without landmarks refinement is required
        t = time.perf_counter()
        say("searching rotation, scale and translation")
        coarse = coarse_search(scene, geometry, search)
        initial = coarse.transform
        seconds["coarse_search"] = time.perf_counter() - t

    result = RegistrationResult(
        initial,
        initial,
        None,
        table,
        geometry,
        fit,
        coarse,
        xp_offset=xp_offset,
        xp_peak=xp_peak,
        xp_alignment=xp_alignment,
        xp=xp_aligned,
        warnings=warnings,
        seconds=seconds,
    )
    if refine:
        assert scene is not None  # prepared above whenever refining
        t = time.perf_counter()
        say("refining automatically")
        result.refinement, result.initial, result.contrast = _refine(
            scene, initial, coarse, correction, bspline, bspline_mesh
        )
        result.transform = result.refinement.transform
        result.metric_initial = result.refinement.metric_initial
        result.metric_final = result.refinement.metric_final
        seconds["refine"] = time.perf_counter() - t
        if landmarks is None and result.contrast < MIN_CONTRAST:
            raise ThinSegError(
                "no match found: the QEMSCAN map and the PP/XP images do not seem to show the same area "
                f"(match contrast {result.contrast:.2f}, a real match scores above {MIN_CONTRAST:g}); give landmarks"
            )
        if landmarks is not None and result.contrast < MIN_CONTRAST:
            warnings.append(f"weak match after refinement (contrast {result.contrast:.2f}): check the overlay")
    elif scene is not None:
        result.metric_initial = result.metric_final = measure(scene, initial)[0]
    result.overlap = _require_overlap(result.transform, qemscan, min_overlap, "after registration")
    if resample:
        t = time.perf_counter()
        say("resampling the QEMSCAN map onto the PP grid")
        result.labels = resample_labels(qemscan, result.transform)
        seconds["resample"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - clock
    return result


def _refine(
    scene: Scene, initial: SectionTransform, coarse: CoarseResult | None, kind: str, bspline: bool, mesh: int
) -> tuple[RefineResult, SectionTransform, float]:
    """Refine the start; after a coarse search whose best candidate does not end in a convincing
    match (low contrast), try the runner-ups with the first refinement level and finish the
    first one that does."""
    best = refine_transform(scene, initial, kind=kind, bspline=bspline, bspline_mesh=mesh)
    contrast = match_contrast(scene, best.transform)
    if coarse is None or contrast >= MIN_CONTRAST:
        return best, initial, contrast
    for candidate in coarse.candidates[1:]:
        quick = refine_transform(scene, candidate, kind=kind, levels=LINEAR_LEVELS[:1], check=False)
        if match_contrast(scene, quick.transform) >= MIN_CONTRAST:
            final = refine_transform(scene, quick.transform, kind=kind, bspline=bspline, bspline_mesh=mesh)
            final.metric_initial = quick.metric_initial
            final.change = change_summary(candidate, final.transform)
            final.history = quick.history + final.history
            return final, candidate, match_contrast(scene, final.transform)
    return best, initial, contrast


def _landmark_arrays(
    landmarks: LandmarkPairs | tuple[np.ndarray, np.ndarray],
) -> tuple[np.ndarray, np.ndarray, list[str], Path | None]:
    if isinstance(landmarks, LandmarkPairs):
        return landmarks.qemscan_px, landmarks.image_px, landmarks.names, landmarks.path
    q_px, img_px = landmarks
    return np.asarray(q_px, dtype=np.float64), np.asarray(img_px, dtype=np.float64), [], None
