"""Labelmaps, colour tables and segmentations (no Qt).

A labelmap's meaning lives in its colour table: value k = entry k (name, colour), 0 = not
classified (transparent). This is the core's `ClassTable` (class k = label k) and GeoSlicer's
netCDF `labels` attribute, so names and colours survive every conversion here:
labelmap -> segmentation -> labelmap keeps the order, including classes with no pixel (they
become empty segments), and the label values.
"""

from __future__ import annotations

import numpy as np
import slicer
import vtk

from thinseg.classes.table import ClassTable, MineralClass, rgb_to_hex
from thinseg.errors import ThinSegError

from .volumes import label_array, set_thin_section_geometry, update_volume, write_picture

BACKGROUND_NAME = "Background"
#: Node attribute marking colour tables made from a ClassTable (every entry is a class).
CLASS_TABLE_ATTRIBUTE = "ThinSectionSegmentation.ClassTable"
#: Node reference from a labelmap/segmentation to the PP (and XP) image it belongs to.
PP_REFERENCE = "ThinSectionSegmentation.PP"
XP_REFERENCE = "ThinSectionSegmentation.XP"


# -- colour tables ------------------------------------------------------------------------------


def create_color_table(scene, name: str, table: ClassTable):
    """A user colour table: entry 0 = transparent background, entry k = k-th class."""
    node = scene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
    fill_color_table(node, table)
    return node


def fill_color_table(node, table: ClassTable) -> None:
    node.SetTypeToUser()
    node.SetNumberOfColors(len(table) + 1)
    node.GetLookupTable().SetTableRange(0, len(table))
    node.SetColor(0, BACKGROUND_NAME, 0.0, 0.0, 0.0, 0.0)
    for k, mineral in enumerate(table.classes, start=1):
        r, g, b = (v / 255.0 for v in mineral.rgb)
        node.SetColor(k, mineral.name, r, g, b, 1.0)
    node.SetAttribute(CLASS_TABLE_ATTRIBUTE, "1")
    node.Modified()


def _color_hex(node, index: int) -> str:
    rgba = [0.0, 0.0, 0.0, 0.0]
    node.GetColor(index, rgba)
    return rgb_to_hex([int(round(255 * v)) for v in rgba[:3]])


def _is_defined(node, index: int) -> bool:
    name = node.GetColorName(index)
    defined = node.GetColorDefined(index) if hasattr(node, "GetColorDefined") else True
    return bool(defined) and bool(name) and name != "(none)"


def class_table_from_color_node(node, max_label: int | None = None) -> ClassTable:
    """Classes 1..N of a colour node. N: every entry of our own tables; for other tables (e.g.
    Slicer's GenericAnatomyColors) up to `max_label`, trailing undefined entries dropped."""
    if node is None:
        raise ThinSegError("the labelmap has no colour table: its classes have no names")
    n = node.GetNumberOfColors() - 1
    if node.GetAttribute(CLASS_TABLE_ATTRIBUTE) is None and max_label is not None:
        n = min(n, max(int(max_label), 0)) if n > 255 else n
        while n > max_label and not _is_defined(node, n):
            n -= 1
    if n > 255:
        raise ThinSegError(f"colour table '{node.GetName()}' has {n} entries; labelmaps hold at most 255 classes")
    classes = []
    for k in range(1, n + 1):
        name = node.GetColorName(k) if _is_defined(node, k) else ""
        classes.append(MineralClass(name or f"Label {k}", _color_hex(node, k)))
    return ClassTable(tuple(classes))


def labelmap_class_table(labelmap_node) -> ClassTable:
    """The labelmap's classes from its display node's colour table."""
    display = labelmap_node.GetDisplayNode()
    color = display.GetColorNode() if display is not None else None
    if color is None:
        raise ThinSegError(f"labelmap '{labelmap_node.GetName()}' has no colour table: its classes have no names")
    labels = label_array(labelmap_node)
    return class_table_from_color_node(color, int(labels.max()) if labels.size else 0)


# -- labelmap nodes -----------------------------------------------------------------------------


def create_labelmap(
    scene,
    name: str,
    labels: np.ndarray,
    table: ClassTable,
    mm_per_pixel: float | None = None,
    origin_mm=(0.0, 0.0, 0.0),
    reference=None,
    node=None,
):
    """A uint8 labelmap volume showing `table`'s names and colours.

    With `reference` (the PP image), `labels` is its picture (H, W) as Slicer shows it, and the
    labelmap gets exactly the reference's grid (IJK-to-RAS, extent, parent transform), voxel for
    voxel; without one it is (1, H, W) with GeoSlicer geometry from spacing/origin. An existing
    `node` is filled in place (its old colour table is replaced, not modified)."""
    data = np.asarray(labels)
    data = data[np.newaxis] if data.ndim == 2 else data
    if data.ndim != 3 or data.shape[0] != 1:
        raise ValueError(f"labels must be (H, W) or (1, H, W), got {data.shape}")
    if data.size and int(data.max()) > len(table):
        raise ThinSegError(f"label value {int(data.max())} has no class: the table lists {len(table)} classes")
    if reference is None and mm_per_pixel is None:
        raise ValueError("give mm_per_pixel or a reference volume")
    created = node is None
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name)
    if reference is not None:
        try:
            write_picture(node, data[0].astype(np.uint8, copy=False), reference)
        except BaseException:
            if created:
                scene.RemoveNode(node)
            raise
    else:
        set_thin_section_geometry(node, mm_per_pixel, origin_mm)
        update_volume(node, data.astype(np.uint8, copy=False))
    display = node.GetDisplayNode()
    old = display.GetColorNode() if display is not None else None
    color = create_color_table(scene, f"{node.GetName()}_ColorTable", table)
    set_labelmap_colors(node, color)
    if old is not None and old.GetAttribute(CLASS_TABLE_ATTRIBUTE) is not None and _unused_color(scene, old):
        scene.RemoveNode(old)  # our own table of a previous result in this node
    return node


def _unused_color(scene, color) -> bool:
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLDisplayNode")):
        display = scene.GetNthNodeByClass(i, "vtkMRMLDisplayNode")
        if display.GetColorNodeID() == color.GetID():
            return False
    return True


def set_labelmap_colors(labelmap_node, color_node) -> None:
    """Display the labelmap with `color_node` (a display node is created if missing; creating it
    ourselves avoids the default 'Labels' table, which a bare MRML scene does not have)."""
    scene = labelmap_node.GetScene()
    display = labelmap_node.GetDisplayNode()
    if display is None:
        display = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeDisplayNode")
        display.SetAndObserveColorNodeID(color_node.GetID())
        labelmap_node.SetAndObserveDisplayNodeID(display.GetID())
    else:
        display.SetAndObserveColorNodeID(color_node.GetID())


def set_reference(node, pp_node=None, xp_node=None) -> None:
    """Remember the PP (and XP) image a labelmap/segmentation belongs to (saved with the scene)."""
    if pp_node is not None:
        node.SetNodeReferenceID(PP_REFERENCE, pp_node.GetID())
    if xp_node is not None:
        node.SetNodeReferenceID(XP_REFERENCE, xp_node.GetID())


# -- segmentations ------------------------------------------------------------------------------


def _segmentations_logic():
    return slicer.vtkSlicerSegmentationsModuleLogic


def labelmap_to_segmentation(labelmap_node, segmentation_node=None, name: str | None = None):
    """A segmentation with one segment per class, in class order, named and coloured as the
    labelmap's colour table; classes without pixels become empty segments."""
    scene = labelmap_node.GetScene()
    table = labelmap_class_table(labelmap_node)
    if segmentation_node is None:
        segmentation_node = scene.AddNewNodeByClass(
            "vtkMRMLSegmentationNode", name or f"{labelmap_node.GetName()}_Segmentation"
        )
    else:
        segmentation_node.GetSegmentation().RemoveAllSegments()
    segmentation_node.SetReferenceImageGeometryParameterFromVolumeNode(labelmap_node)
    if not _segmentations_logic().ImportLabelmapToSegmentationNode(labelmap_node, segmentation_node):
        raise ThinSegError(f"labelmap '{labelmap_node.GetName()}' could not be converted to a segmentation")
    segmentation = segmentation_node.GetSegmentation()
    by_name = {}
    for i in range(segmentation.GetNumberOfSegments()):
        segment_id = segmentation.GetNthSegmentID(i)
        by_name[segmentation.GetSegment(segment_id).GetName()] = segment_id
    for index, mineral in enumerate(table.classes):
        rgb = tuple(v / 255.0 for v in mineral.rgb)
        segment_id = by_name.get(mineral.name)
        if segment_id is None:
            segment_id = segmentation.AddEmptySegment(mineral.name, mineral.name, rgb)
        segment = segmentation.GetSegment(segment_id)
        segment.SetColor(*rgb)
        segmentation.SetSegmentIndex(segment_id, index)
    if segmentation_node.GetDisplayNode() is None:
        segmentation_node.CreateDefaultDisplayNodes()
    for key in (PP_REFERENCE, XP_REFERENCE):
        ref = labelmap_node.GetNodeReference(key)
        if ref is not None:
            segmentation_node.SetNodeReferenceID(key, ref.GetID())
    return segmentation_node


def segmentation_class_table(segmentation_node) -> ClassTable:
    """Segments in order as classes (names, colours)."""
    segmentation = segmentation_node.GetSegmentation()
    classes = []
    for i in range(segmentation.GetNumberOfSegments()):
        segment = segmentation.GetNthSegment(i)
        classes.append(MineralClass(segment.GetName(), rgb_to_hex([int(round(255 * v)) for v in segment.GetColor()])))
    names = [c.name for c in classes]
    if len(set(names)) != len(names):
        raise ThinSegError(
            f"segmentation '{segmentation_node.GetName()}' has segments with the same name; rename them first"
        )
    if len(classes) > 255:
        raise ThinSegError(
            f"segmentation '{segmentation_node.GetName()}' has {len(classes)} segments; at most 255 fit a labelmap"
        )
    return ClassTable(tuple(classes))


def segmentation_to_labelmap(segmentation_node, labelmap_node=None, reference=None, name: str | None = None):
    """A labelmap where value k = k-th segment (names and colours kept), on `reference`'s grid
    (default: the segmentation's reference geometry)."""
    scene = segmentation_node.GetScene()
    table = segmentation_class_table(segmentation_node)
    if labelmap_node is None:
        labelmap_node = scene.AddNewNodeByClass(
            "vtkMRMLLabelMapVolumeNode", name or f"{segmentation_node.GetName()}_Labels"
        )
    color = create_color_table(scene, f"{labelmap_node.GetName()}_ColorTable", table)
    set_labelmap_colors(labelmap_node, color)
    ids = vtk.vtkStringArray()
    segmentation = segmentation_node.GetSegmentation()
    for i in range(segmentation.GetNumberOfSegments()):
        ids.InsertNextValue(segmentation.GetNthSegmentID(i))
    ok = _segmentations_logic().ExportSegmentsToLabelmapNode(
        segmentation_node, ids, labelmap_node, reference, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY, color
    )
    if not ok:
        raise ThinSegError(f"segmentation '{segmentation_node.GetName()}' could not be exported to a labelmap")
    # The export names labels by segment name through `color`; make sure the display uses it.
    set_labelmap_colors(labelmap_node, color)
    for key in (PP_REFERENCE, XP_REFERENCE):
        ref = segmentation_node.GetNodeReference(key)
        if ref is not None:
            labelmap_node.SetNodeReferenceID(key, ref.GetID())
    return labelmap_node


def remove_node_and_colors(node) -> None:
    """Remove a temporary labelmap together with its colour table and display node."""
    if node is None or node.GetScene() is None:
        return
    scene = node.GetScene()
    display = node.GetDisplayNode()
    color = display.GetColorNode() if display is not None else None
    scene.RemoveNode(node)
    if color is not None and color.GetAttribute(CLASS_TABLE_ATTRIBUTE) is not None:
        scene.RemoveNode(color)
