"""From a scan to what a petrographer reads: the grain table in mm and the section's summary.

The summary holds, per class and for the section: counts, size distributions (mm and phi,
Wentworth classes, Folk & Ward), shape means, the contact matrix (boundary length shared by
each pair of classes, and each class's share of its boundary: its associations and locking),
porosity and pore sizes, and the modal mineralogy with 95% intervals from a block bootstrap.
Grains at the section's edge (or cut by a band's largest halo) are in the table, flagged, and
left out of every size and shape statistic.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from thinseg.analysis.options import GrainOptions
from thinseg.analysis.scan import GrainScan
from thinseg.analysis.sizes import size_distribution
from thinseg.classes.table import ClassTable

#: Columns of grains.csv, in order, with their units.
GRAIN_COLUMNS = (
    ("grain", ""),
    ("class", ""),
    ("area_mm2", "mm^2"),
    ("equivalent_diameter_mm", "mm"),
    ("phi", "phi"),
    ("feret_max_mm", "mm"),
    ("feret_min_mm", "mm"),
    ("aspect_ratio", "min/max Feret"),
    ("perimeter_mm", "mm"),
    ("circularity", "4 pi A / P^2"),
    ("orientation_deg", "deg, long axis, counter-clockwise from +x"),
    ("centroid_x_mm", "mm from the left edge"),
    ("centroid_y_mm", "mm from the top edge"),
    ("touches_edge", ""),
    ("neighbours", "grain numbers"),
)


@dataclass
class GrainTable:
    """The grains in mm, one entry per grain (numbered 1.. in raster order)."""

    classes: ClassTable
    columns: dict[str, npt.NDArray[Any]]
    neighbours: list[npt.NDArray[np.int64]]

    def __len__(self) -> int:
        return int(self.columns["grain"].size)

    def csv_text(self) -> str:
        """grains.csv: one row per grain, neighbours as grain numbers separated by ';'."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow([name for name, _unit in GRAIN_COLUMNS])
        names = self.classes.names
        cols = self.columns
        for i in range(len(self)):
            row: list[Any] = []
            for name, _unit in GRAIN_COLUMNS:
                if name == "class":
                    row.append(names[int(cols["class"][i]) - 1])
                elif name == "neighbours":
                    row.append(";".join(str(int(n) + 1) for n in self.neighbours[i]))
                elif name in ("grain", "touches_edge"):
                    row.append(int(cols[name][i]))
                else:
                    row.append(f"{float(cols[name][i]):.6g}")
            writer.writerow(row)
        return buffer.getvalue()


def grain_table(scan: GrainScan, classes: ClassTable) -> GrainTable:
    """The scan's grains converted to mm (orientation of the long axis from the second moments)."""
    g = scan.grains
    mm = scan.mm_per_pixel
    area_px = g["area_px"]
    diameter = 2 * np.sqrt(area_px / math.pi) * mm
    perimeter = g["perimeter_px"] * mm
    with np.errstate(divide="ignore", invalid="ignore"):
        circularity = np.where(perimeter > 0, 4 * math.pi * area_px * mm * mm / perimeter**2, np.nan)
        aspect = np.where(g["feret_max_px"] > 0, g["feret_min_px"] / g["feret_max_px"], np.nan)
        phis = -np.log2(diameter)
    columns: dict[str, npt.NDArray[Any]] = {
        "grain": np.arange(1, area_px.size + 1),
        "class": g["class"].astype(np.int64),
        "area_mm2": area_px * mm * mm,
        "equivalent_diameter_mm": diameter,
        "phi": phis,
        "feret_max_mm": g["feret_max_px"] * mm,
        "feret_min_mm": g["feret_min_px"] * mm,
        "aspect_ratio": aspect,
        "perimeter_mm": perimeter,
        "circularity": np.minimum(circularity, 1.0),
        "orientation_deg": g["orientation_deg"],
        "centroid_x_mm": (g["col"] + 0.5) * mm,
        "centroid_y_mm": (g["row"] + 0.5) * mm,
        "touches_edge": g["touches_edge"].astype(np.int64),
    }
    return GrainTable(classes, columns, scan.neighbours)


def _axial_mean(angles_deg: npt.NDArray[np.float64]) -> float | None:
    """Mean direction of axial data (a long axis at 10 and at 190 degrees is the same)."""
    if angles_deg.size == 0:
        return None
    doubled = np.radians(2 * angles_deg)
    mean = math.degrees(math.atan2(float(np.sin(doubled).mean()), float(np.cos(doubled).mean()))) / 2
    return float(mean)


def _shape_summary(table: GrainTable, pick: npt.NDArray[np.bool_]) -> dict[str, Any]:
    c = table.columns

    def mean(name: str) -> float | None:
        values = c[name][pick]
        values = values[np.isfinite(values)]
        return float(values.mean()) if values.size else None

    orientation = c["orientation_deg"][pick]
    rose, _ = np.histogram(np.mod(orientation, 180.0), bins=np.arange(0, 181, 10))
    return {
        "mean_circularity": mean("circularity"),
        "mean_aspect_ratio": mean("aspect_ratio"),
        "mean_feret_max_mm": mean("feret_max_mm"),
        "mean_orientation_deg": _axial_mean(orientation),
        "orientation_rose_10deg": [int(v) for v in rose],
    }


def modal_intervals(
    blocks: npt.NDArray[np.int64], resamples: int, seed: int, level: float = 0.95
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(low, high) area fraction of each class from a block bootstrap: blocks drawn with
    replacement, fractions of the classified pixels recomputed; pixels of one grain are not
    independent, square blocks of the section are nearly so."""
    counts = blocks.reshape(-1, blocks.shape[-1]).astype(np.float64)[:, 1:]
    counts = counts[counts.sum(axis=1) > 0]
    k = counts.shape[1]
    if counts.shape[0] < 2:
        return np.full(k, np.nan), np.full(k, np.nan)
    rng = np.random.default_rng(seed)
    fractions = np.empty((resamples, k))
    for start in range(0, resamples, 250):
        stop = min(resamples, start + 250)
        draws = rng.integers(0, counts.shape[0], size=(stop - start, counts.shape[0]))
        sums = counts[draws].sum(axis=1)
        fractions[start:stop] = sums / sums.sum(axis=1, keepdims=True)
    tail = 100 * (1 - level) / 2
    lo, hi = np.percentile(fractions, [tail, 100 - tail], axis=0)
    return lo, hi


def summarize(
    scan: GrainScan, table: GrainTable, classes: ClassTable, options: GrainOptions, name: str, source: str | None
) -> dict[str, Any]:
    """summary.json: the section, modal mineralogy, grains per class, porosity, contacts, settings."""
    mm = scan.mm_per_pixel
    pixels = scan.class_pixels.astype(np.float64)
    classified = float(pixels[1:].sum())
    lo, hi = modal_intervals(scan.block_counts, options.resamples, options.seed)
    c = table.columns
    measurable = c["touches_edge"] == 0
    names = classes.names
    per_class = []
    for value, mineral in enumerate(classes.classes, 1):
        in_class = c["class"] == value
        pick = in_class & measurable
        role = "matrix" if value in scan.roles.matrix else "pores" if value in scan.roles.pores else "grains"
        per_class.append(
            {
                "class": mineral.name,
                "color": mineral.color,
                "role": role,
                "area_mm2": float(pixels[value] * mm * mm),
                "area_percent": float(100 * pixels[value] / classified) if classified else None,
                "area_percent_interval": None
                if not np.isfinite(lo[value - 1])
                else [float(100 * lo[value - 1]), float(100 * hi[value - 1])],
                "grains": int(in_class.sum()),
                "grains_measured": int(pick.sum()),
                "grains_at_edge": int((in_class & ~measurable).sum()),
                "small_grain_area_mm2": float(scan.small_grain_pixels[value] * mm * mm),
                "size": size_distribution(c["equivalent_diameter_mm"][pick]),
                "shape": _shape_summary(table, pick),
            }
        )
    solid_grains = np.isin(c["class"], [v for v in scan.roles.grains if v not in scan.roles.pores])
    pores = np.isin(c["class"], list(scan.roles.pores))
    contacts = scan.contacts_px * mm
    boundary = contacts.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        shares = np.where(boundary[:, None] > 0, contacts / boundary[:, None], np.nan)
    pore_pixels = float(pixels[list(scan.roles.pores)].sum()) if scan.roles.pores else None
    return {
        "section": {
            "name": name,
            "source": source,
            "width_px": scan.shape[1],
            "height_px": scan.shape[0],
            "mm_per_pixel": mm,
            "area_mm2": float(scan.shape[0] * scan.shape[1] * mm * mm),
            "classified_area_mm2": classified * mm * mm,
            "not_classified_area_mm2": float(pixels[0] * mm * mm),
        },
        "classes": per_class,
        "grains": {
            "count": int(solid_grains.sum()),
            "measured": int((measurable & solid_grains).sum()),
            "at_edge": int((~measurable & solid_grains).sum()),
            "size": size_distribution(c["equivalent_diameter_mm"][measurable & solid_grains]),
            "shape": _shape_summary(table, measurable & solid_grains),
            "split_regions": scan.split_regions,
        },
        "porosity": {
            "pore_classes": [names[v - 1] for v in scan.roles.pores],
            "porosity_percent": None if pore_pixels is None or not classified else 100 * pore_pixels / classified,
            "pore_bodies": int(pores.sum()),
            "pore_size": size_distribution(c["equivalent_diameter_mm"][pores & measurable]),
        },
        "contacts": {
            "classes": names,
            "length_mm": [[float(v) for v in row[1:]] for row in contacts[1:]],
            "share_of_boundary": [[None if not np.isfinite(v) else float(v) for v in row[1:]] for row in shares[1:]],
            "not_classified_length_mm": [float(v) for v in contacts[0, 1:]],
        },
        "settings": {
            "split_touching_grains": options.split,
            "neck_ratio": options.neck_ratio,
            "min_grain_pixels": options.min_pixels,
            "matrix_classes": [names[v - 1] for v in scan.roles.matrix],
            "modal_interval": {
                "method": "block bootstrap",
                "block_mm": scan.block_px * mm,
                "blocks": int(scan.block_counts.shape[0] * scan.block_counts.shape[1]),
                "resamples": options.resamples,
                "seed": options.seed,
                "level": 0.95,
            },
            "sizes": "apparent 2-D equivalent circular diameters, no stereological correction; percentiles by number",
        },
        "notes": list(scan.notes),
    }
