"""Confusion matrices accumulated pixel by pixel over a whole dataset.

Counts are summed over every section (and every tile of a section) before any metric is taken,
so a large section weighs more than a small one; averaging per-image scores instead would let
a thumbnail with one grain swing the result.

Layout: an int64 (N+1) x (N+1) matrix, rows = truth, columns = prediction, index k = label k.
Row 0 stays empty: pixels whose truth is 0 (not classified) have no truth and are not counted.
Column 0 counts labelled pixels the model left unclassified; they are errors (they lower recall
and accuracy) but belong to no class's false positives.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

from thinseg.errors import ThinSegError

#: Pixels per bincount call: bounds the temporaries for gigapixel label maps.
CHUNK_PIXELS = 1 << 22


def check_label_map(labels: np.ndarray, n_classes: int, what: str) -> None:
    """Label maps are 2-D integer arrays with values 0..n_classes; anything else is a data error."""
    if labels.ndim != 2:
        raise ThinSegError(f"{what} label map must be 2-D (H, W), got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ThinSegError(f"{what} label map must hold integer labels, got {labels.dtype}")
    if labels.size:
        low, high = int(labels.min()), int(labels.max())
        if low < 0 or high > n_classes:
            bad = high if high > n_classes else low
            raise ThinSegError(
                f"{what} label {bad} is outside the class table ({n_classes} classes, labels 0..{n_classes})"
            )


class ConfusionAccumulator:
    """Streaming confusion matrix: call `update` per section or tile, read `matrix` at the end.

    `excluded_pixels` counts labelled pixels dropped by a mask (void borders) and
    `unlabelled_pixels` those with truth 0, so reports can say how much was left out.
    """

    def __init__(self, n_classes: int) -> None:
        if not 1 <= n_classes <= 255:
            raise ValueError(f"n_classes must be 1..255 (uint8 labels), got {n_classes}")
        self.n_classes = n_classes
        self._counts = np.zeros((n_classes + 1) * (n_classes + 1), np.int64)
        self.unlabelled_pixels = 0
        self.excluded_pixels = 0

    def update(self, truth: np.ndarray, pred: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Add the pixels of one section or tile; pixels with `mask` False are left out."""
        truth, pred = np.asarray(truth), np.asarray(pred)
        if truth.shape != pred.shape:
            raise ThinSegError(f"truth {truth.shape} and prediction {pred.shape} label maps differ in size")
        if mask is not None:
            mask = np.asarray(mask, dtype=bool)
            if mask.shape != truth.shape:
                raise ThinSegError(f"mask {mask.shape} and label maps {truth.shape} differ in size")
        check_label_map(truth, self.n_classes, "truth")
        check_label_map(pred, self.n_classes, "prediction")
        side = self.n_classes + 1
        flat_t, flat_p = truth.reshape(-1), pred.reshape(-1)
        flat_m = None if mask is None else mask.reshape(-1)
        for i in range(0, flat_t.size, CHUNK_PIXELS):
            t = flat_t[i : i + CHUNK_PIXELS]
            p = flat_p[i : i + CHUNK_PIXELS]
            labelled = t != 0
            self.unlabelled_pixels += int(t.size - np.count_nonzero(labelled))
            if flat_m is not None:
                kept = labelled & flat_m[i : i + CHUNK_PIXELS]
                self.excluded_pixels += int(np.count_nonzero(labelled) - np.count_nonzero(kept))
                labelled = kept
            index = t[labelled].astype(np.int32) * side + p[labelled].astype(np.int32)
            self._counts += np.bincount(index, minlength=side * side)

    def merge(self, other: ConfusionAccumulator) -> None:
        """Add another accumulator's counts (e.g. one section's, streamed tile by tile)."""
        if other.n_classes != self.n_classes:
            raise ValueError(f"cannot merge {other.n_classes}-class counts into {self.n_classes}-class counts")
        self._counts += other._counts
        self.unlabelled_pixels += other.unlabelled_pixels
        self.excluded_pixels += other.excluded_pixels

    @property
    def matrix(self) -> npt.NDArray[np.int64]:
        """A copy of the (N+1) x (N+1) counts, rows = truth, columns = prediction."""
        side = self.n_classes + 1
        counts: npt.NDArray[np.int64] = self._counts.reshape(side, side).copy()
        return counts

    @property
    def evaluated_pixels(self) -> int:
        return int(self._counts.sum())
