"""PNG figures for `thinseg evaluate`: confusion matrix, per-class bars, fractions, overlays.

Figures are built on `matplotlib.figure.Figure` (Agg, no pyplot): no display needed, no global
backend switch and no figure left open, so this is safe inside Slicer and in worker threads.
Each function writes one PNG to `path` (format forced, so a temporary name without the .png
suffix works with an atomic rename by the caller). Large label maps are shown downsampled by
nearest neighbour (`max_side`), so memory follows the preview, not the section.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt
from matplotlib.figure import Figure
from matplotlib.patches import Patch, Rectangle

from thinseg.classes.table import ClassTable, hex_to_rgb
from thinseg.metrics.calibration import CalibrationStats
from thinseg.metrics.evaluator import EvaluationReport
from thinseg.metrics.fractions import FractionStats, fraction_agreement
from thinseg.metrics.scores import SegmentationMetrics, metrics_from_confusion
from thinseg.reports.preview import shrink

if TYPE_CHECKING:
    from typing_extensions import TypeAlias  # typing has it from Python 3.10 only

PathLike: TypeAlias = "str | os.PathLike[str]"

#: Label 0 in truth/prediction panels (no truth / not classified): a neutral grey with a name.
UNCLASSIFIED_COLOR = "#8c8c8c"
#: Error-map categories: code -> (legend label, colour). Code 1 (correct) shows the faded PP.
ERROR_CATEGORIES = {
    0: ("no truth (not scored)", "#3a3a3a"),
    1: ("correct", "#e6e6e6"),
    2: ("wrong class", "#e41a1c"),
    3: ("left unclassified", "#ff7f00"),
    4: ("void border (not scored)", "#4c9be8"),
}
DPI = 110


def _figure(width_in: float, height_in: float) -> Figure:
    return Figure(figsize=(width_in, height_in), dpi=DPI)


def _save(fig: Figure, path: PathLike) -> None:
    fig.savefig(path, format="png", dpi=DPI, facecolor="white")


def colorize(labels: np.ndarray, table: ClassTable, unclassified: str = UNCLASSIFIED_COLOR) -> np.ndarray:
    """(H, W, 3) uint8 class colours; 0 in the neutral grey (Pores are black in QEMSCAN)."""
    lut = np.array([hex_to_rgb(unclassified)] + [c.rgb for c in table.classes], np.uint8)
    colours: npt.NDArray[np.uint8] = lut[np.minimum(labels, len(lut) - 1)]
    return colours


def error_codes(truth: np.ndarray, pred: np.ndarray, keep: np.ndarray | None = None) -> np.ndarray:
    """Per-pixel category codes of `ERROR_CATEGORIES` (uint8)."""
    codes = np.where(pred == truth, 1, np.where(pred == 0, 3, 2)).astype(np.uint8)
    if keep is not None:
        codes[~np.asarray(keep, bool)] = 4
    codes[truth == 0] = 0
    return codes


def error_image(codes: np.ndarray, pp: np.ndarray | None = None) -> np.ndarray:
    """Colour the error codes; correct pixels show a faded grey PP so the texture stays readable."""
    lut = np.array([hex_to_rgb(c) for _, c in (ERROR_CATEGORIES[k] for k in range(5))], np.uint8)
    out: npt.NDArray[np.uint8] = lut[codes]
    if pp is not None:
        grey = pp[..., :3].astype(np.float32).mean(axis=-1)
        faded = (150 + grey * (100 / 255)).astype(np.uint8)  # light: errors stand out against it
        correct = codes == 1
        out[correct] = faded[correct][:, None]
    return out


def _class_handles(table: ClassTable, zero_label: str = "0: no truth / not classified") -> list[Patch]:
    handles = [Patch(facecolor=c.color, edgecolor="0.25", label=c.name) for c in table.classes]
    handles.append(Patch(facecolor=UNCLASSIFIED_COLOR, edgecolor="0.25", label=zero_label))
    return handles


# --- confusion matrix ------------------------------------------------------------------------


def plot_confusion(cm: np.ndarray, table: ClassTable, path: PathLike, title: str = "") -> None:
    """Row-normalised confusion matrix in %: each row shows where that truth class went.

    The 'not classified' column appears only when the model left labelled pixels at 0.
    Rows without truth pixels are hatched grey instead of showing 0 %.
    """
    cm = np.asarray(cm, np.int64)
    n = len(table)
    rows = cm[1:, :]
    show_zero = bool(rows[:, 0].any())
    block = rows if show_zero else rows[:, 1:]
    col_names = (["not classified"] if show_zero else []) + table.names
    support = rows.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.where(support[:, None] > 0, block / np.maximum(support[:, None], 1), np.nan)
    total = max(int(support.sum()), 1)

    ncol = len(col_names)
    fig = _figure(1.0 + 0.85 * ncol + 2.6, 1.3 + 0.6 * n + 1.8)
    ax = fig.add_axes((0.30, 0.26, 0.58, 0.62))
    image = ax.imshow(np.nan_to_num(norm, nan=0.0) * 100, cmap="Blues", vmin=0, vmax=100, aspect="auto")
    for i in range(n):
        if support[i] == 0:
            ax.add_patch(_hatched_cell(i, ncol))
            ax.text(ncol / 2 - 0.5, i, "no truth pixels", ha="center", va="center", fontsize=9, color="0.3")
            continue
        for j in range(ncol):
            value = norm[i, j] * 100
            if block[i, j] == 0:
                continue
            text = f"{value:.1f}" if value >= 0.1 else "<0.1"
            ax.text(j, i, text, ha="center", va="center", fontsize=9, color="white" if value > 55 else "black")
    ax.set_xticks(range(ncol))
    ax.set_xticklabels(col_names, rotation=35, ha="right", fontsize=10)
    ax.set_yticks(range(n))
    ax.set_yticklabels([f"{name}  ({100 * s / total:.1f}%)" for name, s in zip(table.names, support)], fontsize=10)
    ax.set_xlabel("prediction", fontsize=11)
    ax.set_ylabel("truth  (share of scored pixels)", fontsize=11)
    if show_zero:
        ax.axvline(0.5, color="0.4", linewidth=1)
    cax = fig.add_axes((0.90, 0.26, 0.025, 0.62))
    fig.colorbar(image, cax=cax).set_label("% of the truth row", fontsize=9)
    metrics = metrics_from_confusion(cm, table)
    heading = title or "Confusion matrix"
    fig.suptitle(
        f"{heading}\nrow-normalised %   mean IoU {metrics.mean_iou:.3f}   "
        f"accuracy {100 * metrics.pixel_accuracy:.2f}%   {int(cm[1:].sum()):,} px",
        fontsize=11,
    )
    _save(fig, path)


def _hatched_cell(row: int, ncol: int) -> Rectangle:
    return Rectangle((-0.5, row - 0.5), ncol, 1, facecolor="0.92", hatch="//", edgecolor="0.7", linewidth=0)


# --- per-class bars --------------------------------------------------------------------------

MetricSource: TypeAlias = "EvaluationReport | SegmentationMetrics"


def _metrics_of(source: MetricSource, void_excluded: bool) -> SegmentationMetrics:
    if isinstance(source, EvaluationReport):
        if void_excluded and source.metrics_void_excluded is not None:
            return source.metrics_void_excluded
        return source.metrics
    return source


def plot_per_class_bars(
    reports_by_model: Mapping[str, MetricSource],
    path: PathLike,
    table: ClassTable | None = None,
    void_excluded: bool = False,
    title: str = "",
) -> None:
    """IoU, F1, precision and recall per class; one bar per model (class colours if one model).

    `table` may be left out when the values are EvaluationReports (theirs is used).
    """
    models = list(reports_by_model)
    if table is None:
        first = reports_by_model[models[0]]
        if not isinstance(first, EvaluationReport):
            raise ValueError("pass the class table when plotting SegmentationMetrics")
        table = first.class_table
    metrics = [_metrics_of(reports_by_model[m], void_excluded) for m in models]
    n = len(table)
    panels = (
        ("IoU", "iou", "mean_iou"),
        ("F1", "f1", "mean_f1"),
        ("precision", "precision", None),
        ("recall", "recall", None),
    )
    fig = _figure(max(7.0, 1.1 * n * max(1, len(models)) ** 0.5 + 3), 11)
    x = np.arange(n)
    width = 0.8 / len(models)
    palette = _model_colors(len(models))
    for p, (label, attr, mean_attr) in enumerate(panels):
        ax = fig.add_axes((0.08, 0.77 - p * 0.22, 0.74, 0.17))
        for k, (model, m) in enumerate(zip(models, metrics)):
            values = getattr(m, attr)
            offsets = x - 0.4 + width * (k + 0.5)
            if len(models) == 1:
                colors = table.colors
                edge = "0.2"
            else:
                colors = [palette[k]] * n
                edge = "none"
            ax.bar(
                offsets,
                np.nan_to_num(values, nan=0.0),
                width * 0.92,
                color=colors,
                edgecolor=edge,
                linewidth=0.6,
                label=model,
            )
            for xo, v in zip(offsets, values):
                if np.isnan(v):
                    ax.text(xo, 0.02, "n/a", ha="center", va="bottom", fontsize=7, rotation=90, color="0.4")
                elif len(models) == 1:
                    ax.text(xo, v + 0.02, f"{v:.2f}", ha="center", va="bottom", fontsize=8)
            if mean_attr is not None:
                mean = getattr(m, mean_attr)
                if np.isfinite(mean):
                    ax.axhline(mean, color=palette[k] if len(models) > 1 else "0.3", linestyle="--", linewidth=1)
        ax.set_ylim(0, 1.12)
        ax.set_ylabel(label, fontsize=10)
        ax.set_xticks(x)
        ax.set_xticklabels(table.names if p == len(panels) - 1 else [], rotation=30, ha="right", fontsize=10)
        ax.grid(axis="y", color="0.9")
        ax.set_axisbelow(True)
    if len(models) > 1:
        fig.legend(
            handles=[Patch(facecolor=palette[k], label=m) for k, m in enumerate(models)],
            loc="upper right",
            bbox_to_anchor=(0.995, 0.95),
            frameon=False,
            fontsize=10,
            title="model",
        )
    subtitle = "void borders excluded" if void_excluded else "all labelled pixels"
    fig.suptitle(f"{title or 'Per-class scores'} ({subtitle}; dashed: mean over present classes)", fontsize=11)
    _save(fig, path)


def _model_colors(count: int) -> list[str]:
    """One colour per model: matplotlib's tab10 colours, red last (cycled beyond ten models)."""
    base = [
        "#1f77b4",
        "#ff7f0e",
        "#2ca02c",
        "#9467bd",
        "#8c564b",
        "#e377c2",
        "#17becf",
        "#bcbd22",
        "#7f7f7f",
        "#d62728",
    ]
    return [base[i % len(base)] for i in range(count)]


# --- fractions scatter -----------------------------------------------------------------------


def plot_fractions_scatter(
    true_fracs: np.ndarray,
    pred_fracs: np.ndarray,
    table: ClassTable,
    path: PathLike,
    stats: FractionStats | None = None,
    title: str = "",
) -> None:
    """Predicted vs truth fraction (%) of every class in every section, against the 1:1 line."""
    true_fracs = np.asarray(true_fracs, np.float64).reshape(-1, len(table))
    pred_fracs = np.asarray(pred_fracs, np.float64).reshape(-1, len(table))
    stats = stats or fraction_agreement(true_fracs, pred_fracs, table.names)
    fig = _figure(8.2, 6.2)
    ax = fig.add_axes((0.1, 0.1, 0.56, 0.76))
    finite = np.concatenate([true_fracs[np.isfinite(true_fracs)], pred_fracs[np.isfinite(pred_fracs)]])
    top = min(100.0, max(5.0, 105 * float(finite.max()) if finite.size else 100.0))
    ax.plot([0, top], [0, top], color="0.5", linestyle="--", linewidth=1, label="1:1")
    for k, cls in enumerate(table.classes):
        r2 = stats.r2[k]
        label = f"{cls.name}  R² {r2:.3f}" if np.isfinite(r2) else f"{cls.name}  R² n/a"
        ax.scatter(
            100 * true_fracs[:, k],
            100 * pred_fracs[:, k],
            s=42,
            color=cls.color,
            edgecolors="0.15",
            linewidths=0.8,
            label=label,
            zorder=3,
        )
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_aspect("equal")
    ax.set_xlabel("truth fraction (% of classified area)", fontsize=10)
    ax.set_ylabel("predicted fraction (%)", fontsize=10)
    ax.grid(color="0.92")
    ax.legend(loc="upper left", bbox_to_anchor=(1.03, 1.0), frameon=False, fontsize=9)
    overall = f"R² {stats.r2_overall:.3f}" if np.isfinite(stats.r2_overall) else "R² n/a"
    fig.suptitle(
        f"{title or 'Mineral fractions per section'}\n{overall}   "
        f"RMSE {100 * stats.rmse_overall:.2f} % points   {stats.n_sections} section(s)",
        fontsize=11,
    )
    _save(fig, path)


# --- per-section overlay ---------------------------------------------------------------------


def plot_section_overlay(
    pp: np.ndarray | None,
    truth: np.ndarray,
    pred: np.ndarray,
    table: ClassTable,
    path: PathLike,
    keep: np.ndarray | None = None,
    title: str = "",
    max_side: int = 1000,
) -> None:
    """PP | truth | prediction | errors, side by side, with class and error legends.

    `keep` (the void-border mask) marks the pixels left out of scoring in the error panel.
    Percentages in the error legend are of labelled pixels, at full resolution.
    """
    if truth.shape != pred.shape:
        raise ValueError(f"truth {truth.shape} and prediction {pred.shape} differ in size")
    full_codes_counts = _code_counts(truth, pred, keep)
    small_truth, small_pred = shrink(truth, max_side), shrink(pred, max_side)
    small_keep = shrink(np.asarray(keep, bool), max_side) if keep is not None else None
    small_pp = shrink(pp, max_side) if pp is not None else None
    codes = error_codes(small_truth, small_pred, small_keep)
    panels = []
    if small_pp is not None:
        panels.append(("PP", small_pp[..., :3]))
    panels += [
        ("truth", colorize(small_truth, table)),
        ("prediction", colorize(small_pred, table)),
        ("errors", error_image(codes, small_pp)),
    ]

    h, w = small_truth.shape
    panel_w = 4.0
    panel_h = float(np.clip(panel_w * h / w, 1.2, 9.0))
    legend_h = 0.2 * (max(math.ceil((len(table) + 1) / 3), 3) + 1) + 0.3
    title_h = 0.55
    fig_w, fig_h = panel_w * len(panels) + 0.2 * (len(panels) + 1), panel_h + legend_h + title_h
    fig = _figure(fig_w, fig_h)
    for i, (name, image) in enumerate(panels):
        left = (0.2 + i * (panel_w + 0.2)) / fig_w
        ax = fig.add_axes((left, legend_h / fig_h, panel_w / fig_w, panel_h / fig_h))
        ax.imshow(image, interpolation="nearest")
        ax.set_title(name, fontsize=11)
        ax.set_xticks([])
        ax.set_yticks([])
        for spine in ax.spines.values():
            spine.set_color("0.5")

    fig.legend(
        handles=_class_handles(table),
        loc="lower left",
        bbox_to_anchor=(0.01, 0.0),
        ncol=3,
        frameon=False,
        fontsize=9,
        title="classes",
        title_fontsize=9,
    )
    labelled = max(int(np.count_nonzero(truth)), 1)
    error_handles = []
    for code in (1, 2, 3, 4, 0):
        label, colour = ERROR_CATEGORIES[code]
        if code == 4 and keep is None:
            continue
        count = full_codes_counts[code]
        share = f"{100 * count / labelled:.1f}% of labelled" if code else f"{count:,} px"
        error_handles.append(Patch(facecolor=colour, edgecolor="0.25", label=f"{label}: {share}"))
    fig.legend(
        handles=error_handles,
        loc="lower right",
        bbox_to_anchor=(0.99, 0.0),
        ncol=2,
        frameon=False,
        fontsize=9,
        title="errors panel",
        title_fontsize=9,
    )
    scored = full_codes_counts[1] + full_codes_counts[2] + full_codes_counts[3]
    scope = "scored pixels (void borders excluded)" if keep is not None else "labelled pixels"
    accuracy = f"accuracy {100 * full_codes_counts[1] / scored:.2f}% of {scope}" if scored else "no scored pixels"
    fig.suptitle(f"{title or 'Section'}   {accuracy}", fontsize=12, y=1 - 0.12 / fig_h, va="top")
    _save(fig, path)


def _code_counts(truth: np.ndarray, pred: np.ndarray, keep: np.ndarray | None, band_rows: int = 1024) -> np.ndarray:
    """Pixels per error category over the full-resolution maps (row bands: bounded memory)."""
    counts = np.zeros(5, np.int64)
    for y0 in range(0, truth.shape[0], band_rows):
        band = slice(y0, y0 + band_rows)
        codes = error_codes(truth[band], pred[band], None if keep is None else keep[band])
        counts += np.bincount(codes.reshape(-1), minlength=5)[:5]
    return counts


# --- reliability diagram ---------------------------------------------------------------------


def plot_reliability(stats: CalibrationStats, path: PathLike, title: str = "") -> None:
    """Accuracy against mean confidence per confidence bin (bars on the bins, the diagonal = a
    perfectly calibrated model), and below it how many pixels fall in each bin."""
    edges = np.linspace(0.0, 1.0, stats.bins + 1)
    centres, width = (edges[:-1] + edges[1:]) / 2, 1.0 / stats.bins
    rows = stats.reliability()
    accuracy = np.array([r[1] for r in rows], np.float64)
    confidence = np.array([r[0] for r in rows], np.float64)
    pixels = np.array([r[2] for r in rows], np.float64)
    filled = pixels > 0
    fig = _figure(6.4, 7.0)
    ax = fig.add_axes((0.13, 0.36, 0.82, 0.54))
    ax.plot([0, 1], [0, 1], color="0.3", linestyle="--", linewidth=1, label="perfectly calibrated", zorder=3)
    ax.bar(
        centres[filled],
        accuracy[filled],
        width=width,
        color="#4c9be8",
        edgecolor="0.15",
        linewidth=0.6,
        label="accuracy of the bin",
    )
    gap_low = np.minimum(accuracy, confidence)[filled]
    ax.bar(
        centres[filled],
        np.abs(confidence - accuracy)[filled],
        bottom=gap_low,
        width=width,
        color="#e41a1c",
        alpha=0.35,
        edgecolor="#e41a1c",
        linewidth=0.6,
        label="gap to mean confidence",
    )
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy", fontsize=10)
    ax.tick_params(labelbottom=False)
    ax.set_axisbelow(True)
    ax.grid(color="0.92")
    ax.legend(loc="upper left", frameon=False, fontsize=9)
    counts = fig.add_axes((0.13, 0.08, 0.82, 0.24))
    share = 100 * pixels / max(pixels.sum(), 1.0)
    counts.bar(centres, share, width=width, color="0.55", edgecolor="0.15", linewidth=0.6)
    counts.set_xlim(0, 1)
    counts.set_xlabel("confidence (probability of the winning class)", fontsize=10)
    counts.set_ylabel("% of pixels", fontsize=10)
    counts.set_axisbelow(True)
    counts.grid(color="0.92")
    ece = f"ECE {stats.ece:.3f}" if math.isfinite(stats.ece) else "ECE n/a"
    scope = f"{stats.bins} equal-width bins   {int(stats.pixels.sum()):,} labelled pixels"
    fig.suptitle(f"{title or 'Reliability'}\n{ece}   {scope}", fontsize=11)
    _save(fig, path)
