"""Overlay pictures: labels blended over PP with a legend, for a quick visual check."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt

from thinseg.classes.table import ClassTable
from thinseg.inference.resample import labels_to_grid

#: Longest side of an overlay PNG; gigapixel sections are shown downsampled.
MAX_OVERLAY_SIDE = 4096


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
    """Save `pp_preview` (already at preview size) with `labels` (any size) blended and a legend."""
    # deferred: matplotlib costs about 0.5 s, and `thinseg segment` imports this module at start-up
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred as above; after use("Agg"), so no GUI backend starts
    from matplotlib.patches import Patch  # deferred as above

    height, width = pp_preview.shape[:2]
    small = labels_to_grid(labels, (height, width)) if labels.shape != (height, width) else labels
    image = blend(pp_preview, small, table)
    h, w = image.shape[:2]
    dpi = 100
    legend_w = 260
    fig = plt.figure(figsize=((w + legend_w) / dpi, max(h, 300) / dpi), dpi=dpi)
    ax = fig.add_axes((0, 0, w / (w + legend_w), h / max(h, 300)))
    ax.imshow(image, interpolation="nearest")
    ax.set_axis_off()
    handles = []
    for k, cls in enumerate(table.classes):
        label = cls.name if percents is None else f"{cls.name}  {percents[k]:.1f}%"
        handles.append(Patch(facecolor=cls.color, edgecolor="0.3", label=label))
    fig.legend(handles=handles, loc="upper right", frameon=False, fontsize=11, title=title or None, title_fontsize=11)
    fig.savefig(path, dpi=dpi, format="png")
    plt.close(fig)
