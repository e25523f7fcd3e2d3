"""Overlay pictures: labels blended over PP with a legend, for a quick visual check."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import numpy.typing as npt

from thinseg.classes.table import ClassTable
from thinseg.inference.resample import labels_to_grid

#: Longest side of an overlay PNG; gigapixel sections are shown downsampled.
MAX_OVERLAY_SIDE = 4096

#: Width of the legend column of an overlay (wider when the class names need it), px.
LEGEND_WIDTH = 260
#: Least height of an overlay picture, so that the legend of a small section still fits, px.
LEGEND_MIN_HEIGHT = 300


def colorize(labels: np.ndarray, table: ClassTable) -> npt.NDArray[np.uint8]:
    """(H, W, 3) class colours of a label image (the table's colour for 0 as well)."""
    lut = np.array(table.lut(), dtype=np.uint8)
    colours: npt.NDArray[np.uint8] = lut[np.minimum(labels, len(lut) - 1)]
    return colours


def blend(
    pp: np.ndarray, labels: np.ndarray, table: ClassTable, alpha: float = 0.45, band_rows: int = 256
) -> np.ndarray:
    """PP with class colours on top; unclassified pixels (0) show PP unchanged. Worked out
    `band_rows` rows at a time: the float temporaries of a whole 4096 px preview are about 1 GB."""
    blended: npt.NDArray[np.uint8] = np.empty(np.shape(pp), np.uint8)
    for y0 in range(0, blended.shape[0], max(1, band_rows)):
        y1 = min(blended.shape[0], y0 + max(1, band_rows))
        colours = colorize(labels[y0:y1], table).astype(np.float32)
        out = np.asarray(pp[y0:y1]).astype(np.float32)
        mask = labels[y0:y1] > 0
        out[mask] = (1 - alpha) * out[mask] + alpha * colours[mask]
        blended[y0:y1] = out.round().astype(np.uint8)
    return blended


def write_overlay_png(
    path: Path,
    pp_preview: np.ndarray,
    labels: np.ndarray,
    table: ClassTable,
    percents: list[float] | None = None,
    title: str = "",
) -> None:
    """Save `pp_preview` (already at preview size) with `labels` (any size) blended and a legend.

    The blended pixels are copied into the picture as they are; only the legend column is drawn
    by matplotlib. Drawing the whole 4096 px preview with imshow would resample it through float
    copies (about 1.9 GB), the one part of `thinseg segment --overlay` that did not stay small."""
    height, width = pp_preview.shape[:2]
    small = labels_to_grid(labels, (height, width)) if labels.shape != (height, width) else labels
    picture_h = max(height, LEGEND_MIN_HEIGHT)
    legend = _legend_column(table, percents, title, picture_h)
    picture = np.full((picture_h, width + legend.shape[1], 3), 255, np.uint8)
    picture[picture_h - height :, :width] = blend(pp_preview, small, table)  # at the bottom, as matplotlib put it
    picture[:, width:] = legend
    # deferred: PIL costs start-up time, and `thinseg segment` imports this module at start
    from PIL import Image

    Image.fromarray(picture).save(path, format="PNG")


def _legend_column(table: ClassTable, percents: list[float] | None, title: str, height: int) -> npt.NDArray[np.uint8]:
    """(height, w, 3) white column with the class colours, names (and percents) and the title
    at its top right; w is LEGEND_WIDTH or what the legend needs."""
    # deferred: matplotlib costs about 0.5 s, and `thinseg segment` imports this module at start-up
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch  # deferred as above

    dpi = 100
    handles = []
    for k, cls in enumerate(table.classes):
        label = cls.name if percents is None else f"{cls.name}  {percents[k]:.1f}%"
        handles.append(Patch(facecolor=cls.color, edgecolor="0.3", label=label))
    width = LEGEND_WIDTH
    for _attempt in range(2):
        fig = Figure(figsize=(width / dpi, height / dpi), dpi=dpi, facecolor="white")
        legend = fig.legend(
            handles=handles, loc="upper right", frameon=False, fontsize=11, title=title or None, title_fontsize=11
        )
        fig.draw_without_rendering()
        left = legend.get_window_extent().x0
        if left >= 0:
            break
        width += int(np.ceil(-left)) + 10  # long class names: widen the column rather than cut them
    raw = io.BytesIO()
    fig.savefig(raw, dpi=dpi, format="rgba")  # Agg's pixels as they are
    rgba = np.frombuffer(raw.getbuffer(), np.uint8).reshape(height, -1, 4)
    column: npt.NDArray[np.uint8] = np.ascontiguousarray(rgba[:, :, :3])
    return column
