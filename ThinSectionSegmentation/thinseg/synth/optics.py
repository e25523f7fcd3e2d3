"""Crossed-polars optics: interference colours (Michel-Levy chart) and sRGB encoding.

Between crossed polars an anisotropic grain transmits, per wavelength,
    T(lambda) = sin^2(2 theta) * sin^2(pi * Gamma / lambda),
theta = angle of the grain's vibration direction to the polariser (extinction when 0 or 90 deg),
Gamma = retardation in nm = thickness * birefringence * sin^2(angle of optic axis to the view).
Integrating T against CIE colour-matching functions gives the interference colour, so quartz
comes out first-order grey/white/yellow and calcite high-order creamy white with pastel fringes
where the section thins, as under a real microscope.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import numpy.typing as npt

#: Standard thin-section thickness (nm).
THICKNESS_NM = 30_000.0

#: Maximum birefringence (n_e - n_o, absolute) used for the retardation of each mineral.
BIREFRINGENCE = {"quartz": 0.009, "calcite": 0.172, "dolomite": 0.179, "feldspar": 0.007, "clay": 0.02}

#: Retardations up to this many nm are tabulated (calcite at 30 um reaches ~5200 nm).
MAX_RETARDATION_NM = 6000


def _lobe(lam: np.ndarray, mu: float, s1: float, s2: float) -> np.ndarray:
    s = np.where(lam < mu, s1, s2)
    return np.exp(-0.5 * ((lam - mu) / s) ** 2)


def _cie_xyz(lam: np.ndarray) -> np.ndarray:
    """CIE 1931 2-degree observer, multi-lobe Gaussian fit (Wyman, Sloan & Shirley, JCGT 2013)."""
    x = (
        1.056 * _lobe(lam, 599.8, 37.9, 31.0)
        + 0.362 * _lobe(lam, 442.0, 16.0, 26.7)
        - 0.065 * _lobe(lam, 501.1, 20.4, 26.2)
    )
    y = 0.821 * _lobe(lam, 568.8, 46.9, 40.5) + 0.286 * _lobe(lam, 530.9, 16.3, 31.1)
    z = 1.217 * _lobe(lam, 437.0, 11.8, 36.0) + 0.681 * _lobe(lam, 459.0, 26.0, 13.8)
    return np.stack([x, y, z], axis=1)


_XYZ_TO_LINEAR_SRGB = np.array([[3.2406, -1.5372, -0.4986], [-0.9689, 1.8758, 0.0415], [0.0557, -0.2040, 1.0570]])


@lru_cache(maxsize=1)
def interference_lut() -> np.ndarray:
    """(MAX_RETARDATION_NM + 1, 3) float32 linear-sRGB colour at full brightness (theta = 45 deg)
    for each integer retardation; white-balanced so that a fully transmitting filter is (1, 1, 1)."""
    lam = np.arange(380.0, 781.0, 2.0)
    cmf = _cie_xyz(lam)  # (L, 3)
    gamma = np.arange(MAX_RETARDATION_NM + 1, dtype=np.float64)[:, None]
    # average over a +-5 % spread of retardation (thickness variation, convergent light):
    # it is what washes high-order colours out to the pastel "high-order white" of carbonates
    spread, weights = np.polynomial.hermite_e.hermegauss(9)
    weights = weights / weights.sum()
    transmission = np.zeros((len(gamma), len(lam)))
    for z, wz in zip(spread, weights):
        transmission += wz * np.sin(np.pi * gamma * (1.0 + 0.05 * z) / lam[None, :]) ** 2  # (G, L)
    xyz = transmission @ cmf
    rgb = xyz @ _XYZ_TO_LINEAR_SRGB.T
    white = cmf.sum(axis=0) @ _XYZ_TO_LINEAR_SRGB.T  # equal-energy white
    rgb /= white[None, :]
    rgb = np.clip(rgb, 0.0, None)
    # photographs of real charts are less saturated than the ideal colorimetric result
    grey = rgb @ np.array([0.2126, 0.7152, 0.0722])
    rgb = 0.75 * rgb + 0.25 * grey[:, None]
    lut: npt.NDArray[np.float32] = rgb.astype(np.float32)
    return lut


@lru_cache(maxsize=1)
def _lut_channels_first() -> np.ndarray:
    return np.ascontiguousarray(interference_lut().T)


def interference_colour(retardation_nm: np.ndarray, extinction_angle: np.ndarray) -> np.ndarray:
    """(3, n) linear colour of n pixels from their retardation (nm) and vibration angle (rad)."""
    index = np.clip(retardation_nm, 0, MAX_RETARDATION_NM).astype(np.intp)
    brightness = np.sin(2.0 * extinction_angle, dtype=np.float32) ** 2
    out: npt.NDArray[np.float32] = np.take(_lut_channels_first(), index, axis=1)
    out *= brightness
    return out


@lru_cache(maxsize=1)
def _srgb_encode_lut() -> np.ndarray:
    v = np.linspace(0.0, 1.0, 4096)
    enc = np.where(v <= 0.0031308, 12.92 * v, 1.055 * np.power(v, 1 / 2.4) - 0.055)
    return (enc * 255.0).astype(np.float32)


def linear_to_srgb255(linear: np.ndarray) -> np.ndarray:
    """Linear [0, 1] -> sRGB [0, 255] float32 via a 4096-entry table (np.power on every pixel is slow)."""
    index = np.clip(linear * 4095.0 + 0.5, 0, 4095).astype(np.int32)
    return _srgb_encode_lut()[index]


def srgb255_to_linear(srgb: np.ndarray) -> np.ndarray:
    v = np.asarray(srgb, dtype=np.float32) / 255.0
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4).astype(np.float32)
