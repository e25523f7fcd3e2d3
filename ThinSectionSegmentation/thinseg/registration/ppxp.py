"""XP -> PP rigid check: the two photographs of a section can be offset by a stage shift.

Phase correlation of gradient magnitudes: PP and XP colours differ per grain, but grain
boundaries are edges in both. The shift is an integer number of pixels (the two images share
one camera and grid); the estimate uses a central window at full resolution.
"""

from __future__ import annotations

import numpy as np
from scipy import fft, ndimage

#: Side of the central window used for the estimate (shifts up to about a third of it are found).
WINDOW = 1024


def _edges(rgb: np.ndarray) -> np.ndarray:
    gray = rgb.astype(np.float32).mean(axis=2) if rgb.ndim == 3 else rgb.astype(np.float32)
    gray = ndimage.gaussian_filter(gray, 1.0)
    gy, gx = np.gradient(gray)
    mag = np.hypot(gx, gy)
    return mag - mag.mean()


def _window(shape: tuple[int, int], size: int) -> tuple[slice, slice]:
    h, w = shape
    sh, sw = min(h, size), min(w, size)
    y0, x0 = (h - sh) // 2, (w - sw) // 2
    return slice(y0, y0 + sh), slice(x0, x0 + sw)


def estimate_xp_offset(pp: np.ndarray, xp: np.ndarray, window: int = WINDOW) -> tuple[int, int, float]:
    """(dy, dx, peak) with xp[y, x] showing what pp shows at (y - dy, x - dx).

    peak is the normalised phase-correlation peak (near 0: no reliable estimate).
    """
    win = _window(pp.shape[:2], window)
    a, b = _edges(pp[win]), _edges(xp[win])
    taper = np.outer(np.hanning(a.shape[0]), np.hanning(a.shape[1])).astype(np.float32)
    fa = fft.rfft2(a * taper, workers=-1)
    fb = fft.rfft2(b * taper, workers=-1)
    cross = fb * np.conj(fa)
    cross /= np.abs(cross) + 1e-9
    corr = fft.irfft2(cross, s=a.shape, workers=-1)
    iy, ix = np.unravel_index(int(np.argmax(corr)), corr.shape)
    dy = iy - a.shape[0] if iy > a.shape[0] // 2 else iy
    dx = ix - a.shape[1] if ix > a.shape[1] // 2 else ix
    return int(dy), int(dx), float(corr[iy, ix])


def shift_image(image: np.ndarray, dy: int, dx: int, fill: int = 0) -> np.ndarray:
    """out[y, x] = image[y + dy, x + dx]; uncovered pixels get `fill`."""
    out = np.full_like(image, fill)
    h, w = image.shape[:2]
    ys, yd = (slice(dy, h), slice(0, h - dy)) if dy >= 0 else (slice(0, h + dy), slice(-dy, h))
    xs, xd = (slice(dx, w), slice(0, w - dx)) if dx >= 0 else (slice(0, w + dx), slice(-dx, w))
    out[yd, xd] = image[ys, xs]
    return out


def align_xp_to_pp(pp: np.ndarray, xp: np.ndarray, *, min_peak: float = 0.02) -> tuple[int, int, np.ndarray]:
    """(dy, dx, xp on the PP grid). A zero offset, or a peak too weak to trust, leaves xp as is.

    The offset follows `estimate_xp_offset`; XP pixels shifted in from outside are black, the
    colour of an empty field under crossed polars.
    """
    if pp.shape[:2] != xp.shape[:2]:
        from thinseg.errors import ThinSegError

        raise ThinSegError(f"PP is {pp.shape[1]} x {pp.shape[0]} px but XP is {xp.shape[1]} x {xp.shape[0]} px")
    dy, dx, peak = estimate_xp_offset(pp, xp)
    if (dy, dx) == (0, 0) or peak < min_peak:
        return 0, 0, xp
    return dy, dx, shift_image(xp, dy, dx)
