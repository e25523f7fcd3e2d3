"""Whole-dataset evaluation: stream sections in, get one report out (table, JSON).

`Evaluator` keeps two dataset-wide confusion matrices (all labelled pixels, and the same with
void borders left out) plus each section's confusion matrix, fractions and (given the model's
confidence) calibration bin counts; `report()` turns them into an `EvaluationReport`, with 95%
bootstrap intervals over sections (bootstrap.py) and the expected calibration error.
Fractions always use all labelled pixels of a section: void borders are a per-pixel fairness
device, while a modal mineralogy is a property of the whole section.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from thinseg.classes.table import ClassTable
from thinseg.jsonio import dumps, finite
from thinseg.metrics.bootstrap import BOOTSTRAP_RESAMPLES, BOOTSTRAP_SEED, BootstrapIntervals, bootstrap_intervals
from thinseg.metrics.borders import void_border_mask
from thinseg.metrics.calibration import CalibrationAccumulator, CalibrationStats
from thinseg.metrics.confusion import ConfusionAccumulator
from thinseg.metrics.fractions import FractionStats, fraction_agreement, fractions_from_confusion
from thinseg.metrics.scores import SegmentationMetrics, metrics_from_confusion


@dataclass(frozen=True)
class SectionResult:
    """One section's fractions (over its labelled pixels) and its own headline scores."""

    name: str
    true_fractions: np.ndarray
    pred_fractions: np.ndarray
    evaluated_pixels: int
    pixel_accuracy: float
    mean_iou: float
    confusion: np.ndarray | None = None  # (N+1, N+1), all labelled pixels: what the bootstrap resamples

    def to_dict(self) -> dict[str, Any]:
        plain = {
            "name": self.name,
            "true_fractions": self.true_fractions,
            "pred_fractions": self.pred_fractions,
            "evaluated_pixels": self.evaluated_pixels,
            "pixel_accuracy": self.pixel_accuracy,
            "mean_iou": self.mean_iou,
        }
        if self.confusion is not None:
            plain["confusion"] = self.confusion
        return plain


@dataclass(frozen=True)
class EvaluationReport:
    """Everything `thinseg evaluate` reports for one model on one dataset."""

    model: str
    class_table: ClassTable
    void_border_px: float
    confusion: np.ndarray
    metrics: SegmentationMetrics
    confusion_void_excluded: np.ndarray | None  # None when void_border_px == 0
    metrics_void_excluded: SegmentationMetrics | None
    void_border_pixels: int  # labelled pixels left out as void borders
    sections: tuple[SectionResult, ...]
    fraction_stats: FractionStats
    intervals: BootstrapIntervals | None = None  # over sections, all labelled pixels
    calibration: CalibrationStats | None = None  # None when no confidence was given

    @property
    def section_names(self) -> list[str]:
        return [s.name for s in self.sections]

    @property
    def true_fractions(self) -> np.ndarray:
        """(S, N) truth fractions, one row per section."""
        return np.array([s.true_fractions for s in self.sections]).reshape(len(self.sections), len(self.class_table))

    @property
    def pred_fractions(self) -> np.ndarray:
        return np.array([s.pred_fractions for s in self.sections]).reshape(len(self.sections), len(self.class_table))

    def to_dict(self) -> dict[str, Any]:
        """Plain data (arrays as lists, NaN -> None): what `to_json` writes."""
        plain: dict[str, Any] = finite(
            {
                "model": self.model,
                "classes": [
                    {"label": k, "name": c.name, "color": c.color} for k, c in enumerate(self.class_table.classes, 1)
                ],
                "confusion_axes": "rows = truth label 0..N, columns = predicted label 0..N (0 = not classified)",
                "void_border_px": self.void_border_px,
                "void_border_pixels": self.void_border_pixels,
                "confusion": self.confusion,
                "metrics": self.metrics.to_dict(),
                "confusion_void_excluded": self.confusion_void_excluded,
                "metrics_void_excluded": None
                if self.metrics_void_excluded is None
                else self.metrics_void_excluded.to_dict(),
                "fractions": self.fraction_stats.to_dict(),
                "sections": [s.to_dict() for s in self.sections],
                "intervals": None if self.intervals is None else self.intervals.to_dict(self.class_table.names),
                "bootstrap": None if self.intervals is None else self.intervals.settings(),
                "calibration": None if self.calibration is None else self.calibration.to_dict(),
            }
        )
        return plain

    def to_json(self, indent: int | None = 2) -> str:
        """Standard JSON of `to_dict` (undefined scores as null)."""
        return dumps(self.to_dict(), indent=indent)

    def format_table(self) -> str:
        return format_table(self)


class Evaluator:
    """Accumulates one model's predictions over a dataset, section by section.

    Sections streamed tile by tile can be fed through `add_section_counts` with accumulators
    built by the caller (the void-border mask must then be computed on the whole truth map, or
    on tiles with a margin of `void_border_px`, so that borders at tile edges are right).
    """

    def __init__(
        self, class_table: ClassTable, void_border_px: float = 0, unlabelled_is_boundary: bool = False
    ) -> None:
        self.class_table = class_table
        self.void_border_px = float(void_border_px)
        self.unlabelled_is_boundary = unlabelled_is_boundary
        n = len(class_table)
        self._all = ConfusionAccumulator(n)
        self._kept = ConfusionAccumulator(n) if self.void_border_px > 0 else None
        self._sections: list[SectionResult] = []
        self._calibration: list[CalibrationAccumulator | None] = []

    def add_section(
        self,
        name: str,
        truth: np.ndarray,
        pred: np.ndarray,
        keep: np.ndarray | None = None,
        confidence: np.ndarray | None = None,
    ) -> SectionResult:
        """Score one section; `keep` overrides the void-border mask computed from `truth`;
        `confidence` (winning-class probability, uint8 x 255 or float) adds it to the calibration."""
        n = len(self.class_table)
        counts = ConfusionAccumulator(n)
        counts.update(truth, pred)
        kept = None
        if self._kept is not None:
            if keep is None:
                keep = void_border_mask(truth, self.void_border_px, self.unlabelled_is_boundary)
            kept = ConfusionAccumulator(n)
            kept.update(truth, pred, keep)
        elif keep is not None:
            raise ValueError("a keep mask was given but this Evaluator has void_border_px = 0")
        calibration = None
        if confidence is not None:
            calibration = CalibrationAccumulator()
            calibration.update(truth, pred, confidence)
        return self.add_section_counts(name, counts, kept, calibration)

    def add_section_counts(
        self,
        name: str,
        counts: ConfusionAccumulator,
        kept_counts: ConfusionAccumulator | None = None,
        calibration: CalibrationAccumulator | None = None,
    ) -> SectionResult:
        """Add one section's counts (all labelled pixels, void borders excluded, calibration bins).

        Calibration is given for every section or for none: an ECE over some sections only would
        read as the dataset's."""
        if (kept_counts is None) != (self._kept is None):
            raise ValueError("kept_counts must be given exactly when void_border_px > 0")
        if self._calibration and (calibration is None) != (self._calibration[0] is None):
            raise ValueError("confidence must be given for every section or for none")
        self._all.merge(counts)
        if self._kept is not None and kept_counts is not None:
            self._kept.merge(kept_counts)
        cm = counts.matrix
        true_f, pred_f = fractions_from_confusion(cm)
        metrics = metrics_from_confusion(cm, self.class_table)
        result = SectionResult(
            name, true_f, pred_f, metrics.evaluated_pixels, metrics.pixel_accuracy, metrics.mean_iou, cm
        )
        self._sections.append(result)
        self._calibration.append(calibration)
        return result

    def report(
        self, model: str = "", resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED
    ) -> EvaluationReport:
        """The dataset report, with percentile intervals from `resamples` bootstrap draws of the
        sections (`seed`: the same intervals every time)."""
        n = len(self.class_table)
        true_f = np.array([s.true_fractions for s in self._sections]).reshape(-1, n)
        pred_f = np.array([s.pred_fractions for s in self._sections]).reshape(-1, n)
        cm = self._all.matrix
        kept_cm = self._kept.matrix if self._kept is not None else None
        side = n + 1
        section_cms = np.array([s.confusion for s in self._sections], np.int64).reshape(-1, side, side)
        per_section_bins = [c for c in self._calibration if c is not None]
        calibration = None
        bins = None
        if per_section_bins:
            total = CalibrationAccumulator(per_section_bins[0].bins)
            for part in per_section_bins:
                total.merge(part)
            calibration = total.stats()
            bins = np.array([c.counts for c in per_section_bins])
        intervals = bootstrap_intervals(section_cms, true_f, pred_f, bins, resamples=resamples, seed=seed)
        return EvaluationReport(
            model=model,
            class_table=self.class_table,
            void_border_px=self.void_border_px,
            confusion=cm,
            metrics=metrics_from_confusion(cm, self.class_table),
            confusion_void_excluded=kept_cm,
            metrics_void_excluded=metrics_from_confusion(kept_cm, self.class_table) if kept_cm is not None else None,
            void_border_pixels=self._kept.excluded_pixels if self._kept is not None else 0,
            sections=tuple(self._sections),
            fraction_stats=fraction_agreement(true_f, pred_f, self.class_table.names),
            intervals=intervals,
            calibration=calibration,
        )


# --- terminal tables -------------------------------------------------------------------------


def _num(value: float, width: int, digits: int = 3) -> str:
    return f"{'-':>{width}}" if not math.isfinite(value) else f"{value:{width}.{digits}f}"


def _interval(pair: tuple[float, float] | None, digits: int = 3, scale: float = 1.0) -> str:
    """The text "[lo, hi]" of an interval (times `scale`), "-" when there is none."""
    if pair is None:
        return "-"
    return f"[{scale * pair[0]:.{digits}f}, {scale * pair[1]:.{digits}f}]"


def _with_interval(value: str, pair: tuple[float, float] | None, digits: int = 3, scale: float = 1.0) -> str:
    """A figure followed by its interval, when it has one."""
    return value if pair is None else f"{value} {_interval(pair, digits, scale)}"


def format_table(report: EvaluationReport) -> str:
    """Fixed-width table: per-class scores and fractions, then the dataset figures."""
    m, mv, fs, ci = report.metrics, report.metrics_void_excluded, report.fraction_stats, report.intervals
    spans = ci if ci is not None and ci.mean_iou is not None else None  # intervals to print
    names = report.class_table.names
    width = max(22, *(len(n) for n in names))
    true_f, pred_f = fractions_from_confusion(report.confusion)
    head = f"{'class':<{width}} {'IoU':>6} {'F1':>6} {'prec':>6} {'recall':>6}"
    if mv is not None:
        head += f" {'IoU-vb':>6} {'F1-vb':>6}"
    head += f" {'truth%':>7} {'pred%':>7} {'R^2':>6} {'RMSE%':>6}"
    if spans is not None:
        head += f" {'IoU 95% interval':>16}"
    title = f"model: {report.model or '-'}   sections: {len(report.sections)}   scored pixels: {m.evaluated_pixels:,}"
    lines = [title, head, "-" * len(head)]
    for i, name in enumerate(names):
        row = f"{name:<{width}} {_num(m.iou[i], 6)} {_num(m.f1[i], 6)} {_num(m.precision[i], 6)} {_num(m.recall[i], 6)}"
        if mv is not None:
            row += f" {_num(mv.iou[i], 6)} {_num(mv.f1[i], 6)}"
        row += f" {_num(100 * true_f[i], 7, 2)} {_num(100 * pred_f[i], 7, 2)}"
        row += f" {_num(fs.r2[i], 6)} {_num(100 * fs.rmse[i], 6, 2)}"
        if spans is not None:
            row += f" {_interval(spans.per_class_iou[i]):>16}"
        lines.append(row)
    lines.append("-" * len(head))
    mean = f"{'mean (present classes)':<{width}} {_num(m.mean_iou, 6)} {_num(m.mean_f1, 6)} {'':>6} {'':>6}"
    if mv is not None:
        mean += f" {_num(mv.mean_iou, 6)} {_num(mv.mean_f1, 6)}"
    if spans is not None:
        mean = f"{mean:<{len(head) - 16}}{_interval(spans.mean_iou):>16}"
    lines.append(mean)
    acc = "pixel accuracy: " + _with_interval(
        f"{_num(100 * m.pixel_accuracy, 0, 2).strip()}%", spans.pixel_accuracy if spans else None, 2, 100
    )
    if mv is not None:
        labelled = m.evaluated_pixels
        share = 100 * report.void_border_pixels / labelled if labelled else float("nan")
        acc += (
            f"   with void borders of {report.void_border_px:g} px excluded: "
            f"{_num(100 * mv.pixel_accuracy, 0, 2).strip()}%"
            f" ({report.void_border_pixels:,} px = {_num(share, 0, 1).strip()}% left out)"
        )
    lines.append(acc)
    r2_text = _with_interval(_num(fs.r2_overall, 0).strip(), spans.fraction_r2 if spans else None)
    rmse_text = _with_interval(
        _num(100 * fs.rmse_overall, 0, 2).strip(), spans.fraction_rmse if spans else None, 2, 100
    )
    lines.append(f"fractions over {fs.n_sections} section(s): R^2 {r2_text}, RMSE {rmse_text} % points")
    cal = report.calibration
    if cal is not None:
        ece_text = _with_interval(_num(cal.ece, 0).strip(), spans.ece if spans else None)
        lines.append(
            f"calibration: ECE {ece_text} ({cal.bins} equal-width bins of the winning-class probability; "
            f"mean confidence {_num(cal.mean_confidence, 0).strip()}, accuracy {_num(cal.accuracy, 0).strip()})"
        )
    if ci is not None and spans is not None:
        lines.append(
            f"[lo, hi]: {100 * ci.level:g}% percentile intervals, bootstrap over the {ci.n_sections} sections "
            f"({ci.resamples} resamples, seed {ci.seed})" + (f"; {ci.note}" if ci.note else "")
        )
    elif ci is not None and ci.note:
        lines.append(ci.note)
    if m.unclassified_predictions:
        share = 100 * m.unclassified_predictions / m.evaluated_pixels
        lines.append(
            f"left unclassified by the model: {m.unclassified_predictions:,} px ({share:.2f}%), counted as errors"
        )
    legend = "IoU/F1/prec/recall over all labelled pixels"
    if mv is not None:
        legend += "; -vb: void borders excluded"
    lines.append(legend + "; truth%/pred%: dataset fractions; R^2/RMSE: per-section fractions; '-' = undefined")
    return "\n".join(lines)


#: Rows of the comparison table: (label, getter, digits, higher is better).
_SUMMARY_ROWS: tuple[tuple[str, Callable[[EvaluationReport], float], int, bool], ...] = (
    ("mean IoU", lambda r: r.metrics.mean_iou, 3, True),
    ("mean F1", lambda r: r.metrics.mean_f1, 3, True),
    ("pixel accuracy %", lambda r: 100 * r.metrics.pixel_accuracy, 2, True),
    (
        "mean IoU, void borders excl.",
        lambda r: r.metrics_void_excluded.mean_iou if r.metrics_void_excluded else math.nan,
        3,
        True,
    ),
    (
        "pixel acc. %, void borders excl.",
        lambda r: 100 * r.metrics_void_excluded.pixel_accuracy if r.metrics_void_excluded else math.nan,
        2,
        True,
    ),
    ("fractions R^2 overall", lambda r: r.fraction_stats.r2_overall, 3, True),
    ("fractions RMSE % points", lambda r: 100 * r.fraction_stats.rmse_overall, 2, False),
    ("calibration ECE", lambda r: r.calibration.ece if r.calibration else math.nan, 3, False),
)

#: Rows of the comparison table followed by a row of 95% intervals: label -> the interval.
_INTERVAL_ROWS: dict[str, Callable[[BootstrapIntervals], tuple[float, float] | None]] = {
    "mean IoU": lambda ci: ci.mean_iou,
    "pixel accuracy %": lambda ci: None if ci.pixel_accuracy is None else _scaled(ci.pixel_accuracy, 100),
    "fractions R^2 overall": lambda ci: ci.fraction_r2,
    "fractions RMSE % points": lambda ci: None if ci.fraction_rmse is None else _scaled(ci.fraction_rmse, 100),
    "calibration ECE": lambda ci: ci.ece,
}


def _scaled(pair: tuple[float, float], scale: float) -> tuple[float, float]:
    return scale * pair[0], scale * pair[1]


def format_comparison_table(reports: Mapping[str, EvaluationReport]) -> str:
    """Models side by side (columns); the best value of each row is starred."""
    models = list(reports)
    if not models:
        return ""
    names = next(iter(reports.values())).class_table.names
    width = max(36, *(len(n) + 3 for n in names))
    col = max(9, *(min(len(m), 18) + 1 for m in models))
    spans = {
        label: [None if r.intervals is None else get(r.intervals) for r in reports.values()]
        for label, get in _INTERVAL_ROWS.items()
    }
    digits_of = {label: digits for label, _, digits, _ in _SUMMARY_ROWS}
    shown = {label: pairs for label, pairs in spans.items() if any(p is not None for p in pairs)}
    for label, pairs in shown.items():
        col = max(col, *(len(_interval(p, digits_of[label])) + 2 for p in pairs))

    def row(label: str, values: Sequence[float], digits: int, higher_better: bool) -> str:
        defined = [v for v in values if math.isfinite(v)]
        best = (max(defined) if higher_better else min(defined)) if len(defined) > 1 else None
        cells = []
        for v in values:
            text = _num(v, col - 1, digits).strip() + ("*" if best is not None and v == best else " ")
            cells.append(f"{text:>{col}}")
        return f"{label:<{width}}" + "".join(cells)

    header = f"{'':<{width}}" + "".join(f"{m[:18]:>{col - 1}} " for m in models)
    lines = [header]
    per_class: tuple[tuple[str, Callable[[EvaluationReport, int], float]], ...] = (
        ("IoU", lambda r, i: r.metrics.iou[i]),
        ("F1", lambda r, i: r.metrics.f1[i]),
    )
    for metric, class_score in per_class:
        lines.append(f"{metric} per class")
        for i, name in enumerate(names):
            lines.append(row(f"  {name}", [class_score(reports[m], i) for m in models], 3, True))
    lines.append("fraction R^2 per class")
    for i, name in enumerate(names):
        lines.append(row(f"  {name}", [reports[m].fraction_stats.r2[i] for m in models], 3, True))
    lines.append("dataset")
    for label, getter, digits, higher in _SUMMARY_ROWS:
        lines.append(row(f"  {label}", [getter(reports[m]) for m in models], digits, higher))
        if label in shown:
            cells = "".join(f"{_interval(p, digits) + ' ':>{col}}" for p in shown[label])
            lines.append(f"{'    95% interval':<{width}}" + cells)
    legend = "* best of the models; '-' = undefined"
    if shown:
        legend += "; 95% interval: percentile bootstrap over sections"
    lines.append(legend)
    return "\n".join(lines)


def comparison_dict(reports: Mapping[str, EvaluationReport]) -> dict[str, Any]:
    """JSON-ready comparison: each model's full report, keyed by model name, in order."""
    return {
        "models": [
            dict(name=name, **{k: v for k, v in r.to_dict().items() if k != "model"}) for name, r in reports.items()
        ]
    }
