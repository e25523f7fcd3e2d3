"""Grain analysis in the scene (no Qt): a labelmap or segmentation node -> the core's labels, and
the core's analysis -> table and chart nodes in one subject-hierarchy folder.

The labels are the picture as Slicer shows it, the pixel size is the node's own spacing (mm) and
the classes are the names of its colour table (value k = entry k, 0 = not classified), as for
every labelmap this module makes. A segmentation is exported to a temporary labelmap first, one
label per segment in segment order, as Slicer's "export to labelmap" does; nothing of it stays.

What is made, named after the input: "<name> grains" (one row per grain, the columns of the core's
grains.csv with their units as column properties), "<name> grain summary" (per class: area %
with its 95% interval, grains, sizes, Folk & Ward mean and sorting, circularity), "<name>
contacts" (boundary length in mm shared by each pair of classes), the cumulative grain-size curve
per class (% of grains finer, by number, against the equivalent circular diameter on a log axis)
and the modal mineralogy bars, both in the class colours. Either all of it is added or none.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import vtk
from vtk.util import numpy_support

from thinseg.analysis import GRAIN_COLUMNS, ArrayLabelmap, GrainAnalysis, GrainOptions, analyze
from thinseg.classes.table import ClassTable
from thinseg.errors import ThinSegError
from thinseg.io.images import ArraySource

from . import hierarchy
from .labelmaps import labelmap_class_table, remove_node_and_colors, segmentation_to_labelmap
from .volumes import UNKNOWN_SPACING_MM, label_array, require_square_pixels, rgb_array, section_grid

#: Columns of the summary table: (title, unit) in order.
SUMMARY_COLUMNS = (
    ("Class", ""),
    ("Role", ""),
    ("Area (%)", "%"),
    ("Area low (%)", "%"),
    ("Area high (%)", "%"),
    ("Area (mm2)", "mm2"),
    ("Grains", ""),
    ("Measured", ""),
    ("At edge", ""),
    ("Mean ECD (mm)", "mm"),
    ("D50 ECD (mm)", "mm"),
    ("Folk-Ward mean (phi)", "phi"),
    ("Mean size class", ""),
    ("Sorting (phi)", "phi"),
    ("Sorting", ""),
    ("Mean circularity", ""),
)
SUMMARY_DESCRIPTIONS = {
    "Area low (%)": "lower end of the 95% interval of the area % (block bootstrap)",
    "Area high (%)": "upper end of the 95% interval of the area % (block bootstrap)",
    "Measured": "grains not touching the section's edge: the size and shape statistics use these",
    "Mean ECD (mm)": "mean equivalent circular diameter of the measured grains",
    "D50 ECD (mm)": "median equivalent circular diameter of the measured grains (by number)",
    "Folk-Ward mean (phi)": "Folk & Ward graphic mean, phi = -log2(diameter in mm)",
    "Mean size class": "Wentworth class of the Folk & Ward mean",
    "Sorting (phi)": "Folk & Ward inclusive graphic standard deviation",
    "Mean circularity": "4 pi area / perimeter^2 of the measured grains, 1 for a disc",
}
#: Summary columns holding counts (integers).
_COUNTS = ("Grains", "Measured", "At edge")
#: Y axis of the grain-size curves: the share of a class's measured grains at most this size.
FINER = "finer (%)"
#: Attribute on every node made, naming the input node's ID (a later run can find them).
SOURCE_ATTRIBUTE = "ThinSectionSegmentation.GrainSource"


@dataclass
class GrainNodes:
    """The nodes one analysis made (all under `folder`, a subject-hierarchy folder item)."""

    folder: int
    grains: Any
    summary: Any
    contacts: Any
    sizeChart: Any
    modalChart: Any
    sizeTable: Any
    modalTable: Any
    series: list[Any] = field(default_factory=list)

    @property
    def nodes(self) -> list[Any]:
        """Every node made: the tables, the charts and their series."""
        made = [self.grains, self.summary, self.contacts, self.sizeTable, self.modalTable]
        return made + [self.sizeChart, self.modalChart] + list(self.series)


@dataclass
class GrainInput:
    """What the core analyses, read from a node: the labelmap (labels, classes, mm per pixel)
    and what the user should be told about it."""

    labelmap: ArrayLabelmap
    messages: list[str] = field(default_factory=list)


# -- node -> the core's labelmap ----------------------------------------------------------------


def _kind(node: Any) -> str:
    if node.IsA("vtkMRMLVectorVolumeNode"):
        return "an RGB image"
    if node.IsA("vtkMRMLVolumeNode"):
        return "a scalar volume"
    return f"a {node.GetClassName()}"


def _unnamed_values(labelmap_node: Any, labels: np.ndarray, classes: ClassTable) -> list[int]:
    """Label values in the picture that no colour-table entry names (beyond the table, or an
    entry the table leaves undefined)."""
    color = labelmap_node.GetDisplayNode().GetColorNode()
    present = np.flatnonzero(np.bincount(labels.ravel(), minlength=256))
    unnamed = []
    for value in (int(v) for v in present if v > 0):
        defined = value <= len(classes) and bool(color.GetColorName(value)) and color.GetColorName(value) != "(none)"
        if defined and hasattr(color, "GetColorDefined"):
            defined = bool(color.GetColorDefined(value))
        if not defined:
            unnamed.append(value)
    return unnamed


def _labelmap_input(node: Any, name: str, pp_node: Any = None) -> GrainInput:
    if not node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise ThinSegError(
            f"'{name}' is {_kind(node)}, not a labelmap: grain analysis needs a labelmap whose colour table "
            "names the classes (or a segmentation)"
        )
    grid = require_square_pixels(section_grid(node, "labelmap"), "labelmap", "grain analysis")
    classes = labelmap_class_table(node)
    labels = label_array(node)
    unnamed = _unnamed_values(node, labels, classes)
    if unnamed:
        shown = ", ".join(str(v) for v in unnamed[:8]) + (" ..." if len(unnamed) > 8 else "")
        color = node.GetDisplayNode().GetColorNode().GetName()
        raise ThinSegError(f"labelmap '{name}': label values {shown} have no class name in colour table '{color}'")
    messages = []
    mm = grid.mm_per_pixel
    if abs(mm - UNKNOWN_SPACING_MM) < 1e-12:
        messages.append(
            f"'{name}' has 1 mm pixels, Slicer's placeholder for images without a pixel size: sizes are in "
            "those units; set the spacing in the Volumes module if it is wrong"
        )
    pp = None
    if pp_node is not None:
        rgb = rgb_array(pp_node, "PP image")
        if rgb.shape[:2] != labels.shape:
            raise ThinSegError(
                f"PP '{pp_node.GetName()}' is {rgb.shape[1]}x{rgb.shape[0]} px but labelmap '{name}' is "
                f"{labels.shape[1]}x{labels.shape[0]} px; choose the PP image the labelmap was made on"
            )
        pp = ArraySource(rgb, name=pp_node.GetName(), mm_per_pixel=mm)
    try:
        source = ArrayLabelmap(labels, classes, mm, name=name, pp=pp)
    except ThinSegError as error:
        raise ThinSegError(f"labelmap '{name}': {error.problem}") from None
    return GrainInput(source, messages)


def grain_input(node: Any, pp_node: Any = None) -> GrainInput:
    """The core's labelmap of a labelmap volume node or a segmentation node (exported to a
    temporary labelmap, removed again); ThinSegError in one line for anything else, a volume of
    several slices, non-square pixels or label values without a class name."""
    if node is None:
        raise ThinSegError("choose a labelmap (or segmentation) to analyse")
    name = node.GetName()
    if not node.IsA("vtkMRMLSegmentationNode"):
        return _labelmap_input(node, name, pp_node)
    if node.GetSegmentation().GetNumberOfSegments() == 0:
        raise ThinSegError(f"segmentation '{name}' has no segments")
    scene = node.GetScene()
    exported = segmentation_to_labelmap(node, name=scene.GenerateUniqueName(f"{name}_grain_labels"))
    try:
        return _labelmap_input(exported, name, pp_node)
    finally:
        display = exported.GetDisplayNode()
        hierarchy.remove_items(scene, [exported])
        remove_node_and_colors(exported)
        if display is not None and display.GetScene() is not None:
            scene.RemoveNode(display)


# -- the core's analysis -> table and chart nodes ----------------------------------------------


def _number_array(name: str, values: Any) -> Any:
    data = np.asarray(values)
    kind = np.int32 if data.dtype.kind in "iub" else np.float64  # vtkIntArray / vtkDoubleArray
    array = numpy_support.numpy_to_vtk(np.ascontiguousarray(data, dtype=kind), deep=True)
    array.SetName(name)
    return array


def _string_array(name: str, values: Sequence[str]) -> Any:
    array = vtk.vtkStringArray()
    array.SetName(name)
    for value in values:
        array.InsertNextValue(value)
    return array


def _table(scene: Any, name: str, columns: Sequence[tuple[str, Any]], units: dict[str, str], made: list[Any]) -> Any:
    """A table node holding `columns` (title, numpy array or list of text), with unit labels."""
    node = scene.AddNewNodeByClass("vtkMRMLTableNode", scene.GenerateUniqueName(name))
    made.append(node)
    table = node.GetTable()
    for title, values in columns:
        is_text = isinstance(values, list) and (not values or isinstance(values[0], str))
        table.AddColumn(_string_array(title, values) if is_text else _number_array(title, values))
    for title, unit in units.items():
        if unit:
            node.SetColumnUnitLabel(title, unit)
    table.Modified()
    node.Modified()
    return node


def _number(value: Any) -> float:
    return float("nan") if value is None else float(value)


def grains_table(scene: Any, name: str, analysis: GrainAnalysis, made: list[Any]) -> Any:
    """One row per grain: grains.csv's columns, units as column properties."""
    table = analysis.table
    names = table.classes.names
    columns: list[tuple[str, Any]] = []
    for column, _unit in GRAIN_COLUMNS:
        if column == "class":
            columns.append((column, [names[int(k) - 1] for k in table.columns["class"]]))
        elif column == "neighbours":
            columns.append((column, [";".join(str(int(n) + 1) for n in row) for row in table.neighbours]))
        else:
            columns.append((column, table.columns[column]))
    node = _table(scene, f"{name} grains", columns, dict(GRAIN_COLUMNS), made)
    for column, unit in GRAIN_COLUMNS:
        if unit and unit != node.GetColumnUnitLabel(column):
            node.SetColumnDescription(column, unit)
    return node


def summary_table(scene: Any, name: str, analysis: GrainAnalysis, made: list[Any]) -> Any:
    """Per class: area % with its 95% interval, grains, sizes, Folk & Ward, circularity."""
    rows = analysis.summary["classes"]
    values: dict[str, list[Any]] = {title: [] for title, _unit in SUMMARY_COLUMNS}
    for row in rows:
        size, interval = row["size"], row["area_percent_interval"] or [None, None]
        folk = size.get("folk_ward") or {}
        for title, value in (
            ("Class", row["class"]),
            ("Role", row["role"]),
            ("Area (%)", _number(row["area_percent"])),
            ("Area low (%)", _number(interval[0])),
            ("Area high (%)", _number(interval[1])),
            ("Area (mm2)", _number(row["area_mm2"])),
            ("Grains", int(row["grains"])),
            ("Measured", int(row["grains_measured"])),
            ("At edge", int(row["grains_at_edge"])),
            ("Mean ECD (mm)", _number(size.get("mean_mm"))),
            ("D50 ECD (mm)", _number(size.get("d50_mm"))),
            ("Folk-Ward mean (phi)", _number(folk.get("mean_phi"))),
            ("Mean size class", str(folk.get("mean_class") or "")),
            ("Sorting (phi)", _number(folk.get("sorting_phi"))),
            ("Sorting", str(folk.get("sorting") or "")),
            ("Mean circularity", _number(row["shape"]["mean_circularity"])),
        ):
            values[title].append(value)
    columns: list[tuple[str, Any]] = []
    for title, _unit in SUMMARY_COLUMNS:
        column = values[title]
        is_text = title in ("Class", "Role", "Mean size class", "Sorting")
        columns.append((title, column if is_text else np.asarray(column, np.int64 if title in _COUNTS else float)))
    node = _table(scene, f"{name} grain summary", columns, dict(SUMMARY_COLUMNS), made)
    for title, text in SUMMARY_DESCRIPTIONS.items():
        node.SetColumnDescription(title, text)
    return node


def contacts_table(scene: Any, name: str, analysis: GrainAnalysis, made: list[Any]) -> Any:
    """Class x class: the boundary length (mm) the two classes share (symmetric; the diagonal is
    the length along which touching grains of one class were split)."""
    contacts = analysis.summary["contacts"]
    classes = list(contacts["classes"])
    lengths = np.asarray(contacts["length_mm"], np.float64).reshape(len(classes), len(classes))
    columns: list[tuple[str, Any]] = [("Class", classes)]
    columns += [(mineral, lengths[:, j]) for j, mineral in enumerate(classes)]
    node = _table(scene, f"{name} contacts", columns, dict.fromkeys(classes, "mm"), made)
    node.SetUseFirstColumnAsRowHeader(True)
    return node


def _rgb(color: str) -> tuple[float, float, float]:
    text = color.lstrip("#")
    r, g, b = (int(text[i : i + 2], 16) / 255.0 for i in (0, 2, 4))
    return r, g, b


def size_curves(
    scene: Any, name: str, analysis: GrainAnalysis, made: list[Any], series_made: list[Any]
) -> tuple[Any, Any]:
    """The cumulative grain-size curve of each class with measured grains: x the equivalent
    circular diameter (mm, log axis), y the % of the class's measured grains at most that size
    (by number); a table with two columns per class (shorter curves repeat their last point)."""
    c = analysis.table.columns
    measured = c["touches_edge"] == 0
    curves = []
    for value, row in enumerate(analysis.summary["classes"], 1):
        if row["role"] == "matrix":
            continue
        diameters = np.sort(c["equivalent_diameter_mm"][measured & (c["class"] == value)])
        diameters = diameters[np.isfinite(diameters) & (diameters > 0)]
        if diameters.size:
            curves.append(
                (row["class"], row["color"], diameters, 100.0 * np.arange(1, diameters.size + 1) / diameters.size)
            )
    longest = max((d.size for _n, _c, d, _p in curves), default=0)
    columns: list[tuple[str, Any]] = []
    units = {}
    for mineral, _color, diameters, percent in curves:
        pad = longest - diameters.size
        columns.append((f"{mineral} ECD (mm)", np.concatenate([diameters, np.repeat(diameters[-1:], pad)])))
        columns.append((f"{mineral} {FINER}", np.concatenate([percent, np.repeat(percent[-1:], pad)])))
        units[f"{mineral} ECD (mm)"], units[f"{mineral} {FINER}"] = "mm", "%"
    table = _table(scene, f"{name} grain size curves", columns, units, made)
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", scene.GenerateUniqueName(f"{name} grain sizes"))
    made.append(chart)
    for mineral, color, _d, _p in curves:
        series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", scene.GenerateUniqueName(f"{name} {mineral} sizes"))
        series_made.append(series)
        series.SetAndObserveTableNodeID(table.GetID())
        series.SetXColumnName(f"{mineral} ECD (mm)")
        series.SetYColumnName(f"{mineral} {FINER}")
        series.SetPlotType(series.PlotTypeLine)
        series.SetMarkerStyle(series.MarkerStyleCircle)
        series.SetColor(*_rgb(color))
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
    chart.SetTitle(f"{name}: cumulative grain size (measured grains, by number)")
    chart.SetXAxisTitle("Equivalent circular diameter (mm)")
    chart.SetYAxisTitle(f"Grains {FINER}")
    chart.SetXAxisLogScale(True)
    chart.SetLegendVisibility(True)
    return table, chart


def modal_bars(
    scene: Any, name: str, analysis: GrainAnalysis, made: list[Any], series_made: list[Any]
) -> tuple[Any, Any]:
    """The modal mineralogy as bars in the class colours: one bar series per class (a series has
    one colour), each a column holding the class's area % on its own row and 0 on the others."""
    rows = analysis.summary["classes"]
    names = [row["class"] for row in rows]
    percent = np.array([_number(row["area_percent"]) for row in rows])
    columns: list[tuple[str, Any]] = [("Class", names), ("Area (%)", percent)]
    for k, mineral in enumerate(names):
        own = np.zeros(len(names))
        own[k] = percent[k]
        columns.append((f"{mineral} (%)", own))
    table = _table(scene, f"{name} modal mineralogy", columns, {"Area (%)": "%"}, made)
    chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", scene.GenerateUniqueName(f"{name} modal mineralogy chart"))
    made.append(chart)
    for row in rows:
        series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", scene.GenerateUniqueName(f"{name} {row['class']} %"))
        series_made.append(series)
        series.SetAndObserveTableNodeID(table.GetID())
        series.SetYColumnName(f"{row['class']} (%)")  # bar plots use the row index as x
        series.SetLabelColumnName("Class")
        series.SetPlotType(series.PlotTypeBar)
        series.SetColor(*_rgb(row["color"]))
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
    chart.SetTitle(f"{name}: modal mineralogy (area % of the classified pixels)")
    chart.SetXAxisTitle("Class")
    chart.SetYAxisTitle("Area (%)")
    chart.SetLegendVisibility(False)
    return table, chart


def _remove(scene: Any, nodes: Sequence[Any], folder: int) -> None:
    hierarchy.remove_items(scene, nodes, folder)
    for node in reversed(list(nodes)):
        if node.GetScene() is not None:
            scene.RemoveNode(node)


def create_nodes(scene: Any, name: str, analysis: GrainAnalysis, parent: int, source_id: str = "") -> GrainNodes:
    """The tables and charts of `analysis` in a new folder "<name> grain analysis" under
    `parent`; on any failure everything made so far is removed again."""
    made: list[Any] = []
    series: list[Any] = []
    folder = 0
    try:
        grains = grains_table(scene, name, analysis, made)
        summary = summary_table(scene, name, analysis, made)
        contacts = contacts_table(scene, name, analysis, made)
        size_table, size_chart = size_curves(scene, name, analysis, made, series)
        modal_table, modal_chart = modal_bars(scene, name, analysis, made, series)
        folder = hierarchy.create_folder(scene, f"{name} grain analysis", parent)
        for node in made + series:
            node.SetAttribute(SOURCE_ATTRIBUTE, source_id)
            hierarchy.place(node, folder)
    except BaseException:
        _remove(scene, made + series, folder)
        raise
    return GrainNodes(folder, grains, summary, contacts, size_chart, modal_chart, size_table, modal_table, series)


def analyze_node(
    node: Any,
    pp_node: Any = None,
    options: GrainOptions | None = None,
    progress: Callable[[int, int], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> tuple[GrainAnalysis, GrainNodes, list[str]]:
    """Analyse a labelmap or segmentation node (in this process: one worker, no child processes
    in the host) and add the result's nodes beside it; the scene is only changed once the
    analysis has finished (a cancel, thinseg.analysis.Cancelled, leaves it as it was)."""
    given = grain_input(node, pp_node)
    # one worker: a child process of the host would start the host application, not Python
    options = replace(options or GrainOptions(), workers=1)
    analysis = analyze(given.labelmap, options, progress=progress, cancelled=cancelled)
    scene = node.GetScene()
    made = create_nodes(scene, node.GetName(), analysis, hierarchy.parent_item(node), node.GetID())
    return analysis, made, given.messages
