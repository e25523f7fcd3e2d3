"""The smooth objective that refinement climbs: expected pointwise mutual information.

With the current alignment, the joint histogram of (colour cluster, QEMSCAN label) gives each
pair its pointwise mutual information PMI[j, k] = log p(j, k) / (p(j) p(k)). A work pixel of
cluster j whose QEMSCAN position q sees label k scores PMI[j, k]; with the label map's one-hot
channels O_k blurred and bilinearly interpolated, the per-cluster score maps
G_j = sum_k PMI[j, k] O_k make the mean score a smooth function of q with an exact gradient.
Re-estimating PMI after each climb (EM style) climbs mutual information itself. Points off the
map score 0, the same as an unrelated label, so leaving the map is never rewarded.

This replaces SimpleITK's histogram metrics, which on a categorical label map (linearly
interpolated label values) drifted 0.25-0.6 QEMSCAN px away from the true transform.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

PAD = 2  # zero border of the score maps: points off the map read 0 and gradients fade smoothly


def pmi_table(counts: np.ndarray, alpha: float = 0.5, clip: float = 6.0) -> np.ndarray:
    """Pointwise mutual information (nats) of a (clusters, labels) count table, smoothed by alpha."""
    p = counts + alpha
    p = p / p.sum()
    pmi = np.log(p) - np.log(p.sum(axis=1, keepdims=True)) - np.log(p.sum(axis=0, keepdims=True))
    out: np.ndarray = np.clip(pmi, -clip, clip)
    return out


def blurred_channels(labels: np.ndarray, n_labels: int, sigma_px: float) -> np.ndarray:
    """(n_labels + 1, h + 2 PAD, w + 2 PAD) float32 one-hot label channels, blurred, zero border.
    They do not change while PMI is re-estimated, so a level computes them once."""
    h, w = labels.shape
    out = np.zeros((n_labels + 1, h + 2 * PAD, w + 2 * PAD), dtype=np.float32)
    for k in range(n_labels + 1):
        onehot = (labels == k).astype(np.float32)
        if onehot.any():
            out[k, PAD:-PAD, PAD:-PAD] = (
                ndimage.gaussian_filter(onehot, sigma_px, mode="constant") if sigma_px > 0 else onehot
            )
    return out


def score_maps(channels: np.ndarray, pmi: np.ndarray) -> np.ndarray:
    """(K, h', w') float32 per-cluster score maps G_j = sum_k PMI[j, k] * channel_k."""
    maps: np.ndarray = np.einsum("kl,lhw->khw", pmi.astype(np.float32), channels)
    return maps


class Sampler:
    """Bilinear value and gradient of map G_{c_i} at points q_i (QEMSCAN px), vectorised."""

    def __init__(self, maps: np.ndarray, clusters: np.ndarray) -> None:
        self.flat = maps.reshape(-1)
        self.k, self.h, self.w = maps.shape
        self.base = clusters.astype(np.intp) * (self.h * self.w)

    def __call__(self, q: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(values (P,), gradients (P, 2)) at q (P, 2) = (x, y) in unpadded QEMSCAN pixels."""
        x = np.clip(q[:, 0] + PAD, 0, self.w - 1.001)
        y = np.clip(q[:, 1] + PAD, 0, self.h - 1.001)
        x0 = x.astype(np.intp)
        y0 = y.astype(np.intp)
        fx = x - x0
        fy = y - y0
        i00 = self.base + y0 * self.w + x0
        v00 = self.flat[i00]
        v01 = self.flat[i00 + 1]
        v10 = self.flat[i00 + self.w]
        v11 = self.flat[i00 + self.w + 1]
        top = v00 + fx * (v01 - v00)
        bottom = v10 + fx * (v11 - v10)
        value = top + fy * (bottom - top)
        gx = (1 - fy) * (v01 - v00) + fy * (v11 - v10)
        gy = bottom - top
        return value, np.stack([gx, gy], axis=1)
