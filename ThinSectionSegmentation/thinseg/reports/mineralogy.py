"""Modal mineralogy: the area of each class per section, in % of classified area and in mm^2."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from thinseg.classes.table import ClassTable
from thinseg.io.atomic import atomic_output, free_output_path
from thinseg.metrics.fractions import class_pixel_counts


@dataclass(frozen=True)
class ClassArea:
    """One class of a section: its pixels, % of the classified area and area in mm^2."""

    name: str
    pixels: int
    percent: float  # of classified pixels (label != 0)
    area_mm2: float


@dataclass(frozen=True)
class ModalMineralogy:
    """The class areas of one section at its pixel size."""

    section: str
    mm_per_pixel: float
    areas: tuple[ClassArea, ...]

    @property
    def classified_pixels(self) -> int:
        return sum(a.pixels for a in self.areas)


def modal_mineralogy(section: str, labels: np.ndarray, table: ClassTable, mm_per_pixel: float) -> ModalMineralogy:
    """Area of each class of `table` in `labels` (label k = k-th class, 0 = unclassified)."""
    counts = class_pixel_counts(labels, len(table))
    classified = int(counts[1:].sum())
    pixel_area = mm_per_pixel * mm_per_pixel
    areas = tuple(
        ClassArea(
            name=name,
            pixels=int(counts[k]),
            percent=100.0 * counts[k] / classified if classified else 0.0,
            area_mm2=float(counts[k] * pixel_area),
        )
        for k, name in enumerate(table.names, start=1)
    )
    return ModalMineralogy(section=section, mm_per_pixel=mm_per_pixel, areas=areas)


CSV_FIELDS = ("section", "class", "pixels", "percent", "area_mm2")


def fractions_csv_text(results: Sequence[ModalMineralogy]) -> str:
    """Long format (one row per section and class): easy to filter, pivot and plot."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    for result in results:
        for area in result.areas:
            writer.writerow([result.section, area.name, area.pixels, f"{area.percent:.3f}", f"{area.area_mm2:.6f}"])
    return buffer.getvalue()


def format_table(result: ModalMineralogy) -> str:
    """Fixed-width terminal table of one section's modal mineralogy."""
    width = max(len("class"), *(len(a.name) for a in result.areas))
    lines = [f"{'class':<{width}}  {'%':>7}  {'mm^2':>10}  {'pixels':>12}"]
    lines.append("-" * len(lines[0]))
    for a in result.areas:
        lines.append(f"{a.name:<{width}}  {a.percent:7.2f}  {a.area_mm2:10.4f}  {a.pixels:12d}")
    return "\n".join(lines)


def write_mineralogy_csv(path: Path, results: Sequence[ModalMineralogy], *, overwrite: bool = False) -> Path:
    """Write `fractions_csv_text(results)` all or nothing; an existing file is kept and a free
    numbered name used instead unless `overwrite`. Returns the path written."""
    target = path if overwrite else free_output_path(path)
    with atomic_output(target) as tmp:
        tmp.write_text(fractions_csv_text(results), encoding="utf-8")
    return target
