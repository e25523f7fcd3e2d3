"""XP -> PP rigid check: the two photographs of a section can be offset by a stage shift, and
sometimes turned by a small stage rotation between the two exposures.

Phase correlation of gradient magnitudes: PP and XP colours differ per grain, but grain
boundaries are edges in both. A pure shift is an integer number of pixels (one camera, one
grid) and is undone exactly; when the translation-only match is weak, a search over small
rotations (at half resolution, then refined) finds a turned XP, which is then resampled
bilinearly. The reliability of a match is the correlation peak over the spread of the
correlation surface (a z-score): about 3-5 for unrelated images, tens for a real match.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import fft, ndimage

from thinseg.errors import ThinSegError

#: Side of the central window used for the estimate (shifts up to about a third of it are found).
WINDOW = 2048
#: Peak z-score above which a match is trusted (unrelated images give 3-6).
MIN_SCORE = 9.0
#: A translation-only match at least this strong is taken without trying rotations.
STRONG_SCORE = 20.0
#: Stage rotations searched when the translation-only match is weak (degrees).
MAX_ROTATION_DEG = 10.0


def _edges(rgb: np.ndarray) -> np.ndarray:
    gray = rgb.astype(np.float32).mean(axis=2) if rgb.ndim == 3 else rgb.astype(np.float32)
    gray = ndimage.gaussian_filter(gray, 1.0)
    gy, gx = np.gradient(gray)
    mag = np.hypot(gx, gy)
    edges: np.ndarray = mag - mag.mean()
    return edges


def _window(shape: tuple[int, int], size: int) -> tuple[slice, slice]:
    h, w = shape
    sh, sw = min(h, size), min(w, size)
    y0, x0 = (h - sh) // 2, (w - sw) // 2
    return slice(y0, y0 + sh), slice(x0, x0 + sw)


def _phase_correlation(a: np.ndarray, b: np.ndarray) -> tuple[int, int, float, float]:
    """(dy, dx, peak, z-score) of b against a (b[y, x] ~ a[y - dy, x - dx])."""
    taper = np.outer(np.hanning(a.shape[0]), np.hanning(a.shape[1])).astype(np.float32)
    fa = fft.rfft2(a * taper, workers=-1)
    fb = fft.rfft2(b * taper, workers=-1)
    cross = fb * np.conj(fa)
    cross /= np.abs(cross) + 1e-9
    corr = fft.irfft2(cross, s=a.shape, workers=-1)
    iy, ix = np.unravel_index(int(np.argmax(corr)), corr.shape)
    dy = iy - a.shape[0] if iy > a.shape[0] // 2 else iy
    dx = ix - a.shape[1] if ix > a.shape[1] // 2 else ix
    peak = float(corr[iy, ix])
    return int(dy), int(dx), peak, peak / (float(corr.std()) + 1e-12)


def estimate_xp_offset(pp: np.ndarray, xp: np.ndarray, window: int = WINDOW) -> tuple[int, int, float]:
    """(dy, dx, peak) with xp[y, x] showing what pp shows at (y - dy, x - dx).

    peak is the normalised phase-correlation peak (near 0: no reliable estimate).
    """
    win = _window(pp.shape[:2], window)
    dy, dx, peak, _score = _phase_correlation(_edges(pp[win]), _edges(xp[win]))
    return dy, dx, peak


@dataclass(frozen=True)
class XpAlignment:
    """Where XP sits on the PP grid: xp at (y, x) shows pp at R(-angle) about the image centre,
    then shifted by (dy, dx). A pure shift has angle 0 and integer dy, dx."""

    dy: float
    dx: float
    angle_deg: float
    score: float  # correlation peak z-score of the match
    reliable: bool

    @property
    def is_identity(self) -> bool:
        return not self.reliable or (self.angle_deg == 0 and self.dy == 0 and self.dx == 0)

    def describe(self) -> str:
        if not self.reliable:
            return f"PP and XP do not match (score {self.score:.1f}, below {MIN_SCORE:g}); XP left as it is"
        if self.is_identity:
            return f"XP is aligned with PP (score {self.score:.1f})"
        turn = f", rotated {self.angle_deg:+.2f} deg" if self.angle_deg else ""
        return f"XP offset from PP by dy {self.dy:+g}, dx {self.dx:+g} px{turn} (score {self.score:.1f}); aligned to PP"

    def as_dict(self) -> dict[str, float | bool]:
        """JSON-ready record of the placement."""
        return {
            "dy": self.dy,
            "dx": self.dx,
            "angle_deg": self.angle_deg,
            "score": self.score,
            "reliable": self.reliable,
        }

    def apply(self, xp: np.ndarray) -> np.ndarray:
        """XP resampled onto the PP grid (uncovered pixels black, an empty field under crossed polars)."""
        if self.is_identity:
            return xp
        if self.angle_deg == 0:
            return shift_image(xp, int(self.dy), int(self.dx))
        return _rotate_shift(xp, self.angle_deg, self.dy, self.dx)


def _rotation(angle_deg: float) -> np.ndarray:
    """2 x 2 rotation matrix acting on (y, x)."""
    theta = np.deg2rad(angle_deg)
    return np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])


def _rotate_shift(image: np.ndarray, angle_deg: float, dy: float, dx: float, order: int = 1) -> np.ndarray:
    """out[p] = image[R(angle) (p - c) + c + (dy, dx)] with p = (y, x), c the image centre."""
    rot = _rotation(angle_deg)
    centre = (np.array(image.shape[:2], float) - 1) / 2
    offset = centre - rot @ centre + np.array([dy, dx])
    if image.ndim == 2:
        moved: np.ndarray = ndimage.affine_transform(image, rot, offset, order=order, mode="constant", cval=0)
        return moved
    out = np.empty_like(image)
    for c in range(image.shape[2]):
        out[..., c] = ndimage.affine_transform(image[..., c], rot, offset, order=order, mode="constant", cval=0)
    return out


def estimate_xp_alignment(
    pp: np.ndarray, xp: np.ndarray, *, window: int = WINDOW, max_rotation_deg: float = MAX_ROTATION_DEG
) -> XpAlignment:
    """The rigid placement of XP on PP (see module doc); an unreliable match says so."""
    win = _window(pp.shape[:2], window)
    pp_edges = _edges(pp[win])
    dy, dx, _peak, score = _phase_correlation(pp_edges, _edges(xp[win]))
    shift_only = XpAlignment(float(dy), float(dx), 0.0, score, score >= MIN_SCORE)
    if score >= STRONG_SCORE or max_rotation_deg <= 0:
        return shift_only
    # weak translation-only match: maybe the stage was turned. Coarse angles at half resolution.
    gray = xp.astype(np.float32).mean(axis=2) if xp.ndim == 3 else xp.astype(np.float32)
    half_pp = _edges(pp[win][::2, ::2])
    half_xp = gray[::2, ::2]
    half_win = _window(half_xp.shape, window // 2)
    best = (score, 0.0)
    for angle in np.arange(-max_rotation_deg, max_rotation_deg + 1e-9, 1.0):
        if angle == 0:
            continue
        s = _half_score(half_pp, half_xp, half_win, float(angle))
        if s > best[0]:
            best = (s, float(angle))
    if best[1] == 0.0:
        return shift_only
    # refine the angle at full resolution around the coarse best
    full_best = (score, 0.0, dy, dx)
    for angle in np.arange(best[1] - 1.0, best[1] + 1.0 + 1e-9, 0.25):
        turned = _rotate_shift(gray, float(angle), 0.0, 0.0)
        ady, adx, _p, s = _phase_correlation(pp_edges, _edges(turned[win]))
        if s > full_best[0]:
            full_best = (s, float(angle), ady, adx)
    s, angle, ady, adx = full_best
    if angle == 0.0:
        return shift_only
    # turned[p] = xp[R(p - c) + c]; turned[y, x] ~ pp[y - ady, x - adx]
    # => aligned[q] = turned[q + (ady, adx)] = xp[R(q + d - c) + c] = xp[R(q - c) + c + R d]
    sy, sx = _rotation(angle) @ np.array([ady, adx], float)
    return XpAlignment(round(float(sy), 2), round(float(sx), 2), angle, s, s >= MIN_SCORE)


def _half_score(half_pp: np.ndarray, half_xp: np.ndarray, half_win: tuple[slice, slice], angle: float) -> float:
    turned = _rotate_shift(half_xp, angle, 0.0, 0.0)
    return _phase_correlation(half_pp, _edges(turned[half_win]))[3]


def shift_image(image: np.ndarray, dy: int, dx: int, fill: int = 0) -> np.ndarray:
    """out[y, x] = image[y + dy, x + dx]; uncovered pixels get `fill`."""
    out = np.full_like(image, fill)
    h, w = image.shape[:2]
    ys, yd = (slice(dy, h), slice(0, h - dy)) if dy >= 0 else (slice(0, h + dy), slice(-dy, h))
    xs, xd = (slice(dx, w), slice(0, w - dx)) if dx >= 0 else (slice(0, w + dx), slice(-dx, w))
    out[yd, xd] = image[ys, xs]
    return out


def align_xp_to_pp(pp: np.ndarray, xp: np.ndarray) -> tuple[int, int, np.ndarray]:
    """(dy, dx, xp on the PP grid) for a pure shift. A zero offset, or a match too weak to
    trust, leaves xp as is. (`estimate_xp_alignment` also finds small rotations.)"""
    check_same_size(pp, xp)
    a = estimate_xp_alignment(pp, xp, max_rotation_deg=0)
    if a.is_identity:
        return 0, 0, xp
    return int(a.dy), int(a.dx), a.apply(xp)


def check_same_size(pp: np.ndarray, xp: np.ndarray) -> None:
    if pp.shape[:2] != xp.shape[:2]:
        raise ThinSegError(f"PP is {pp.shape[1]} x {pp.shape[0]} px but XP is {xp.shape[1]} x {xp.shape[0]} px")
