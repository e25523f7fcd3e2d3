"""Mineral fractions per section, predicted vs truth: how well a model reproduces the modal
mineralogy (the area share of each mineral) that QEMSCAN measures on the same section.

Fractions are of CLASSIFIED pixels (label != 0), as in the modal mineralogy report, and both are
taken over the same pixels: those with truth. So the truth fractions of a section are its
QEMSCAN modal mineralogy and the predicted fractions are what `thinseg segment` would report
for that area.

Agreement is the coefficient of determination against the identity line (no fitted line, so a
bias is penalised, unlike a squared correlation):
    R^2 = 1 - SS_res / SS_tot,  SS_res = sum (pred - true)^2,  SS_tot = sum (true - mean(true))^2
per class over sections, and "overall" over all (section, class) pairs pooled, with one mean over
all pairs: the scatter plot of every mineral of every section against the 1:1 line.
RMSE = sqrt(mean (pred - true)^2) on the same sets, in fraction units (0..1).
R^2 is NaN where SS_tot = 0 (fewer than two sections, or a class with the same fraction
everywhere). It can be negative: predicting worse than the mean of the truth.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from thinseg.metrics.confusion import CHUNK_PIXELS


def class_pixel_counts(
    labels: npt.NDArray[np.integer[Any]], n_classes: int, mask: npt.NDArray[np.bool_] | None = None
) -> npt.NDArray[np.int64]:
    """(n_classes + 1,) int64 pixels of each label value 0..n_classes (0 = unclassified or no
    truth); values above n_classes are not counted. With `mask`, only pixels where it is True.

    `np.bincount` copies its input to 8-byte integers, so a gigapixel uint8 map is counted in
    bands of rows of about CHUNK_PIXELS pixels: the copy stays small, and a memory-mapped map
    is read one band at a time.
    """
    grid = np.asarray(labels)
    keep = None if mask is None else np.asarray(mask, bool).reshape(grid.shape)
    if grid.ndim < 2:
        grid = grid.reshape(1, -1)
        keep = None if keep is None else keep.reshape(1, -1)
    counts = np.zeros(n_classes + 1, np.int64)
    if grid.size == 0:
        return counts
    rows = max(1, CHUNK_PIXELS // (grid.size // grid.shape[0]))
    for y0 in range(0, grid.shape[0], rows):
        part = grid[y0 : y0 + rows].reshape(-1)
        if keep is not None:
            part = part[keep[y0 : y0 + rows].reshape(-1)]
        counts += np.bincount(part, minlength=n_classes + 1)[: n_classes + 1]
    return counts


def area_fractions(
    labels: npt.NDArray[np.integer[Any]], n_classes: int, mask: npt.NDArray[np.bool_] | None = None
) -> npt.NDArray[np.float64]:
    """(N,) fractions of classes 1..N among classified pixels (in `mask`); NaN if none classified."""
    counts = class_pixel_counts(labels, n_classes, mask)[1:].astype(np.float64)
    total = counts.sum()
    return counts / total if total else np.full(n_classes, np.nan)


def fractions_from_confusion(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(truth, predicted) fractions of one section from its (unmasked) confusion matrix."""
    cm = np.asarray(cm, np.float64)
    truth = cm[1:, 1:].sum(axis=1) + cm[1:, 0]
    pred = cm[1:, 1:].sum(axis=0)
    t_total, p_total = truth.sum(), pred.sum()
    nan = np.full(truth.shape, np.nan)
    return (truth / t_total if t_total else nan), (pred / p_total if p_total else nan.copy())


@dataclass(frozen=True)
class FractionStats:
    """R^2, RMSE and bias (mean pred - true) of fractions, per class and overall."""

    class_names: tuple[str, ...]
    r2: np.ndarray
    rmse: np.ndarray
    bias: np.ndarray
    r2_overall: float
    rmse_overall: float
    n_sections: int  # sections used (both fraction vectors defined)

    def to_dict(self) -> dict[str, Any]:
        return {
            "r2_overall": float(self.r2_overall),
            "rmse_overall": float(self.rmse_overall),
            "n_sections": int(self.n_sections),
            "classes": [
                {"name": name, "r2": float(self.r2[i]), "rmse": float(self.rmse[i]), "bias": float(self.bias[i])}
                for i, name in enumerate(self.class_names)
            ],
        }


def r_squared(true: np.ndarray, pred: np.ndarray) -> float:
    """1 - SS_res / SS_tot against the identity line; NaN if the truth does not vary."""
    true, pred = np.asarray(true, np.float64).ravel(), np.asarray(pred, np.float64).ravel()
    ss_tot = float(((true - true.mean()) ** 2).sum()) if true.size else 0.0
    if ss_tot <= 0:
        return float("nan")
    return 1.0 - float(((pred - true) ** 2).sum()) / ss_tot


def fraction_agreement(
    true_fracs: np.ndarray, pred_fracs: np.ndarray, class_names: Sequence[str] | None = None
) -> FractionStats:
    """Compare (S, N) fraction tables; sections with an undefined (NaN) vector are left out."""
    true_fracs, pred_fracs = np.asarray(true_fracs, np.float64), np.asarray(pred_fracs, np.float64)
    if true_fracs.ndim != 2 or true_fracs.shape != pred_fracs.shape:
        raise ValueError(
            f"fraction tables must both be (sections, classes), got {true_fracs.shape} and {pred_fracs.shape}"
        )
    n = true_fracs.shape[1]
    names = tuple(class_names) if class_names is not None else tuple(f"class {k}" for k in range(1, n + 1))
    ok = ~(np.isnan(true_fracs).any(axis=1) | np.isnan(pred_fracs).any(axis=1))
    t, p = true_fracs[ok], pred_fracs[ok]
    if len(t):
        rmse = np.sqrt(((p - t) ** 2).mean(axis=0))
        bias = (p - t).mean(axis=0)
        rmse_overall = float(np.sqrt(((p - t) ** 2).mean()))
    else:
        rmse = bias = np.full(n, np.nan)
        rmse_overall = float("nan")
    return FractionStats(
        class_names=names,
        r2=np.array([r_squared(t[:, k], p[:, k]) for k in range(n)]),
        rmse=rmse,
        bias=bias,
        r2_overall=r_squared(t, p),
        rmse_overall=rmse_overall,
        n_sections=int(ok.sum()),
    )
