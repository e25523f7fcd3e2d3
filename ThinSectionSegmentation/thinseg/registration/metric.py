"""How well a label map fits the photographs: joint histograms of colour cluster x label.

Mutual information (bits) of (colour cluster, QEMSCAN label) over the working grid is the
reported metric and the guard against divergence: it needs no idea which colour each mineral
has. Correspondence analysis of the same table turns both sides into one scalar each (the
colour score and the label score that correlate best), which SimpleITK's correlation metric
can then optimise with gradients.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk

from thinseg.registration.features import Scene, WorkGrid
from thinseg.registration.sitk_transforms import SectionTransform

#: Shift (QEMSCAN px) of the "unrelated" positions that the match contrast compares against.
CONTRAST_SHIFT = 15.0

OUTSIDE = 255  # work pixels whose QEMSCAN position falls off the map


def qemscan_image(labels: np.ndarray, qemscan_mm: float, dtype: npt.DTypeLike = np.uint8) -> sitk.Image:
    """The label map as a SimpleITK image with QEMSCAN pixel spacing (origin at pixel (0, 0))."""
    img = sitk.GetImageFromArray(np.ascontiguousarray(labels.astype(dtype)))
    img.SetSpacing((qemscan_mm, qemscan_mm))
    return img


def warp_labels(labels: np.ndarray, transform: SectionTransform, grid: WorkGrid) -> np.ndarray:
    """QEMSCAN label (nearest) at each work pixel; OUTSIDE where the map does not reach."""
    moving = qemscan_image(labels, transform.geometry.qemscan_mm_per_pixel)
    ref = grid.image(np.zeros(grid.shape, np.float32))
    out = sitk.Resample(moving, ref, transform.itk, sitk.sitkNearestNeighbor, OUTSIDE, sitk.sitkUInt8)
    warped: npt.NDArray[np.uint8] = sitk.GetArrayViewFromImage(out).copy()
    return warped


def contingency(clusters: np.ndarray, warped: np.ndarray, n_clusters: int, n_labels: int) -> np.ndarray:
    """Counts (n_clusters, n_labels + 1) of work pixels per (cluster, label 0..N); off-map pixels skipped."""
    inside = warped != OUTSIDE
    idx = clusters[inside].astype(np.int64) * (n_labels + 1) + warped[inside].astype(np.int64)
    return np.bincount(idx, minlength=n_clusters * (n_labels + 1)).reshape(n_clusters, n_labels + 1).astype(np.float64)


def mutual_information(table: np.ndarray) -> float:
    total = table.sum()
    if total <= 0:
        return 0.0
    p = table / total
    pr = p.sum(axis=1, keepdims=True)
    pc = p.sum(axis=0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log2(p[nz] / (pr @ pc)[nz])).sum())


def correspondence_scores(table: np.ndarray, component: int = 0) -> tuple[np.ndarray, np.ndarray, float]:
    """Row (cluster) and column (label) scores of a correspondence-analysis axis, and its
    canonical correlation. Empty rows/columns get score 0. Scores have unit weighted variance."""
    p = table / max(table.sum(), 1.0)
    r = p.sum(axis=1)
    c = p.sum(axis=0)
    rr = np.where(r > 0, 1 / np.sqrt(np.maximum(r, 1e-300)), 0.0)
    cc = np.where(c > 0, 1 / np.sqrt(np.maximum(c, 1e-300)), 0.0)
    s = (p - np.outer(r, c)) * np.outer(rr, cc)
    u, sv, vt = np.linalg.svd(s, full_matrices=False)
    component = min(component, len(sv) - 1)
    f = u[:, component] * rr
    g = vt[component] * cc
    if g @ c < 0 or (abs(g @ c) < 1e-12 and g.sum() < 0):
        f, g = -f, -g
    return f, g, float(sv[component])


def overlap_fraction(warped: np.ndarray) -> float:
    """Share of work pixels that land on a labelled (non-zero) QEMSCAN pixel."""
    return float(np.mean((warped != OUTSIDE) & (warped != 0)))


def measure(scene: Scene, transform: SectionTransform) -> tuple[float, float]:
    """(mutual information in bits, overlap fraction) of a transform on the full working grid."""
    warped = warp_labels(scene.labels, transform, scene.grid)
    table = contingency(scene.clusters, warped, scene.n_clusters, scene.n_labels)
    return mutual_information(table), overlap_fraction(warped)


def match_contrast(scene: Scene, transform: SectionTransform, shift: float = CONTRAST_SHIFT) -> float:
    """Mutual information at `transform` over its median at four positions `shift` QEMSCAN px
    away. About 1 when the label map and the colours are unrelated there; a real match on the
    generated sections scores 5-6."""
    here, _ = measure(scene, transform)
    s = shift * transform.geometry.qemscan_mm_per_pixel
    values = []
    for dx, dy in ((s, 0.0), (-s, 0.0), (0.0, s), (0.0, -s)):
        shift_tx = sitk.TranslationTransform(2, (dx, dy))
        moved = sitk.CompositeTransform([shift_tx, transform.itk])
        values.append(measure(scene, SectionTransform(transform.kind, moved, transform.geometry))[0])
    return float(here / max(float(np.median(values)), 1e-6))
