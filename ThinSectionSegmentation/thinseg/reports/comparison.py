"""`thinseg compare` visuals: the same regions under each model, with their differences marked.

A sheet has one row per region and the columns PP | truth | model A | model B | ... |
differences. On every model panel a magenta outline surrounds the pixels where the models do
not all agree, so the eye can compare inside the same outline across columns; the differences
panel says who is right there (a model's colour where it alone is right). Regions are taken at
full resolution, by default where the models disagree most, since agreeing areas teach nothing.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from matplotlib.artist import Artist
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch
from scipy import ndimage

from thinseg.classes.table import ClassTable, hex_to_rgb
from thinseg.metrics.evaluator import _SUMMARY_ROWS, EvaluationReport
from thinseg.reports.plots import PathLike, _class_handles, _figure, _model_colors, _save, colorize
from thinseg.reports.preview import RegionSliceable

DISAGREEMENT_OUTLINE = "#ff00ff"
#: Differences-panel categories other than "only model k is right" (which uses the model's colour).
DIFF_CATEGORIES = {
    0: ("no truth, models agree", "#3a3a3a"),
    1: ("all agree, right", "#e6e6e6"),
    2: ("all agree, wrong", "#a50f15"),
    3: ("differ, several right", "#fff2a8"),
    4: ("differ, none right", "#000000"),
    5: ("differ, no truth", "#b07cc6"),
}
_ONLY_BASE = 10  # code 10 + k: only model k is right


@dataclass(frozen=True)
class Region:
    """A window of a section in full-resolution pixels."""

    y0: int
    x0: int
    height: int
    width: int

    @property
    def slices(self) -> tuple[slice, slice]:
        return slice(self.y0, self.y0 + self.height), slice(self.x0, self.x0 + self.width)

    def __str__(self) -> str:
        return f"y {self.y0}:{self.y0 + self.height}, x {self.x0}:{self.x0 + self.width}"


def _starts(length: int, size: int) -> list[int]:
    """Window starts covering [0, length): a grid, the last window flush with the end."""
    if length <= size:
        return [0]
    starts = list(range(0, length - size + 1, size))
    if starts[-1] + size < length:
        starts.append(length - size)
    return starts


def choose_regions(truth: np.ndarray, preds: Sequence[np.ndarray], count: int = 3, size: int = 256) -> list[Region]:
    """The `count` grid windows with most model disagreement (then most errors, then most truth).

    Scores are counted band by band (one band of `size` rows at a time), so memory stays at a
    few bytes per pixel of one band.
    """
    h, w = truth.shape
    rh, rw = min(size, h), min(size, w)
    row_starts, col_starts = _starts(h, size), _starts(w, size)
    scored: list[tuple[int, int, int, Region]] = []
    for y0 in row_starts:
        band = slice(y0, y0 + rh)
        t = truth[band]
        labelled = t != 0
        differ = np.zeros(t.shape, bool)
        wrong = np.zeros(t.shape, bool)
        for p in preds:
            differ |= p[band] != preds[0][band]
            wrong |= p[band] != t
        sums = []
        for mask in (differ, wrong & labelled, labelled):
            cumulative = np.concatenate([[0], np.cumsum(mask.sum(axis=0, dtype=np.int64))])
            sums.append([int(cumulative[x0 + rw] - cumulative[x0]) for x0 in col_starts])
        for i, x0 in enumerate(col_starts):
            scored.append((sums[0][i], sums[1][i], sums[2][i], Region(y0, x0, rh, rw)))
    scored.sort(key=lambda s: (-s[0], -s[1], -s[2], s[3].y0, s[3].x0))
    chosen: list[Region] = []
    for *_, region in scored:  # the flush last window may overlap its neighbour: skip overlaps
        if len(chosen) == count:
            break
        if not any(_overlap(region, other) for other in chosen):
            chosen.append(region)
    return chosen


def _overlap(a: Region, b: Region) -> bool:
    return a.y0 < b.y0 + b.height and b.y0 < a.y0 + a.height and a.x0 < b.x0 + b.width and b.x0 < a.x0 + a.width


def difference_codes(truth: np.ndarray, preds: Sequence[np.ndarray]) -> np.ndarray:
    """Per-pixel codes of DIFF_CATEGORIES, or 10 + k where only model k is right."""
    stack = np.stack(list(preds))
    differ = (stack != stack[0]).any(axis=0)
    right = stack == truth
    n_right = right.sum(axis=0)
    labelled = truth != 0
    codes = np.where(n_right == len(preds), 1, 2).astype(np.uint8)
    codes[differ & (n_right >= 2)] = 3
    codes[differ & (n_right == 0)] = 4
    only = differ & (n_right == 1)
    codes[only] = _ONLY_BASE + np.argmax(right, axis=0)[only]
    codes[~labelled] = np.where(differ[~labelled], 5, 0)
    return codes


def _difference_image(codes: np.ndarray, model_colors: Sequence[str], pp: np.ndarray | None) -> np.ndarray:
    lut = np.zeros((_ONLY_BASE + len(model_colors), 3), np.uint8)
    for code, (_, colour) in DIFF_CATEGORIES.items():
        lut[code] = hex_to_rgb(colour)
    for k, colour in enumerate(model_colors):
        lut[_ONLY_BASE + k] = hex_to_rgb(colour)
    out: npt.NDArray[np.uint8] = lut[codes]
    if pp is not None:  # agreeing-and-right pixels show faded PP texture
        grey = pp[..., :3].astype(np.float32).mean(axis=-1)
        faded = (150 + grey * (100 / 255)).astype(np.uint8)
        agree = codes == 1
        out[agree] = faded[agree][:, None]
    return out


def compare_sheet(
    pp: RegionSliceable | None,
    truth: np.ndarray,
    preds_by_model: Mapping[str, np.ndarray],
    table: ClassTable,
    path: PathLike,
    regions: Sequence[Region] | None = None,
    count: int = 3,
    size: int = 256,
    title: str = "",
) -> list[Region]:
    """Write one section's comparison PNG; returns the regions shown (chosen if not given)."""
    models = list(preds_by_model)
    preds = [np.asarray(preds_by_model[m]) for m in models]
    for m, p in zip(models, preds):
        if p.shape != truth.shape:
            raise ValueError(f"prediction of {m} {p.shape} and truth {truth.shape} differ in size")
    regions = list(regions) if regions is not None else choose_regions(truth, preds, count, size)
    colors = _model_colors(len(models))
    columns = (["PP"] if pp is not None else []) + ["truth"] + models + ["differences"]
    panel = 2.4
    legend_lines = max(math.ceil((len(table) + 1) / 2), math.ceil((len(DIFF_CATEGORIES) + len(models)) / 2))
    legend_h = 0.2 * (legend_lines + 1) + 0.35
    title_h = 0.6
    fig_w = panel * len(columns) + 0.9
    aspects = [r.height / r.width for r in regions]
    row_h = [panel * float(np.clip(a, 0.3, 2.5)) + 0.35 for a in aspects]
    fig_h = sum(row_h) + legend_h + title_h
    fig = _figure(fig_w, fig_h)
    top = fig_h - title_h
    for r, region in enumerate(regions):
        ys, xs = region.slices
        t = truth[ys, xs]
        ps = [p[ys, xs] for p in preds]
        codes = difference_codes(t, ps)
        differ = codes >= 3  # 3, 4, 5 and 10 + k: the models do not all agree
        # outline a slightly grown mask: single stray pixels would draw a cloud of tiny rings
        outline = ndimage.binary_dilation(differ, iterations=1) if differ.any() else differ
        crop_pp = pp[ys, xs] if pp is not None else None
        images = (
            ([crop_pp[..., :3]] if crop_pp is not None else [])
            + [colorize(t, table)]
            + [colorize(p, table) for p in ps]
        )
        images.append(_difference_image(codes, colors, crop_pp))
        top -= row_h[r]
        labelled = max(int(np.count_nonzero(t)), 1)
        for c, (name, image) in enumerate(zip(columns, images)):
            ax = fig.add_axes(
                ((0.7 + c * panel) / fig_w, (top + 0.3) / fig_h, (panel - 0.12) / fig_w, (row_h[r] - 0.35) / fig_h)
            )
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            model_index = c - (len(columns) - len(models) - 1)
            is_model = 0 <= model_index < len(models)
            if r == 0:
                ax.set_title(name[:24], fontsize=10, color=colors[model_index] if is_model else "black")
            if c == 0:
                ax.set_ylabel(str(region), fontsize=8)
            if is_model:
                right = int(np.count_nonzero((ps[model_index] == t) & (t != 0)))
                ax.set_xlabel(f"right {100 * right / labelled:.1f}%", fontsize=8, labelpad=2)
                if outline.any():
                    ax.contour(outline.astype(np.float32), levels=[0.5], colors=DISAGREEMENT_OUTLINE, linewidths=0.7)
    _legends(fig, table, models, colors)
    fig.suptitle(
        f"{title or 'Model comparison'}\nmagenta outline: models disagree; differences panel: who is right there",
        fontsize=11,
        y=1 - 0.08 / fig_h,
        va="top",
    )
    _save(fig, path)
    return regions


def _legends(fig: Figure, table: ClassTable, models: Sequence[str], colors: Sequence[str]) -> None:
    fig.legend(
        handles=_class_handles(table),
        loc="lower left",
        bbox_to_anchor=(0.01, 0.0),
        ncol=2,
        frameon=False,
        fontsize=8,
        title="classes",
        title_fontsize=9,
    )
    handles: list[Artist] = [
        Patch(facecolor=colour, edgecolor="0.25", label=f"only {m[:20]} right") for m, colour in zip(models, colors)
    ]
    for code in (1, 2, 3, 4, 0, 5):
        if code == 3 and len(models) < 3:
            continue
        label, colour = DIFF_CATEGORIES[code]
        handles.append(Patch(facecolor=colour, edgecolor="0.25", label=label))
    handles.append(Line2D([], [], color=DISAGREEMENT_OUTLINE, linewidth=1.5, label="models disagree (outline)"))
    fig.legend(
        handles=handles,
        loc="lower right",
        bbox_to_anchor=(0.99, 0.0),
        ncol=2,
        frameon=False,
        fontsize=8,
        title="differences",
        title_fontsize=9,
    )


# --- HTML page -------------------------------------------------------------------------------


def comparison_html(
    reports: Mapping[str, EvaluationReport], images: Sequence[tuple[str, PathLike]], title: str = "thinseg compare"
) -> str:
    """A self-contained page: metrics side by side (best in bold) and the PNGs embedded."""
    models = list(reports)
    names = next(iter(reports.values())).class_table.names if models else []
    esc = html.escape

    def cells(values: Sequence[float], digits: int, higher_better: bool = True) -> str:
        finite = [v for v in values if math.isfinite(v)]
        best = (max(finite) if higher_better else min(finite)) if len(finite) > 1 else None
        out = []
        for v in values:
            text = "&ndash;" if not math.isfinite(v) else f"{v:.{digits}f}"
            out.append(f"<td><b>{text}</b></td>" if best is not None and v == best else f"<td>{text}</td>")
        return "".join(out)

    rows = [f"<tr><th></th>{''.join(f'<th>{esc(m)}</th>' for m in models)}</tr>"]
    per_class: tuple[tuple[str, Callable[[EvaluationReport, int], float]], ...] = (
        ("IoU", lambda r, i: float(r.metrics.iou[i])),
        ("F1", lambda r, i: float(r.metrics.f1[i])),
        ("fraction R²", lambda r, i: float(r.fraction_stats.r2[i])),
    )
    for label, getter in per_class:
        rows.append(f"<tr class='group'><th colspan='{len(models) + 1}'>{label} per class</th></tr>")
        for i, name in enumerate(names):
            rows.append(
                f"<tr><td class='name'>{esc(name)}</td>{cells([float(getter(reports[m], i)) for m in models], 3)}</tr>"
            )
    rows.append(f"<tr class='group'><th colspan='{len(models) + 1}'>dataset</th></tr>")
    for label, summary, digits, higher in _SUMMARY_ROWS:
        values = cells([float(summary(reports[m])) for m in models], digits, higher)
        rows.append(f"<tr><td class='name'>{esc(label)}</td>{values}</tr>")
    figures = []
    for caption, image_path in images:
        data = base64.b64encode(Path(image_path).read_bytes()).decode("ascii")
        figures.append(
            f"<figure><img src='data:image/png;base64,{data}' alt='{esc(caption)}'>"
            f"<figcaption>{esc(caption)}</figcaption></figure>"
        )
    style = (
        "body{font-family:sans-serif;margin:1.5em;color:#222}table{border-collapse:collapse;margin-bottom:2em}"
        "td,th{padding:3px 10px;text-align:right;border-bottom:1px solid #ddd}td.name{text-align:left}"
        "tr.group th{text-align:left;background:#f0f0f0}figure{margin:0 0 2em 0}"
        "img{max-width:100%;border:1px solid #ccc}"
    )
    return (
        f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{esc(title)}</title>"
        f"<style>{style}</style></head><body>\n"
        f"<h1>{esc(title)}</h1>\n<p>Best value of each row in bold; &ndash; = undefined.</p>\n"
        f"<table>\n{chr(10).join(rows)}\n</table>\n{chr(10).join(figures)}\n</body></html>\n"
    )


def write_comparison_html(
    path: PathLike,
    reports: Mapping[str, EvaluationReport],
    images: Sequence[tuple[str, PathLike]],
    title: str = "thinseg compare",
) -> None:
    Path(path).write_text(comparison_html(reports, images, title), encoding="utf-8")
