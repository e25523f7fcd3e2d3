"""What registration compares: PP/XP colours reduced to a working grid and quantised.

The QEMSCAN map has ~7.6x coarser pixels than the photographs, so the metric works on a grid
a few times finer than the QEMSCAN one (block means of PP/XP): full resolution would only cost
time. Colours are quantised into clusters (k-means over PP+XP, 6-D) so that the label map can be
compared with them by joint histograms, whatever colour each mineral happens to have.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import SimpleITK as sitk
from PIL import Image
from scipy.cluster.vq import kmeans2

from thinseg.io.images import RasterSource

#: Working-grid pixels per QEMSCAN pixel (about): finer gains no accuracy, coarser loses some.
WORK_PER_QEMSCAN = 2.5
#: Largest working grid (pixels): bounds time and memory on gigapixel sections.
MAX_WORK_PIXELS = 4_000_000


@dataclass(frozen=True)
class WorkGrid:
    """Block-mean grid over the image: pixel (i, j) averages image pixels f*i..f*i+f-1."""

    factor: int
    shape: tuple[int, int]
    image_mm_per_pixel: float

    @property
    def spacing_mm(self) -> float:
        return self.factor * self.image_mm_per_pixel

    @property
    def origin_mm(self) -> float:
        """Physical position of work pixel (0, 0)'s centre (the mean of its block's centres)."""
        return (self.factor - 1) / 2 * self.image_mm_per_pixel

    def image(self, array: np.ndarray) -> sitk.Image:
        """A scalar sitk image of `array` (shape == self.shape) placed on this grid."""
        img = sitk.GetImageFromArray(np.ascontiguousarray(array, dtype=np.float32))
        img.SetSpacing((self.spacing_mm, self.spacing_mm))
        img.SetOrigin((self.origin_mm, self.origin_mm))
        return img


def choose_grid(
    image_shape: tuple[int, int],
    image_mm: float,
    qemscan_mm: float,
    per_qemscan: float = WORK_PER_QEMSCAN,
    max_pixels: int = MAX_WORK_PIXELS,
) -> WorkGrid:
    h, w = image_shape
    f = max(1, int(round(qemscan_mm / image_mm / per_qemscan)))
    while (h // f) * (w // f) > max_pixels:
        f += 1
    return WorkGrid(f, (max(1, h // f), max(1, w // f)), image_mm)


def block_mean(image: np.ndarray | RasterSource, factor: int, band_rows: int = 2048) -> npt.NDArray[np.float32]:
    """float32 block means of an (H, W[, C]) array or a RasterSource (`read(y0, y1)`), by bands.

    uint8 RGB bands go through Pillow's box reduction (C speed; means rounded to integers)."""
    h, w = image.shape[:2]
    oh, ow = h // factor, w // factor

    def read(y0: int, y1: int) -> np.ndarray:
        return image[y0:y1] if isinstance(image, np.ndarray) else image.read(y0, y1)

    out: npt.NDArray[np.float32] | None = None
    rows = max(1, band_rows // factor)
    for i0 in range(0, oh, rows):
        i1 = min(oh, i0 + rows)
        band = np.ascontiguousarray(np.asarray(read(i0 * factor, i1 * factor))[:, : ow * factor])
        if factor == 1:
            small = band.astype(np.float32)
        elif band.dtype == np.uint8 and band.ndim == 3 and band.shape[2] == 3:
            small = np.asarray(Image.fromarray(band).reduce(factor), dtype=np.float32)
        else:
            small = band.astype(np.float32).reshape(i1 - i0, factor, ow, factor, *band.shape[2:]).mean(axis=(1, 3))
        if out is None:
            out = np.empty((oh, ow) + small.shape[2:], dtype=np.float32)
        out[i0:i1] = small
    if out is None:
        raise ValueError(f"an image of {h} rows has no whole {factor}-row block")
    return out


def colour_features(pp_small: np.ndarray, xp_small: np.ndarray | None) -> np.ndarray:
    """(h, w, 6) PP and XP colours, each channel standardised (XP optional: (h, w, 3))."""
    parts = [pp_small] if xp_small is None else [pp_small, xp_small]
    feats = np.concatenate(parts, axis=2).astype(np.float32)
    flat = feats.reshape(-1, feats.shape[2])
    mean = flat.mean(axis=0)
    std = flat.std(axis=0) + 1e-3
    out: np.ndarray = (feats - mean) / std
    return out


def quantise(features: np.ndarray, clusters: int = 24, seed: int = 0, sample: int = 25_000) -> np.ndarray:
    """Cluster index per pixel (int16) by k-means fitted on a random sample of pixels."""
    flat = features.reshape(-1, features.shape[-1])
    rng = np.random.default_rng(seed)
    pick = rng.choice(len(flat), size=min(sample, len(flat)), replace=False)
    k = min(clusters, len(pick))
    with warnings.catch_warnings():  # an empty cluster is harmless here: it just gets no pixels
        warnings.simplefilter("ignore", UserWarning)
        centroids, _ = kmeans2(flat[pick].astype(np.float64), k, minit="++", seed=seed, iter=10)
    c = centroids.astype(np.float32)
    c_norm = (c * c).sum(axis=1)
    index = np.empty(len(flat), dtype=np.int16)
    for start in range(0, len(flat), 500_000):
        block = flat[start : start + 500_000]
        # argmin |x - c|^2 = argmin (|c|^2 - 2 x.c); einsum, not a threaded BLAS product (slow on thin products)
        index[start : start + 500_000] = np.argmin(c_norm[None, :] - 2.0 * np.einsum("nd,kd->nk", block, c), axis=1)
    return index.reshape(features.shape[:2])


@dataclass
class Scene:
    """Everything the metric needs, computed once per section: the working grid, the colour
    cluster of each work pixel and the QEMSCAN labels (0..n_labels)."""

    grid: WorkGrid
    clusters: np.ndarray  # (h_w, w_w) int16
    n_clusters: int
    labels: np.ndarray  # (h_q, w_q) uint8
    n_labels: int
    qemscan_mm_per_pixel: float
    coarse_clusters: np.ndarray  # (h_w, w_w) int16, fewer clusters for the coarse search

    @property
    def qemscan_per_work(self) -> float:
        """Work pixels per QEMSCAN pixel."""
        return self.qemscan_mm_per_pixel / self.grid.spacing_mm


def prepare_scene(
    pp: np.ndarray | RasterSource,
    xp: np.ndarray | RasterSource | None,
    labels: np.ndarray,
    image_mm: float,
    qemscan_mm: float,
    *,
    n_labels: int | None = None,
    n_clusters: int = 24,
    n_coarse_clusters: int = 6,
    seed: int = 0,
) -> Scene:
    """Reduce PP (and XP, may be None) to the working grid and quantise their colours."""
    grid = choose_grid(tuple(pp.shape[:2]), image_mm, qemscan_mm)
    pp_small = block_mean(pp, grid.factor)
    xp_small = None if xp is None else block_mean(xp, grid.factor)
    feats = colour_features(pp_small, xp_small)
    clusters = quantise(feats, n_clusters, seed)
    coarse = quantise(feats, n_coarse_clusters, seed)
    n_labels = max(int(labels.max()), 1) if n_labels is None else max(int(n_labels), int(labels.max()), 1)
    return Scene(grid, clusters, int(clusters.max()) + 1, labels, n_labels, qemscan_mm, coarse)
