"""Overlay pictures: labels blended over PP with a legend, for a quick visual check."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from thinseg.classes.table import ClassTable
from thinseg.inference.resample import labels_to_grid

#: Longest side of an overlay PNG; gigapixel sections are shown downsampled.
MAX_OVERLAY_SIDE = 4096


def colorize(labels: np.ndarray, table: ClassTable) -> np.ndarray:
    lut = np.array(table.lut(), dtype=np.uint8)
    return lut[np.minimum(labels, len(lut) - 1)]


def preview_shape(shape: tuple[int, int], max_side: int = MAX_OVERLAY_SIDE) -> tuple[int, int]:
    scale = min(1.0, max_side / max(shape))
    return max(1, int(round(shape[0] * scale))), max(1, int(round(shape[1] * scale)))


def blend(pp: np.ndarray, labels: np.ndarray, table: ClassTable, alpha: float = 0.45) -> np.ndarray:
    """PP with class colours on top; unclassified pixels (0) show PP unchanged."""
    colours = colorize(labels, table).astype(np.float32)
    out = pp.astype(np.float32)
    mask = labels > 0
    out[mask] = (1 - alpha) * out[mask] + alpha * colours[mask]
    return out.round().astype(np.uint8)


def write_overlay_png(
    path: Path,
    pp_preview: np.ndarray,
    labels: np.ndarray,
    table: ClassTable,
    percents: list[float] | None = None,
    title: str = "",
) -> None:
    """Save `pp_preview` (already at preview size) with `labels` (any size) blended and a legend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    small = labels_to_grid(labels, pp_preview.shape[:2]) if labels.shape != pp_preview.shape[:2] else labels
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
