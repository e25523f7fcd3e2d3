"""Grain analysis of mineral maps: grains per class, their sizes, shapes and contacts.

    from thinseg.analysis import analyze, open_labelmap
    result = analyze(open_labelmap("section.nc"))
    result.table.csv_text(); result.summary["classes"]

Touching grains of one mineral are split by a distance-transform watershed; sizes are reported
in mm and phi with Wentworth classes and Folk & Ward measures; the contact matrix gives each
pair of classes' shared boundary; the modal mineralogy carries block-bootstrap intervals.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from thinseg.analysis.labelmap_input import ArrayLabelmap, LabelmapSource, open_labelmap
from thinseg.analysis.options import ClassRoles, GrainOptions, class_roles
from thinseg.analysis.scan import Cancelled, GrainScan, Progress, scan_labelmap
from thinseg.analysis.summary import GRAIN_COLUMNS, GrainTable, grain_table, summarize

__all__ = [
    "GRAIN_COLUMNS",
    "ArrayLabelmap",
    "Cancelled",
    "ClassRoles",
    "GrainAnalysis",
    "GrainOptions",
    "GrainScan",
    "GrainTable",
    "LabelmapSource",
    "analyze",
    "class_roles",
    "open_labelmap",
]


@dataclass
class GrainAnalysis:
    """A labelmap's grains (`table`), its summary (JSON-ready dict) and the scan behind them
    (pixel counts, contacts, the overview picture's data)."""

    source: LabelmapSource
    scan: GrainScan
    table: GrainTable
    summary: dict[str, Any]


def analyze(
    source: LabelmapSource,
    options: GrainOptions | None = None,
    *,
    progress: Progress | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> GrainAnalysis:
    """Grains, statistics and contacts of one labelmap (see the package docstring)."""
    options = options or GrainOptions()
    scan = scan_labelmap(source, options, progress=progress, cancelled=cancelled)
    table = grain_table(scan, source.classes)
    path = str(source.path) if source.path is not None else None
    summary = summarize(scan, table, source.classes, options, source.name, path)
    return GrainAnalysis(source, scan, table, summary)
