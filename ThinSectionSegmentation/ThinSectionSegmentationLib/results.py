"""How a result appears: mineral area table + bar chart, labelmap over PP in the slice views,
and the training curve (no Qt; the widget only asks the layout to show these nodes)."""

from __future__ import annotations

import numpy as np
import vtk

from thinseg.classes.table import ClassTable
from thinseg.reports.mineralogy import ModalMineralogy, modal_mineralogy

from .labelmaps import labelmap_class_table
from .volumes import label_array, section_grid

FRACTIONS_COLUMNS = ("Mineral", "Area (%)", "Area (mm2)", "Pixels")
CURVE_COLUMNS = ("Epoch", "Training loss", "Validation mean IoU")


def mineralogy_of(labelmap_node, table: ClassTable | None = None) -> ModalMineralogy:
    """Areas per class; a non-square pixel counts as the square of the same area."""
    table = table or labelmap_class_table(labelmap_node)
    return modal_mineralogy(
        labelmap_node.GetName(), label_array(labelmap_node), table, section_grid(labelmap_node).mm_per_pixel
    )


def _set_columns(table, columns):
    table.Initialize()
    arrays = []
    for title, cls in columns:
        array = cls()
        array.SetName(title)
        table.AddColumn(array)
        arrays.append(array)
    return arrays


def fractions_table(scene, labelmap_node, table_node=None, table: ClassTable | None = None):
    """A table node: one row per class (name, area %, mm2, pixels), in class order, then the
    "not classified" row, so the % column sums to 100 of the section's pixels."""
    mineralogy = mineralogy_of(labelmap_node, table)
    if table_node is None:
        table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{labelmap_node.GetName()}_Fractions")
    vtable = table_node.GetTable()
    _set_columns(
        vtable,
        [
            (FRACTIONS_COLUMNS[0], vtk.vtkStringArray),
            (FRACTIONS_COLUMNS[1], vtk.vtkDoubleArray),
            (FRACTIONS_COLUMNS[2], vtk.vtkDoubleArray),
            (FRACTIONS_COLUMNS[3], vtk.vtkDoubleArray),
        ],
    )
    for area in mineralogy.rows:
        vtable.InsertNextBlankRow()
        r = vtable.GetNumberOfRows() - 1
        vtable.SetValue(r, 0, vtk.vtkVariant(area.name))
        vtable.SetValue(r, 1, vtk.vtkVariant(float(area.percent)))
        vtable.SetValue(r, 2, vtk.vtkVariant(float(area.area_mm2)))
        vtable.SetValue(r, 3, vtk.vtkVariant(float(area.pixels)))
    vtable.Modified()
    table_node.Modified()
    return table_node


def fractions_chart(scene, table_node, labelmap_node=None, chart_node=None):
    """A bar chart of the area % column (one bar per mineral, labelled by name, in the class
    colour when the labelmap is given)."""
    name = table_node.GetName().replace("_Fractions", "")
    series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{name} area %")
    series.SetAndObserveTableNodeID(table_node.GetID())
    series.SetYColumnName(FRACTIONS_COLUMNS[1])  # bar plots use the row index as x
    series.SetLabelColumnName(FRACTIONS_COLUMNS[0])  # mineral names label the bars
    series.SetPlotType(series.PlotTypeBar)
    if labelmap_node is not None:
        colors = labelmap_class_table(labelmap_node).classes
        if colors:  # one series colour: the most abundant class's, bars stay readable
            rows = min(len(colors), table_node.GetTable().GetNumberOfRows())  # not the "not classified" row
            fractions = [table_node.GetTable().GetValue(r, 1).ToDouble() for r in range(rows)]
            top = int(np.argmax(fractions)) if fractions else 0
            series.SetColor(*(v / 255.0 for v in colors[top].rgb))
    if chart_node is None:
        chart_node = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{name} mineral fractions")
    chart_node.RemoveAllPlotSeriesNodeIDs()
    chart_node.AddAndObservePlotSeriesNodeID(series.GetID())
    chart_node.SetTitle(f"{name}: mineral area fractions")
    chart_node.SetXAxisTitle("Mineral")
    chart_node.SetYAxisTitle("Area (%)")
    chart_node.SetLegendVisibility(False)
    return chart_node


def show_labelmap(scene, pp_node, labelmap_node, opacity: float = 0.5) -> None:
    """PP as background and the labelmap as label layer in every slice view of the scene
    (what slicer.util.setSliceViewerLayers does, without needing the application)."""
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
        if pp_node is not None:
            composite.SetBackgroundVolumeID(pp_node.GetID())
        composite.SetLabelVolumeID(labelmap_node.GetID() if labelmap_node is not None else None)
        composite.SetLabelOpacity(opacity)


def training_curve(scene, epochs, table_node=None, chart_node=None, name: str = "Training"):
    """Table (epoch, loss, validation mean IoU) and a line chart of both; call again with more
    epochs to update the same nodes (the live curve)."""
    if table_node is None:
        table_node = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{name} curve")
    vtable = table_node.GetTable()
    _set_columns(vtable, [(c, vtk.vtkDoubleArray) for c in CURVE_COLUMNS])
    for e in epochs:
        vtable.InsertNextBlankRow()
        r = vtable.GetNumberOfRows() - 1
        vtable.SetValue(r, 0, vtk.vtkVariant(float(e.epoch)))
        vtable.SetValue(r, 1, vtk.vtkVariant(float("nan") if e.loss is None else float(e.loss)))
        vtable.SetValue(r, 2, vtk.vtkVariant(float("nan") if e.val_mean_iou is None else float(e.val_mean_iou)))
    vtable.Modified()
    table_node.Modified()
    if chart_node is None:
        chart_node = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", f"{name} chart")
        for column, color in ((CURVE_COLUMNS[1], (0.85, 0.3, 0.1)), (CURVE_COLUMNS[2], (0.1, 0.45, 0.8))):
            series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", f"{name} {column}")
            series.SetAndObserveTableNodeID(table_node.GetID())
            series.SetXColumnName(CURVE_COLUMNS[0])
            series.SetYColumnName(column)
            series.SetPlotType(series.PlotTypeScatter)
            series.SetMarkerStyle(series.MarkerStyleCircle)
            series.SetColor(*color)
            chart_node.AddAndObservePlotSeriesNodeID(series.GetID())
        chart_node.SetTitle(f"{name}: loss and validation mean IoU")
        chart_node.SetXAxisTitle("Epoch")
    return table_node, chart_node
