"""Scene nodes <-> GeoSlicer netCDF files (the layout GeoSlicer writes and opens), no Qt.

Export writes one variable per node with the core's `NetcdfWriter` (the same writer as
`thinseg segment`): RGB vector volumes as (1, H, W, 3) uint8 on the shared `c` dimension,
labelmaps with `type="labelmap"`, the `labels` list of their colour table and `reference` = the
PP image's variable, segmentation nodes likewise with `type="segmentation"` (segment k ->
label k, names and colours kept), single-channel volumes as scalar images. x/y origins are
negated in the coordinates and `transform` holds the IJK-to-RAS matrix, as GeoSlicer does.

Import creates the matching nodes (vector volume, labelmap + colour table, segmentation,
scalar volume) in a subject-hierarchy folder named after the file, geometry from `transform`.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import thinseg
from thinseg.errors import ThinSegError
from thinseg.io.netcdf import NC_LOCK, NetcdfWriter, list_variables, open_netcdf_image, read_labelmap
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
    create_rgb_volume,
    create_scalar_volume,
    is_rgb_volume,
    label_array,
    require_thin_section_geometry,
    rgb_array,
    scalar_array,
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
    the pixel size in mm (default: the node's)."""
    wanted_names = names or {}
    spacing = spacing or {}
    nodes = [n for n in nodes if n is not None]
    if not nodes:
        raise ThinSegError("nothing to export: choose at least one image, labelmap or segmentation")
    unique = list({n.GetID(): n for n in nodes}.values())
    kinds = {n.GetID(): _kind(n) for n in unique}
    order = sorted(unique, key=lambda n: {"rgb": 0, "scalar": 1, "labelmap": 2, "segmentation": 2}[kinds[n.GetID()]])
    names = {}
    path = Path(path)
    file_attrs = {"thinseg_version": thinseg.__version__, **(attrs or {})}
    with NetcdfWriter(path, attrs=file_attrs) as writer:
        for node in order:
            kind, node_id = kinds[node.GetID()], node.GetID()
            var = wanted_names.get(node_id, node.GetName())
            if kind in ("rgb", "scalar"):
                g = require_thin_section_geometry(node, "image")
                mm = spacing.get(node_id, g.mm_per_pixel)
                if kind == "rgb":
                    names[node_id] = writer.add_rgb_image(var, rgb_array(node), mm, g.origin)
                else:
                    names[node_id] = writer.add_scalar_image(var, scalar_array(node), mm, g.origin)
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
        g = require_thin_section_geometry(labelmap, "labelmap")
        table = labelmap_class_table(labelmap)
        extra = {"kind": "segmentation"} if kind == "segmentation" else {}
        return writer.add_labelmap(
            var, label_array(labelmap), table, mm or g.mm_per_pixel, g.origin, reference=reference_var, **extra
        )
    finally:
        remove_node_and_colors(temporary)


# -- import -------------------------------------------------------------------------------------


@dataclass
class ImportedFile:
    """Nodes created from one file, in file order, plus the PP/XP images found by affix."""

    path: Path
    nodes: list = field(default_factory=list)
    pp: object | None = None
    xp: object | None = None
    skipped: list[str] = field(default_factory=list)  # "name: reason"
    folder: int = 0


def _read_scalar(path: Path, name: str) -> np.ndarray:
    # deferred: netCDF4/HDF5 load only when a file is imported; the panel opens without them
    import netCDF4

    with NC_LOCK:
        ds = netCDF4.Dataset(path, "r")
        try:
            ds.set_auto_maskandscale(False)
            return np.array(ds.variables[name][0])
        finally:
            ds.close()


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

    All data is read before any node is created, so a bad file leaves the scene unchanged."""
    path = Path(path)
    variables = list_variables(path)
    loaded = []  # (info, payload) read first: nothing is added to the scene if a read fails
    skipped = []
    for info in variables:
        if info.kind in ("table", "other"):
            skipped.append(f"{info.name}: {'table column' if info.kind == 'table' else 'not an image'}")
            continue
        if info.shape[0] != 1:
            skipped.append(f"{info.name}: {info.shape[0]} slices (thin sections are single images)")
            continue
        if info.kind == "vector":
            skipped.append(f"{info.name}: {info.shape[-1]}-channel {info.dtype} image (only RGB uint8 is imported)")
            continue
        if info.kind == "rgb":
            source = open_netcdf_image(path, info.name)
            try:
                payload = source.read(0, source.shape[0])
            finally:
                source.close()
        elif info.kind in ("labelmap", "segmentation"):
            payload = read_labelmap(path, info.name)
        else:
            payload = _read_scalar(path, info.name)
        loaded.append((info, payload))
    if not loaded:
        raise ThinSegError("holds no image, labelmap or segmentation to import", path)

    result = ImportedFile(path, skipped=skipped)
    result.folder = hierarchy.create_folder(scene, folder_name or path.stem)
    by_var = {}
    references = []
    for info, payload in loaded:
        spacing = info.mm_per_pixel or 1.0
        origin = info.origin_mm or (0.0, 0.0, 0.0)
        if info.kind == "rgb":
            node = create_rgb_volume(scene, info.name, payload, spacing, origin)
        elif info.kind == "scalar":
            node = create_scalar_volume(scene, info.name, payload, spacing, origin)
        else:
            labels, table, mm, lab_origin = payload
            labelmap = create_labelmap(scene, info.name, labels, table, mm or spacing, lab_origin or origin)
            if info.kind == "segmentation":
                node = labelmap_to_segmentation(labelmap, name=info.name)
                remove_node_and_colors(labelmap)
            else:
                node = labelmap
            ref = info.attrs.get("reference")
            if isinstance(ref, str) and ref:
                references.append((node, ref))
        node.SetAttribute(VARIABLE_ATTRIBUTE, info.name)
        node.SetAttribute(SOURCE_ATTRIBUTE, str(path))
        hierarchy.place(node, result.folder)
        by_var[info.name] = node
        result.nodes.append(node)
    result.pp, result.xp = find_pp_xp(result.nodes, pp_pattern, xp_patterns)
    for node, ref in references:
        pp_node = by_var.get(ref)
        if pp_node is not None:
            set_reference(node, pp_node, result.xp if pp_node is result.pp else None)
            if node.IsA("vtkMRMLSegmentationNode"):
                node.SetReferenceImageGeometryParameterFromVolumeNode(pp_node)
    return result


def referenced_images(node) -> tuple:
    """(PP, XP) nodes a labelmap/segmentation refers to (None where unknown)."""
    return node.GetNodeReference(PP_REFERENCE), node.GetNodeReference(XP_REFERENCE)
