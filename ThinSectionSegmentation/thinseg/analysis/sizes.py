"""Grain-size statistics as sedimentologists read them: the phi scale, Wentworth classes and
Folk & Ward's (1957) graphic measures.

phi = -log2(diameter in mm). Percentiles run from coarse to fine (phi ascending) and are taken
of the number of grains (each grain counts once, as in point counting), by linear
interpolation. Sizes from a section are apparent (2-D cuts through 3-D grains): no stereological
correction is made, which the report states.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

#: Wentworth (1922) size classes: name and lower bound in mm (the upper is the next's lower).
WENTWORTH: tuple[tuple[str, float], ...] = (
    ("clay", 0.0),
    ("silt", 1 / 256),
    ("very fine sand", 1 / 16),
    ("fine sand", 1 / 8),
    ("medium sand", 1 / 4),
    ("coarse sand", 1 / 2),
    ("very coarse sand", 1.0),
    ("granule", 2.0),
    ("pebble", 4.0),
    ("cobble", 64.0),
    ("boulder", 256.0),
)

#: Folk & Ward verbal classes: (upper bound, words), first match wins.
SORTING_WORDS = (
    (0.35, "very well sorted"),
    (0.50, "well sorted"),
    (0.71, "moderately well sorted"),
    (1.00, "moderately sorted"),
    (2.00, "poorly sorted"),
    (4.00, "very poorly sorted"),
    (math.inf, "extremely poorly sorted"),
)
SKEWNESS_WORDS = (
    (-0.3, "very coarse skewed"),
    (-0.1, "coarse skewed"),
    (0.1, "symmetrical"),
    (0.3, "fine skewed"),
    (math.inf, "very fine skewed"),
)
KURTOSIS_WORDS = (
    (0.67, "very platykurtic"),
    (0.90, "platykurtic"),
    (1.11, "mesokurtic"),
    (1.50, "leptokurtic"),
    (3.00, "very leptokurtic"),
    (math.inf, "extremely leptokurtic"),
)

#: Width of the histogram's phi bins.
PHI_BIN = 0.5


def phi(diameter_mm: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """The phi value of diameters in mm."""
    out: npt.NDArray[np.float64] = -np.log2(np.asarray(diameter_mm, np.float64))
    return out


def wentworth_class(diameter_mm: float) -> str:
    """The Wentworth class of one diameter in mm."""
    name = WENTWORTH[0][0]
    for candidate, lower in WENTWORTH:
        if diameter_mm >= lower:
            name = candidate
    return name


def _words(value: float, table: Sequence[tuple[float, str]]) -> str:
    for bound, words in table:
        if value < bound:
            return words
    return table[-1][1]


def folk_ward(phis: npt.ArrayLike) -> dict[str, Any] | None:
    """Folk & Ward graphic mean, sorting, skewness and kurtosis (phi units) with their words;
    None for fewer than two grains."""
    values = np.sort(np.asarray(phis, np.float64))
    if values.size < 2:
        return None
    p5, p16, p25, p50, p75, p84, p95 = np.percentile(values, [5, 16, 25, 50, 75, 84, 95])
    mean = (p16 + p50 + p84) / 3
    sorting = (p84 - p16) / 4 + (p95 - p5) / 6.6
    skew = 0.0
    if p84 > p16:
        skew += (p16 + p84 - 2 * p50) / (2 * (p84 - p16))
    if p95 > p5:
        skew += (p5 + p95 - 2 * p50) / (2 * (p95 - p5))
    kurtosis = (p95 - p5) / (2.44 * (p75 - p25)) if p75 > p25 else None
    return {
        "mean_phi": float(mean),
        "mean_mm": float(2.0**-mean),
        "mean_class": wentworth_class(float(2.0**-mean)),
        "median_phi": float(p50),
        "sorting_phi": float(sorting),
        "sorting": _words(float(sorting), SORTING_WORDS),
        "skewness": float(skew),
        "skewness_words": _words(float(skew), SKEWNESS_WORDS),
        "kurtosis": None if kurtosis is None else float(kurtosis),
        "kurtosis_words": None if kurtosis is None else _words(float(kurtosis), KURTOSIS_WORDS),
        "percentiles_phi": {
            str(k): float(v) for k, v in zip((5, 16, 25, 50, 75, 84, 95), (p5, p16, p25, p50, p75, p84, p95))
        },
    }


def size_distribution(diameters_mm: npt.ArrayLike) -> dict[str, Any]:
    """Counts, percentiles in mm, a phi histogram (bins of PHI_BIN, coarse to fine), the
    cumulative curve (share of grains coarser than each bin's fine edge), Wentworth classes and
    Folk & Ward's measures of equivalent circular diameters."""
    d = np.asarray(diameters_mm, np.float64)
    d = d[np.isfinite(d) & (d > 0)]
    out: dict[str, Any] = {"count": int(d.size)}
    if d.size == 0:
        out.update(mean_mm=None, median_mm=None, d10_mm=None, d50_mm=None, d90_mm=None, histogram=None, wentworth={})
        out["folk_ward"] = None
        return out
    d10, d50, d90 = np.percentile(d, [10, 50, 90])
    values = phi(d)
    lo = math.floor(values.min() / PHI_BIN) * PHI_BIN
    hi = math.ceil(values.max() / PHI_BIN) * PHI_BIN
    if hi <= lo:
        hi = lo + PHI_BIN
    edges = np.arange(lo, hi + PHI_BIN / 2, PHI_BIN)
    counts, _ = np.histogram(values, bins=edges)
    went = {name: 0 for name, _ in WENTWORTH}
    for value in d:
        went[wentworth_class(float(value))] += 1
    out.update(
        mean_mm=float(d.mean()),
        median_mm=float(np.median(d)),
        d10_mm=float(d10),
        d50_mm=float(d50),
        d90_mm=float(d90),
        histogram={
            "phi_edges": [float(e) for e in edges],
            "counts": [int(c) for c in counts],
            "cumulative_percent": [float(c) for c in 100.0 * np.cumsum(counts) / d.size],
        },
        wentworth={k: v for k, v in went.items() if v},
        folk_ward=folk_ward(values),
    )
    return out
