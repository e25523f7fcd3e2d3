"""Truth | prediction | errors: one picture per scored section, for looking rather than reading.

Three panels side by side at the same scale: the truth and the prediction in the class colours
over a faded grey PP (the rock's texture stays visible under the colours), and an error panel
where correct pixels show the faded PP, wrong ones one strong colour (`ERROR_COLOR`) and pixels
without truth neutral grey stripes. The title gives the section's pixel accuracy and mean IoU
over all its labelled pixels at full resolution (the numbers `thinseg evaluate` prints per
section), the legend the class colours with truth and predicted area shares.

Panels are drawn pixel for pixel (`Figure.figimage`, no resampling): a section larger than
`MAX_PANEL_SIDE` is shown by nearest neighbour, the PP read band by band from its file, so a
gigapixel section costs the picture's memory, not the section's. `draw_error_overlay` writes a
PNG to the path it is given (the caller's temporary); `write_error_overlay` is the same for
scripts, all or nothing and refusing to replace a file unless asked.

    from thinseg.reports.errors import write_error_overlay
    write_error_overlay("figure.png", truth, prediction, class_table, pp=pp_rgb, title="S12")
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Union

import numpy as np
import numpy.typing as npt
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.legend import Legend
from matplotlib.patches import Patch
from matplotlib.transforms import IdentityTransform

from thinseg.classes.table import ClassTable, hex_to_rgb
from thinseg.errors import ThinSegError
from thinseg.io.atomic import atomic_output
from thinseg.metrics.confusion import ConfusionAccumulator
from thinseg.metrics.scores import SegmentationMetrics, metrics_from_confusion
from thinseg.reports.preview import RegionReader, preview_shape, read_preview, shrink

#: Longest side of each panel in the picture; larger sections are shown downsampled.
MAX_PANEL_SIDE = 1600
#: Wrong pixels in the error panel: magenta, a colour no usual mineral table uses.
ERROR_COLOR = "#ff00ff"
#: Pixels without truth (and labels the model left unclassified): diagonal stripes of two greys,
#: which no class colour over the PP can be mistaken for (black Pores, white Others included).
NEUTRAL_COLORS = ("#5a5a5a", "#9a9a9a")
STRIPE = 6  # stripe width in picture pixels
NEUTRAL = "neutral"  # legend entries drawn with the stripes
#: Share of the class colour over the grey PP in the truth and prediction panels.
CLASS_ALPHA = 0.65
DPI = 100
PAD = 12  # pixels around and between panels
MIN_SLOT = 280  # narrowest panel slot, so that a tiny section still leaves room for its texts

#: A PP image: an (H, W, 3) array (whole section, or already at panel size) or a region reader.
PPImage = Union[np.ndarray, RegionReader, None]


@dataclass
class ErrorOverlay:
    """What was drawn: the PNG, where each panel sits in it ((x0, y0, x1, y1), pixels from the
    top-left corner, x1/y1 exclusive), section pixels per picture pixel along each axis, and the
    section's scores over all labelled pixels (and without void borders when a mask was given)."""

    path: str
    panels: dict[str, tuple[int, int, int, int]]
    scale: tuple[float, float]
    evaluated_pixels: int
    pixel_accuracy: float
    mean_iou: float
    pixel_accuracy_kept: float | None = None
    mean_iou_kept: float | None = None


def _rgb(color: str) -> npt.NDArray[np.float32]:
    return np.array(hex_to_rgb(color), np.float32)


def faded_grey(pp: np.ndarray) -> npt.NDArray[np.float32]:
    """(H, W) light grey version of an RGB PP (150..250): texture without competing colours."""
    rgb = pp[..., :3].astype(np.float32)
    luminance = rgb @ np.array([0.299, 0.587, 0.114], np.float32)
    faded: npt.NDArray[np.float32] = 150 + luminance * (100 / 255)
    return faded


def neutral(shape: tuple[int, int]) -> npt.NDArray[np.float32]:
    """(H, W, 3) the striped neutral fill of pixels without truth."""
    rows, cols = np.indices(shape)
    dark = ((rows + cols) // STRIPE) % 2 == 0
    out: npt.NDArray[np.float32] = np.where(dark[..., None], _rgb(NEUTRAL_COLORS[0]), _rgb(NEUTRAL_COLORS[1]))
    return out.astype(np.float32)


def class_panel(labels: np.ndarray, table: ClassTable, pp: np.ndarray | None = None) -> npt.NDArray[np.uint8]:
    """Class colours of a label map (0: the striped neutral), over the grey PP when one is given."""
    lut = np.stack([_rgb(NEUTRAL_COLORS[0])] + [_rgb(c.color) for c in table.classes])
    colours = lut[np.minimum(labels, len(lut) - 1)]
    unlabelled = labels == 0
    colours[unlabelled] = neutral(labels.shape)[unlabelled]
    if pp is not None:
        base = faded_grey(pp)[..., None]
        labelled = labels > 0
        colours[labelled] = CLASS_ALPHA * colours[labelled] + (1 - CLASS_ALPHA) * base[labelled]
    out: npt.NDArray[np.uint8] = np.clip(np.round(colours), 0, 255).astype(np.uint8)
    return out


def error_panel(truth: np.ndarray, pred: np.ndarray, pp: np.ndarray | None = None) -> npt.NDArray[np.uint8]:
    """`ERROR_COLOR` where labelled truth and prediction differ, the faded PP (light grey without
    one) where they agree, the striped neutral where there is no truth."""
    h, w = truth.shape
    if pp is not None:
        out = np.repeat(np.round(faded_grey(pp))[..., None], 3, axis=-1)
    else:
        out = np.full((h, w, 3), 230, np.float32)
    out[(truth != pred) & (truth > 0)] = _rgb(ERROR_COLOR)
    unlabelled = truth == 0
    out[unlabelled] = neutral((h, w))[unlabelled]
    panel: npt.NDArray[np.uint8] = out.astype(np.uint8)
    return panel


def _small_pp(pp: PPImage, full: tuple[int, int], small: tuple[int, int], max_side: int) -> np.ndarray | None:
    """The PP at panel size: read band by band from a reader, shrunk from a whole array, or as
    given when it is already at panel size."""
    if pp is None:
        return None
    if isinstance(pp, np.ndarray):
        if pp.ndim != 3 or pp.shape[2] < 3:
            raise ValueError(f"the PP image must be (H, W, 3) RGB, got shape {pp.shape}")
        if pp.shape[:2] == full:
            return shrink(pp, max_side)[..., :3]
        if pp.shape[:2] == small:
            return pp[..., :3]
        raise ValueError(f"the PP image is {pp.shape[:2]}, the label maps {full} (panels {small})")
    if tuple(pp.shape) != full:
        raise ValueError(f"the PP image is {tuple(pp.shape)}, the label maps {full}")
    return read_preview(pp, max_side)


def _scores(
    truth: np.ndarray, pred: np.ndarray, table: ClassTable, keep: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray | None]:
    """Full-resolution confusion matrices of the section (all labelled pixels; kept pixels)."""
    counts = ConfusionAccumulator(len(table))
    counts.update(truth, pred)
    kept = None
    if keep is not None:
        kept_counts = ConfusionAccumulator(len(table))
        kept_counts.update(truth, pred, keep)
        kept = kept_counts.matrix
    return counts.matrix, kept


def draw_error_overlay(
    path: str | os.PathLike[str],
    truth: np.ndarray,
    pred: np.ndarray,
    table: ClassTable,
    pp: PPImage = None,
    *,
    keep: np.ndarray | None = None,
    title: str = "",
    max_panel_side: int = MAX_PANEL_SIDE,
) -> ErrorOverlay:
    """Write truth | prediction | errors for one section as a PNG to `path` (format forced, so a
    temporary name works). `truth` and `pred` are label maps of `table` on the section grid (0:
    no truth / not classified); `pp` is the section's PP (see `PPImage`), None for plain colours;
    `keep` the void-border mask (True: scored), which adds its scores to the title."""
    truth, pred = np.asarray(truth), np.asarray(pred)
    if truth.ndim != 2 or truth.shape != pred.shape:
        raise ValueError(f"truth {truth.shape} and prediction {pred.shape} must be label maps of one size")
    full = (int(truth.shape[0]), int(truth.shape[1]))
    small = preview_shape(full, max_panel_side)
    cm, kept_cm = _scores(truth, pred, table, keep)
    metrics = metrics_from_confusion(cm, table)
    kept_metrics = metrics_from_confusion(kept_cm, table) if kept_cm is not None else None

    small_pp = _small_pp(pp, full, small, max_panel_side)
    small_truth, small_pred = shrink(truth, max_panel_side), shrink(pred, max_panel_side)
    images = {
        "truth": class_panel(small_truth, table, small_pp),
        "prediction": class_panel(small_pred, table, small_pp),
        "errors": error_panel(small_truth, small_pred, small_pp),
    }
    ph, pw = small
    slot = max(pw, MIN_SLOT)
    width = 3 * slot + 4 * PAD
    fig = Figure(figsize=(width / DPI, 4), dpi=DPI)
    FigureCanvasAgg(fig)  # becomes fig.canvas
    fig.canvas.draw()  # an (empty) drawing leaves the renderer that legends are measured with
    screen = IdentityTransform()
    font = max(1.0, width / 1800)  # texts grow with the picture, so they read when it is shown whole

    class_legend = _fit_legend(fig, _class_entries(table, cm), width - 2 * PAD, font)
    error_legend = _fit_legend(fig, _error_entries(cm), width - 2 * PAD, font)
    title_h, heading_h, gap, caption = round(58 * font), round(26 * font), round(6 * font), round(18 * font)
    legend_h = [int(np.ceil(legend.get_window_extent().height)) for legend in (class_legend, error_legend)]
    panel_top = PAD + title_h + heading_h
    class_top = panel_top + ph + PAD  # each legend under its caption
    error_top = class_top + caption + legend_h[0] + gap
    height = error_top + caption + legend_h[1] + PAD
    fig.set_size_inches(width / DPI, height / DPI)

    boxes: dict[str, tuple[int, int, int, int]] = {}
    for i, (name, image) in enumerate(images.items()):
        x0 = PAD + i * (slot + PAD) + (slot - pw) // 2
        boxes[name] = (x0, panel_top, x0 + pw, panel_top + ph)
        fig.figimage(image, xo=x0, yo=height - panel_top - ph, origin="upper")
        fig.text(
            x0 + pw / 2, height - panel_top + gap, name, ha="center", va="bottom", fontsize=12 * font, transform=screen
        )
    for legend, top, text in ((class_legend, class_top, "classes"), (error_legend, error_top, "errors panel")):
        fig.text(PAD, height - top, text, ha="left", va="top", fontsize=10 * font, transform=screen)
        legend.set_bbox_to_anchor((PAD, height - top - caption), transform=screen)
        fig.legends.append(legend)

    heading = title or "Section"
    scale_y, scale_x = full[0] / ph, full[1] / pw
    shown = "" if (ph, pw) == full else f"   (shown 1:{max(scale_x, scale_y):.3g})"
    line_2 = height - PAD - round(26 * font)
    fig.text(
        PAD, height - PAD, heading + shown, ha="left", va="top", fontsize=13 * font, weight="bold", transform=screen
    )
    fig.text(PAD, line_2, _score_line(metrics, kept_metrics), ha="left", va="top", fontsize=11 * font, transform=screen)
    fig.savefig(path, format="png", dpi=DPI, facecolor="white")
    return ErrorOverlay(
        path=os.fspath(path),
        panels=boxes,
        scale=(scale_y, scale_x),
        evaluated_pixels=metrics.evaluated_pixels,
        pixel_accuracy=metrics.pixel_accuracy,
        mean_iou=metrics.mean_iou,
        pixel_accuracy_kept=kept_metrics.pixel_accuracy if kept_metrics is not None else None,
        mean_iou_kept=kept_metrics.mean_iou if kept_metrics is not None else None,
    )


def write_error_overlay(
    path: str | os.PathLike[str],
    truth: np.ndarray,
    pred: np.ndarray,
    table: ClassTable,
    pp: PPImage = None,
    *,
    keep: np.ndarray | None = None,
    title: str = "",
    max_panel_side: int = MAX_PANEL_SIDE,
    overwrite: bool = False,
) -> ErrorOverlay:
    """`draw_error_overlay` for scripts: written all or nothing, and an existing file is refused
    (ThinSegError) unless `overwrite`."""
    target = os.fspath(path)
    if not overwrite and os.path.lexists(target):
        raise ThinSegError("output exists already; it is replaced only when overwriting is asked for", target)
    with atomic_output(target) as tmp:
        drawn = draw_error_overlay(tmp, truth, pred, table, pp, keep=keep, title=title, max_panel_side=max_panel_side)
    drawn.path = target
    return drawn


def _score_line(metrics: SegmentationMetrics, kept: SegmentationMetrics | None) -> str:
    if not metrics.evaluated_pixels:
        return "no labelled pixels"
    line = (
        f"pixel accuracy {100 * metrics.pixel_accuracy:.2f}%   mean IoU {metrics.mean_iou:.3f}   "
        f"({metrics.evaluated_pixels:,} labelled px)"
    )
    if kept is not None and kept.evaluated_pixels:
        line += f"   without void borders: {100 * kept.pixel_accuracy:.2f}%, mean IoU {kept.mean_iou:.3f}"
    return line


def _class_entries(table: ClassTable, cm: np.ndarray) -> list[tuple[str, str]]:
    """(label, colour) per class with its truth and predicted share of the labelled pixels."""
    total = max(int(cm[1:].sum()), 1)
    truth_share, pred_share = cm[1:].sum(axis=1) / total, cm[1:].sum(axis=0) / total
    entries = [
        (f"{c.name}: truth {100 * truth_share[k]:.1f}%, predicted {100 * pred_share[k + 1]:.1f}%", c.color)
        for k, c in enumerate(table.classes)
    ]
    if pred_share[0] > 0:
        shown = f"{100 * pred_share[0]:.1f}%" if pred_share[0] >= 0.0005 else "<0.1%"
        entries.append((f"not classified by the model: {shown}", NEUTRAL))
    return entries


def _error_entries(cm: np.ndarray) -> list[tuple[str, str]]:
    labelled = int(cm[1:].sum())
    wrong = labelled - int(np.trace(cm[1:, 1:]))
    share = f"{100 * wrong / labelled:.1f}% of labelled pixels" if labelled else "no labelled pixels"
    return [
        ("correct (faded PP)", "#d0d0d0"),
        (f"wrong: {share}", ERROR_COLOR),
        ("no truth (not scored)", NEUTRAL),
    ]


def _fit_legend(fig: Figure, entries: list[tuple[str, str]], width: float, font: float) -> Legend:
    """A legend of colour patches in as many columns as fit in `width` pixels (one at least);
    `NEUTRAL` entries are striped as the panels are."""
    handles = [
        Patch(facecolor=NEUTRAL_COLORS[1], edgecolor=NEUTRAL_COLORS[0], hatch="////")
        if colour == NEUTRAL
        else Patch(facecolor=colour, edgecolor="0.3")
        for _, colour in entries
    ]
    labels = [label for label, _ in entries]
    for ncol in range(len(entries), 0, -1):
        legend = Legend(
            fig,
            handles,
            labels,
            loc="upper left",
            ncol=ncol,
            frameon=False,
            fontsize=10 * font,
            borderaxespad=0,
            borderpad=0,
        )
        if ncol == 1 or legend.get_window_extent().width <= width:
            break
    return legend
