"""Coarse search for a start without landmarks: rotation x scale grid, translations by FFT.

For each (rotation, scale) hypothesis the QEMSCAN label channels are warped onto a coarse grid
(pixels of 1.5-4 QEMSCAN px) and cross-correlated, by FFT, with the colour-cluster channels of
PP/XP: that gives the (cluster x label) joint histogram for EVERY translation at once, hence
the mutual information over the whole translation range for the price of a few FFTs. The best
(rotation, scale, translation) starts the refinement; how far it stands out from the other
hypotheses tells whether the two maps show the same area at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import fft, ndimage

from thinseg.registration.features import Scene
from thinseg.registration.grids import Geometry
from thinseg.registration.sitk_transforms import SectionTransform, from_px_matrix

#: Coarse pixels across the longer side of the QEMSCAN footprint (bounds the FFT size).
COARSE_PIXELS = 128
#: Largest number of label channels correlated (the rarest labels are merged).
MAX_CHANNELS = 6
#: Rotation/scale grid step, in coarse pixels of displacement at the mean image radius.
STEP = 2.0


@dataclass(frozen=True)
class SearchRange:
    """Misalignment the search covers, around "centres coincide, nominal pixel sizes"."""

    rotation_deg: float = 8.0
    scale: float = 0.10  # relative
    translation: float = 0.05  # fraction of the image width


#: The default search range (immutable, so one shared instance).
DEFAULT_SEARCH = SearchRange()


@dataclass
class CoarseResult:
    transform: SectionTransform
    mutual_information: float  # bits, on the coarse grid
    significance: float  # robust z-score of the best hypothesis against all hypotheses
    candidates: list[SectionTransform] = field(default_factory=list)  # best first
    rotation_deg: float = 0.0
    scale: float = 1.0
    translation_px: tuple[float, float] = (0.0, 0.0)


def hypothesis_matrix(geometry: Geometry, rotation_deg: float, scale: float, tx: float, ty: float) -> np.ndarray:
    """Image px -> QEMSCAN px for a QEMSCAN map rotated by `rotation_deg`, scaled by `scale`
    relative to the nominal pixel sizes and shifted by (tx, ty) image px, centres matching."""
    h, w = geometry.image_shape
    hq, wq = geometry.qemscan_shape
    a = math.radians(rotation_deg)
    lin = geometry.ratio * scale * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    c_img = np.array([(w - 1) / 2, (h - 1) / 2]) + np.array([tx, ty])
    c_q = np.array([(wq - 1) / 2, (hq - 1) / 2])
    q_to_img = np.eye(3)
    q_to_img[:2, :2] = lin
    q_to_img[:2, 2] = c_img - lin @ c_q
    return np.linalg.inv(q_to_img)


def _mi_per_shift(joint: np.ndarray) -> np.ndarray:
    """Mutual information (bits) of a (K, L, ...) stack of joint tables, one per trailing index."""
    k, l = joint.shape[:2]
    flat = np.maximum(joint.reshape(k, l, -1), 0.0)
    total = flat.sum(axis=(0, 1)) + 1e-9
    p = flat / total
    pr = p.sum(axis=1, keepdims=True)
    pc = p.sum(axis=0, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 1e-12, p * np.log2(p / (pr * pc + 1e-300)), 0.0)
    mi: np.ndarray = terms.sum(axis=(0, 1)).reshape(joint.shape[2:])
    return mi


def _label_channels(labels: np.ndarray, n_labels: int) -> tuple[np.ndarray, list[list[int]]]:
    """One-hot float channels of the labels, the rarest merged so that at most MAX_CHANNELS remain."""
    counts = np.bincount(labels.ravel(), minlength=n_labels + 1)
    order = [int(v) for v in np.argsort(-counts) if counts[v] > 0]
    groups = [[v] for v in order[: MAX_CHANNELS - 1]] + (
        [order[MAX_CHANNELS - 1 :]] if len(order) >= MAX_CHANNELS else []
    )
    chans = np.stack([np.isin(labels, g).astype(np.float32) for g in groups])
    return chans, groups


def coarse_search(
    scene: Scene,
    geometry: Geometry,
    search: SearchRange = SearchRange(),
    coarse_clusters: np.ndarray | None = None,
    n_candidates: int = 3,
) -> CoarseResult:
    """Best similarity over `search` by mutual information (see module doc)."""
    grid = scene.grid
    clusters = scene.coarse_clusters if coarse_clusters is None else coarse_clusters
    n_k = int(clusters.max()) + 1
    ratio = geometry.ratio
    h_w, w_w = clusters.shape
    extent_q = max(geometry.image_shape) / ratio
    coarse_q = float(np.clip(extent_q / COARSE_PIXELS, 1.5, 4.0))  # coarse pixel in QEMSCAN px
    b = max(1, int(round(coarse_q * ratio / grid.factor)))  # work pixels per coarse pixel
    step_img = b * grid.factor  # image px per coarse pixel
    hc, wc = h_w // b, w_w // b
    fixed = np.zeros((n_k, hc, wc), np.float32)
    cl = clusters[: hc * b, : wc * b]
    for j in range(n_k):
        fixed[j] = (cl == j).reshape(hc, b, wc, b).sum(axis=(1, 3))
    max_t = search.translation * geometry.image_shape[1]
    pad = int(math.ceil(max_t / step_img)) + 1
    size = (hc + 2 * pad, wc + 2 * pad)
    fft_size = (fft.next_fast_len(size[0], real=True), fft.next_fast_len(size[1], real=True))
    fixed_big = np.zeros((n_k,) + fft_size, np.float32)
    fixed_big[:, pad : pad + hc, pad : pad + wc] = fixed
    f_fixed = np.conj(fft.rfft2(fixed_big, workers=-1)).astype(np.complex64)

    chans, _groups = _label_channels(scene.labels, scene.n_labels)
    sigma_q = 0.5 * step_img / ratio
    chans = np.stack([ndimage.gaussian_filter(c, sigma_q, mode="constant") for c in chans])
    chans_hwc = np.pad(np.ascontiguousarray(chans.transpose(1, 2, 0)), ((1, 1), (1, 1), (0, 0)))
    x0 = (step_img - 1) / 2 - pad * step_img
    ys, xs = np.meshgrid(x0 + step_img * np.arange(size[0]), x0 + step_img * np.arange(size[1]), indexing="ij")
    pts = np.stack([xs.ravel(), ys.ravel(), np.ones(xs.size)])

    rho = 0.38 * math.hypot(*geometry.image_shape)  # mean distance of image points from the centre
    rot_step = math.degrees(STEP * step_img / rho)
    scale_step = STEP * step_img / rho
    rotations = _steps(search.rotation_deg, rot_step)
    scales = 1.0 + _steps(search.scale, scale_step)
    results = []  # (mi, rotation, scale, ty, tx)
    for rot in rotations:
        for sc in scales:
            m = hypothesis_matrix(geometry, rot, sc, 0.0, 0.0)
            q = (m[0, 0] * pts[0] + m[0, 1] * pts[1] + m[0, 2], m[1, 0] * pts[0] + m[1, 1] * pts[1] + m[1, 2])
            warped = _bilinear(chans_hwc, q[0], q[1]).T.reshape((len(chans),) + size)
            f_mov = fft.rfft2(warped, s=fft_size, workers=-1).astype(np.complex64)
            corr = fft.irfft2(f_fixed[:, None] * f_mov[None], s=fft_size, workers=-1)
            # corr[j, k, t] = sum_x fixed_j(x) warped_k(x + t): moving sampled t coarse px further on
            shifts = np.concatenate([np.arange(0, pad + 1), np.arange(-pad, 0)])
            window = corr[:, :, shifts][:, :, :, shifts]
            mi = _mi_per_shift(window)
            iy, ix = np.unravel_index(int(np.argmax(mi)), mi.shape)
            results.append((float(mi[iy, ix]), rot, sc, float(shifts[iy]), float(shifts[ix])))
    results.sort(key=lambda r: -r[0])
    scores = np.array([r[0] for r in results])
    med = float(np.median(scores))
    mad = float(np.median(np.abs(scores - med))) * 1.4826 + 1e-9
    chosen: list[tuple[float, float, float, float, float]] = []
    for r in results:  # distinct peaks only: a neighbour of a chosen hypothesis is the same peak
        if not any(
            abs(r[1] - c[1]) <= 1.01 * rot_step
            and abs(r[2] - c[2]) <= 1.01 * scale_step
            and abs(r[3] - c[3]) <= 2
            and abs(r[4] - c[4]) <= 2
            for c in chosen
        ):
            chosen.append(r)
        if len(chosen) == max(1, n_candidates):
            break
    # sampling the moving map at x + t means the map content sits at x - t: translation -t
    candidates = [
        from_px_matrix(hypothesis_matrix(geometry, rot, sc, -sx * step_img, -sy * step_img), geometry, "similarity")
        for _mi, rot, sc, sy, sx in chosen
    ]
    best = results[0]
    return CoarseResult(
        candidates[0],
        best[0],
        (best[0] - med) / mad,
        candidates,
        best[1],
        best[2],
        (-best[4] * step_img, -best[3] * step_img),
    )


def _bilinear(image: np.ndarray, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(P, C) bilinear samples of a zero-bordered (h + 2, w + 2, C) image at unpadded (x, y)."""
    h, w, c = image.shape
    flat = image.reshape(-1, c)
    x = np.clip(x + 1, 0, w - 1.001)
    y = np.clip(y + 1, 0, h - 1.001)
    x0, y0 = x.astype(np.intp), y.astype(np.intp)
    fx, fy = (x - x0)[:, None].astype(np.float32), (y - y0)[:, None].astype(np.float32)
    i00 = y0 * w + x0
    # np.take of whole rows is ~10x faster than fancy indexing here
    top = np.take(flat, i00, axis=0) * (1 - fx) + np.take(flat, i00 + 1, axis=0) * fx
    bottom = np.take(flat, i00 + w, axis=0) * (1 - fx) + np.take(flat, i00 + w + 1, axis=0) * fx
    samples: np.ndarray = top * (1 - fy) + bottom * fy
    return samples


def _steps(half_range: float, step: float) -> np.ndarray:
    n = max(1, int(math.ceil(half_range / max(step, 1e-9))))
    return np.linspace(-half_range, half_range, 2 * n + 1)
