"""Scene nodes <-> GeoSlicer netCDF files (the layout GeoSlicer writes and opens), no Qt.

Export writes one variable per node with the core's `NetcdfWriter` (the same writer as
`thinseg segment`): RGB vector volumes as (1, H, W, 3) uint8 on the shared `c` dimension,
labelmaps with `type="labelmap"`, the `labels` list of their colour table and `reference` = the
PP image's variable, segmentation nodes likewise with `type="segmentation"` (segment k ->
label k, names and colours kept), single-channel volumes as scalar images. Each node is
written as its picture (the photograph as Slicer shows it, `volumes.SectionGrid`) with the
picture's own IJK-to-RAS matrix in `transform` (x/y origins negated in the coordinates, as
GeoSlicer does), so every pixel opens at the RAS position it has in the scene whatever the
node's directions, flips, view or pixel shape; GeoSlicer's own thin-section nodes are written
exactly as GeoSlicer writes them.

Import does what GeoSlicer's import does: the voxels in file order, the `transform` matrix (else
the coordinates and diag(-1, -1, 1)) as IJK-to-RAS, edge padding of files without `transform`
cropped. Nodes go into a subject-hierarchy folder named after the file; a labelmap on its
reference image's grid gets exactly that image's IJK-to-RAS.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import vtk

import thinseg
from thinseg.classes.table import ClassTable
from thinseg.errors import ThinSegError
from thinseg.io.netcdf import (
    NC_LOCK,
    Geometry,
    NetcdfWriter,
    VariableInfo,
    list_variables,
    open_netcdf_image,
    padding_window,
    read_labelmap,
)
from thinseg.io.pairing import find_affix

from . import hierarchy
from .labelmaps import (
    PP_REFERENCE,
    XP_REFERENCE,
    create_labelmap,
    labelmap_class_table,
    labelmap_to_segmentation,
    remove_node_and_colors,
    segmentation_to_labelmap,
    set_reference,
)
from .volumes import (
    SectionGrid,
    create_rgb_volume,
    create_scalar_volume,
    ijk_to_ras_matrix,
    is_rgb_volume,
    label_array,
    rgb_array,
    scalar_array,
    section_grid,
    update_volume,
)

#: Node attribute recording the variable a node was imported from / exported to.
VARIABLE_ATTRIBUTE = "ThinSectionSegmentation.NetcdfVariable"
SOURCE_ATTRIBUTE = "ThinSectionSegmentation.NetcdfFile"


def _kind(node) -> str:
    if node.IsA("vtkMRMLSegmentationNode"):
        return "segmentation"
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        return "labelmap"
    if is_rgb_volume(node):
        return "rgb"
    if node.IsA("vtkMRMLScalarVolumeNode"):
        return "scalar"
    raise ThinSegError(
        f"node '{node.GetName()}' ({node.GetClassName()}) cannot be exported: only RGB images, scalar "
        "images, labelmaps and segmentations go to netCDF"
    )


def picture_geometry(grid: SectionGrid, mm_per_pixel: float | None = None) -> Geometry:
    """The grid of a node's picture as the writer stores it: the picture-to-RAS matrix, with
    square `mm_per_pixel` pixels instead of the node's when given (same directions, origin)."""
    matrix = grid.picture_to_ras.copy()
    if mm_per_pixel is not None:
        for axis in range(3):
            matrix[:3, axis] *= float(mm_per_pixel) / np.linalg.norm(matrix[:3, axis])
    return Geometry(matrix)


def export_nodes(
    nodes: Iterable,
    path: str | os.PathLike[str],
    attrs: dict | None = None,
    names: dict[str, str] | None = None,
    spacing: dict[str, float] | None = None,
) -> dict[str, str]:
    """Write `nodes` to one GeoSlicer netCDF file (all or nothing); returns node ID -> variable.

    Images are written first so that labelmaps can name their PP image as `reference`.
    `names` / `spacing` (by node ID) override the variable name (default: the node name) and
    the pixel size in mm (default: the node's own, square or not)."""
    wanted_names = names or {}
    spacing = spacing or {}
    nodes = [n for n in nodes if n is not None]
    if not nodes:
        raise ThinSegError("nothing to export: choose at least one image, labelmap or segmentation")
    unique = list({n.GetID(): n for n in nodes}.values())
    kinds = {n.GetID(): _kind(n) for n in unique}
    order = sorted(unique, key=lambda n: {"rgb": 0, "scalar": 1, "labelmap": 2, "segmentation": 2}[kinds[n.GetID()]])
    for node in order:  # geometry problems (no image, several slices, degenerate axes) before the file is started
        if kinds[node.GetID()] != "segmentation":
            section_grid(node, "image" if kinds[node.GetID()] in ("rgb", "scalar") else "labelmap")
    names = {}
    path = Path(path)
    file_attrs = {"thinseg_version": thinseg.__version__, **(attrs or {})}
    with NetcdfWriter(path, attrs=file_attrs) as writer:
        for node in order:
            kind, node_id = kinds[node.GetID()], node.GetID()
            var = wanted_names.get(node_id, node.GetName())
            if kind in ("rgb", "scalar"):
                geometry = picture_geometry(section_grid(node, "image"), spacing.get(node_id))
                if kind == "rgb":
                    names[node_id] = writer.add_rgb_image(var, rgb_array(node), geometry=geometry)
                else:
                    names[node_id] = writer.add_scalar_image(var, scalar_array(node), geometry=geometry)
            else:
                names[node_id] = _write_labels(writer, node, kind, names, var, spacing.get(node_id))
    return names


def _write_labels(writer: NetcdfWriter, node, kind: str, names: dict[str, str], var: str, mm: float | None) -> str:
    reference = node.GetNodeReference(PP_REFERENCE)
    reference_var = names.get(reference.GetID()) if reference is not None else None
    temporary = None
    labelmap = node
    if kind == "segmentation":
        temporary = segmentation_to_labelmap(node, reference=reference, name=f"{node.GetName()}_export")
        labelmap = temporary
    try:
        geometry = picture_geometry(section_grid(labelmap, "labelmap"), mm)
        table = labelmap_class_table(labelmap)
        extra = {"kind": "segmentation"} if kind == "segmentation" else {}
        return writer.add_labelmap(
            var, label_array(labelmap), table, reference=reference_var, geometry=geometry, **extra
        )
    finally:
        remove_node_and_colors(temporary)


@dataclass
class ImportedFile:
    """Nodes created from one file, in file order, plus the PP/XP images found by affix."""

    path: Path
    nodes: list = field(default_factory=list)
    pp: object | None = None
    xp: object | None = None
    skipped: list[str] = field(default_factory=list)  # "name: reason"
    folder: int = 0


def _read_scalar(path: Path, name: str, crop_padding: bool = False) -> np.ndarray:
    """A single-channel variable's (H, W) values; with `crop_padding`, the rows and columns
    GeoSlicer keeps on import (`padding_window`)."""
    # deferred: netCDF4/HDF5 load only when a file is imported; the panel opens without them
    import netCDF4

    window = padding_window(path, name) if crop_padding else None
    with NC_LOCK:
        ds = netCDF4.Dataset(path, "r")
        try:
            ds.set_auto_maskandscale(False)
            data = np.array(ds.variables[name][0])
        finally:
            ds.close()
    return data if window is None else data[window.y0 : window.y1, window.x0 : window.x1]


def find_pp_xp(nodes: Sequence, pp_pattern: str = "PP", xp_patterns: Sequence[str] = ("XP", "PX")) -> tuple:
    """The first RGB node whose name holds the PP affix (as a token), and the first other one
    holding an XP affix; (None, None) parts when absent."""
    rgb = [n for n in nodes if is_rgb_volume(n)]
    pp = next((n for n in rgb if find_affix(n.GetName(), pp_pattern)), None)
    xp = next((n for n in rgb if n is not pp and any(find_affix(n.GetName(), a) for a in xp_patterns if a)), None)
    return pp, xp


def import_netcdf(
    scene,
    path: str | os.PathLike[str],
    pp_pattern: str = "PP",
    xp_patterns: Sequence[str] = ("XP", "PX"),
    folder_name: str | None = None,
) -> ImportedFile:
    """Create nodes for every image, labelmap and segmentation of a GeoSlicer netCDF file.

    All data is read and checked before any node is created, and the nodes made before a
    failure are removed, so a bad file leaves the scene unchanged."""
    path = Path(path)
    variables = list_variables(path)
    loaded = []  # (info, voxels, class table, grid) read first: nothing is added if a read fails
    skipped = []
    for info in variables:
        if info.kind in ("table", "other"):
            skipped.append(f"{info.name}: {'table column' if info.kind == 'table' else 'not an image'}")
            continue
        if info.kind == "vector":
            skipped.append(f"{info.name}: {info.shape[-1]}-channel {info.dtype} image (only RGB uint8 is imported)")
            continue
        table = None
        if info.shape[0] != 1:
            if 1 not in info.shape[1:3]:
                skipped.append(f"{info.name}: {info.shape[0]} slices (thin sections are single images)")
                continue
            # a single slice along y or x: read as stored (GeoSlicer keeps such nodes in file order)
            voxels, table = _read_voxels(path, info)
            grid = info.geometry
        elif info.kind == "rgb":
            source = open_netcdf_image(path, info.name, crop_padding=True)
            try:
                voxels, grid = source.read(0, source.shape[0])[np.newaxis], source.geometry
            finally:
                source.close()
        elif info.kind in ("labelmap", "segmentation"):
            labels, table, _mm, _origin = read_labelmap(path, info.name, crop_padding=True)
            voxels, grid = labels[np.newaxis], _cropped_geometry(path, info)
        else:
            voxels, grid = _read_scalar(path, info.name, crop_padding=True)[np.newaxis], _cropped_geometry(path, info)
        if table is not None:
            _check_label_values(path, info.name, voxels, table)
        loaded.append((info, voxels, table, grid or Geometry.thin_section(1.0)))
    if not loaded:
        raise ThinSegError("holds no image, labelmap or segmentation to import", path)

    result = ImportedFile(path, skipped=skipped)
    existing = _node_ids(scene)
    try:
        _create_nodes(scene, path, loaded, result, folder_name or path.stem, pp_pattern, xp_patterns)
    except BaseException:
        _remove_added_nodes(scene, existing, result.folder)
        raise
    return result


def _create_nodes(
    scene, path: Path, loaded: list, result: ImportedFile, folder: str, pp_pattern: str, xp_patterns: Sequence[str]
) -> None:
    by_var: dict[str, object] = {}
    references = []
    created: dict[int, object] = {}
    # images first, so that labelmaps find the image they name (GeoSlicer imports in that order too)
    order = sorted(range(len(loaded)), key=lambda i: loaded[i][0].kind in ("labelmap", "segmentation"))
    for index in order:
        info, voxels, table, grid = loaded[index]
        ref = info.attrs.get("reference")
        node = _create_node(scene, info, voxels, table, grid, by_var.get(ref) if isinstance(ref, str) else None)
        if info.kind == "segmentation":
            labelmap = node
            node = labelmap_to_segmentation(labelmap, name=info.name)
            remove_node_and_colors(labelmap)
        if info.kind in ("labelmap", "segmentation") and isinstance(ref, str) and ref:
            references.append((node, ref))
        node.SetAttribute(VARIABLE_ATTRIBUTE, info.name)
        node.SetAttribute(SOURCE_ATTRIBUTE, str(path))
        by_var[info.name] = node
        created[index] = node
    result.folder = hierarchy.create_folder(scene, folder)
    for index in range(len(loaded)):  # the folder and the result list in file order
        hierarchy.place(created[index], result.folder)
        result.nodes.append(created[index])
    result.pp, result.xp = find_pp_xp(result.nodes, pp_pattern, xp_patterns)
    for node, ref in references:
        pp_node = by_var.get(ref)
        if pp_node is not None:
            set_reference(node, pp_node, result.xp if pp_node is result.pp else None)
            if node.IsA("vtkMRMLSegmentationNode"):
                node.SetReferenceImageGeometryParameterFromVolumeNode(pp_node)


def _node_ids(scene) -> set[str]:
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def _remove_added_nodes(scene, existing: set[str], folder: int) -> None:
    """Remove every node added since `existing` (the nodes made, their display and colour
    nodes), newest first, with their subject-hierarchy items and `folder`, so that a failed
    import leaves the scene as it was."""

    def added() -> list:
        nodes = [scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes())]
        return [n for n in nodes if n.GetID() not in existing]

    hierarchy.remove_items(scene, added(), folder)
    for node in reversed(added()):  # again: a subject-hierarchy node may have been made meanwhile
        if node.GetScene() is scene:
            scene.RemoveNode(node)


def _check_label_values(path: Path, name: str, labels: np.ndarray, table: ClassTable) -> None:
    """Every label value must name a class of the variable's `labels` list (value k = class k):
    checked while reading, before any node exists."""
    top = int(labels.max()) if labels.size else 0
    if top > len(table):
        listed = f"{len(table)} class{'es' if len(table) != 1 else ''}"
        raise ThinSegError(f"variable '{name}' holds label value {top} but its 'labels' attribute lists {listed}", path)


def _create_node(scene, info: VariableInfo, voxels: np.ndarray, table, grid: Geometry, reference):
    """The volume node of one variable (a labelmap for labelmaps and segmentations) as
    GeoSlicer's import makes it: voxels (z, y, x[, c]) in file order, the file's grid."""
    first = voxels.reshape((-1, voxels.shape[2]) + voxels.shape[3:])  # any 2-D view, replaced below
    if info.kind == "rgb":
        node = create_rgb_volume(scene, info.name, first, 1.0)
    elif info.kind == "scalar":
        node = create_scalar_volume(scene, info.name, first, 1.0)
    else:
        node = create_labelmap(scene, info.name, first, table, 1.0)
    update_volume(node, voxels)
    is_labels = info.kind in ("labelmap", "segmentation")
    _set_matrix(node, _labelmap_matrix(grid, node, reference) if is_labels else grid.matrix)
    return node


def _read_voxels(path: Path, info: VariableInfo) -> tuple[np.ndarray, ClassTable | None]:
    """A variable's stored (z, y, x[, c]) values, and the class table of a labelmap."""
    # deferred: netCDF4/HDF5 load only when a file is imported; the panel opens without them
    import netCDF4

    with NC_LOCK:
        ds = netCDF4.Dataset(path, "r")
        try:
            ds.set_auto_maskandscale(False)
            data = np.array(ds.variables[info.name][:])
        finally:
            ds.close()
    if data.dtype == np.int8 and str(info.attrs.get("_Unsigned", "")).lower() == "true":
        data = data.view(np.uint8)
    if info.kind not in ("labelmap", "segmentation"):
        return data, None
    if data.dtype.kind not in "iub" or (data.size and (data.min() < 0 or data.max() > 255)):
        raise ThinSegError(f"variable '{info.name}' has label values outside 0..255 ({data.dtype})", path)
    labels = info.attrs.get("labels")
    try:
        table = (
            ClassTable(())
            if labels is None or isinstance(labels, str)
            else ClassTable.from_geoslicer_labels([str(v) for v in np.atleast_1d(labels)])
        )
    except ValueError as error:
        raise ThinSegError(f"variable '{info.name}' has a malformed 'labels' attribute ({error})", path) from None
    return data.astype(np.uint8), table


def _cropped_geometry(path: Path, info: VariableInfo) -> Geometry | None:
    """The variable's grid after GeoSlicer's padding crop (the whole array when it has `transform`)."""
    if info.geometry is None:
        return None
    window = padding_window(path, info.name)
    return info.geometry.shifted(window.y0, window.x0)


def _labelmap_matrix(grid: Geometry, labelmap, reference) -> np.ndarray:
    """A labelmap's IJK-to-RAS: its reference image's exact matrix when the labelmap's voxels
    lie on that image's voxels (same extent, corner voxels within a thousandth of a pixel; the
    step across a single slice places nothing), else its own."""
    if reference is None or reference.GetImageData() is None:
        return grid.matrix
    dims = reference.GetImageData().GetDimensions()
    if dims != labelmap.GetImageData().GetDimensions():
        return grid.matrix
    matrix = ijk_to_ras_matrix(reference)
    corners = np.array([[*c, 1.0] for c in itertools.product(*[(0, n - 1) for n in dims])]).T
    pixel = min(float(np.linalg.norm(matrix[:3, a])) for a in range(3) if dims[a] > 1) if max(dims) > 1 else 1.0
    if np.allclose(matrix @ corners, grid.matrix @ corners, rtol=0, atol=1e-3 * pixel):
        return matrix
    return grid.matrix


def _set_matrix(node, matrix: np.ndarray) -> None:
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(matrix[r, c]))
    node.SetIJKToRASMatrix(m)


def referenced_images(node) -> tuple:
    """(PP, XP) nodes a labelmap/segmentation refers to (None where unknown)."""
    return node.GetNodeReference(PP_REFERENCE), node.GetNodeReference(XP_REFERENCE)
