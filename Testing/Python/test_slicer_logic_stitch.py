"""Stitching from the Slicer logic on a real MRML scene: 2 x 3 PP/XP tiles cut at known positions
-> stitchTiles -> "<name>_PP" / "<name>_XP" vector volumes whose voxels and IJK-to-RAS are the
netCDF's exactly, a tile table equal to stitch.json (positions the true ones up to one offset),
all in one folder; a cancel, a tile set with a PP tile missing its XP, a TIFF-only stitch and an
existing output folder add no node and leave nothing on disk; the parameter fields survive a
saved scene and an older scene gets their defaults."""

from __future__ import annotations

import shutil
import xml.etree.ElementTree as ET
from pathlib import Path

import netCDF4
import numpy as np
import pytest
import slicer
import vtk
from tile_sets import TileSetTruth, cut_tiles, source_shape_for, synthetic_source

from ThinSectionSegmentationLib import ThinSectionSegmentationLogic, hierarchy, stitch_nodes, volumes
from ThinSectionSegmentationLib.parameters import STITCH_FLAT_FIELDS, STITCH_LAYOUTS, get_parameter_node
from thinseg import jsonio
from thinseg.data.section_images import DEFAULT_MM_PER_PIXEL
from thinseg.errors import ThinSegError
from thinseg.io.netcdf import list_variables
from thinseg.pipelines.stitch import StitchOptions
from thinseg.stitching import Cancelled

ROWS, COLS, TILE, OVERLAP, JITTER = 2, 3, (300, 400), 0.2, 0.02
MM = 0.002
UI = Path(__file__).resolve().parents[2] / "ThinSectionSegmentation" / "Resources" / "UI" / "ThinSectionSegmentation.ui"


@pytest.fixture(scope="module")
def tile_set(tmp_path_factory) -> TileSetTruth:
    """Exact crops (no vignetting, no noise) of a generated section, named S1_r<row>_c<col>_PP/XP.png."""
    pp, xp = synthetic_source(source_shape_for(ROWS, COLS, TILE, OVERLAP, JITTER), seed=3)
    folder = tmp_path_factory.mktemp("tiles") / "S1 tiles"
    return cut_tiles(pp, xp, folder, rows=ROWS, cols=COLS, tile_shape=TILE, overlap=OVERLAP, jitter=JITTER, seed=3)


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


def node_ids(scene):
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def sh_items(scene):
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    ids = vtk.vtkIdList()
    sh.GetItemChildren(sh.GetSceneItemID(), ids, True)
    return sorted(ids.GetId(i) for i in range(ids.GetNumberOfIds()))


def column(table_node, name):
    array = table_node.GetTable().GetColumnByName(name)
    assert array is not None, f"{table_node.GetName()} has no column {name!r}"
    return [array.GetValue(r) for r in range(array.GetNumberOfTuples())]


def stitch(scene, tile_set, output, **kwargs):
    logic = ThinSectionSegmentationLogic(scene)
    return logic, logic.stitchTiles([tile_set.pp_paths[0].parent], output, overlap=OVERLAP, **kwargs)


def test_panoramas_are_the_netcdfs_voxels_on_its_grid_and_the_table_is_stitch_json(scene, tile_set, tmp_path):
    stages = []

    def progress(stage, pixels):
        stages.append(stage)
        return lambda done, total: None

    logic, out = stitch(scene, tile_set, tmp_path / "S1 out", pixelSize=MM, progress=progress)
    assert stages == ["S1: positions", "S1: blending"]
    assert out.name == "S1" and out.folder == tmp_path / "S1 out"
    assert sorted(out.files) == ["netcdf", "positions", "pp_tiff", "summary", "tile_map", "xp_tiff"]
    assert all(path.is_file() and path.parent == out.folder for path in out.files.values())
    assert out.summary == jsonio.read_json(out.files["summary"])
    assert (out.ppNode.GetName(), out.xpNode.GetName(), out.tableNode.GetName()) == ("S1_PP", "S1_XP", "S1 tiles")
    assert out.ppNode.IsA("vtkMRMLVectorVolumeNode") and out.xpNode.IsA("vtkMRMLVectorVolumeNode")

    height, width = out.summary["shape"]
    infos = {info.name: info for info in list_variables(out.files["netcdf"])}
    with netCDF4.Dataset(out.files["netcdf"]) as ds:
        for node, var in ((out.ppNode, "S1_PP"), (out.xpNode, "S1_XP")):
            stored = np.asarray(ds.variables[var][:])
            assert stored.shape == (1, height, width, 3)
            np.testing.assert_array_equal(volumes.volume_array(node), stored)  # voxel for voxel, in file order
            np.testing.assert_array_equal(volumes.ijk_to_ras_matrix(node), infos[var].geometry.matrix)
            assert volumes.section_grid(node).spacing_yx == pytest.approx((MM, MM), rel=1e-12)
            assert volumes.rgb_array(node).shape == (height, width, 3)

    tiles = out.summary["tiles"]
    assert len(tiles) == ROWS * COLS and out.tableNode.GetTable().GetNumberOfRows() == ROWS * COLS
    assert column(out.tableNode, "name") == [t["name"] for t in tiles]
    assert column(out.tableNode, "number") == [str(k + 1) for k in range(ROWS * COLS)]
    assert column(out.tableNode, "x") == [float(t["x"]) for t in tiles]
    assert column(out.tableNode, "y") == [float(t["y"]) for t in tiles]
    assert column(out.tableNode, "used") == column(out.tableNode, "linked") == [1] * (ROWS * COLS)
    assert column(out.tableNode, "pp") == [str(p) for p in tile_set.pp_paths]
    assert column(out.tableNode, "xp") == [str(p) for p in tile_set.xp_paths]
    assert out.tableNode.GetColumnUnitLabel("x") == "px"
    assert out.tableNode.GetAttribute("ThinSectionSegmentation.TileMap") == str(out.files["tile_map"])
    # the positions found are the true ones, up to the one offset of the panorama's corner
    by_name = {t["name"]: (t["y"], t["x"]) for t in tiles}
    found = np.array([by_name[p.name.replace("_PP.png", "")] for p in tile_set.pp_paths])
    offsets = found - tile_set.positions
    assert (offsets == offsets[0]).all(), offsets

    assert hierarchy.item_name(scene, out.hierarchyFolder) == "S1"
    assert hierarchy.children_nodes(scene, out.hierarchyFolder) == [out.ppNode, out.xpNode, out.tableNode]
    assert out.nodes == [out.ppNode, out.xpNode, out.tableNode]
    assert out.warnings == [] and logic.messages == []
    assert out.summary["layout"] == "grid from the tile names"  # the default: the names give a grid


def test_without_a_pixel_size_the_warning_reaches_the_messages(scene, tile_set, tmp_path):
    logic, out = stitch(scene, tile_set, tmp_path / "out")
    assert out.warnings == [f"no pixel size given (--pixel-size): the netCDF records {DEFAULT_MM_PER_PIXEL} mm"]
    assert logic.messages == out.warnings
    assert volumes.section_grid(out.ppNode).spacing_yx == pytest.approx((DEFAULT_MM_PER_PIXEL,) * 2, rel=1e-12)


@pytest.mark.parametrize("stage", ["positions", "blending"])
def test_cancelling_adds_no_node_and_leaves_nothing_on_disk(scene, tile_set, tmp_path, stage):
    items = sh_items(scene)  # makes the subject-hierarchy node first
    before = node_ids(scene)
    started = []

    def progress(name, pixels):
        started.append(name)
        return lambda done, total: None

    def cancelled():
        return any(name.endswith(stage) for name in started)

    output = tmp_path / "new" / "S1"  # its parent too is made by the stitch
    with pytest.raises(Cancelled):
        stitch(scene, tile_set, output, progress=progress, cancelled=cancelled)
    assert started[-1] == f"S1: {stage}"
    assert node_ids(scene) == before and sh_items(scene) == items
    assert list(tmp_path.iterdir()) == []


def test_a_failure_while_loading_removes_every_node_already_added(scene, tile_set, tmp_path, monkeypatch):
    def broken_table(*_args):
        raise RuntimeError("table broke")

    monkeypatch.setattr(stitch_nodes, "tile_table", broken_table)
    items = sh_items(scene)
    before = node_ids(scene)
    with pytest.raises(RuntimeError, match="^table broke$"):
        stitch(scene, tile_set, tmp_path / "out")
    assert node_ids(scene) == before and sh_items(scene) == items
    assert (tmp_path / "out" / "S1.nc").is_file()  # the finished stitch stays on disk


def test_a_pp_tile_without_its_xp_is_named_and_nothing_is_added(scene, tile_set, tmp_path):
    tiles = tmp_path / "tiles"
    shutil.copytree(tile_set.pp_paths[0].parent, tiles)
    (tiles / tile_set.xp_paths[4].name).unlink()
    before = node_ids(scene)
    with pytest.raises(ThinSegError) as raised:
        ThinSectionSegmentationLogic(scene).stitchTiles([tiles], tmp_path / "out")
    assert str(raised.value) == f"{tiles / tile_set.pp_paths[4].name}: PP tile without its XP tile (1 in all)"
    assert node_ids(scene) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiles"]


def test_a_tiff_only_stitch_is_refused_before_it_runs(scene, tile_set, tmp_path):
    options = StitchOptions([tile_set.pp_paths[0].parent], tmp_path / "out", formats=("tiff",))
    before = node_ids(scene)
    with pytest.raises(ThinSegError, match=r"^formats tiff: loading the panoramas into the scene needs the netCDF"):
        ThinSectionSegmentationLogic(scene).stitchTiles([], "", options=options)
    assert node_ids(scene) == before and list(tmp_path.iterdir()) == []


def test_an_existing_output_folder_is_replaced_only_when_asked(scene, tile_set, tmp_path):
    output = tmp_path / "out"
    output.mkdir()
    (output / "keep.txt").write_text("mine")
    before = node_ids(scene)
    with pytest.raises(ThinSegError, match=r"the output folder exists: pass --overwrite to replace it$"):
        stitch(scene, tile_set, output)
    assert node_ids(scene) == before and (output / "keep.txt").read_text() == "mine"
    _logic, out = stitch(scene, tile_set, output, overwrite=True, name="Section 7", layout="auto", flatField="none")
    assert not (output / "keep.txt").exists()
    assert (out.ppNode.GetName(), out.tableNode.GetName()) == ("Section 7_PP", "Section 7 tiles")
    # the panel's layout and flat-field settings reach the stitch
    assert out.summary["layout"] == "positions from the images alone"
    assert out.summary["flat_field"] == {"pp_strength": None, "xp_strength": None}


def test_missing_tiles_or_output_are_asked_for(scene, tile_set):
    logic = ThinSectionSegmentationLogic(scene)
    with pytest.raises(ThinSegError, match=r"^choose the tiles to stitch \(files or a folder\)$"):
        logic.stitchTiles([], "/tmp/out")
    with pytest.raises(ThinSegError, match=r"^choose the output folder of the stitch$"):
        logic.stitchTiles([tile_set.pp_paths[0].parent], "")


def test_stitch_parameters_survive_a_saved_scene_and_an_older_scene_gets_their_defaults(tmp_path):
    scene = slicer.vtkMRMLScene()
    params = get_parameter_node(scene)
    assert (params.stitchTileFolder, params.stitchOutputFolder, params.stitchOverlap) == ("", "", 0.15)
    assert (params.stitchFlatField, params.stitchLayout) == ("auto", "")
    params.stitchTileFolder, params.stitchOutputFolder = "/data/S1 tiles", "/data/S1 out"
    params.stitchOverlap, params.stitchFlatField, params.stitchLayout = 0.3, "/data/blank.tif", "auto"
    with pytest.raises(ValueError, match=r"^Value must be within range \[0.0, 0.89\], is 0.9$"):
        params.stitchOverlap = 0.9
    scene.SetURL(str(tmp_path / "stitch.mrml"))
    assert scene.Commit()
    loaded = slicer.vtkMRMLScene()
    loaded.SetURL(str(tmp_path / "stitch.mrml"))
    assert loaded.Import()
    again = get_parameter_node(loaded)
    assert (again.stitchTileFolder, again.stitchOutputFolder, again.stitchOverlap) == (
        "/data/S1 tiles",
        "/data/S1 out",
        0.3,
    )
    assert (again.stitchFlatField, again.stitchLayout) == ("/data/blank.tif", "auto")

    # a scene saved before stitching: the fields come with their defaults, the rest is kept
    params.epochs = 35
    for name in ("stitchTileFolder", "stitchOutputFolder", "stitchOverlap", "stitchFlatField", "stitchLayout"):
        params.parameterNode.UnsetParameter(name)
    scene.SetURL(str(tmp_path / "before-stitch.mrml"))
    assert scene.Commit()
    older = slicer.vtkMRMLScene()
    older.SetURL(str(tmp_path / "before-stitch.mrml"))
    assert older.Import()
    old = get_parameter_node(older)
    assert (old.stitchTileFolder, old.stitchOutputFolder, old.stitchOverlap, old.stitchFlatField, old.stitchLayout) == (
        "",
        "",
        0.15,
        "auto",
        "",
    )
    assert old.epochs == 35


def test_the_flat_field_and_layout_combo_boxes_have_a_row_per_choice_then_the_file_row():
    """The panel shows stitchFlatField / stitchLayout as the row of a choice, or the last row for a file."""
    combos = {w.get("name"): w for w in ET.parse(UI).getroot().iter("widget") if w.get("class") == "QComboBox"}
    for name, choices, file_row in (
        ("stitchFlatFieldComboBox", STITCH_FLAT_FIELDS, "Reference image..."),
        ("stitchLayoutComboBox", STITCH_LAYOUTS, "Tile-position file..."),
    ):
        items = [item.findtext("property/string") for item in combos[name].findall("item")]
        assert len(items) == len(choices) + 1 and items[-1] == file_row, items
    assert STITCH_FLAT_FIELDS == ("auto", "none") and STITCH_LAYOUTS == ("", "grid", "auto")
