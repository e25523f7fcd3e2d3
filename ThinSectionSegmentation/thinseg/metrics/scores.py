"""Per-class and overall scores from a confusion matrix (see confusion.py for its layout).

For class k: TP = cm[k, k], FP = predicted k where truth is another class, FN = truth k
predicted as anything else, including 0 (not classified).
    precision = TP / (TP + FP)      recall = TP / (TP + FN)
    F1 = 2 TP / (2 TP + FP + FN)    IoU = TP / (TP + FP + FN)
A score whose denominator is 0 is undefined (NaN, null in JSON), never 0 or 1.
Mean IoU and mean F1 average over the classes present in the truth OR the prediction: a class
absent from both says nothing about the model and would otherwise count as a free 1 (or 0).
A class that is only predicted scores 0 and does count. Pixel accuracy = trace / all counted
pixels, so pixels excluded by a mask are neither correct nor wrong: they are not counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from thinseg.classes.table import ClassTable


@dataclass(frozen=True)
class SegmentationMetrics:
    """Scores of one model on one set of pixels; per-class arrays are indexed class k -> [k-1]."""

    class_names: tuple[str, ...]
    iou: np.ndarray
    f1: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    support: np.ndarray  # truth pixels per class (int64)
    predicted: np.ndarray  # pixels predicted as each class, among counted pixels (int64)
    present: np.ndarray  # bool: in truth or prediction, i.e. counted in the means
    mean_iou: float
    mean_f1: float
    pixel_accuracy: float
    evaluated_pixels: int
    unclassified_predictions: int  # counted pixels the model left at 0

    def to_dict(self) -> dict[str, Any]:
        per_class = [
            {
                "name": name,
                "iou": float(self.iou[i]),
                "f1": float(self.f1[i]),
                "precision": float(self.precision[i]),
                "recall": float(self.recall[i]),
                "support": int(self.support[i]),
                "predicted": int(self.predicted[i]),
                "in_mean": bool(self.present[i]),
            }
            for i, name in enumerate(self.class_names)
        ]
        return {
            "mean_iou": float(self.mean_iou),
            "mean_f1": float(self.mean_f1),
            "pixel_accuracy": float(self.pixel_accuracy),
            "evaluated_pixels": int(self.evaluated_pixels),
            "unclassified_predictions": int(self.unclassified_predictions),
            "classes": per_class,
        }


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    num, den = np.asarray(num, np.float64), np.asarray(den, np.float64)
    out = np.full(np.broadcast(num, den).shape, np.nan)
    np.divide(num, den, out=out, where=den > 0)
    return out


def metrics_from_confusion(cm: np.ndarray, class_table: ClassTable | Sequence[str]) -> SegmentationMetrics:
    """Scores from an (N+1) x (N+1) matrix; row 0 (truth 0) is ignored if it holds anything."""
    names = tuple(class_table.names if isinstance(class_table, ClassTable) else class_table)
    cm = np.asarray(cm, np.int64)
    n = len(names)
    if cm.shape != (n + 1, n + 1):
        raise ValueError(f"confusion matrix {cm.shape} does not fit {n} classes (expected {(n + 1, n + 1)})")
    counted = cm[1:, :]  # labelled truth only
    tp = np.diagonal(counted[:, 1:]).copy()
    support = counted.sum(axis=1)
    predicted = counted[:, 1:].sum(axis=0)
    fp = predicted - tp
    fn = support - tp
    iou = _ratio(tp, tp + fp + fn)
    f1 = _ratio(2 * tp, 2 * tp + fp + fn)
    present = (support + predicted) > 0
    total = int(counted.sum())
    return SegmentationMetrics(
        class_names=names,
        iou=iou,
        f1=f1,
        precision=_ratio(tp, tp + fp),
        recall=_ratio(tp, support),
        support=support,
        predicted=predicted,
        present=present,
        mean_iou=float(iou[present].mean()) if present.any() else float("nan"),
        mean_f1=float(f1[present].mean()) if present.any() else float("nan"),
        pixel_accuracy=float(tp.sum() / total) if total else float("nan"),
        evaluated_pixels=total,
        unclassified_predictions=int(counted[:, 0].sum()),
    )
