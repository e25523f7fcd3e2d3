"""Is the model's confidence honest? Expected calibration error (ECE) over the scored pixels.

Confidence is the probability of the winning class (the engine's confidence map: max softmax
probability, stored x 255 as uint8, or a float in [0, 1]). Pixels with truth (label != 0) are
put into CALIBRATION_BINS equal-width bins over [0, 1] (bin i holds [i/B, (i+1)/B), the last
one also 1.0); each bin counts its pixels, its correct pixels and the sum of their confidence.

    ECE = sum over bins |accuracy(bin) - mean confidence(bin)| * pixels(bin) / all pixels
        = sum over bins |correct(bin) - confidence sum(bin)| / all pixels

0 is a perfectly calibrated model; a model that says 0.9 and is right half the time scores 0.4.
Counts stream like the confusion matrix (per section, per tile) and add up, so the dataset ECE
is taken over all pixels at once and a bootstrap over sections only sums the bin counts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from thinseg.errors import ThinSegError
from thinseg.metrics.confusion import CHUNK_PIXELS

#: Equal-width confidence bins over [0, 1].
CALIBRATION_BINS = 15
#: uint8 confidence maps hold the probability x this.
CONFIDENCE_SCALE = 255


def confidence_bins(confidence: np.ndarray, bins: int = CALIBRATION_BINS) -> npt.NDArray[np.intp]:
    """Bin index of each confidence: uint8 maps (x 255) exactly in integers, floats by floor(c * bins)."""
    values = np.asarray(confidence)
    if values.dtype == np.uint8:
        index = values.astype(np.intp) * bins // CONFIDENCE_SCALE
    else:
        index = np.floor(values.astype(np.float64) * bins).astype(np.intp)
    clipped: npt.NDArray[np.intp] = np.clip(index, 0, bins - 1)
    return clipped


def confidence_values(confidence: np.ndarray) -> npt.NDArray[np.float64]:
    """Confidence as probabilities (uint8 maps divided by 255)."""
    values = np.asarray(confidence)
    if values.dtype == np.uint8:
        scaled: npt.NDArray[np.float64] = values.astype(np.float64) / CONFIDENCE_SCALE
        return scaled
    return values.astype(np.float64)


def expected_calibration_error(
    pixels: npt.ArrayLike, correct: npt.ArrayLike, confidence_sum: npt.ArrayLike
) -> npt.NDArray[np.float64]:
    """ECE from bin counts (last axis = bins; leading axes, e.g. bootstrap resamples, are kept);
    NaN where there are no pixels."""
    n = np.asarray(pixels, np.float64)
    gap = np.abs(np.asarray(correct, np.float64) - np.asarray(confidence_sum, np.float64)).sum(axis=-1)
    total = n.sum(axis=-1)
    out = np.full(np.shape(total), np.nan)
    np.divide(gap, total, out=out, where=total > 0)
    return out


class CalibrationAccumulator:
    """Per-bin pixels, correct pixels and confidence sums of labelled pixels; `update` per section
    or tile, `merge` to add another accumulator's counts."""

    def __init__(self, bins: int = CALIBRATION_BINS) -> None:
        if bins < 1:
            raise ValueError(f"bins must be at least 1, got {bins}")
        self.bins = bins
        self.pixels = np.zeros(bins, np.int64)
        self.correct = np.zeros(bins, np.int64)
        self.confidence_sum = np.zeros(bins, np.float64)

    def update(self, truth: np.ndarray, pred: np.ndarray, confidence: np.ndarray) -> None:
        """Add the labelled pixels (truth != 0) of one section or tile."""
        truth, pred, confidence = np.asarray(truth), np.asarray(pred), np.asarray(confidence)
        if not truth.shape == pred.shape == confidence.shape:
            raise ThinSegError(
                f"truth {truth.shape}, prediction {pred.shape} and confidence {confidence.shape} maps differ in size"
            )
        if confidence.dtype != np.uint8 and confidence.size:
            low, high = float(confidence.min()), float(confidence.max())  # NaN fails the test below
            if not (low >= 0.0 and high <= 1.0):
                raise ThinSegError(f"confidence must lie in [0, 1], got values from {low:g} to {high:g}")
        flat_t, flat_p, flat_c = truth.reshape(-1), pred.reshape(-1), confidence.reshape(-1)
        for i in range(0, flat_t.size, CHUNK_PIXELS):
            t = flat_t[i : i + CHUNK_PIXELS]
            labelled = t != 0
            c = flat_c[i : i + CHUNK_PIXELS][labelled]
            right = t[labelled] == flat_p[i : i + CHUNK_PIXELS][labelled]
            index = confidence_bins(c, self.bins)
            self.pixels += np.bincount(index, minlength=self.bins)
            self.correct += np.bincount(index[right], minlength=self.bins)
            self.confidence_sum += np.bincount(index, weights=confidence_values(c), minlength=self.bins)

    def merge(self, other: CalibrationAccumulator) -> None:
        if other.bins != self.bins:
            raise ValueError(f"cannot merge {other.bins}-bin counts into {self.bins}-bin counts")
        self.pixels += other.pixels
        self.correct += other.correct
        self.confidence_sum += other.confidence_sum

    def stats(self) -> CalibrationStats:
        return CalibrationStats(self.pixels.copy(), self.correct.copy(), self.confidence_sum.copy())

    @property
    def counts(self) -> npt.NDArray[np.float64]:
        """(bins, 3): pixels, correct pixels, confidence sum (what a bootstrap sums over sections)."""
        stacked: npt.NDArray[np.float64] = np.stack(
            [self.pixels.astype(np.float64), self.correct.astype(np.float64), self.confidence_sum], axis=1
        )
        return stacked


@dataclass(frozen=True)
class CalibrationStats:
    """The bin counts of a set of pixels and what follows from them (ECE, reliability)."""

    pixels: np.ndarray  # (bins,) int64
    correct: np.ndarray  # (bins,) int64
    confidence_sum: np.ndarray  # (bins,) float64

    @property
    def bins(self) -> int:
        return int(self.pixels.size)

    @property
    def ece(self) -> float:
        return float(expected_calibration_error(self.pixels, self.correct, self.confidence_sum))

    @property
    def mean_confidence(self) -> float:
        total = int(self.pixels.sum())
        return float(self.confidence_sum.sum() / total) if total else float("nan")

    @property
    def accuracy(self) -> float:
        total = int(self.pixels.sum())
        return float(self.correct.sum() / total) if total else float("nan")

    def reliability(self) -> list[tuple[float, float, int]]:
        """(mean confidence, accuracy, pixels) per bin, NaN for an empty bin's two ratios."""
        rows = []
        for n, right, conf in zip(self.pixels.tolist(), self.correct.tolist(), self.confidence_sum.tolist()):
            rows.append((conf / n if n else float("nan"), right / n if n else float("nan"), int(n)))
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {
            "ece": self.ece,
            "bins": self.bins,
            "binning": f"{self.bins} equal-width bins of the winning-class probability over [0, 1]",
            "pixels": int(self.pixels.sum()),
            "mean_confidence": self.mean_confidence,
            "accuracy": self.accuracy,
            "reliability": [list(row) for row in self.reliability()],
            "reliability_axes": "per bin: mean confidence, accuracy, pixels (null: empty bin)",
        }
