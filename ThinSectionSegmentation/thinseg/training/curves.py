"""Per-epoch CSV log and a PNG of the training curves (rewritten every epoch from the history,
so a resumed run keeps one continuous log)."""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from thinseg.console import signals_held
from thinseg.io.atomic import atomic_output


def write_log_csv(path: Path, history: Sequence[dict[str, Any]]) -> Path:
    """One row per epoch, columns in order of first appearance; written all or nothing."""
    columns: list[str] = []
    for row in history:
        for key in row:
            if key not in columns:
                columns.append(key)
    with atomic_output(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in history:
            writer.writerow({k: _fmt(row.get(k)) for k in columns})
    return path


def _fmt(value: Any) -> Any:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def plot_curves(path: Path, history: Sequence[dict[str, Any]]) -> Path | None:
    """Loss (left) and validation mean IoU (right) against epoch."""
    if not history:
        return None
    with signals_held():  # matplotlib's C extensions load in here (the import, the first drawing)
        return _plot_curves(path, history)


def _plot_curves(path: Path, history: Sequence[dict[str, Any]]) -> Path:
    # deferred: matplotlib costs ~0.4 s at import, paid only once the first epoch has ended
    import matplotlib
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    matplotlib.use("Agg", force=False)

    epochs = [row["epoch"] for row in history]
    fig = Figure(figsize=(9, 3.6), dpi=100)
    ax_loss, ax_iou = fig.subplots(1, 2)
    ax_loss.plot(epochs, [row.get("train_loss") for row in history], "o-", label="train loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("Dice + CE loss")
    ax_loss.grid(alpha=0.3)
    ious = [row.get("val_mean_iou") for row in history]
    if any(v is not None for v in ious):
        ax_iou.plot(epochs, [math.nan if v is None else v for v in ious], "o-", color="tab:green", label="val mean IoU")
        ax_iou.set_ylim(0, 1)
    ax_iou.set_xlabel("epoch")
    ax_iou.set_ylabel("validation mean IoU")
    ax_iou.grid(alpha=0.3)
    for ax in (ax_loss, ax_iou):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole: no 1.5 or 2.5 ticks
    fig.tight_layout()
    with atomic_output(path) as tmp:
        fig.savefig(tmp, format="png")  # the temporary name has no ".png" to tell matplotlib
    return path
