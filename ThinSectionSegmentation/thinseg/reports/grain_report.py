"""The grain analysis as people look at it: an overview picture and a self-contained HTML report.

The report is one file that opens anywhere, offline: no scripts, style sheets or fonts from
elsewhere; every figure is a PNG inside the page. Figures show distributions (one artist per
class, never one per grain), so a section of tens of thousands of grains builds in seconds.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from thinseg.analysis import GrainAnalysis
from thinseg.analysis.sizes import WENTWORTH
from thinseg.classes.table import hex_to_rgb

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

#: Not classified pixels in the class-colour overview.
UNCLASSIFIED_RGB = (140, 140, 140)
#: Grain outlines on the class-colour overview (the PP overview draws them in class colours).
OUTLINE_ON_CLASSES = (20, 20, 20)
#: Outline on PP where the overview's pixel is no grain class (matrix, not classified).
OUTLINE_DEFAULT = (255, 255, 255)
#: Dots per inch of the report's figures (they are shown at about their pixel size).
DPI = 100
#: Width (CSS pixels) that a small overview is enlarged towards, by a whole factor.
OVERVIEW_WIDTH = 1000
#: Points of a cumulative curve at most (quantiles of the grains beyond that).
CURVE_POINTS = 2000
#: Box plots also show each grain's value up to this many grains in a class.
FEW_POINTS = 60
#: Rows of the largest-grains table.
LARGEST = 20
#: Section headings, in page order: (anchor, title).
SECTIONS = (
    ("section", "Section"),
    ("modal", "Modal mineralogy"),
    ("counts", "Grains per class"),
    ("size", "Grain size"),
    ("shape", "Grain shape and orientation"),
    ("contacts", "Contacts"),
    ("porosity", "Porosity"),
    ("overview", "Overview"),
    ("largest", "Largest grains"),
    ("methods", "Methods and notes"),
)
DASH = "&ndash;"


# --- overview picture ------------------------------------------------------------------------


def _grow(mask: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """`mask` and its 8-neighbours."""
    tall = mask.copy()
    tall[1:] |= mask[:-1]
    tall[:-1] |= mask[1:]
    wide = tall.copy()
    wide[:, 1:] |= tall[:, :-1]
    wide[:, :-1] |= tall[:, 1:]
    grown: npt.NDArray[np.bool_] = wide
    return grown


def _shift(array: npt.NDArray[Any], dy: int, dx: int, fill: Any) -> npt.NDArray[Any]:
    """`array` moved by (dy, dx) pixels (|d| <= 1), `fill` where nothing moved in."""
    out = np.full_like(array, fill)
    h, w = array.shape[:2]
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = array[
        max(-dy, 0) : h - max(dy, 0), max(-dx, 0) : w - max(dx, 0)
    ]
    return out


def _spread(colors: npt.NDArray[np.uint8], have: npt.NDArray[np.bool_]) -> npt.NDArray[np.uint8]:
    """`colors` where `have`, copied one pixel outwards (8-neighbours) into the pixels without."""
    out = colors.copy()
    filled = have.copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                take = _shift(have, dy, dx, False) & ~filled
                out[take] = _shift(colors, dy, dx, 0)[take]
                filled |= take
    spread: npt.NDArray[np.uint8] = out
    return spread


def _line_width(analysis: GrainAnalysis) -> int:
    """Outline width in overview pixels: 2 where the median grain is 40 overview pixels across or
    more (a thin line is lost on a big grain), else 1 (a wide one would hide small grains)."""
    c = analysis.table.columns
    diameters = c["equivalent_diameter_mm"][c["touches_edge"] == 0]
    if diameters.size == 0:
        return 1
    across = float(np.median(diameters)) / (analysis.scan.mm_per_pixel * analysis.scan.overview_factor)
    return 2 if across >= 40 else 1


def grain_overview_image(analysis: GrainAnalysis, pp_overview: npt.NDArray[np.uint8] | None) -> npt.NDArray[np.uint8]:
    """The overview with every grain outlined: on the PP, each grain's outline in its class
    colour with a contrasting edge (black by pale colours, white by dark ones), so it reads on
    bright and dark minerals alike; without a PP, the class colours with near-black outlines."""
    scan = analysis.scan
    classes = analysis.source.classes
    labels, outlines = scan.overview_labels, scan.overview_outlines
    height, width = min(labels.shape[0], outlines.shape[0]), min(labels.shape[1], outlines.shape[1])
    if pp_overview is not None:
        height, width = min(height, pp_overview.shape[0]), min(width, pp_overview.shape[1])
    labels = np.minimum(labels[:height, :width], len(classes))
    outlines = outlines[:height, :width]
    lut = np.array(classes.lut(UNCLASSIFIED_RGB), np.uint8)
    if pp_overview is None:
        image = lut[labels]
        image[outlines] = OUTLINE_ON_CLASSES
        return np.ascontiguousarray(image)
    pp = pp_overview[:height, :width]
    image = np.array(pp[..., :3] if pp.ndim == 3 else np.repeat(pp[..., None], 3, axis=2), np.uint8)
    line = lut.copy()
    line[0] = OUTLINE_DEFAULT
    for value in scan.roles.matrix:
        line[value] = OUTLINE_DEFAULT
    luminance = line.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    edge = np.where(luminance[:, None] > 110, 0, 255).astype(np.uint8) * np.ones(3, np.uint8)
    colour = np.zeros_like(image)
    colour[outlines] = line[labels[outlines]]
    edge_colour = np.zeros_like(image)
    edge_colour[outlines] = edge[labels[outlines]]
    drawn = outlines
    if _line_width(analysis) > 1:
        colour, edge_colour = _spread(colour, drawn), _spread(edge_colour, drawn)
        drawn = _grow(drawn)
    ring = _grow(drawn) & ~drawn
    image[ring] = _spread(edge_colour, drawn)[ring]
    image[drawn] = colour[drawn]
    return np.ascontiguousarray(image)


def _png_uri(image: npt.NDArray[np.uint8]) -> str:
    from PIL import Image  # deferred: Pillow is needed only when a report is written

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


# --- formatting --------------------------------------------------------------------------------


def _num(value: Any, digits: int = 2) -> str:
    """A number with `digits` decimals, or a dash when undefined."""
    if value is None or not math.isfinite(float(value)):
        return DASH
    text = f"{float(value):.{digits}f}"
    negative_zero = text.startswith("-") and text.strip("-0.") == ""
    return text[1:] if negative_zero else text  # no "-0.0" for a value that rounds to zero


def _mm(value: Any) -> str:
    """A length in mm with three significant digits at least (grain sizes span 1e-3..10 mm)."""
    if value is None or not math.isfinite(float(value)):
        return DASH
    v = float(value)
    return f"{v:.4f}" if abs(v) < 0.1 else f"{v:.3f}"


def _esc(text: Any) -> str:
    return html.escape(str(text))


def _swatch(color: str) -> str:
    return f"<span class='sw' style='background:{_esc(color)}'></span>"


def _named(name: str, color: str | None) -> str:
    """A class name with its colour swatch (a table cell's content)."""
    return (_swatch(color) if color else "<span class='sw none'></span>") + _esc(name)


def _table(
    header: Sequence[str], rows: Sequence[Sequence[str]], caption: str | None = None, text: Sequence[int] = (0,)
) -> str:
    """An HTML table; header and cells are HTML already (escaped by the caller); columns `text`
    align left, the others (numbers) right."""

    def cell(tag: str, i: int, content: str) -> str:
        return f"<{tag} class='t'>{content}</{tag}>" if i in text else f"<{tag}>{content}</{tag}>"

    head = "".join(cell("th", i, h) for i, h in enumerate(header))
    body = "\n".join("<tr>" + "".join(cell("td", i, c) for i, c in enumerate(row)) + "</tr>" for row in rows)
    cap = f"<caption>{caption}</caption>" if caption else ""
    return f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>\n{body}\n</tbody></table>"


def _figure_html(fig: Figure, alt: str, caption: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, facecolor="white", metadata={"Software": None})
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return (
        f"<figure><img src='data:image/png;base64,{data}' alt='{_esc(alt)}'><figcaption>{caption}</figcaption></figure>"
    )


def _new_figure(width_in: float, height_in: float) -> Figure:
    # deferred: matplotlib costs about half a second to import; only report writing needs it
    from matplotlib.figure import Figure

    return Figure(figsize=(width_in, height_in), dpi=DPI, layout="constrained")


def _edge(color: str) -> str:
    """A darker edge for a class colour, so pale colours keep their outline on white."""
    r, g, b = hex_to_rgb(color)
    return f"#{int(r * 0.55):02x}{int(g * 0.55):02x}{int(b * 0.55):02x}"


# --- what the figures show ---------------------------------------------------------------------


class _Group:
    """The measured grains (not at the section's edge) of one class, or of all grain classes."""

    def __init__(self, name: str, color: str | None, summary: dict[str, Any], pick: npt.NDArray[np.bool_]) -> None:
        self.name = name
        self.color = color
        self.summary = summary
        self.pick = pick

    @property
    def size(self) -> dict[str, Any]:
        size: dict[str, Any] = self.summary["size"]
        return size

    @property
    def plot_color(self) -> str:
        return self.color or "#444444"


def _groups(analysis: GrainAnalysis, role: str) -> list[_Group]:
    """Per class of `role` ('grains' or 'pores'): its measured grains."""
    c = analysis.table.columns
    measured = c["touches_edge"] == 0
    out = []
    for value, entry in enumerate(analysis.summary["classes"], 1):
        if entry["role"] == role:
            out.append(_Group(str(entry["class"]), str(entry["color"]), entry, (c["class"] == value) & measured))
    return out


def _all_grains(analysis: GrainAnalysis, groups: Sequence[_Group]) -> _Group:
    pick = np.zeros(len(analysis.table), bool)
    for group in groups:
        pick |= group.pick
    return _Group("All grains", None, analysis.summary["grains"], pick)


def _wentworth_bands() -> list[tuple[str, float, float]]:
    """(name, coarse phi, fine phi) of each Wentworth class."""
    bands = []
    for i, (name, lower) in enumerate(WENTWORTH):
        upper = WENTWORTH[i + 1][1] if i + 1 < len(WENTWORTH) else math.inf
        coarse = -math.log2(upper) if math.isfinite(upper) else -math.inf
        fine = -math.log2(lower) if lower > 0 else math.inf
        bands.append((name, coarse, fine))
    return bands


def _phi_axis(ax: Axes, lo: float, hi: float, band_labels: bool) -> None:
    """Wentworth classes as shaded bands (named inside the plot), phi below, mm above."""
    for i, (name, coarse, fine) in enumerate(_wentworth_bands()):
        a, b = max(coarse, lo), min(fine, hi)
        if b <= a:
            continue
        if i % 2 == 0:
            ax.axvspan(a, b, color="#f0f0f0", zorder=0, lw=0)
        if band_labels and b - a >= 0.6:
            ax.text(
                (a + b) / 2,
                0.97,
                name.replace(" sand", "\nsand") if b - a < 1.5 else name,
                transform=ax.get_xaxis_transform(),
                ha="center",
                va="top",
                fontsize=7,
                color="#555555",
            )
    ax.set_xlim(lo, hi)
    ticks = np.arange(math.ceil(lo), math.floor(hi) + 1)
    ax.set_xticks(ticks)
    top = ax.secondary_xaxis("top")
    top.set_xticks(ticks)
    top.set_xticklabels([f"{2.0**-t:g}" for t in ticks], fontsize=7)
    top.set_xlabel("mm", fontsize=7, labelpad=4)


def _phi_range(groups: Sequence[_Group]) -> tuple[float, float]:
    edges = [e for g in groups if g.size["histogram"] for e in g.size["histogram"]["phi_edges"]]
    return float(math.floor(min(edges))), float(math.ceil(max(edges)))


def _histogram_figure(groups: Sequence[_Group], unit: str = "grains") -> Figure | None:
    """Phi histograms, one panel per group with measured grains, on one phi range."""
    shown = [g for g in groups if g.size["histogram"]]
    if not shown:
        return None
    lo, hi = _phi_range(shown)
    columns = 1 if len(shown) == 1 else 2
    rows = math.ceil(len(shown) / columns)
    fig = _new_figure(12.5 if columns == 2 else 8.0, 2.6 * rows + 0.3)
    axes = fig.subplots(rows, columns, squeeze=False)
    for ax, group in zip(axes.ravel(), shown):
        hist = group.size["histogram"]
        edges = np.asarray(hist["phi_edges"], np.float64)
        counts = np.asarray(hist["counts"], np.float64)
        ax.bar(
            edges[:-1],
            counts,
            width=np.diff(edges),
            align="edge",
            color=group.plot_color,
            edgecolor=_edge(group.plot_color),
            linewidth=0.8,
            zorder=2,
        )
        ax.set_ylim(0, max(1.0, float(counts.max())) * 1.45)
        _phi_axis(ax, lo, hi, True)
        ax.set_title(f"{group.name} (n = {group.size['count']})", fontsize=9, loc="left")
        ax.set_xlabel("phi", fontsize=8)
        ax.set_ylabel(unit, fontsize=8)
        ax.tick_params(labelsize=8)
        ax.yaxis.get_major_locator().set_params(integer=True)
    for ax in axes.ravel()[len(shown) :]:
        ax.set_visible(False)
    return fig


def _curve(values: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(sorted values, percent at or below): the empirical cumulative curve, thinned to quantiles."""
    v = np.sort(values[np.isfinite(values) & (values > 0)])
    percent = 100.0 * np.arange(1, v.size + 1) / max(1, v.size)
    if v.size > CURVE_POINTS:
        percent = np.linspace(100.0 / v.size, 100.0, CURVE_POINTS)
        v = np.quantile(v, percent / 100.0)
    return v, percent


def _cumulative_figure(
    groups: Sequence[_Group], everything: _Group, diameters: npt.NDArray[np.float64]
) -> Figure | None:
    """Cumulative percent finer against diameter (log mm below, phi above)."""
    curves = []
    for group in [*groups, everything]:
        d, percent = _curve(diameters[group.pick])
        if d.size:
            curves.append((group, d, percent))
    if not curves:
        return None
    fig = _new_figure(12.5, 4.6)
    ax = fig.subplots()
    for group, d, percent in curves:
        label = f"{group.name} (n = {int(group.pick.sum())})"
        if group.color is None:
            ax.step(d, percent, where="post", color="#222222", linestyle="--", linewidth=1.6, label=label, zorder=5)
        elif d.size == 1:
            ax.plot(d, percent, "o", color=group.color, markeredgecolor=_edge(group.color), label=label, zorder=4)
        else:
            ax.step(d, percent, where="post", color=_edge(group.color), linewidth=3.4, zorder=3)
            ax.step(d, percent, where="post", color=group.color, linewidth=1.8, label=label, zorder=4)
    all_d = np.concatenate([d for _, d, _ in curves])
    lo_phi = -math.log2(float(all_d.min())) + 0.3  # the fine end (phi grows as grains get finer)
    hi_phi = -math.log2(float(all_d.max())) - 0.3
    step = 1.0 if lo_phi - hi_phi >= 3 else 0.5
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 102)
    for level in (10, 50, 90):
        ax.axhline(level, color="#bbbbbb", linewidth=0.8, zorder=1)
        ax.text(1.002, level, f"D{level}", transform=ax.get_yaxis_transform(), fontsize=7, va="center")
    phis = np.arange(math.ceil(hi_phi / step), math.floor(lo_phi / step) + 1) * step
    ax.set_xticks([2.0**-p for p in phis])
    ax.set_xticklabels([f"{2.0**-p:.3g}" for p in phis], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel("equivalent circular diameter (mm, log scale)", fontsize=9)
    ax.set_ylabel("cumulative % finer (by number)", fontsize=9)
    top = ax.secondary_xaxis("top")
    top.set_xticks([2.0**-p for p in phis])
    top.set_xticklabels([f"{p:g}" for p in phis], fontsize=8)
    top.minorticks_off()
    top.set_xlabel("phi", fontsize=9)
    ax.set_xlim(2.0**-lo_phi, 2.0**-hi_phi)  # after the ticks: setting ticks widens the limits
    ax.grid(True, axis="x", color="#e5e5e5", zorder=0)
    ax.legend(fontsize=8, loc="upper left", frameon=True)
    ax.tick_params(labelsize=8)
    return fig


def _shape_figure(groups: Sequence[_Group], circularity: npt.NDArray[Any], aspect: npt.NDArray[Any]) -> Figure | None:
    """Box plots of circularity and aspect ratio, one box per class with measured grains."""
    shown = []
    for group in groups:
        values = [v[group.pick] for v in (circularity, aspect)]
        values = [v[np.isfinite(v)] for v in values]
        if values[0].size or values[1].size:
            shown.append((group, values))
    if not shown:
        return None
    fig = _new_figure(12.5, 3.9)
    axes = fig.subplots(1, 2)
    for k, (ax, title) in enumerate(zip(axes, ("circularity (4 pi A / P^2)", "aspect ratio (min / max Feret)"))):
        data = [values[k] if values[k].size else np.array([np.nan]) for _, values in shown]
        parts = ax.boxplot(
            data, patch_artist=True, widths=0.6, flierprops={"markersize": 2, "alpha": 0.5}, showfliers=False
        )
        for box, (group, _) in zip(parts["boxes"], shown):
            box.set_facecolor(group.plot_color)
            box.set_edgecolor(_edge(group.plot_color))
        for median in parts["medians"]:
            median.set_color("#111111")
        for position, (group, values) in enumerate(shown, 1):
            few = values[k]
            if 0 < few.size <= FEW_POINTS:  # few grains: each one shown, so one grain is no bare line
                jitter = np.random.default_rng(position).uniform(-0.12, 0.12, few.size)
                ax.scatter(
                    position + jitter, few, s=14, color=group.plot_color, edgecolors=_edge(group.plot_color), zorder=3
                )
        ax.set_xticks(range(1, len(shown) + 1))
        ax.set_xticklabels([f"{g.name}\n(n = {v[k].size})" for g, v in shown], fontsize=8)
        ax.set_ylim(0, 1.02)
        ax.set_title(title, fontsize=9, loc="left")
        ax.grid(True, axis="y", color="#e5e5e5")
        ax.tick_params(axis="y", labelsize=8)
    return fig


def _rose_figure(groups: Sequence[_Group]) -> Figure | None:
    """Long-axis orientations as a rose (axial data: 0-180 degrees mirrored), stacked by class."""
    roses = [(g, np.asarray(g.summary["shape"]["orientation_rose_10deg"], np.float64)) for g in groups]
    roses = [(g, r) for g, r in roses if r.sum() > 0]
    if not roses:
        return None
    fig = _new_figure(6.0, 5.2)
    ax = fig.add_subplot(projection="polar")
    width = math.radians(10)
    centres = np.radians(np.arange(5, 360, 10))
    bottom = np.zeros(36)
    for group, rose in roses:
        counts = np.concatenate([rose, rose])
        ax.bar(
            centres,
            counts,
            width=width,
            bottom=bottom,
            color=group.plot_color,
            edgecolor=_edge(group.plot_color),
            linewidth=0.6,
            label=f"{group.name} (n = {int(rose.sum())})",
        )
        bottom += counts
    ax.set_xticks(np.radians(np.arange(0, 360, 30)))
    ax.set_xticklabels([f"{d}\N{DEGREE SIGN}" for d in range(0, 360, 30)], fontsize=8)
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.05, 1.0), frameon=False)
    return fig


def _modal_figure(entries: Sequence[dict[str, Any]]) -> Figure | None:
    """Area percent per class with its 95% interval."""
    shown = [e for e in entries if e["area_percent"] is not None]
    if not shown:
        return None
    fig = _new_figure(9.0, 0.45 * len(shown) + 1.0)
    ax = fig.subplots()
    y = np.arange(len(shown))
    values = np.array([float(e["area_percent"]) for e in shown])
    low = np.array(
        [values[i] - e["area_percent_interval"][0] if e["area_percent_interval"] else 0.0 for i, e in enumerate(shown)]
    )
    high = np.array(
        [e["area_percent_interval"][1] - values[i] if e["area_percent_interval"] else 0.0 for i, e in enumerate(shown)]
    )
    ax.barh(
        y,
        values,
        color=[e["color"] for e in shown],
        edgecolor=[_edge(e["color"]) for e in shown],
        xerr=np.vstack([np.maximum(low, 0), np.maximum(high, 0)]),
        error_kw={"ecolor": "#222222", "capsize": 4, "linewidth": 1.2},
    )
    for i, value in enumerate(values):
        ax.text(value + max(high[i], 0) + 0.6, i, f"{value:.2f}%", va="center", fontsize=8)
    ax.set_yticks(y)
    ax.set_yticklabels([str(e["class"]) for e in shown], fontsize=9)
    ax.invert_yaxis()
    ax.set_xlim(0, min(100.0, float((values + np.maximum(high, 0)).max()) * 1.15 + 3))
    ax.set_xlabel("area % of the classified section (bars: 95% interval)", fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    ax.grid(True, axis="x", color="#e5e5e5")
    ax.set_axisbelow(True)
    return fig


def _contact_figure(names: Sequence[str], colors: Sequence[str], lengths: npt.NDArray[np.float64]) -> Figure | None:
    """The contact matrix as a heat map, each cell with its length in mm."""
    n = len(names)
    if n == 0 or not np.any(lengths > 0):
        return None
    side = max(4.5, 0.75 * n + 2.5)
    fig = _new_figure(side + 1.5, side)
    ax = fig.subplots()
    peak = float(lengths.max())
    image = ax.imshow(lengths, cmap="YlOrRd", vmin=0, vmax=peak, aspect="auto")
    digits = 3 if peak < 10 else 1
    for i in range(n):
        for j in range(n):
            value = float(lengths[i, j])
            ax.text(
                j,
                i,
                f"{value:.{digits}f}" if value > 0 else "0",
                ha="center",
                va="center",
                fontsize=8 if n <= 8 else 6,
                color="white" if value > 0.6 * peak else "#222222",
            )
    ax.set_xticks(range(n))
    ax.set_yticks(range(n))
    ax.set_xticklabels(names, rotation=35, ha="right", fontsize=8)
    ax.set_yticklabels(names, fontsize=8)
    ax.tick_params(axis="y", pad=16)
    ax.tick_params(axis="x", pad=16)
    rgb = np.array([hex_to_rgb(c) for c in colors], np.uint8)
    left = ax.inset_axes((-0.045, 0.0, 0.035, 1.0))
    left.imshow(rgb[:, None], aspect="auto")
    left.set_axis_off()
    below = ax.inset_axes((0.0, -0.045, 1.0, 0.035))
    below.imshow(rgb[None, :], aspect="auto")
    below.set_axis_off()
    fig.colorbar(image, ax=ax, shrink=0.8, label="shared boundary (mm)")
    return fig


# --- the page ----------------------------------------------------------------------------------


def _section(anchor: str, body: str) -> str:
    title = dict(SECTIONS)[anchor]
    return f"<section id='{anchor}'>\n<h2>{_esc(title)}</h2>\n{body}\n</section>"


def _header(analysis: GrainAnalysis) -> str:
    s = analysis.summary
    sec, settings = s["section"], s["settings"]
    mm = float(sec["mm_per_pixel"])
    w, h = int(sec["width_px"]), int(sec["height_px"])
    interval = settings["modal_interval"]
    rows = [
        ("Section", _esc(sec["name"])),
        ("Source", _esc(sec["source"]) if sec["source"] else "in memory"),
        ("Size", f"{w} &times; {h} px = {w * mm:.3f} &times; {h * mm:.3f} mm ({_num(sec['area_mm2'], 3)} mm&sup2;)"),
        ("Pixel size", f"{mm:.6g} mm ({mm * 1000:.4g} &micro;m)"),
        ("Classified area", f"{_num(sec['classified_area_mm2'], 3)} mm&sup2;"),
        ("Not classified area", f"{_num(sec['not_classified_area_mm2'], 3)} mm&sup2;"),
        ("Classes", f"{len(analysis.source.classes)}"),
        ("Split touching grains", "yes" if settings["split_touching_grains"] else "no"),
        ("Neck ratio", _num(settings["neck_ratio"], 2)),
        ("Smallest grain", f"{int(settings['min_grain_pixels'])} px"),
        ("Matrix classes", _esc(", ".join(settings["matrix_classes"])) or "none"),
        ("Pore classes", _esc(", ".join(s["porosity"]["pore_classes"])) or "none"),
        (
            "Modal intervals",
            f"{_num(100 * float(interval['level']), 0)}% {_esc(interval['method'])}, blocks of "
            f"{_mm(interval['block_mm'])} mm ({int(interval['blocks'])} blocks), "
            f"{int(interval['resamples'])} resamples, seed {int(interval['seed'])}",
        ),
        ("Sizes", _esc(settings["sizes"])),
    ]
    body = "<table class='kv'><tbody>\n" + "\n".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return _section("section", body + "\n</tbody></table>")


def _modal(analysis: GrainAnalysis) -> str:
    entries = analysis.summary["classes"]
    rows = []
    for e in entries:
        interval = e["area_percent_interval"]
        rows.append(
            [
                _named(e["class"], e["color"]),
                _esc(e["role"]),
                _num(e["area_mm2"], 4),
                _num(e["area_percent"], 2),
                f"{_num(interval[0], 2)} {DASH} {_num(interval[1], 2)}" if interval else DASH,
            ]
        )
    table = _table(["Class", "Role", "Area (mm&sup2;)", "Area %", "95% interval (%)"], rows, text=(0, 1))
    fig = _modal_figure(entries)
    figure = (
        _figure_html(fig, "modal mineralogy", "Area percent of each class; bars: 95% block-bootstrap interval.")
        if fig is not None
        else "<p class='empty'>No classified pixels: no modal mineralogy.</p>"
    )
    return _section("modal", table + "\n" + figure)


def _counts(analysis: GrainAnalysis) -> str:
    s = analysis.summary
    rows = []
    for e in s["classes"]:
        rows.append(
            [
                _named(e["class"], e["color"]),
                _esc(e["role"]),
                str(e["grains"]) if e["role"] != "matrix" else f"{DASH} (matrix)",
                str(e["grains_measured"]),
                str(e["grains_at_edge"]),
                _num(e["small_grain_area_mm2"], 4),
            ]
        )
    g = s["grains"]
    solid = int(g["measured"]) + int(g["at_edge"])  # the summary's "count" holds the pore bodies too
    rows.append(
        ["<b>All grains</b> (pores excluded)", "", f"<b>{solid}</b>", str(g["measured"]), str(g["at_edge"]), ""]
    )
    header = ["Class", "Role", "Grains", "Measured", "At edge", "Area of grains under the size limit (mm&sup2;)"]
    note = (
        f"<p>{int(g.get('split_regions', 0))} regions of touching grains were split. Grains touching the "
        "section's edge are counted but left out of every size and shape statistic (their size is cut).</p>"
    )
    return _section("counts", _table(header, rows, text=(0, 1)) + note)


def _size_rows(groups: Sequence[_Group]) -> tuple[list[list[str]], list[list[str]]]:
    """Folk & Ward rows and percentile rows of each group."""
    folk, percentiles = [], []
    for group in groups:
        size = group.size
        name = _named(group.name, group.color) if group.color else f"<b>{_esc(group.name)}</b>"
        fw = size["folk_ward"]
        if fw is None:
            why = "no measured grains" if size["count"] == 0 else "needs 2 grains or more"
            folk.append([name, str(size["count"]), f"<span class='empty'>{why}</span>"] + [""] * 8)
        else:
            folk.append(
                [
                    name,
                    str(size["count"]),
                    _num(fw["mean_phi"], 2),
                    _mm(fw["mean_mm"]),
                    _esc(fw["mean_class"]),
                    _num(fw["sorting_phi"], 2),
                    _esc(fw["sorting"]),
                    _num(fw["skewness"], 2),
                    _esc(fw["skewness_words"]),
                    _num(fw["kurtosis"], 2),
                    _esc(fw["kurtosis_words"]) if fw["kurtosis_words"] else DASH,
                ]
            )
        classes = ", ".join(f"{_esc(k)} {v}" for k, v in size["wentworth"].items())
        percentiles.append(
            [
                name,
                str(size["count"]),
                _mm(size["mean_mm"]),
                _mm(size["median_mm"]),
                _mm(size["d10_mm"]),
                _mm(size["d50_mm"]),
                _mm(size["d90_mm"]),
                classes or DASH,
            ]
        )
    return folk, percentiles


FOLK_HEADER = [
    "Class",
    "n",
    "Mean (phi)",
    "Mean (mm)",
    "Mean class",
    "Sorting (phi)",
    "Sorting class",
    "Skewness",
    "Skewness class",
    "Kurtosis",
    "Kurtosis class",
]
FOLK_TEXT = (0, 4, 6, 8, 10)
PERCENTILE_HEADER = ["Class", "n", "Mean (mm)", "Median (mm)", "D10 (mm)", "D50 (mm)", "D90 (mm)", "Wentworth classes"]


def _size(analysis: GrainAnalysis, groups: Sequence[_Group], everything: _Group) -> str:
    parts = []
    if not groups:
        return _section("size", "<p class='empty'>No grain classes (every class is matrix or pores).</p>")
    hist = _histogram_figure([*groups, everything] if len(groups) > 1 else groups)
    if hist is None:
        parts.append("<p class='empty'>No measured grains: no size distribution.</p>")
    else:
        parts.append(
            _figure_html(
                hist,
                "grain-size histograms",
                "Number of measured grains per half-phi class; shaded bands and names: Wentworth classes; "
                "top axis: the same sizes in mm.",
            )
        )
        without = [g.name for g in groups if not g.size["histogram"]]
        if without:
            parts.append(f"<p class='empty'>No measured grains: {_esc(', '.join(without))}.</p>")
    diameters = analysis.table.columns["equivalent_diameter_mm"].astype(np.float64)
    curve = _cumulative_figure(groups, everything, diameters)
    if curve is not None:
        parts.append(
            _figure_html(
                curve,
                "cumulative grain-size curves",
                "Cumulative percent of grains finer than each size, by number (dashed: all grains); "
                "grey lines: D10, D50, D90.",
            )
        )
    folk, percentiles = _size_rows([*groups, everything])
    parts.append("<h3>Folk &amp; Ward graphic measures</h3>")
    parts.append(_table(FOLK_HEADER, folk, text=FOLK_TEXT))
    parts.append("<h3>Percentiles (D10 / D50 / D90)</h3>")
    parts.append(_table(PERCENTILE_HEADER, percentiles, text=(0, 7)))
    return _section("size", "\n".join(parts))


def _shape(analysis: GrainAnalysis, groups: Sequence[_Group], everything: _Group) -> str:
    c = analysis.table.columns
    parts = []
    fig = _shape_figure(groups, c["circularity"].astype(np.float64), c["aspect_ratio"].astype(np.float64))
    if fig is None:
        parts.append("<p class='empty'>No measured grains: no shape distributions.</p>")
    else:
        parts.append(
            _figure_html(
                fig,
                "shape distributions",
                f"Box: quartiles, line: median, whiskers: the last grains within 1.5 interquartile ranges; dots: each "
                f"grain's value where a class has {FEW_POINTS} measured grains or fewer.",
            )
        )
    rose = _rose_figure(groups)
    if rose is not None:
        parts.append(
            _figure_html(
                rose,
                "orientation rose",
                "Long-axis orientation, counter-clockwise from the image's x axis, in 10&deg; sectors stacked by "
                "class; axial data (0&ndash;180&deg;) shown mirrored.",
            )
        )
    rows = []
    for group in [*groups, everything]:
        shape = group.summary["shape"]
        name = _named(group.name, group.color) if group.color else f"<b>{_esc(group.name)}</b>"
        rows.append(
            [
                name,
                str(int(group.pick.sum())),
                _num(shape["mean_circularity"], 3),
                _num(shape["mean_aspect_ratio"], 3),
                _mm(shape["mean_feret_max_mm"]),
                _num(shape["mean_orientation_deg"], 1),
            ]
        )
    header = ["Class", "n", "Mean circularity", "Mean aspect ratio", "Mean max Feret (mm)", "Mean orientation (&deg;)"]
    parts.append(_table(header, rows))
    return _section("shape", "\n".join(parts))


def _contacts(analysis: GrainAnalysis) -> str:
    contacts = analysis.summary["contacts"]
    names = [str(n) for n in contacts["classes"]]
    colors = analysis.source.classes.colors
    lengths = np.asarray(contacts["length_mm"], np.float64).reshape(len(names), len(names))
    parts = []
    fig = _contact_figure(names, colors, lengths)
    if fig is None:
        parts.append("<p class='empty'>No boundaries between classified pixels: no contacts.</p>")
    else:
        parts.append(
            _figure_html(
                fig,
                "contact matrix",
                "Boundary length (mm, Crofton estimate) shared by each pair of classes; the diagonal: between "
                "grains of one class.",
            )
        )
    header = ["Boundary of &darr; shared with &rarr;"] + [_named(n, c) for n, c in zip(names, colors)]
    rows = []
    for i, (name, color) in enumerate(zip(names, colors)):
        shares = contacts["share_of_boundary"][i]
        rows.append([_named(name, color)] + [_num(None if v is None else 100 * float(v), 1) for v in shares])
    unclassified = [float(v) for v in contacts["not_classified_length_mm"]]
    if any(v > 0 for v in unclassified):
        rows.append(["<i>not classified (mm)</i>"] + [_num(v, 3) for v in unclassified])
    caption = "Share of each row class's boundary (%) that each column class shares with it."
    parts.append(_table(header, rows, caption))
    return _section("contacts", "\n".join(parts))


def _porosity(analysis: GrainAnalysis) -> str:
    porosity = analysis.summary["porosity"]
    if not porosity["pore_classes"]:
        return _section(
            "porosity",
            "<p class='empty'>No pore class in this labelmap's classes, so porosity and pore sizes are not "
            "measured (a class named like pore, porosity or void is one; others can be named as pore "
            "classes).</p>",
        )
    groups = _groups(analysis, "pores")
    pore_size = porosity["pore_size"]
    parts = [
        f"<p>Porosity: <b>{_num(porosity['porosity_percent'], 2)}%</b> of the classified area "
        f"({_esc(', '.join(porosity['pore_classes']))}); {int(porosity['pore_bodies'])} pore bodies, "
        f"{int(pore_size['count'])} measured (not at the edge).</p>"
    ]
    hist = _histogram_figure(groups, "pore bodies")
    if hist is None:
        parts.append("<p class='empty'>No measured pore bodies: no pore-size distribution.</p>")
    else:
        parts.append(
            _figure_html(hist, "pore-size histogram", "Pore bodies per half-phi class (equivalent circular diameter).")
        )
    folk, percentiles = _size_rows(groups)
    parts.append(_table(FOLK_HEADER, folk, text=FOLK_TEXT))
    parts.append(_table(PERCENTILE_HEADER, percentiles, text=(0, 7)))
    return _section("porosity", "\n".join(parts))


def _overview(analysis: GrainAnalysis, pp_overview: npt.NDArray[np.uint8] | None) -> str:
    image = grain_overview_image(analysis, pp_overview)
    factor = analysis.scan.overview_factor
    # a small labelmap is shown enlarged by whole pixels (crisp), a large one fits the page
    width = image.shape[1] * max(1, OVERVIEW_WIDTH // max(1, image.shape[1]))
    legend = " ".join(
        f"<span class='legend'>{_named(e['class'], e['color'])}</span>" for e in analysis.summary["classes"]
    )
    what = "the plane-polarised image" if pp_overview is not None else "the class colours"
    scale = "full resolution" if factor == 1 else f"every {factor}th pixel"
    caption = (
        f"Grain outlines on {what} ({scale}); outlines in the grain's class colour."
        if pp_overview is not None
        else (f"Grain outlines on {what} ({scale}).")
    )
    return _section(
        "overview",
        f"<p>{legend}</p><figure><img class='overview' src='{_png_uri(image)}' alt='overview with grain outlines' "
        f"style='width:{width}px'>"
        f"<figcaption>{_esc(caption)}</figcaption></figure>",
    )


def _largest(analysis: GrainAnalysis) -> str:
    c = analysis.table.columns
    if len(analysis.table) == 0:
        return _section("largest", "<p class='empty'>No grains.</p>")
    order = np.argsort(-c["area_mm2"], kind="stable")[:LARGEST]
    classes = analysis.source.classes.classes
    rows = []
    for i in order:
        mineral = classes[int(c["class"][i]) - 1]
        rows.append(
            [
                str(int(c["grain"][i])),
                _named(mineral.name, mineral.color),
                _num(c["area_mm2"][i], 4),
                _mm(c["equivalent_diameter_mm"][i]),
                _num(c["phi"][i], 2),
                _mm(c["feret_max_mm"][i]),
                _mm(c["feret_min_mm"][i]),
                _num(c["aspect_ratio"][i], 2),
                _num(c["circularity"][i], 2),
                _num(c["orientation_deg"][i], 0),
                f"{_mm(c['centroid_x_mm'][i])}, {_mm(c['centroid_y_mm'][i])}",
                "yes" if c["touches_edge"][i] else "",
            ]
        )
    header = [
        "Grain",
        "Class",
        "Area (mm&sup2;)",
        "ECD (mm)",
        "phi",
        "Max Feret (mm)",
        "Min Feret (mm)",
        "Aspect",
        "Circularity",
        "Orientation (&deg;)",
        "Centroid x, y (mm)",
        "At edge",
    ]
    caption = (
        f"The {len(order)} largest of {len(analysis.table)} grains by area (pores included); numbers as in grains.csv."
    )
    return _section("largest", _table(header, rows, caption, text=(1, 11)))


def _methods(analysis: GrainAnalysis) -> str:
    s = analysis.summary
    settings = s["settings"]
    interval = settings["modal_interval"]
    split = (
        f"Touching grains of one class are split by a distance-transform watershed where the neck between two "
        f"grains is narrower than {_num(settings['neck_ratio'], 2)} times the smaller grain's half-width (the "
        "distance to the boundary at the neck against that at the grain's centre); a piece whose contact with "
        "its neighbour is longer than its own inscribed diameter is joined back (a strip along a crack, not a grain)."
        if settings["split_touching_grains"]
        else "Touching grains of one class were not split: each connected region is one grain."
    )
    items = [
        "Grains are the connected regions of each grain class (4-connected: pixels sharing a side); matrix "
        "classes are continuous phases that count in the modal mineralogy and the contacts only. " + split,
        f"Regions under {int(settings['min_grain_pixels'])} px count in the areas, not as grains.",
        "Perimeters and contact lengths are Crofton estimates (line intersections over several directions), "
        "so they do not grow with the staircase of the pixel grid.",
        "Sizes are apparent 2-D sizes of the cut through each grain (equivalent circular diameter, Feret "
        "diameters): no stereological correction; percentiles and Folk &amp; Ward measures are by number of "
        "grains; phi = &minus;log<sub>2</sub>(mm).",
        f"Modal intervals: a block bootstrap over square blocks of {_mm(interval['block_mm'])} mm "
        f"({int(interval['resamples'])} resamples): pixels of one grain are not independent, blocks nearly are.",
    ]
    notes = [f"<li>{_esc(note)}</li>" for note in s["notes"]]
    body = "<ul>" + "".join(f"<li>{item}</li>" for item in items) + "</ul>"
    body += "<h3>Notes</h3>" + ("<ul>" + "".join(notes) + "</ul>" if notes else "<p>None.</p>")
    return _section("methods", body)


STYLE = (
    "body{font-family:system-ui,'Segoe UI',Helvetica,Arial,sans-serif;margin:1.5em auto;max-width:1320px;"
    "color:#222;padding:0 1em;font-size:14px}"
    "h1{margin-bottom:.2em}h2{border-bottom:2px solid #ccc;padding-bottom:.2em;margin-top:1.8em}"
    "nav a{margin-right:1em}table{border-collapse:collapse;margin:.6em 0 1.2em 0}"
    "td,th{padding:3px 9px;border-bottom:1px solid #ddd;text-align:right;vertical-align:top}"
    ".t{text-align:left}th{background:#f3f3f3}td:not(.t),th{white-space:nowrap}"
    "table.kv th{text-align:left;background:none;font-weight:600}table.kv td{text-align:left}"
    "caption{caption-side:top;text-align:left;color:#555;padding-bottom:.3em}"
    ".sw{display:inline-block;width:.9em;height:.9em;border:1px solid #555;margin-right:.4em;"
    "vertical-align:-.1em}.sw.none{border-color:transparent}"
    ".legend{margin-right:1.2em;white-space:nowrap}.empty{color:#777;font-style:italic}"
    "figure{margin:.5em 0 1.5em 0}figcaption{color:#555;font-size:13px}"
    "img{max-width:100%;height:auto}img.overview{border:1px solid #999;image-rendering:pixelated}"
)


def grain_report_html(analysis: GrainAnalysis, pp_overview: npt.NDArray[np.uint8] | None) -> str:
    """The whole analysis as one self-contained HTML page (figures inline, nothing fetched)."""
    groups = _groups(analysis, "grains")
    everything = _all_grains(analysis, groups)
    name = str(analysis.summary["section"]["name"])
    nav = " ".join(f"<a href='#{anchor}'>{_esc(title)}</a>" for anchor, title in SECTIONS)
    body = [
        _header(analysis),
        _modal(analysis),
        _counts(analysis),
        _size(analysis, groups, everything),
        _shape(analysis, groups, everything),
        _contacts(analysis),
        _porosity(analysis),
        _overview(analysis, pp_overview),
        _largest(analysis),
        _methods(analysis),
    ]
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>Grain analysis: {_esc(name)}</title><style>{STYLE}</style></head><body>\n"
        f"<h1>Grain analysis: {_esc(name)}</h1>\n<nav>{nav}</nav>\n" + "\n".join(body) + "\n</body></html>\n"
    )
