"""Files written by GeoSlicer's own exporter, segmented here, imported back by GeoSlicer's own importer.

GeoSlicer 2.8.9's netcdf.py runs unmodified on a real MRML scene (slicer-core); the nodes it
exports are built the way GeoSlicer holds thin sections (RGB vector volumes, IJK-to-RAS with
its directions). Each test checks a case that used to come out wrong without a word:
- the 255 padding of a "same coordinate system" export: cropped as GeoSlicer crops it on
  import, never segmented nor counted; outputs on the cropped image's own grid;
- a file holding several sections: each one segmented into its own output (or the one chosen);
- class names GeoSlicer's "Name,Index,Color" parser would misread: refused, naming the class;
- non-square pixels: resampled per axis, labels back on the input grid, said in one line;
- geometry: the labelmap GeoSlicer imports has the PP node's IJK-to-RAS and extent exactly.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import slicer
import vtk
import xarray as xr
from geoslicer_reference import geoslicer_netcdf
from helpers import make_bundle, open_nc, read_csv, run_main, section_images, tiny_network

from thinseg.classes.files import default_class_table
from thinseg.classes.table import ClassTable
from thinseg.errors import ThinSegError
from thinseg.inference.engine import InferenceOptions, Segmenter
from thinseg.inference.resample import ResampledSource, labels_to_grid
from thinseg.io.images import ArraySource
from thinseg.io.netcdf import NetcdfWriter, list_variables, padding_window, read_labelmap
from thinseg.model.bundle import load_bundle, save_bundle
from thinseg.pipelines.segment import SegmentOptions, segment_files

MM = 0.01  # GeoSlicer's default thin-section pixel size; the tiny models run at it (no resampling)
TABLE = default_class_table()
INFERENCE = InferenceOptions(device="cpu")


# ---------------------------------------------------------------------------------------------
# scene, GeoSlicer export/import, models


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models") / "ThinSectionEnv"
    return {
        "ppxp": make_bundle(root / "tiny-pp-xp", inputs=("PP", "PX"), pixels_per_mm=1 / MM, title="tiny PP+XP"),
        "pp": make_bundle(root / "tiny-pp", inputs=("PP",), seed=1, pixels_per_mm=1 / MM, title="tiny PP"),
    }


def rgb_node(scene, name: str, rgb: np.ndarray, matrix: np.ndarray):
    """An RGB vector volume as GeoSlicer holds a PP/XP image: (1, H, W, 3) uint8, IJK-to-RAS `matrix`."""
    node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(rgb[None]))
    node.SetIJKToRASMatrix(vtk_matrix(matrix))
    node.CreateDefaultDisplayNodes()
    return node


def labelmap_node(scene, name: str, labels: np.ndarray, table: ClassTable, matrix: np.ndarray, reference=None):
    """A labelmap node with a colour table (entry k = class k), referring to its image as GeoSlicer does."""
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", name)
    slicer.util.updateVolumeFromArray(node, np.ascontiguousarray(labels[None]))
    node.SetIJKToRASMatrix(vtk_matrix(matrix))
    node.CreateDefaultDisplayNodes()
    colors = scene.AddNewNodeByClass("vtkMRMLColorTableNode", f"{name}_ColorTable")
    colors.SetTypeToUser()
    colors.SetNumberOfColors(len(table) + 1)
    colors.SetColor(0, "Background", 0, 0, 0, 0)
    for k, (class_name, rgb) in enumerate(zip(table.names, table.lut()[1:]), 1):
        colors.SetColor(k, class_name, *(c / 255 for c in rgb), 1.0)
    node.GetDisplayNode().SetAndObserveColorNodeID(colors.GetID())
    if reference is not None:
        node.SetNodeReferenceID(
            slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole(), reference.GetID()
        )
    return node


def thin_section_matrix(spacing_xy=(MM, MM), origin=(0.0, 0.0, 0.0), directions=(-1, -1, 1), z_spacing=1.0):
    sx, sy = spacing_xy
    m = np.diag([directions[0] * sx, directions[1] * sy, directions[2] * z_spacing, 1.0])
    m[:3, 3] = origin
    return m


def vtk_matrix(m: np.ndarray) -> vtk.vtkMatrix4x4:
    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(m[r, c]))
    return out


def ijk_to_ras(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def array_of(node) -> np.ndarray:
    return np.asarray(slicer.util.arrayFromVolume(node))[0]


def geoslicer_export(scene, path: Path, nodes, reference=None, same_grid: bool = False) -> Path:
    """GeoSlicer's exportNetcdf: per-image coordinates, or one grid for all ("same coordinate system")."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with geoslicer_netcdf(scene) as geoslicer:
        geoslicer.exportNetcdf(str(path), list(nodes), referenceItem=reference, single_coords=same_grid)
    return path


def geoslicer_import(path: Path) -> dict[str, object]:
    """GeoSlicer's import_file on a fresh scene: variable name -> node."""
    scene = slicer.vtkMRMLScene()
    with geoslicer_netcdf(scene) as geoslicer:
        nodes = geoslicer.import_file(Path(path))
    return {node.GetName(): node for node in nodes}


def segment(paths, models, key: str, output: Path, **options) -> object:
    run = segment_files([str(p) for p in paths], SegmentOptions(inference=INFERENCE, **options), output, models[key])
    assert not run.failed, run.failed
    return run


def engine_labels(models, key: str, images, factor=None) -> np.ndarray:
    """The engine run directly on the arrays (at `factor` and back): what the outputs must hold."""
    segmenter = Segmenter(load_bundle(models[key]), INFERENCE)
    sources = [ArraySource(np.ascontiguousarray(a)) for a in images]
    if factor is None:
        return segmenter.segment(sources).labels
    small = segmenter.segment([ResampledSource(s, factor) for s in sources]).labels
    return labels_to_grid(small, images[0].shape[:2])


def assert_same_grid(node, reference) -> None:
    """Same IJK-to-RAS matrix and the same extent: the labelmap lies exactly on its image."""
    np.testing.assert_allclose(ijk_to_ras(node), ijk_to_ras(reference), rtol=1e-12, atol=1e-12)
    assert node.GetImageData().GetDimensions() == reference.GetImageData().GetDimensions()


# ---------------------------------------------------------------------------------------------
# 1. padding of a "same coordinate system" export


def test_padding_of_a_same_grid_export_is_cropped_as_geoslicer_does(scene, tmp_path, models):
    pp, xp = section_images(30, 40, seed=11)
    xp_big = section_images(40, 50, seed=12)[1]  # a larger XP photograph around the PP field
    xp_big[5:35, 5:45] = xp  # ... showing the PP field at rows 5-34, columns 5-44
    origin = (1.0, 2.0, 0.0)
    pp_node = rgb_node(scene, "S1_PP", pp, thin_section_matrix(origin=origin))
    xp_node = rgb_node(scene, "S1_XP", xp_big, thin_section_matrix(origin=(1.0 + 5 * MM, 2.0 + 5 * MM, 0.0)))
    source = geoslicer_export(scene, tmp_path / "in" / "well.nc", [pp_node, xp_node], pp_node, same_grid=True)

    with xr.open_dataset(source) as ds:  # one 40x50 grid; PP padded with 255 on every side
        assert ds["S1_PP"].dims == ("z", "y", "x", "c") and "transform" not in ds["S1_PP"].attrs
        stored = ds["S1_PP"].values[0]
    padding = int((stored == 255).all(axis=-1).sum())
    assert stored.shape == (40, 50, 3) and padding == 40 * 50 - 30 * 40 == 800
    window = padding_window(source, "S1_PP")
    assert tuple(window) == (5, 35, 5, 45)
    np.testing.assert_array_equal(stored[5:35, 5:45], pp)

    run = segment([source], models, "ppxp", tmp_path / "out")
    out = run.results[0].netcdf
    assert out == tmp_path / "out" / "well.nc"
    assert any("800 pixels of padding" in m and "40x30 px of 50x40" in m for m in run.results[0].messages)
    with open_nc(out) as ds:
        labels = np.asarray(ds.variables["well_Segmentation"][0])
    # only the PP field was segmented, with the XP over the same pixels
    assert labels.shape == (30, 40)
    np.testing.assert_array_equal(labels, engine_labels(models, "ppxp", (pp, xp)))
    rows = read_csv(tmp_path / "out" / "modal_mineralogy.csv")
    counted = sum(int(r["pixels"]) for r in rows)  # "not classified" included: the section, no padding
    assert counted == labels.size == 30 * 40
    assert sum(int(r["pixels"]) for r in rows if r["class"] != "not classified") == int((labels > 0).sum())

    # GeoSlicer imports the output: the labelmap lies exactly on the PP node it imports from
    # the input file, which is the original PP node's grid
    from_input, from_output = geoslicer_import(source), geoslicer_import(out)
    assert_same_grid(from_output["well_Segmentation"], from_input["S1_PP"])
    np.testing.assert_allclose(ijk_to_ras(from_output["well_Segmentation"]), ijk_to_ras(pp_node), atol=1e-12)
    np.testing.assert_array_equal(array_of(from_output["well_Segmentation"]), labels)
    for name in ("S1_PP", "S1_XP"):
        assert_same_grid(from_output[name], from_input[name])
    np.testing.assert_array_equal(array_of(from_output["S1_PP"]), pp)
    role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    assert from_output["well_Segmentation"].GetNodeReference(role) is from_output["S1_PP"]


def test_padding_crop_keeps_white_data_and_reads_labelmaps_as_geoslicer(scene, tmp_path):
    """Only whole edge rows/columns of the fill value go (GeoSlicer's rule, also for a white
    edge of the data itself); labels use 0; an all-padding array is kept whole."""
    image = np.full((6, 8, 3), 90, np.uint8)
    image[0] = 255  # a white first row of the data: GeoSlicer crops it too
    image[3, 0] = 255  # a white pixel inside is data
    labels = np.zeros((6, 8), np.uint8)
    labels[2:4, 3:7] = 2
    other = np.full((10, 12, 3), 40, np.uint8)
    pp = rgb_node(scene, "P_PP", image, thin_section_matrix(origin=(0.0, 0.0, 0.0)))
    big = rgb_node(scene, "P_other", other, thin_section_matrix(origin=(0.02, 0.03, 0.0)))
    lab = labelmap_node(scene, "P_Manual", labels, TABLE, thin_section_matrix(origin=(0.0, 0.0, 0.0)), pp)
    path = geoslicer_export(scene, tmp_path / "p.nc", [pp, big, lab], pp, same_grid=True)
    imported = geoslicer_import(path)
    infos = {v.name: v for v in list_variables(path)}
    assert all(infos[n].on_shared_grid for n in ("P_PP", "P_other", "P_Manual"))

    window = padding_window(path, "P_PP")
    assert window.shape == array_of(imported["P_PP"]).shape[:2] == (5, 8)
    read, table, mm, origin = read_labelmap(path, "P_Manual", crop_padding=True)
    np.testing.assert_array_equal(read, array_of(imported["P_Manual"]))
    assert read.shape == (2, 4) and table == TABLE
    np.testing.assert_allclose(origin, ijk_to_ras(imported["P_Manual"])[:3, 3], atol=1e-12)
    assert mm == pytest.approx(MM)
    assert tuple(padding_window(path, "P_other")) == (0, 10, 0, 12)  # no padding: whole

    blank = rgb_node(scene, "B_PP", np.full((4, 5, 3), 255, np.uint8), thin_section_matrix())
    path = geoslicer_export(scene, tmp_path / "blank.nc", [blank], blank, same_grid=True)
    assert tuple(padding_window(path, "B_PP")) == (0, 4, 0, 5)  # all padding: kept whole, as GeoSlicer does
    assert array_of(geoslicer_import(path)["B_PP"]).shape == (4, 5, 3)


# ---------------------------------------------------------------------------------------------
# 2. several sections in one file


def _two_sections(scene, folder: Path, same_grid: bool = False):
    images = {}
    nodes = []
    for k, (name, origin) in enumerate((("S1", (0.0, 0.0, 0.0)), ("S2", (3.0, -1.0, 0.0)))):
        pp, xp = section_images(24 + 8 * k, 36, seed=20 + k)
        images[name] = (pp, xp)
        nodes += [
            rgb_node(scene, f"{name}_PP", pp, thin_section_matrix(origin=origin)),
            rgb_node(scene, f"{name}_XP", xp, thin_section_matrix(origin=origin)),
        ]
    path = geoslicer_export(scene, folder / "two.nc", nodes, nodes[0], same_grid=same_grid)
    return path, images, nodes


@pytest.mark.parametrize("same_grid", [False, True], ids=["per-image-coords", "same-coordinate-system"])
def test_every_section_of_a_file_is_segmented_into_its_own_output(scene, tmp_path, models, same_grid):
    path, images, nodes = _two_sections(scene, tmp_path / "in", same_grid)
    run = segment([path], models, "ppxp", tmp_path / "out")
    assert [r.section.name for r in run.results] == ["S1", "S2"]
    assert [r.netcdf.name for r in run.results] == ["S1.nc", "S2.nc"]
    by_name = {n.GetName(): n for n in nodes}
    for result in run.results:
        name = result.section.name
        with open_nc(result.netcdf) as ds:
            labels = np.asarray(ds.variables[f"{name}_Segmentation"][0])
            assert sorted(v for v in ds.variables if "_" in v and not v.startswith(("x_", "y_", "z_"))) == [
                f"{name}_PP",
                f"{name}_Segmentation",
                f"{name}_XP",
            ]
        np.testing.assert_array_equal(labels, engine_labels(models, "ppxp", images[name]))
        imported = geoslicer_import(result.netcdf)
        assert_same_grid(imported[f"{name}_Segmentation"], imported[f"{name}_PP"])
        np.testing.assert_allclose(
            ijk_to_ras(imported[f"{name}_Segmentation"])[:3, 3], ijk_to_ras(by_name[f"{name}_PP"])[:3, 3], atol=1e-9
        )
    rows = read_csv(tmp_path / "out" / "modal_mineralogy.csv")
    assert sorted({r["section"] for r in rows}) == ["S1", "S2"]


def test_one_section_of_a_file_can_be_chosen(scene, tmp_path, models, capsys):
    path, images, _ = _two_sections(scene, tmp_path / "in")
    code, _, stderr = run_main(
        capsys, "segment", path, "--section", "S2", "--model", models["ppxp"], "--output", tmp_path / "out", "-q"
    )
    assert code == 0, stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nc")) == ["S2.nc"]
    with open_nc(tmp_path / "out" / "S2.nc") as ds:
        labels = np.asarray(ds.variables["S2_Segmentation"][0])
    np.testing.assert_array_equal(labels, engine_labels(models, "ppxp", images["S2"]))

    # one output file for a file of two sections: refused, naming them and the way out
    code, _, stderr = run_main(capsys, "segment", path, "--model", models["ppxp"], "--output", tmp_path / "one.nc")
    assert code == 2 and "two.nc holds 2 sections (S1, S2)" in stderr and "--section" in stderr
    assert not (tmp_path / "one.nc").exists()
    # a section that is not there: the file and its sections are named
    code, _, stderr = run_main(
        capsys, "segment", path, "--section", "S9", "--model", models["ppxp"], "--output", tmp_path / "none", "-q"
    )
    assert code == 2
    assert f"{path}: no section named S9 here (sections: S1 (S1_PP), S2 (S2_PP))" in stderr


def test_an_xp_image_without_its_pp_image_is_left_out_with_a_note(scene, tmp_path, models, capsys):
    """S1_PP, S1_XP and a spare S2_XP: S1 is segmented with its own XP, S2_XP named as left out."""
    pp, xp = section_images(24, 36, seed=30)
    _, spare = section_images(24, 36, seed=31)
    nodes = [
        rgb_node(scene, "S1_PP", pp, thin_section_matrix()),
        rgb_node(scene, "S1_XP", xp, thin_section_matrix()),
        rgb_node(scene, "S2_XP", spare, thin_section_matrix()),
    ]
    path = geoslicer_export(scene, tmp_path / "in" / "spare.nc", nodes, nodes[0])
    code, stdout, stderr = run_main(capsys, "segment", path, "--model", models["ppxp"], "--output", tmp_path / "out")
    assert code == 0, stderr
    assert "Traceback" not in stderr
    assert "thinseg: spare.nc: S2_XP not segmented: no PP image is named like it" in stderr.splitlines()
    assert sorted(p.name for p in (tmp_path / "out").glob("*.nc")) == ["spare.nc"]
    with open_nc(tmp_path / "out" / "spare.nc") as ds:
        labels = np.asarray(ds.variables["spare_Segmentation"][0])  # one section: named after its file
    np.testing.assert_array_equal(labels, engine_labels(models, "ppxp", (pp, xp)))


# ---------------------------------------------------------------------------------------------
# 3. class names GeoSlicer's labels parser would misread


def test_geoslicer_parser_shifts_classes_after_a_comma_so_such_names_are_refused(scene, tmp_path, models):
    names = ["Quartz", "Feldspar, altered", "Calcite", "Pores"]
    table = ClassTable.from_names_colors(names, ["#ff0000", "#00ff00", "#0000ff", "#000000"])
    with geoslicer_netcdf(scene) as geoslicer:  # what GeoSlicer makes of such a labels attribute
        colors = geoslicer.nc_labels_to_color_node(table.geoslicer_labels(), "probe")
        parsed = [colors.GetColorName(k) for k in range(1, colors.GetNumberOfColors())]
        good = geoslicer.nc_labels_to_color_node(TABLE.geoslicer_labels(), "good")
        assert [good.GetColorName(k) for k in range(1, good.GetNumberOfColors())] == TABLE.names
    assert parsed == ["Quartz", "Calcite", "Pores"]  # label 2 would read "Calcite", label 3 "Pores"

    with pytest.raises(ThinSegError) as error, NetcdfWriter(tmp_path / "bad.nc") as writer:
        writer.add_labelmap("S_Segmentation", np.ones((3, 4), np.uint8), table, MM)
    assert error.value.path == tmp_path / "bad.nc"
    assert "class 2 'Feldspar, altered' has a comma" in error.value.problem
    assert list(tmp_path.iterdir()) == []

    # a model with such a class is refused before anything is read or written
    network, params = tiny_network(3, len(TABLE) + 1, seed=1)
    folder = save_bundle(
        tmp_path / "models" / "comma",
        network,
        network_name="UNet",
        network_params=params,
        class_table=ClassTable.from_names_colors(["Quartz", "Feldspar, altered", *TABLE.names[2:]], TABLE.colors),
        input_names=("PP",),
        pixels_per_mm=1 / MM,
        roi_shape=(64, 64),
        title="comma",
        description="test model",
    )
    pp, _ = section_images(20, 30, seed=3)
    source = tmp_path / "in" / "c.nc"
    source.parent.mkdir(exist_ok=True)
    with NetcdfWriter(source) as writer:
        writer.add_rgb_image("C_PP", pp, MM)
    with pytest.raises(ThinSegError) as error:
        segment_files([source], SegmentOptions(inference=INFERENCE), tmp_path / "out", folder)
    assert error.value.path == folder / "meta.json"
    assert "class 2 'Feldspar, altered' has a comma" in error.value.problem
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []


# ---------------------------------------------------------------------------------------------
# 4. pixels that are not square


def test_non_square_pixels_are_resampled_per_axis_and_labels_lie_on_the_input(scene, tmp_path, models):
    pp, xp = section_images(40, 30, seed=31)
    matrix = thin_section_matrix(spacing_xy=(MM, 2 * MM), origin=(0.5, 0.25, 0.0))
    nodes = [rgb_node(scene, "A_PP", pp, matrix), rgb_node(scene, "A_XP", xp, matrix)]
    source = geoslicer_export(scene, tmp_path / "in" / "aniso.nc", nodes)

    run = segment([source], models, "ppxp", tmp_path / "out")
    result = run.results[0]
    assert any(
        "pixels are 0.01 x 0.02 mm (width x height), not square: resampling to the model's 0.01 x 0.01 mm "
        "(30x80 px) and the labels back onto the 30x40 px input grid" in m
        for m in result.messages
    ), result.messages
    with open_nc(result.netcdf) as ds:
        v = ds.variables["aniso_Segmentation"]
        labels = np.asarray(v[0])
        np.testing.assert_allclose(np.asarray(v.getncattr("transform")).reshape(4, 4), matrix, atol=1e-15)
        np.testing.assert_allclose(np.diff(ds.variables["y_aniso_Segmentation"][:]), 2 * MM)
        np.testing.assert_allclose(np.diff(ds.variables["x_aniso_Segmentation"][:]), MM)
    assert labels.shape == (40, 30)
    np.testing.assert_array_equal(labels, engine_labels(models, "ppxp", (pp, xp), factor=(2.0, 1.0)))
    # the modal mineralogy counts areas of 0.01 x 0.02 mm pixels
    rows = read_csv(tmp_path / "out" / "modal_mineralogy.csv")
    for row in rows:
        assert float(row["area_mm2"]) == pytest.approx(int(row["pixels"]) * MM * 2 * MM, abs=5e-7)

    imported = geoslicer_import(result.netcdf)
    assert_same_grid(imported["aniso_Segmentation"], nodes[0])  # the full height, not half of it
    bounds = np.abs(ijk_to_ras(imported["aniso_Segmentation"])[:3, :3] @ [30, 40, 0])
    assert bounds[:2] == pytest.approx([0.3, 0.8])


# ---------------------------------------------------------------------------------------------
# 5. geometry: directions, flips, rotations, origins and z survive the round trip


def _rotated(degrees: float, origin) -> np.ndarray:
    a = math.radians(degrees)
    m = np.eye(4)
    m[:2, :2] = [[-MM * math.cos(a), MM * math.sin(a)], [-MM * math.sin(a), -MM * math.cos(a)]]
    m[2, 2] = 0.5
    m[:3, 3] = origin
    return m


@pytest.mark.parametrize(
    "matrix",
    [
        thin_section_matrix(origin=(3.5, -1.25, 0.7)),
        thin_section_matrix(origin=(3.5, -1.25, 0.7), directions=(1, -1, 1), z_spacing=0.5),
        thin_section_matrix(origin=(-2.0, 4.0, 1.0), directions=(1, 1, 1)),
        _rotated(30, (1.0, 2.0, 3.0)),
    ],
    ids=["geoslicer-default", "x-flipped", "slicer-default", "rotated-30"],
)
def test_geoslicer_export_segment_import_keeps_the_pp_grid(scene, tmp_path, models, matrix):
    pp, _ = section_images(26, 34, seed=41)
    labels_in = np.zeros((26, 34), np.uint8)
    labels_in[3:10, 5:20] = 3
    pp_node = rgb_node(scene, "G_PP", pp, matrix)
    manual = labelmap_node(scene, "G_Manual", labels_in, TABLE, matrix, pp_node)
    source = geoslicer_export(scene, tmp_path / "in" / "geo.nc", [pp_node, manual])

    run = segment([source], models, "pp", tmp_path / "out")
    out = run.results[0].netcdf
    with xr.open_dataset(source) as a, xr.open_dataset(out) as b:
        for axis in "zyx":  # coordinates written exactly as GeoSlicer writes the PP's
            np.testing.assert_allclose(b[f"{axis}_geo_Segmentation"].values, a[f"{axis}_G_PP"].values, atol=1e-15)
        labels = b["geo_Segmentation"].values[0]
        assert b["geo_Segmentation"].attrs["reference"] == "G_PP"
    np.testing.assert_array_equal(labels, engine_labels(models, "pp", (pp,)))

    imported = geoslicer_import(out)
    assert_same_grid(imported["geo_Segmentation"], pp_node)
    assert_same_grid(imported["G_PP"], pp_node)
    assert_same_grid(imported["G_Manual"], manual)  # a copied labelmap keeps its image's geometry
    np.testing.assert_array_equal(array_of(imported["G_Manual"]), labels_in)
    np.testing.assert_array_equal(array_of(imported["geo_Segmentation"]), labels)
    colors = imported["geo_Segmentation"].GetDisplayNode().GetColorNode()
    assert [colors.GetColorName(k) for k in range(1, colors.GetNumberOfColors())] == TABLE.names
