"""Stitching in the scene (no Qt): microscope tiles -> `thinseg stitch`'s output folder -> the
PP and XP panoramas as vector volumes and a table of the tiles, in one subject-hierarchy folder.

The stitch runs in this process (threads read the tiles; no child process, which in the host
would start the host application). The panoramas come into the scene through the netCDF import
(`netcdf_nodes.import_netcdf`), so their voxels, pixel size and origin are exactly the netCDF's
`<name>_PP` / `<name>_XP` variables, as when the file is opened later. Loading therefore needs
the netCDF among the formats written; a stitch asked for TIFF only is refused before anything
runs. The tile map picture (tiles.png) stays in the output folder: its path is on the table node.

What is made: the folder "<name>" holding "<name>_PP", "<name>_XP" (when the tiles have XP) and
"<name> tiles" (one row per tile: number, name, x, y (top-left in panorama pixels, NaN for a
tile left out), linked, used, the PP and XP files), as stitch.json lists them. Either all of it
is added or none; a cancel leaves the scene as it was and nothing on disk.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import vtk

from thinseg.errors import ThinSegError
from thinseg.pipelines.stitch import ProgressFactory, StitchOptions, StitchResult, stitch_tiles

from . import hierarchy
from .netcdf_nodes import VARIABLE_ATTRIBUTE, import_netcdf

#: Columns of the tile table, named as stitch.json's tile keys: (name, unit).
TILE_COLUMNS = (
    ("number", ""),
    ("name", ""),
    ("x", "px"),
    ("y", "px"),
    ("linked", ""),
    ("used", ""),
    ("pp", ""),
    ("xp", ""),
)
#: Attribute on every node made, naming the stitch's output folder.
FOLDER_ATTRIBUTE = "ThinSectionSegmentation.StitchFolder"
#: Attribute on the tile table naming the tile map picture.
TILE_MAP_ATTRIBUTE = "ThinSectionSegmentation.TileMap"


@dataclass
class StitchNodes:
    """The nodes one stitch made, all under `folder` (a subject-hierarchy folder item)."""

    folder: int
    pp: Any
    xp: Any
    table: Any

    @property
    def nodes(self) -> list[Any]:
        """Every node made: the panoramas and the tile table."""
        return [n for n in (self.pp, self.xp, self.table) if n is not None]


@dataclass
class StitchRun:
    """A finished stitch: the core's result and the nodes it became."""

    result: StitchResult
    made: StitchNodes
    messages: list[str] = field(default_factory=list)


def require_netcdf(formats: Sequence[str]) -> None:
    """Loading the panoramas goes through the netCDF: refuse a TIFF-only stitch up front."""
    if "netcdf" not in formats:
        raise ThinSegError(
            f"formats {','.join(formats) or '(none)'}: loading the panoramas into the scene needs the netCDF "
            "(add 'netcdf'; the TIFFs can be written beside it), or run `thinseg stitch` for TIFF only"
        )


def tile_table(scene: Any, name: str, summary: dict[str, Any]) -> Any:
    """The table node "<name> tiles": stitch.json's tiles, one row each, in its order (the node
    is added to the scene once its columns are complete)."""
    tiles = summary["tiles"]
    node = scene.CreateNodeByClass("vtkMRMLTableNode")
    node.UnRegister(None)  # CreateNodeByClass returns a new reference in Python
    node.SetName(scene.GenerateUniqueName(f"{name} tiles"))
    table = node.GetTable()
    for key, _unit in TILE_COLUMNS:
        values = [t[key] for t in tiles]
        array: Any
        if key in ("x", "y"):
            array = vtk.vtkDoubleArray()  # NaN where a tile was left out (no position)
            for v in values:
                array.InsertNextValue(float("nan") if v is None else float(v))
        elif key in ("linked", "used"):
            array = vtk.vtkIntArray()
            for v in values:
                array.InsertNextValue(int(bool(v)))
        else:
            array = vtk.vtkStringArray()
            for v in values:
                array.InsertNextValue("" if v is None else str(v))
        array.SetName(key)
        table.AddColumn(array)
    table.Modified()
    node = scene.AddNode(node)
    for key, unit in TILE_COLUMNS:  # column properties live in the scene's table schema
        if unit:
            node.SetColumnUnitLabel(key, unit)
    node.SetColumnDescription("x", "left edge of the tile in the panorama (pixels)")
    node.SetColumnDescription("y", "top edge of the tile in the panorama (pixels)")
    node.SetColumnDescription("linked", "1: placed by measured overlaps with its neighbours")
    node.SetColumnDescription("used", "1: the tile is in the panorama")
    node.Modified()
    return node


def _remove(scene: Any, nodes: Sequence[Any], folder: int) -> None:
    hierarchy.remove_items(scene, nodes, folder)
    for node in reversed(list(nodes)):
        for display in [node.GetNthDisplayNode(i) for i in range(node.GetNumberOfDisplayNodes())]:
            if display is not None and display.GetScene() is scene:
                scene.RemoveNode(display)
        if node.GetScene() is scene:
            scene.RemoveNode(node)


def load_result(scene: Any, result: StitchResult) -> StitchNodes:
    """The panoramas (from the netCDF) and the tile table in a folder "<name>" at the top of
    the scene; on any failure everything made so far is removed again."""
    if "netcdf" not in result.files:
        raise ThinSegError("the stitch wrote no netCDF: loading the panoramas into the scene needs it", result.folder)
    imported = import_netcdf(scene, result.files["netcdf"], folder_name=result.name)
    by_var = {n.GetAttribute(VARIABLE_ATTRIBUTE): n for n in imported.nodes}
    made = StitchNodes(imported.folder, by_var.get(f"{result.name}_PP"), by_var.get(f"{result.name}_XP"), None)
    try:
        if made.pp is None:
            raise ThinSegError(f"holds no variable {result.name}_PP", result.files["netcdf"])
        made.table = tile_table(scene, result.name, result.summary)
        made.table.SetAttribute(TILE_MAP_ATTRIBUTE, str(result.files.get("tile_map", "")))
        hierarchy.place(made.table, made.folder)
        for node in imported.nodes + [made.table]:
            node.SetAttribute(FOLDER_ATTRIBUTE, str(result.folder))
    except BaseException:
        _remove(scene, imported.nodes + ([made.table] if made.table is not None else []), made.folder)
        raise
    return made


def stitch_into_scene(
    scene: Any,
    options: StitchOptions,
    progress: ProgressFactory | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> StitchRun:
    """Run the stitch (thinseg.stitching.Cancelled when `cancelled` says so: nothing is written
    and the scene is untouched) and load its output. An output folder whose parent this call
    made is removed again when the stitch does not finish."""
    require_netcdf(tuple(options.formats))
    output = Path(options.output)
    made_parents = [p for p in [output.parent, *output.parent.parents] if not p.exists()]
    try:
        result = stitch_tiles(options, progress=progress, cancel=cancelled)
    except BaseException:
        for parent in made_parents:  # innermost first; only empty folders this call made
            try:
                parent.rmdir()
            except OSError:
                break
        raise
    made = load_result(scene, result)
    messages = list(result.warnings)
    return StitchRun(result, made, messages)
