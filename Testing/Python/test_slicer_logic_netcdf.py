"""MRML logic on a real scene: export nodes to GeoSlicer netCDF and import such files back.

The file layout is checked against GeoSlicer's netCDF layout with xarray/netCDF4
(per-variable z/y/x dims, shared `c`, x/y origins negated, `transform`, `labels`, `type`,
`reference`); the round trip is exact for pixels, geometry, names and colours."""

import netCDF4
import numpy as np
import pytest
import slicer
import vtk
from helpers import open_nc, write_geoslicer_netcdf

from ThinSectionSegmentationLib import ThinSectionSegmentationLogic, hierarchy, labelmaps, netcdf_nodes, volumes
from thinseg.classes.files import default_class_table
from thinseg.errors import ThinSegError

SPACING = 0.00132
ORIGIN = (1.25, -0.75, 0.5)


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


def section(scene, name="S1", h=6, w=9):
    rng = np.random.default_rng(1)
    pp = volumes.create_rgb_volume(
        scene, f"{name}_PP", rng.integers(0, 256, (h, w, 3), dtype=np.uint8), SPACING, ORIGIN
    )
    xp = volumes.create_rgb_volume(
        scene, f"{name}_XP", rng.integers(0, 256, (h, w, 3), dtype=np.uint8), SPACING, ORIGIN
    )
    labels = np.zeros((h, w), np.uint8)
    labels[:3, :4], labels[3:, 4:], labels[0, -1] = 1, 4, 6
    lab = labelmaps.create_labelmap(scene, f"{name}_Segmentation", labels, default_class_table(), reference=pp)
    labelmaps.set_reference(lab, pp, xp)
    return pp, xp, lab, labels


def matrix(node):
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def test_export_writes_the_geoslicer_layout(scene, tmp_path):
    import xarray as xr

    pp, xp, lab, labels = section(scene)
    seg = labelmaps.labelmap_to_segmentation(lab, name="S1_Segments")
    conf = volumes.create_scalar_volume(
        scene, "S1_Confidence", np.arange(54, dtype=np.uint8).reshape(6, 9), SPACING, ORIGIN
    )
    path = tmp_path / "S1.nc"
    names = ThinSectionSegmentationLogic(scene).exportNetcdf([lab, seg, conf, pp, xp], path)
    assert names[pp.GetID()] == "S1_PP" and names[lab.GetID()] == "S1_Segmentation"
    with xr.open_dataset(path) as ds:
        assert ds["S1_PP"].dims == ("z_S1_PP", "y_S1_PP", "x_S1_PP", "c")
        assert list(ds["c"].values) == ["r", "g", "b"]
        assert ds["S1_PP"].dtype == np.uint8 and ds["S1_PP"].shape == (1, 6, 9, 3)
        assert np.array_equal(ds["S1_PP"].values[0], volumes.rgb_array(pp))
        # x and y coordinates are the negated RAS origin, z is not
        assert ds["x_S1_PP"].values[0] == pytest.approx(-ORIGIN[0])
        assert ds["y_S1_PP"].values[0] == pytest.approx(-ORIGIN[1])
        assert ds["z_S1_PP"].values[0] == pytest.approx(ORIGIN[2])
        assert np.diff(ds["x_S1_PP"].values) == pytest.approx(np.full(8, SPACING))
        assert np.allclose(np.asarray(ds["S1_PP"].attrs["transform"]).reshape(4, 4), matrix(pp))
        attrs = ds["S1_Segmentation"].attrs
        assert attrs["type"] == "labelmap" and attrs["reference"] == "S1_PP"
        assert list(attrs["labels"]) == default_class_table().geoslicer_labels()
        assert np.array_equal(ds["S1_Segmentation"].values[0], labels)
        assert ds["S1_Segments"].attrs["type"] == "segmentation"
        assert np.array_equal(ds["S1_Segments"].values[0], labels)
        assert "c" not in ds["S1_Confidence"].dims and "type" not in ds["S1_Confidence"].attrs


def test_export_then_import_round_trips_exactly(scene, tmp_path):
    pp, xp, lab, labels = section(scene)
    seg = labelmaps.labelmap_to_segmentation(lab, name="S1_Segments")
    logic = ThinSectionSegmentationLogic(scene)
    logic.exportNetcdf([pp, xp, lab, seg], tmp_path / "S1.nc")

    other = slicer.vtkMRMLScene()
    logic2 = ThinSectionSegmentationLogic(other)
    result = logic2.importNetcdf(tmp_path / "S1.nc")
    nodes = result.nodes
    by_name = {n.GetName(): n for n in nodes}
    assert set(by_name) == {"S1_PP", "S1_XP", "S1_Segmentation", "S1_Segments"}
    assert by_name["S1_PP"].IsA("vtkMRMLVectorVolumeNode")
    assert by_name["S1_Segmentation"].IsA("vtkMRMLLabelMapVolumeNode")
    assert by_name["S1_Segments"].IsA("vtkMRMLSegmentationNode")
    for name, original in (("S1_PP", pp), ("S1_XP", xp)):
        assert np.array_equal(volumes.rgb_array(by_name[name]), volumes.rgb_array(original))
        assert np.allclose(matrix(by_name[name]), matrix(original), rtol=1e-12, atol=0)
    imported = by_name["S1_Segmentation"]
    assert np.array_equal(volumes.label_array(imported), labels)
    assert np.allclose(matrix(imported), matrix(lab))
    assert labelmaps.labelmap_class_table(imported) == default_class_table()
    assert labelmaps.segmentation_class_table(by_name["S1_Segments"]) == default_class_table()
    assert np.array_equal(volumes.label_array(labelmaps.segmentation_to_labelmap(by_name["S1_Segments"])), labels)
    # PP/XP found by affix, references restored, everything in a folder named after the file
    assert result.pp is by_name["S1_PP"] and result.xp is by_name["S1_XP"]
    assert imported.GetNodeReference(labelmaps.PP_REFERENCE) is by_name["S1_PP"]
    assert imported.GetNodeReference(labelmaps.XP_REFERENCE) is by_name["S1_XP"]
    folder = result.folder
    assert hierarchy.item_name(other, folder) == "S1"
    assert all(hierarchy.parent_item(n) == folder for n in nodes)


def test_geoslicer_files_with_px_naming_and_scalars_import(scene, tmp_path):
    rng = np.random.default_rng(2)
    pp, px = (rng.integers(0, 256, (5, 6, 3), dtype=np.uint8) for _ in range(2))
    labels = np.zeros((5, 6), np.uint8)
    labels[2:, :3] = 3
    path = write_geoslicer_netcdf(
        tmp_path / "gs.nc",
        {"ABC_3200_PP": pp, "ABC_3200_PX": px},
        labelmaps={"ABC_3200_labels": labels},
        scalars={"porosity": np.ones((5, 6), np.float32)},
        origin_mm=(2.0, 3.0, 0.0),
    )
    logic = ThinSectionSegmentationLogic(scene)
    result = logic.importNetcdf(path)
    assert result.pp.GetName() == "ABC_3200_PP" and result.xp.GetName() == "ABC_3200_PX"
    scalar = next(n for n in result.nodes if n.GetName() == "porosity")
    assert scalar.IsA("vtkMRMLScalarVolumeNode") and volumes.scalar_array(scalar).dtype == np.float32
    assert np.array_equal(volumes.rgb_array(result.xp), px)
    assert result.pp.GetOrigin() == (2.0, 3.0, 0.0)


def test_a_bad_file_leaves_the_scene_unchanged(scene, tmp_path):
    bad = tmp_path / "broken.nc"
    bad.write_bytes(b"not a netCDF file at all")
    before = scene.GetNumberOfNodes()
    with pytest.raises(ThinSegError, match="not a readable netCDF file"):
        ThinSectionSegmentationLogic(scene).importNetcdf(bad)
    with pytest.raises(ThinSegError, match="file not found"):
        ThinSectionSegmentationLogic(scene).importNetcdf(tmp_path / "missing.nc")
    assert scene.GetNumberOfNodes() == before


def test_label_values_past_the_labels_list_are_refused_before_any_node_is_made(scene, tmp_path):
    labels = np.zeros((5, 6), np.uint8)
    labels[1:3, 2:] = 6
    path = write_geoslicer_netcdf(
        tmp_path / "short.nc", {"S1_PP": np.full((5, 6, 3), 90, np.uint8)}, labelmaps={"S1_labels": labels}
    )
    with netCDF4.Dataset(path, "a") as ds:  # a colour table of one class, as a hand-edited file may have
        ds.variables["S1_labels"].setncattr("labels", ["Name,Index,Color", "Quartz,1,#ff0000"])
    hierarchy.create_folder(scene, "already there")  # the scene's own subject hierarchy, as in Slicer
    before, items = scene.GetNumberOfNodes(), subject_items(scene)
    with pytest.raises(ThinSegError) as error:
        ThinSectionSegmentationLogic(scene).importNetcdf(path)
    assert str(error.value) == (
        f"{path}: variable 'S1_labels' holds label value 6 but its 'labels' attribute lists 1 class"
    )
    assert scene.GetNumberOfNodes() == before and subject_items(scene) == items


def test_a_failure_while_making_nodes_removes_the_nodes_already_made(scene, tmp_path, monkeypatch):
    rng = np.random.default_rng(4)
    labels = np.zeros((5, 6), np.uint8)
    labels[2:, :3] = 3
    path = write_geoslicer_netcdf(
        tmp_path / "gs.nc",
        {"S1_PP": rng.integers(0, 256, (5, 6, 3), np.uint8), "S1_XP": rng.integers(0, 256, (5, 6, 3), np.uint8)},
        labelmaps={"S1_labels": labels},
    )
    section(scene)  # nodes that must stay
    hierarchy.create_folder(scene, "already there")
    before, ids, items = scene.GetNumberOfNodes(), node_ids(scene), subject_items(scene)
    real = netcdf_nodes.set_reference
    # a fault after every node and the folder are made
    monkeypatch.setattr(netcdf_nodes, "set_reference", lambda *a: (real(*a), 1 / 0))
    with pytest.raises(ZeroDivisionError):
        ThinSectionSegmentationLogic(scene).importNetcdf(path)
    assert scene.GetNumberOfNodes() == before and node_ids(scene) == ids and subject_items(scene) == items
    monkeypatch.undo()
    result = ThinSectionSegmentationLogic(scene).importNetcdf(path)  # the same file imports once the fault is gone
    assert [n.GetName() for n in result.nodes] == ["S1_PP", "S1_XP", "S1_labels"]
    assert np.array_equal(volumes.label_array(result.nodes[2]), labels)


def node_ids(scene) -> list[str]:
    return [scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())]


def subject_items(scene) -> list[str]:
    """Names of every subject-hierarchy item, folders included."""
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    ids = vtk.vtkIdList()
    sh.GetItemChildren(sh.GetSceneItemID(), ids, True)
    return [sh.GetItemName(ids.GetId(i)) for i in range(ids.GetNumberOfIds())]


def test_export_refuses_what_geoslicer_cannot_store_and_leaves_no_file(scene, tmp_path):
    pp, _xp, _lab, _labels = section(scene)
    stack = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "stack")
    volumes.update_volume(stack, np.zeros((3, 4, 5, 3), np.uint8))
    with pytest.raises(ThinSegError, match="'stack' has 3 slices"):
        ThinSectionSegmentationLogic(scene).exportNetcdf([stack], tmp_path / "x.nc")
    model = scene.AddNewNodeByClass("vtkMRMLModelNode", "surface")
    with pytest.raises(ThinSegError, match="cannot be exported"):
        ThinSectionSegmentationLogic(scene).exportNetcdf([model], tmp_path / "x.nc")
    with pytest.raises(ThinSegError, match="nothing to export"):
        ThinSectionSegmentationLogic(scene).exportNetcdf([], tmp_path / "x.nc")
    assert list(tmp_path.iterdir()) == []


def test_exported_labelmap_reads_back_with_the_core_reader(scene, tmp_path):
    from thinseg.io.netcdf import find_image_variable, read_labelmap

    pp, xp, lab, labels = section(scene, name="W7")
    path = tmp_path / "w7.nc"
    ThinSectionSegmentationLogic(scene).exportNetcdf([pp, xp, lab], path)
    got, table, mm, origin = read_labelmap(path, "W7_Segmentation")
    assert np.array_equal(got, labels) and table == default_class_table()
    assert mm == pytest.approx(SPACING) and origin == pytest.approx(ORIGIN)
    assert find_image_variable(path, "PP") == "W7_PP" and find_image_variable(path, "XP") == "W7_XP"
    with open_nc(path) as ds:
        assert ds.variables["W7_Segmentation"].filters()["zlib"]
