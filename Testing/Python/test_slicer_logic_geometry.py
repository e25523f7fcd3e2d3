"""Thin sections placed every way Slicer and GeoSlicer place them, on a real MRML scene.

A node's *picture* is what Slicer shows of it in the view looking at the slice (axial,
coronal or sagittal). These tests build nodes that show one known picture with every
axis-aligned direction matrix (each flip and permutation, the slice along I, J or K), with
slicer.util.addVolumeFromArray (identity directions), with GeoSlicer's own importer, off-zero
origins and non-square pixels. Where each voxel must go is computed here independently of the
module: from the voxel's RAS position and the screen axes of Slicer's own slice-view presets
(vtkMRMLSliceNode). Then:
- the logic hands the core exactly that picture (up is up, nothing mirrored);
- every labelmap (segment(), the background job, registration, netCDF) has exactly the PP's
  IJK-to-RAS and extent, and its voxel (i, j, k) is the class of the PP's voxel (i, j, k).
"""

import itertools
import sys
import zlib

import numpy as np
import pytest
import slicer
import vtk
from geoslicer_reference import geoslicer_netcdf
from helpers import make_bundle

from ThinSectionSegmentationLib import ThinSectionSegmentationLogic, labelmaps, netcdf_nodes, results, volumes
from thinseg.classes.files import default_class_table
from thinseg.synth import generate_section

MM = 0.00132
HEIGHT, WIDTH = 36, 52  # not square: a transposed picture cannot pass for the right one


# -- an independent model of where Slicer shows each voxel ---------------------------------------


def slicer_screen_axes() -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """RAS axis a slice is normal to -> (screen right, screen down) in RAS, from Slicer's own
    Axial/Coronal/Sagittal slice-to-RAS presets (x right, y up)."""
    axes = {}
    for normal, preset in ((2, "Axial"), (1, "Coronal"), (0, "Sagittal")):
        m = vtk.vtkMatrix3x3()
        getattr(slicer.vtkMRMLSliceNode, f"Get{preset}SliceToRASMatrix")(m)
        a = np.array([[m.GetElement(r, c) for c in range(3)] for r in range(3)])
        axes[normal] = (a[:, 0], -a[:, 1])
    return axes


SCREEN = slicer_screen_axes()


def matrix_of(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def vtk_matrix(array) -> vtk.vtkMatrix4x4:
    m = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            m.SetElement(r, c, float(array[r][c]))
    return m


def layout(directions, slice_axis, picture_shape, spacing=(MM, MM, MM), origin=(0.0, 0.0, 0.0)):
    """(IJK-to-RAS 4x4, (I, J, K) sizes) of a single-slice volume along `slice_axis` with these
    directions that shows a picture of `picture_shape` in Slicer."""
    d = np.asarray(directions, dtype=float)
    normal = int(np.argmax(np.abs(d[:, slice_axis])))
    right, _down = SCREEN[normal]
    dims = [1, 1, 1]
    for axis in range(3):
        if axis != slice_axis:
            along_right = abs(d[:, axis] @ right) > 0.5
            dims[axis] = picture_shape[1] if along_right else picture_shape[0]
    m = np.eye(4)
    m[:3, :3] = d * np.asarray(spacing, dtype=float)
    m[:3, 3] = origin
    return m, tuple(dims)


def voxels_showing(picture, ijk_to_ras, dims):
    """The (K, J, I[, C]) voxels that Slicer shows as `picture` on this grid: each voxel takes
    the picture pixel at its screen position (RAS position along Slicer's screen axes)."""
    ni, nj, nk = dims
    k, j, i = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
    ras = (ijk_to_ras @ np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)]))[:3]
    slice_axis = next(a for a in (2, 1, 0) if dims[a] == 1)
    normal = int(np.argmax(np.abs(ijk_to_ras[:3, slice_axis])))
    right, down = SCREEN[normal]
    steps = np.linalg.norm(ijk_to_ras[:3, :3], axis=0)
    step_right = steps[int(np.argmax(np.abs(right @ ijk_to_ras[:3, :3])))]
    step_down = steps[int(np.argmax(np.abs(down @ ijk_to_ras[:3, :3])))]
    x, y = right @ ras, down @ ras
    col = np.rint((x - x.min()) / step_right).astype(int)
    row = np.rint((y - y.min()) / step_down).astype(int)
    assert (row.max() + 1, col.max() + 1) == picture.shape[:2]
    return picture[row, col].reshape((nk, nj, ni) + picture.shape[2:])


def signed_permutations():
    for perm in itertools.permutations(range(3)):
        for signs in itertools.product((1.0, -1.0), repeat=3):
            d = np.zeros((3, 3))
            for column, (row, sign) in enumerate(zip(perm, signs)):
                d[row, column] = sign
            yield d


GEOMETRIES = [(d, axis) for d in signed_permutations() for axis in (2, 1, 0)]


def geometry_id(case) -> str:
    d, axis = case
    columns = ["".join(("+" if d[r, c] > 0 else "-") + "RAS"[r] for r in range(3) if d[r, c]) for c in range(3)]
    return f"IJK={','.join(columns)}-slice{'IJK'[axis]}"


def add_volume(scene, name, voxels, ijk_to_ras, class_name="vtkMRMLVectorVolumeNode"):
    """A node built the way slicer.util.addVolumeFromArray builds one (given matrix, then
    updateVolumeFromArray), in this scene."""
    node = scene.AddNewNodeByClass(class_name, name)
    node.SetIJKToRASMatrix(vtk_matrix(ijk_to_ras))
    slicer.util.updateVolumeFromArray(node, voxels)
    return node


# -- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def section():
    return generate_section(HEIGHT, WIDTH, seed=11)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("models") / "ThinSectionEnv" / "tiny", inputs=("PP", "PX"))


@pytest.fixture(scope="module")
def expected_labels(section, model_dir):
    """What the core gives for the picture itself: the known answer for every geometry."""
    from thinseg.inference.engine import InferenceOptions, Segmenter
    from thinseg.io.images import ArraySource
    from thinseg.model.bundle import load_bundle

    segmenter = Segmenter(load_bundle(model_dir), InferenceOptions(device="cpu", with_confidence=True))
    result = segmenter.segment([ArraySource(section.pp), ArraySource(section.xp)])
    labels = result.labels
    # a result that a flip, a transposition or a shift would change: the test can see mistakes
    assert len(np.unique(labels)) >= 3
    assert not np.array_equal(labels, labels[::-1]) and not np.array_equal(labels, labels[:, ::-1])
    return labels, result.confidence


@pytest.fixture
def scene():
    s = slicer.vtkMRMLScene()
    s.AddNewNodeByClass("vtkMRMLSliceCompositeNode")
    return s


@pytest.fixture
def console_scene(scene, monkeypatch):
    """The scene as slicer.mrmlScene, as in Slicer's Python console."""
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    return scene


def test_screen_axes_are_the_ones_the_module_uses():
    for normal, (name, right, down) in volumes.SLICE_VIEWS.items():
        assert np.array_equal(SCREEN[normal][0], right) and np.array_equal(SCREEN[normal][1], down), name


def test_geoslicer_thin_sections_show_their_array_as_it_is(section):
    """The model agrees with GeoSlicer's convention: diag(-1, -1, 1), array (1, H, W, 3) = picture."""
    m, dims = layout(volumes.THIN_SECTION_DIRECTIONS, 2, section.pp.shape)
    assert dims == (WIDTH, HEIGHT, 1)
    assert np.array_equal(voxels_showing(section.pp, m, dims)[0], section.pp)


# -- every axis-aligned geometry: picture in, labelmap out ---------------------------------------


@pytest.mark.parametrize("case", GEOMETRIES, ids=geometry_id)
def test_any_axis_aligned_slice_reads_as_its_picture_and_labels_land_voxel_for_voxel(scene, section, case, tmp_path):
    directions, slice_axis = case
    rng = np.random.default_rng(zlib.crc32(geometry_id(case).encode()))
    origin = rng.uniform(-50, 50, 3)
    spacing = np.array([MM, MM, MM])
    spacing[slice_axis] = 0.03  # a slice thickness that differs from the pixel size
    m, dims = layout(directions, slice_axis, section.pp.shape, spacing, origin)
    pp = add_volume(scene, "S_PP", voxels_showing(section.pp, m, dims), m)
    grid = volumes.section_grid(pp)
    assert grid.shape == (HEIGHT, WIDTH) and grid.is_square and grid.mm_per_pixel == pytest.approx(MM)
    # the core gets the picture as Slicer shows it
    assert np.array_equal(volumes.rgb_array(pp), section.pp)
    # a labelmap made from labels of that picture: PP's grid exactly, each voxel its PP voxel's class
    table = default_class_table()
    lab = labelmaps.create_labelmap(scene, "S_Seg", section.labels, table, reference=pp)
    assert np.array_equal(matrix_of(lab), matrix_of(pp))
    assert lab.GetImageData().GetDimensions() == dims
    assert np.array_equal(slicer.util.arrayFromVolume(lab), voxels_showing(section.labels, m, dims))
    assert np.array_equal(volumes.label_array(lab), section.labels)
    # netCDF keeps each pixel where it is: the imported voxel at each PP voxel's RAS has its value
    path = tmp_path / "S.nc"
    netcdf_nodes.export_nodes([pp, lab], path)
    other = slicer.vtkMRMLScene()
    imported = {n.GetName(): n for n in netcdf_nodes.import_netcdf(other, path).nodes}
    assert np.array_equal(matrix_of(imported["S_Seg"]), matrix_of(imported["S_PP"]))
    for name, node in (("S_PP", pp), ("S_Seg", lab)):
        assert_same_voxels_in_ras(node, imported[name])


def assert_same_voxels_in_ras(original, other):
    """Every voxel of `original` has the same value in `other` at the same RAS position."""
    ni, nj, nk = original.GetImageData().GetDimensions()
    k, j, i = np.meshgrid(np.arange(nk), np.arange(nj), np.arange(ni), indexing="ij")
    ras = matrix_of(original) @ np.stack([i.ravel(), j.ravel(), k.ravel(), np.ones(i.size)])
    ijk = np.linalg.inv(matrix_of(other)) @ ras
    index = np.rint(ijk[:3]).astype(int)
    assert np.allclose(ijk[:3], index, atol=1e-6), "voxel centres do not coincide"
    values = slicer.util.arrayFromVolume(other)[index[2], index[1], index[0]]
    assert np.array_equal(values, slicer.util.arrayFromVolume(original).reshape(values.shape))


# -- segment(): the picture goes to the core, the labels come back on the PP's grid --------------


def check_result(out, pp, expected, confidence=None):
    """`out` (a SegmentationOutput) holds `expected` (labels of PP's picture) on PP's grid."""
    labelmap = out.labelmap
    m = matrix_of(pp)
    dims = pp.GetImageData().GetDimensions()
    assert np.array_equal(matrix_of(labelmap), m)
    assert labelmap.GetImageData().GetDimensions() == dims
    assert np.array_equal(slicer.util.arrayFromVolume(labelmap), voxels_showing(expected, m, dims))
    # a distinctive place, by RAS: the PP voxel showing picture pixel (row 3, column 40) holds its class
    ijk = volumes.section_grid(pp).picture_to_ijk @ [40, 3, 0, 1]
    ras = m @ ijk
    lab_ijk = np.rint(np.linalg.inv(matrix_of(labelmap)) @ ras).astype(int)
    assert slicer.util.arrayFromVolume(labelmap)[lab_ijk[2], lab_ijk[1], lab_ijk[0]] == expected[3, 40]
    if confidence is not None:
        conf = out.confidence
        assert np.array_equal(matrix_of(conf), m)
        assert np.array_equal(slicer.util.arrayFromVolume(conf), voxels_showing(confidence, m, dims))


CASES = {
    "geoslicer": (volumes.THIN_SECTION_DIRECTIONS, 2, (0.0, 0.0, 0.0)),
    "identity-off-zero-origin": (np.eye(3), 2, (12.5, -7.25, 3.0)),
    "transposed-and-flipped": (np.array([[0, 1, 0], [-1, 0, 0], [0, 0, -1.0]]), 2, (1.0, 2.0, -3.0)),
    "coronal-J-slice": (np.diag([1.0, 1.0, 1.0]), 1, (0.5, 0.0, 0.0)),
    "sagittal-I-slice": (np.array([[1.0, 0, 0], [0, 0, 1], [0, -1, 0]]), 0, (0.0, -4.0, 9.0)),
}


@pytest.mark.parametrize("name", list(CASES))
def test_segment_returns_the_labels_of_the_picture_on_the_pp_grid(scene, section, model_dir, expected_labels, name):
    directions, slice_axis, origin = CASES[name]
    m, dims = layout(directions, slice_axis, section.pp.shape, origin=origin)
    pp = add_volume(scene, "S_PP", voxels_showing(section.pp, m, dims), m)
    xp = add_volume(scene, "S_XP", voxels_showing(section.xp, m, dims), m)
    logic = ThinSectionSegmentationLogic(scene)
    out = logic.segment(pp, xp, model_dir, device="cpu", confidence=True, createSegmentation=True)
    labels, confidence = expected_labels
    check_result(out, pp, labels, confidence)
    # the segmentation made from it converts back onto the same grid, voxel for voxel
    back = labelmaps.segmentation_to_labelmap(out.segmentation, reference=pp)
    assert np.array_equal(matrix_of(back), matrix_of(pp))
    assert np.array_equal(slicer.util.arrayFromVolume(back), slicer.util.arrayFromVolume(out.labelmap))


def test_volumes_made_with_add_volume_from_array_segment_like_geoslicer_nodes(
    console_scene, section, model_dir, expected_labels
):
    """slicer.util.addVolumeFromArray gives identity directions: Slicer shows the array turned
    by 180 degrees, and the logic segments what Slicer shows."""
    photo_pp, photo_xp = section.pp[::-1, ::-1], section.xp[::-1, ::-1]  # the arrays a user holds
    pp = slicer.util.addVolumeFromArray(photo_pp[np.newaxis], name="S_PP", nodeClassName="vtkMRMLVectorVolumeNode")
    xp = slicer.util.addVolumeFromArray(photo_xp[np.newaxis], name="S_XP", nodeClassName="vtkMRMLVectorVolumeNode")
    assert np.array_equal(matrix_of(pp), np.eye(4))
    assert np.array_equal(volumes.rgb_array(pp), section.pp)
    logic = ThinSectionSegmentationLogic(console_scene)
    out = logic.segment(pp, xp, model_dir, device="cpu")
    check_result(out, pp, expected_labels[0])
    # in the array the user gave, labels sit on the pixels they classify
    assert np.array_equal(slicer.util.arrayFromVolume(out.labelmap)[0], expected_labels[0][::-1, ::-1])


@pytest.mark.parametrize("spacing", [(MM, MM, MM), (MM, 2 * MM, MM)], ids=["square", "non-square"])
def test_the_background_job_gives_the_same_voxels_as_in_process(scene, section, model_dir, expected_labels, spacing):
    directions, slice_axis, origin = CASES["transposed-and-flipped"]
    m, dims = layout(directions, slice_axis, section.pp.shape, spacing, origin)
    pp = add_volume(scene, "S_PP", voxels_showing(section.pp, m, dims), m)
    xp = add_volume(scene, "S_XP", voxels_showing(section.xp, m, dims), m)
    logic = ThinSectionSegmentationLogic(scene)
    job = logic.prepareSegmentation(pp, xp, model_dir, device="cpu", confidence=True, python=sys.executable)
    try:
        proc = job.start()
        proc.wait(timeout=180)
        proc.check()
        out = logic.finishSegmentation(job)
    finally:
        logic.discardJob(job)
    if spacing[0] == spacing[1]:
        check_result(out, pp, *expected_labels)
    same = ThinSectionSegmentationLogic(scene).segment(pp, xp, model_dir, device="cpu", confidence=True, show=False)
    check_result(out, pp, volumes.label_array(same.labelmap), volumes.scalar_array(same.confidence))


def test_geoslicer_imported_nodes_segment_on_their_own_grid(scene, section, model_dir, expected_labels, tmp_path):
    """Nodes made by GeoSlicer's own importer: a K slice (its thin sections) and a J slice."""
    import xarray as xr

    s = MM
    for name, shape, transform in (
        ("K", (1, HEIGHT, WIDTH), [[-s, 0, 0, 1.0], [0, -s, 0, 2.0], [0, 0, s, 0.5], [0, 0, 0, 1]]),
        ("J", (HEIGHT, 1, WIDTH), [[-s, 0, 0, 1.0], [0, -s, 0, 2.0], [0, 0, s, 0.5], [0, 0, 0, 1]]),
    ):
        gs_scene = slicer.vtkMRMLScene()
        dims = (shape[2], shape[1], shape[0])
        m = np.array(transform)
        arrays = {
            f"{name}_PP": voxels_showing(section.pp, m, dims),
            f"{name}_XP": voxels_showing(section.xp, m, dims),
        }
        data = {}
        for var, voxels in arrays.items():
            coords = {f"{a}_{var}": np.arange(n) * s for a, n in zip("zyx", voxels.shape[:3])}
            data[var] = xr.DataArray(
                voxels, dims=[*coords, "c"], coords={**coords, "c": ["r", "g", "b"]}, attrs={"transform": m.ravel()}
            )
        path = tmp_path / f"{name}.nc"
        xr.Dataset(data).to_netcdf(path)
        with geoslicer_netcdf(gs_scene) as gs:
            nodes = {n.GetName(): n for n in gs.import_file(path)}
        pp, xp = nodes[f"{name}_PP"], nodes[f"{name}_XP"]
        assert np.array_equal(matrix_of(pp), m) and pp.GetImageData().GetDimensions() == dims
        logic = ThinSectionSegmentationLogic(gs_scene)
        check_result(logic.segment(pp, xp, model_dir, device="cpu"), pp, expected_labels[0])


# -- pixels that are not square ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tall_section():
    """A section imaged at the bundled model's 0.00132 mm/px; every other row makes 0.00264 mm
    tall pixels."""
    return generate_section(96, 64, seed=5)


@pytest.mark.parametrize("directions", [volumes.THIN_SECTION_DIRECTIONS, np.eye(3)], ids=["geoslicer", "identity"])
def test_non_square_pixels_are_resampled_to_the_model_and_back_onto_the_pp_grid(scene, tall_section, directions):
    from thinseg.inference.engine import InferenceOptions, Segmenter
    from thinseg.inference.resample import segment_at_model_resolution
    from thinseg.io.images import ArraySource
    from thinseg.model.bundle import load_bundle
    from thinseg.resources import default_model_dir

    pp_picture, xp_picture = tall_section.pp[::2], tall_section.xp[::2]
    spacing = (MM, 2 * MM, 0.03)  # picture columns along I, rows along J (0.00132 x 0.00264 mm)
    m, dims = layout(directions, 2, pp_picture.shape, spacing, (3.0, -2.0, 0.0))
    pp = add_volume(scene, "T_PP", voxels_showing(pp_picture, m, dims), m)
    xp = add_volume(scene, "T_XP", voxels_showing(xp_picture, m, dims), m)
    assert volumes.section_grid(pp).spacing_yx == pytest.approx((2 * MM, MM))
    logic = ThinSectionSegmentationLogic(scene)
    out = logic.segment(pp, xp, None, device="cpu")
    assert any("0.00132 x 0.00264 mm pixels" in message and "resampled" in message for message in logic.messages)
    # the known answer: the core run at square model pixels (rows doubled) and mapped back
    segmenter = Segmenter(load_bundle(default_model_dir()), InferenceOptions(device="cpu"))
    expected = segment_at_model_resolution(segmenter, [ArraySource(pp_picture), ArraySource(xp_picture)], (2.0, 1.0))
    check_result(out, pp, expected.labels)
    # the labels cover the whole section: they agree with the truth over the full height
    truth = tall_section.labels[::2]
    for rows in (slice(0, 24), slice(24, 48)):
        assert (expected.labels[rows] == truth[rows]).mean() > 0.9
    # areas count each pixel at its true size
    mineralogy = results.mineralogy_of(out.labelmap)
    counts = np.bincount(expected.labels.ravel(), minlength=7)[1:]
    assert [a.area_mm2 for a in mineralogy.areas] == pytest.approx(list(counts * MM * 2 * MM))


def test_non_square_pixels_go_to_netcdf_at_their_own_size(scene, tall_section, tmp_path):
    picture = tall_section.pp[::2]
    m, dims = layout(np.eye(3), 2, picture.shape, (MM, 2 * MM, MM), (1.0, 1.0, 0.0))
    pp = add_volume(scene, "T_PP", voxels_showing(picture, m, dims), m)
    lab = labelmaps.create_labelmap(scene, "T_Seg", tall_section.labels[::2], default_class_table(), reference=pp)
    labelmaps.set_reference(lab, pp)
    path = tmp_path / "T.nc"
    netcdf_nodes.export_nodes([pp, lab], path)
    imported = {n.GetName(): n for n in netcdf_nodes.import_netcdf(slicer.vtkMRMLScene(), path).nodes}
    assert volumes.section_grid(imported["T_PP"]).spacing_yx == pytest.approx((2 * MM, MM))
    assert np.array_equal(matrix_of(imported["T_Seg"]), matrix_of(imported["T_PP"]))
    for name, node in (("T_PP", pp), ("T_Seg", lab)):
        assert_same_voxels_in_ras(node, imported[name])


# -- GeoSlicer reads our files, we read GeoSlicer's ----------------------------------------------

NETCDF_CASES = {
    "identity": (np.eye(3), 2, (MM, MM, MM)),
    "geoslicer-J-slice": (volumes.THIN_SECTION_DIRECTIONS, 1, (MM, MM, MM)),
    "sagittal-I-slice": (np.array([[1.0, 0, 0], [0, 0, -1], [0, 1, 0]]), 0, (MM, MM, MM)),
    "non-square": (volumes.THIN_SECTION_DIRECTIONS, 2, (MM, 2 * MM, MM)),
}


def section_nodes(scene, section, case):
    directions, slice_axis, spacing = NETCDF_CASES[case]
    m, dims = layout(directions, slice_axis, section.pp.shape, spacing, (4.0, -3.0, 2.0))
    pp = add_volume(scene, "S_PP", voxels_showing(section.pp, m, dims), m)
    lab = labelmaps.create_labelmap(scene, "S_Seg", section.labels, default_class_table(), reference=pp)
    labelmaps.set_reference(lab, pp)
    return pp, lab


@pytest.mark.parametrize("case", list(NETCDF_CASES))
def test_geoslicer_opens_our_export_with_every_pixel_where_it_was(scene, section, case, tmp_path):
    pp, lab = section_nodes(scene, section, case)
    path = tmp_path / "ours.nc"
    netcdf_nodes.export_nodes([pp, lab], path)
    geoslicer_scene = slicer.vtkMRMLScene()
    with geoslicer_netcdf(geoslicer_scene) as gs:
        opened = {n.GetName(): n for n in gs.import_file(path)}
    assert opened["S_Seg"].IsA("vtkMRMLLabelMapVolumeNode")
    assert np.array_equal(matrix_of(opened["S_Seg"]), matrix_of(opened["S_PP"]))
    for name, node in (("S_PP", pp), ("S_Seg", lab)):
        assert_same_voxels_in_ras(node, opened[name])


@pytest.mark.parametrize("case", list(NETCDF_CASES))
def test_geoslicer_exports_import_as_geoslicer_imports_them(scene, section, case, tmp_path):
    pp, lab = section_nodes(scene, section, case)
    path = tmp_path / "geoslicer.nc"
    with geoslicer_netcdf(scene) as gs:
        gs.exportNetcdf(path, [pp, lab])
    geoslicer_scene = slicer.vtkMRMLScene()
    with geoslicer_netcdf(geoslicer_scene) as gs:
        theirs = {n.GetName(): n for n in gs.import_file(path)}
    ours = {n.GetName(): n for n in netcdf_nodes.import_netcdf(slicer.vtkMRMLScene(), path).nodes}
    for name in ("S_PP", "S_Seg"):
        assert np.array_equal(matrix_of(ours[name]), matrix_of(theirs[name])), name
        assert np.array_equal(slicer.util.arrayFromVolume(ours[name]), slicer.util.arrayFromVolume(theirs[name]))
        assert_same_voxels_in_ras(pp if name == "S_PP" else lab, ours[name])
    assert np.array_equal(matrix_of(ours["S_Seg"]), matrix_of(ours["S_PP"]))
    assert np.array_equal(volumes.label_array(ours["S_Seg"]), section.labels)


def test_a_labelmap_stored_without_transform_takes_its_reference_image_grid(scene, section, tmp_path):
    import netCDF4

    pp, lab = section_nodes(scene, section, "identity")
    path = tmp_path / "S.nc"
    netcdf_nodes.export_nodes([pp, lab], path)
    with netCDF4.Dataset(path, "a") as ds:  # as files from older writers: coordinates only
        ds["S_Seg"].delncattr("transform")
    imported = {n.GetName(): n for n in netcdf_nodes.import_netcdf(slicer.vtkMRMLScene(), path).nodes}
    assert np.array_equal(matrix_of(imported["S_Seg"]), matrix_of(imported["S_PP"]))
    assert_same_voxels_in_ras(lab, imported["S_Seg"])


# -- registration on a PP placed another way ----------------------------------------------------


def screen_ras(ijk_to_ras, dims, col, row):
    """RAS of picture pixel (col, row) of a single-slice grid, from Slicer's screen axes."""
    corners = np.array([[*c, 1.0] for c in itertools.product(*[(0, n - 1) for n in dims])]).T
    ras = (ijk_to_ras @ corners)[:3]
    slice_axis = next(a for a in (2, 1, 0) if dims[a] == 1)
    normal = int(np.argmax(np.abs(ijk_to_ras[:3, slice_axis])))
    right, down = SCREEN[normal]
    steps = np.linalg.norm(ijk_to_ras[:3, :3], axis=0)
    step_right = steps[int(np.argmax(np.abs(right @ ijk_to_ras[:3, :3])))]
    step_down = steps[int(np.argmax(np.abs(down @ ijk_to_ras[:3, :3])))]
    plane = np.zeros(3)
    plane[normal] = ras[normal, 0]
    x, y = (right @ ras).min() + col * step_right, (down @ ras).min() + row * step_down
    return plane + right * x + down * y


def rotation(axis, degrees):
    """3x3 rotation by `degrees` about RAS axis `axis` (0 = R, 1 = A, 2 = S)."""
    c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    i, j = (a for a in range(3) if a != axis)
    r = np.eye(3)
    r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
    return r


#: How a PP is placed in RAS relative to its axis-aligned layout: (rotation about its origin,
#: mm added to its origin's S). Every placement keeps the same voxels, so Slicer's nearest view
#: shows the same picture.
PLACEMENTS = {
    "axis-aligned": (np.eye(3), 0.0),
    "turned-30": (rotation(2, 30), 0.0),
    "tilted-R-20": (rotation(0, 20), 0.0),
    "turned-30-tilted-R-20-A-15": (rotation(1, 15) @ rotation(0, 20) @ rotation(2, 30), 0.0),
    "raised-0.4mm": (np.eye(3), 0.4),
}


def placed(straight, placement):
    """The IJK-to-RAS matrix of `straight` turned about its origin and raised as `placement` says."""
    turn, lift = PLACEMENTS[placement]
    m = straight.copy()
    m[:3, :3] = turn @ straight[:3, :3]
    m[2, 3] += lift
    return m


@pytest.fixture(scope="module")
def registration_sample():
    """The bundled sample: its true QEMSCAN -> image pixel transform, the PP picture, and four
    landmark pairs (QEMSCAN px, image px) placed by that transform."""
    import json

    from helpers import REPO

    from thinseg.io.images import open_image

    sample = REPO / "Resources" / "Sample"
    truth = json.loads((sample / "sample_truth_transform.json").read_text())
    source = open_image(sample / "sample_PP.jpg")
    picture = np.asarray(source.read(0, source.shape[0]))
    qemscan_px = np.array([[60, 60], [250, 50], [80, 200], [240, 210]], float)
    image_px = (np.array(truth["qemscan_to_image"]) @ np.c_[qemscan_px, np.ones(4)].T).T[:, :2]
    return sample, truth, picture, qemscan_px, image_px


@pytest.fixture(scope="module")
def straight_registered(registration_sample):
    """kind -> the registered labels of the sample on a GeoSlicer PP node (the known answer
    every placement of the PP must give on its own voxels)."""
    from thinseg.registration import LandmarkPairs

    sample, truth, picture, qemscan_px, image_px = registration_sample
    labels = {}
    for kind in ("similarity", "tps"):
        logic = ThinSectionSegmentationLogic(slicer.vtkMRMLScene())
        pp = volumes.create_rgb_volume(logic.scene, "PP", picture, truth["image_mm_per_pixel"])
        qemscan = logic.loadQemscan(
            sample / "sample_QEMSCAN.tif", sample / "sample_QEMSCAN.csv", mmPerPixel=truth["qemscan_mm_per_pixel"]
        )
        out = logic.register(pp, qemscan, LandmarkPairs(qemscan_px, image_px), refine=False, kind=kind)
        labels[kind] = volumes.label_array(out.labelmap)
    # a picture that a flip or a transposition would change: the test can see mistakes
    assert len(np.unique(labels["similarity"])) >= 3
    assert not np.array_equal(labels["similarity"], labels["similarity"][::-1])
    return labels


@pytest.mark.parametrize("placement", list(PLACEMENTS))
@pytest.mark.parametrize("kind", ["similarity", "tps"])
def test_registration_on_a_pp_placed_any_way_lands_the_map_on_its_grid(
    scene, registration_sample, straight_registered, kind, placement
):
    """Landmarks clicked on a PP flipped, turned in its plane, tilted out of it or lifted off the
    QEMSCAN map's plane: the transform node sends every PP pixel onto the QEMSCAN map's plane,
    where the true transform sends it, and the labelmap lies on the PP's own voxels."""
    sample, truth, picture, qemscan_px, image_px = registration_sample
    spacing = truth["image_mm_per_pixel"]
    logic = ThinSectionSegmentationLogic(scene)
    qemscan = logic.loadQemscan(
        sample / "sample_QEMSCAN.tif", sample / "sample_QEMSCAN.csv", mmPerPixel=truth["qemscan_mm_per_pixel"]
    )
    q_matrix = matrix_of(qemscan)
    probe = np.array([[300.0, 400.0], [1000.0, 800.0], [1700.0, 1200.0]])
    expected_px = (np.linalg.inv(np.array(truth["qemscan_to_image"])) @ np.c_[probe, np.ones(3)].T).T[:, :2]
    for name, directions in (("GeoSlicer", volumes.THIN_SECTION_DIRECTIONS), ("identity", np.eye(3))):
        straight, dims = layout(directions, 2, picture.shape, (spacing, spacing, spacing), (3.0, -1.0, 0.0))
        m = placed(straight, placement)

        def pixel_ras(x, y, straight=straight, m=m, dims=dims):
            # where picture pixel (x, y) of the axis-aligned layout went: the same voxel, moved
            return (m @ np.linalg.inv(straight) @ [*screen_ras(straight, dims, x, y), 1.0])[:3]

        pp = add_volume(scene, f"{name}_PP", voxels_showing(picture, straight, dims), m)
        points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", f"{name} points")
        for x, y in image_px:
            points.AddControlPoint(*pixel_ras(x, y))
        q_points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", f"{name} QEMSCAN points")
        for x, y in qemscan_px:
            q_points.AddControlPoint(*(q_matrix @ [x, y, 0, 1])[:3])
        out = logic.register(pp, qemscan, (points, q_points), refine=False, kind=kind)
        assert np.allclose(matrix_of(pp), m, rtol=0, atol=1e-15)
        assert np.array_equal(matrix_of(out.labelmap), matrix_of(pp))
        assert np.array_equal(
            slicer.util.arrayFromVolume(out.labelmap), voxels_showing(straight_registered[kind], straight, dims)
        )
        # the transform node sends the RAS of PP picture pixels where the true transform sends
        # them, on the QEMSCAN map's plane (its slice index 0)
        from_parent = out.transform.GetTransformFromParent()
        for (x, y), q in zip(probe, expected_px):
            local = from_parent.TransformPoint(*pixel_ras(x, y))
            assert np.allclose((np.linalg.inv(q_matrix) @ [*local, 1.0])[:3], [*q, 0.0], atol=0.05)


# -- volumes turned off the R/A/S axes --------------------------------------------------------------


@pytest.mark.parametrize("placement", ["turned-30", "tilted-R-20"])
def test_turned_volumes_segment_as_the_nearest_view_on_their_own_voxels(scene, section, model_dir, tmp_path, placement):
    """A PP turned by 30 degrees in its plane, or tilted 20 degrees out of it about R, is read as
    the axial view nearest to it shows it: its labels are those of the same voxels unturned,
    written on the turned grid, and survive a netCDF round trip."""
    straight, dims = layout(np.eye(3), 2, section.pp.shape)
    turned = placed(straight, placement)
    logic = ThinSectionSegmentationLogic(scene)
    outputs = {}
    for name, m in (("Straight", straight), ("Turned", turned)):
        pp = add_volume(scene, f"{name}_PP", voxels_showing(section.pp, straight, dims), m)
        xp = add_volume(scene, f"{name}_XP", voxels_showing(section.xp, straight, dims), m)
        out = logic.segment(pp, xp, model_dir, device="cpu")
        assert np.allclose(matrix_of(pp), m, rtol=0, atol=1e-15)
        assert np.array_equal(matrix_of(out.labelmap), matrix_of(pp))
        outputs[name] = (pp, out.labelmap)
    assert np.array_equal(
        slicer.util.arrayFromVolume(outputs["Turned"][1]), slicer.util.arrayFromVolume(outputs["Straight"][1])
    )
    pp, labelmap = outputs["Turned"]
    netcdf_nodes.export_nodes([pp, labelmap], tmp_path / "turned.nc")
    imported = ThinSectionSegmentationLogic(scene).importNetcdf(tmp_path / "turned.nc")
    labels_back = next(node for node in imported.nodes if node.IsA("vtkMRMLLabelMapVolumeNode"))
    # every voxel keeps its RAS position: the same picture on the same picture-to-RAS matrix
    for original, back in ((pp, imported.pp), (labelmap, labels_back)):
        assert np.allclose(volumes.section_grid(back).picture_to_ras, volumes.section_grid(original).picture_to_ras)
        assert np.array_equal(volumes.picture_array(back), volumes.picture_array(original))


def test_results_follow_the_pp_under_a_parent_transform(scene, section, model_dir):
    m, dims = layout(np.eye(3), 2, section.pp.shape)
    pp = add_volume(scene, "S_PP", voxels_showing(section.pp, m, dims), m)
    xp = add_volume(scene, "S_XP", voxels_showing(section.xp, m, dims), m)
    moved = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "moved")
    moved.SetMatrixTransformToParent(vtk_matrix([[0, -1, 0, 5], [1, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))
    pp.SetAndObserveTransformNodeID(moved.GetID())
    out = ThinSectionSegmentationLogic(scene).segment(pp, xp, model_dir, device="cpu")
    assert out.labelmap.GetTransformNodeID() == moved.GetID()
    assert out.labelmap.GetParentTransformNode() is moved
