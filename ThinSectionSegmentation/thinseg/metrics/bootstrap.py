"""How sure is a dataset score? Percentile bootstrap intervals over SECTIONS.

Pixels of one section are not independent (one grain covers thousands of them), so the unit
that is resampled is the section: each resample draws as many sections as were evaluated, with
replacement, and recomputes every dataset figure exactly as the report does, from the SUM of
the drawn sections' confusion matrices (and calibration bin counts) and from the drawn sections'
fractions. The interval is the central `level` share of the resampled values (percentiles,
linear interpolation); a fixed seed makes a report reproducible. Only sums are redone, so 2000
resamples take a fraction of a second.

Fraction R^2 keeps its definition (pooled over (section, class) pairs against the 1:1 line),
which is about agreement ACROSS sections: a resample that draws a single section (with defined
fractions) over and over is degenerate for it, so it is left out of the R^2 interval and
counted (`degenerate_resamples`). Fraction RMSE and the other figures use every resample. A
figure undefined in a resample (a class absent from the drawn sections) is left out of that
figure's interval only. With fewer than two sections there is nothing to resample: no intervals.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from thinseg.metrics.calibration import expected_calibration_error

#: Resamples of the evaluated sections.
BOOTSTRAP_RESAMPLES = 2000
#: Seed of the resampling (reports are reproducible).
BOOTSTRAP_SEED = 0
#: Central share of the resampled values an interval covers.
INTERVAL_LEVEL = 0.95


@dataclass(frozen=True)
class BootstrapIntervals:
    """Percentile intervals (lo, hi) of the dataset figures; None where no interval exists."""

    resamples: int
    seed: int
    level: float
    n_sections: int
    mean_iou: tuple[float, float] | None
    pixel_accuracy: tuple[float, float] | None
    per_class_iou: tuple[tuple[float, float] | None, ...]
    fraction_r2: tuple[float, float] | None
    fraction_rmse: tuple[float, float] | None
    ece: tuple[float, float] | None
    degenerate_resamples: int  # resamples drawing one section only, left out of fraction_r2
    note: str | None = None

    def to_dict(self, class_names: Sequence[str]) -> dict[str, Any]:
        """The report's "intervals" object (None -> null)."""

        def pair(value: tuple[float, float] | None) -> list[float] | None:
            return None if value is None else [float(value[0]), float(value[1])]

        return {
            "mean_iou": pair(self.mean_iou),
            "pixel_accuracy": pair(self.pixel_accuracy),
            "per_class_iou": {name: pair(v) for name, v in zip(class_names, self.per_class_iou)},
            "fraction_r2": pair(self.fraction_r2),
            "fraction_rmse": pair(self.fraction_rmse),
            "ece": pair(self.ece),
        }

    def settings(self) -> dict[str, Any]:
        """The report's "bootstrap" object: how the intervals were made."""
        return {
            "resamples": self.resamples,
            "seed": self.seed,
            "level": self.level,
            "unit": "section",
            "sections": self.n_sections,
            "method": "percentile",
            "degenerate_resamples": self.degenerate_resamples,
            "note": self.note,
        }


def resample_weights(n_sections: int, resamples: int, seed: int) -> npt.NDArray[np.int64]:
    """(resamples, n_sections): how often each section is drawn in each resample."""
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, n_sections, size=(resamples, n_sections))
    return weights_of(picks, n_sections)


def weights_of(picks: npt.ArrayLike, n_sections: int) -> npt.NDArray[np.int64]:
    """(resamples, n_sections) draw counts of explicit picks: (resamples, draws) section indices."""
    rows = np.asarray(picks, np.int64)
    if rows.ndim != 2:
        raise ValueError(f"picks must be (resamples, draws), got shape {rows.shape}")
    weights = np.zeros((rows.shape[0], n_sections), np.int64)
    np.add.at(weights, (np.repeat(np.arange(rows.shape[0]), rows.shape[1]), rows.reshape(-1)), 1)
    return weights


def confusion_scores(
    matrices: npt.ArrayLike,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(per-class IoU (R, N), mean IoU (R,), pixel accuracy (R,)) of R confusion matrices
    (R, N+1, N+1), as `metrics_from_confusion` defines them (NaN where undefined)."""
    cm = np.asarray(matrices, np.float64)
    counted = cm[:, 1:, :]
    tp = np.diagonal(counted[:, :, 1:], axis1=1, axis2=2)
    support = counted.sum(axis=2)
    predicted = counted[:, :, 1:].sum(axis=1)
    union = support + predicted - tp
    iou = np.full(tp.shape, np.nan)
    np.divide(tp, union, out=iou, where=union > 0)
    present = (support + predicted) > 0
    n_present = present.sum(axis=1)
    mean_iou = np.full(cm.shape[0], np.nan)
    np.divide(np.where(present, iou, 0.0).sum(axis=1), n_present, out=mean_iou, where=n_present > 0)
    total = counted.sum(axis=(1, 2))
    accuracy = np.full(cm.shape[0], np.nan)
    np.divide(tp.sum(axis=1), total, out=accuracy, where=total > 0)
    return iou, mean_iou, accuracy


def fraction_scores(
    weights: npt.ArrayLike, true_fracs: npt.ArrayLike, pred_fracs: npt.ArrayLike
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """(pooled R^2 (R,), pooled RMSE (R,), degenerate (R,)) of the fraction tables (S, N) with
    each section counted `weights` (R, S) times, as `fraction_agreement` pools them; sections
    with an undefined fraction vector are left out, as there."""
    t, p = np.asarray(true_fracs, np.float64), np.asarray(pred_fracs, np.float64)
    w = np.asarray(weights, np.float64)
    ok: npt.NDArray[np.bool_] = np.logical_not(np.isnan(t).any(axis=1) | np.isnan(p).any(axis=1))
    w = w * ok
    t, p = np.where(ok[:, None], t, 0.0), np.where(ok[:, None], p, 0.0)
    n_classes = t.shape[1]
    pairs = w.sum(axis=1) * n_classes
    mean = np.full(w.shape[0], np.nan)
    np.divide(w @ t.sum(axis=1), pairs, out=mean, where=pairs > 0)
    filled = np.where(np.isfinite(mean), mean, 0.0)
    ss_tot = (w * ((t[None, :, :] - filled[:, None, None]) ** 2).sum(axis=2)).sum(axis=1)
    ss_res = w @ ((p - t) ** 2).sum(axis=1)
    r2 = np.full(w.shape[0], np.nan)
    np.divide(ss_res, ss_tot, out=r2, where=ss_tot > 0)
    r2 = np.where(ss_tot > 0, 1.0 - r2, np.nan)
    rmse = np.full(w.shape[0], np.nan)
    np.divide(ss_res, pairs, out=rmse, where=pairs > 0)
    degenerate = (w > 0).sum(axis=1) < 2
    return r2, np.sqrt(rmse), degenerate


def percentile_interval(values: npt.ArrayLike, level: float = INTERVAL_LEVEL) -> tuple[float, float] | None:
    """The central `level` share of the finite values (linear interpolation); None if there are none."""
    finite = np.asarray(values, np.float64)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return None
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(finite, [tail, 100 - tail])
    return float(lo), float(hi)


def bootstrap_intervals(
    confusions: npt.ArrayLike,
    true_fracs: npt.ArrayLike,
    pred_fracs: npt.ArrayLike,
    calibration: npt.ArrayLike | None = None,
    *,
    resamples: int = BOOTSTRAP_RESAMPLES,
    seed: int = BOOTSTRAP_SEED,
    level: float = INTERVAL_LEVEL,
    weights: npt.ArrayLike | None = None,
) -> BootstrapIntervals:
    """Intervals from per-section confusion matrices (S, N+1, N+1), fraction tables (S, N) and
    optional calibration bin counts (S, bins, 3: pixels, correct, confidence sum).

    `weights` (R, S) replaces the random draws (e.g. every possible resample of a small set)."""
    cms = np.asarray(confusions, np.int64)
    n_sections, side = cms.shape[0], cms.shape[-1]
    n_classes = side - 1
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if weights is None:
        if resamples < 1:
            raise ValueError(f"resamples must be at least 1, got {resamples}")
        if n_sections < 2:
            return BootstrapIntervals(
                resamples=resamples,
                seed=seed,
                level=level,
                n_sections=n_sections,
                mean_iou=None,
                pixel_accuracy=None,
                per_class_iou=(None,) * n_classes,
                fraction_r2=None,
                fraction_rmse=None,
                ece=None,
                degenerate_resamples=0,
                note=f"no intervals: {n_sections} section(s) evaluated, resampling needs at least 2",
            )
        w = resample_weights(n_sections, resamples, seed)
    else:
        w = np.asarray(weights, np.int64).reshape(-1, n_sections)
        resamples = w.shape[0]
    summed = (w @ cms.reshape(n_sections, side * side)).reshape(-1, side, side)
    iou, mean_iou, accuracy = confusion_scores(summed)
    r2, rmse, degenerate = fraction_scores(w, true_fracs, pred_fracs)
    ece = None
    if calibration is not None:
        cal = np.asarray(calibration, np.float64)
        bins = (w.astype(np.float64) @ cal.reshape(n_sections, -1)).reshape(-1, cal.shape[1], 3)
        ece = percentile_interval(expected_calibration_error(bins[..., 0], bins[..., 1], bins[..., 2]), level)
    skipped = int(degenerate.sum())
    return BootstrapIntervals(
        resamples=resamples,
        seed=seed,
        level=level,
        n_sections=n_sections,
        mean_iou=percentile_interval(mean_iou, level),
        pixel_accuracy=percentile_interval(accuracy, level),
        per_class_iou=tuple(percentile_interval(iou[:, k], level) for k in range(n_classes)),
        fraction_r2=percentile_interval(r2[~degenerate], level),
        fraction_rmse=percentile_interval(rmse, level),
        ece=ece,
        degenerate_resamples=skipped,
        note=(
            f"{skipped} of {resamples} resamples drew one section only and are left out of the fraction R^2 interval"
            if skipped
            else None
        ),
    )
