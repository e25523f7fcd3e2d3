"""Smooth random fields for textures and boundary warps.

Wide Gaussian filters at full resolution are slow on big sections, so a field with a
correlation length of `scale` pixels is drawn on a grid a few times coarser and upsampled
bilinearly: cost stays proportional to the number of output pixels whatever the scale.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
from scipy.ndimage import gaussian_filter


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int], scale: float) -> np.ndarray:
    """float32 field of zero mean and unit standard deviation, correlated over ~`scale` px."""
    h, w = shape
    step = max(1, int(scale / 2))
    low = rng.standard_normal((h // step + 3, w // step + 3), dtype=np.float32)
    low = gaussian_filter(low, sigma=max(scale / step, 0.5), mode="wrap")
    low -= low.mean()
    low /= low.std() + 1e-12
    if step == 1:
        return np.ascontiguousarray(low[:h, :w])
    return _bilinear_upsample(low, step, h, w)


def _bilinear_upsample(low: np.ndarray, step: int, h: int, w: int) -> np.ndarray:
    """Separable bilinear upsampling by an integer `step`, by broadcasting (no index gathers)."""
    frac = np.arange(step, dtype=np.float32) / step
    ny, nx = -(-h // step), -(-w // step)
    rows = low[: ny + 1, None, :] * (1 - frac)[None, :, None] + low[1 : ny + 2, None, :] * frac[None, :, None]
    rows = rows.reshape(-1, low.shape[1])[:h]
    out = rows[:, :nx, None] * (1 - frac)
    out += rows[:, 1 : nx + 1, None] * frac
    return np.ascontiguousarray(out.reshape(h, -1)[:, :w])


def white_noise(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """float32 zero-mean unit-variance per-pixel noise, triangular-distributed (within +-2.45):
    the sum of two random bytes, several times faster than Gaussian draws and alike to the eye."""
    n = int(np.prod(shape))
    raw = np.frombuffer(rng.bytes(2 * n), dtype=np.uint8).reshape(2, n)
    out = raw[0].astype(np.float32)
    out += raw[1]
    out -= 255.0
    out *= np.float32(1.0 / 104.5)
    noise: npt.NDArray[np.float32] = out.reshape(shape)
    return noise


def blur(image: np.ndarray, sigma: float) -> np.ndarray:
    """float32 Gaussian-like blur over the last two axes (edges replicated): repeated 3-tap
    kernels [a, 1-2a, a] whose variances add up to sigma^2. Shift-and-add of whole rows is
    several times faster than scipy's filters for the sub-pixel blurs of a microscope camera."""
    out = image.astype(np.float32, copy=True)
    if sigma <= 0:
        return out
    passes = blur_reach(sigma)
    a = np.float32(sigma**2 / (2 * passes))
    for _ in range(passes):
        for axis in (image.ndim - 2, image.ndim - 1):
            if out.shape[axis] < 2:
                continue
            src = out
            out = src * (1 - 2 * a)
            _add_shifted(out, src, axis, 1, a)
            _add_shifted(out, src, axis, -1, a)
    return out


def blur_reach(sigma: float) -> int:
    """How many pixels `blur` looks to each side (its number of 3-tap passes)."""
    return max(1, int(np.ceil(sigma**2 / 0.6))) if sigma > 0 else 0


def _add_shifted(out: np.ndarray, src: np.ndarray, axis: int, d: int, weight: np.float32) -> None:
    """out[i] += weight * src[clip(i + d)] along `axis` (d = +-1)."""
    n = src.shape[axis]
    dst_sl, src_sl, edge = ([slice(None)] * src.ndim for _ in range(3))
    if d > 0:
        dst_sl[axis], src_sl[axis], edge[axis] = slice(0, n - 1), slice(1, n), slice(n - 1, n)
    else:
        dst_sl[axis], src_sl[axis], edge[axis] = slice(1, n), slice(0, n - 1), slice(0, 1)
    out[tuple(dst_sl)] += src[tuple(src_sl)] * weight
    out[tuple(edge)] += src[tuple(edge)] * weight
