"""MRML logic on a real scene (slicer-core): volume nodes <-> arrays, labelmaps, colour tables,
labelmap <-> segmentation, subject hierarchy and the parameter node saved with the scene."""

import numpy as np
import pytest
import slicer

from ThinSectionSegmentationLib import ThinSectionSegmentationLogic, base_name, hierarchy, labelmaps, volumes
from ThinSectionSegmentationLib.parameters import Device, ThinSectionSegmentationParameters, find_parameter_node, typed
from thinseg.classes.files import default_class_table
from thinseg.classes.table import ClassTable
from thinseg.errors import ThinSegError


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


def rgb(h=5, w=7, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def ijk_to_ras(node):
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return np.array([[m.GetElement(r, c) for c in range(4)] for r in range(4)])


def test_rgb_volume_round_trips_exactly_with_geoslicer_geometry(scene):
    image = rgb(6, 9)
    node = volumes.create_rgb_volume(scene, "S1_PP", image, 0.00132, (1.5, -2.0, 0.25))
    assert node.IsA("vtkMRMLVectorVolumeNode")
    # slicer.util's own reader sees (1, H, W, 3), the layout GeoSlicer uses
    as_slicer = slicer.util.arrayFromVolume(node)
    assert as_slicer.shape == (1, 6, 9, 3) and as_slicer.dtype == np.uint8
    assert np.array_equal(as_slicer[0], image)
    assert np.array_equal(volumes.rgb_array(node), image)
    expected = np.array([[-0.00132, 0, 0, 1.5], [0, -0.00132, 0, -2.0], [0, 0, 0.00132, 0.25], [0, 0, 0, 1]])
    assert np.allclose(ijk_to_ras(node), expected, atol=0, rtol=1e-12)
    g = volumes.require_thin_section_geometry(node)
    assert g.mm_per_pixel == pytest.approx(0.00132) and g.origin == (1.5, -2.0, 0.25)
    # an array written by slicer.util reads back identically too
    other = rgb(6, 9, seed=3)[np.newaxis]
    slicer.util.updateVolumeFromArray(node, other)
    assert np.array_equal(volumes.rgb_array(node), other[0])


def test_pixel_ij_lies_at_the_geoslicer_ras_position(scene):
    node = volumes.create_rgb_volume(scene, "PP", rgb(4, 4), 0.01, (3.0, 4.0, 0.0))
    ras = ijk_to_ras(node) @ np.array([2, 1, 0, 1])
    assert np.allclose(ras[:3], [3.0 - 0.02, 4.0 - 0.01, 0.0])


def test_images_the_core_cannot_use_are_refused_with_one_clear_message(scene):
    grey = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "grey")
    volumes.set_thin_section_geometry(grey, 0.01)
    volumes.update_volume(grey, np.zeros((1, 4, 4), np.uint8))
    with pytest.raises(ThinSegError, match="not an RGB image"):
        volumes.rgb_array(grey, "PP image")
    stack = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "stack")
    volumes.update_volume(stack, np.zeros((3, 4, 4, 3), np.uint8))
    with pytest.raises(ThinSegError, match="3 slices"):
        volumes.rgb_array(stack)
    rotated = volumes.create_rgb_volume(scene, "rot", rgb(), 0.01)
    rotated.SetIJKToRASDirections(0.8, -0.6, 0, 0.6, 0.8, 0, 0, 0, 1)  # a turn is read as the nearest view
    assert volumes.require_thin_section_geometry(rotated).shape == rgb().shape[:2]
    degenerate = volumes.create_rgb_volume(scene, "flat", rgb(), 0.01)
    degenerate.SetIJKToRASDirections(1, 1, 0, 0, 0, 0, 0, 0, 1)
    with pytest.raises(ThinSegError, match="'flat' has degenerate IJK-to-RAS directions"):
        volumes.require_thin_section_geometry(degenerate)
    skewed = volumes.create_rgb_volume(scene, "aniso", rgb(), 0.01)
    skewed.SetSpacing(0.01, 0.02, 0.01)
    with pytest.raises(ThinSegError, match="'aniso' has 0.01 x 0.02 mm pixels .* needs square pixels"):
        volumes.require_thin_section_geometry(skewed)
    empty = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "empty")
    with pytest.raises(ThinSegError, match="no image data"):
        volumes.rgb_array(empty)
    assert volumes.is_rgb_volume(rotated) and not volumes.is_rgb_volume(grey)


def test_labelmap_carries_class_names_and_colours_in_its_colour_table(scene):
    table = default_class_table()
    pp = volumes.create_rgb_volume(scene, "S_PP", rgb(5, 7), 0.002, (1.0, 2.0, 0.0))
    labels = np.zeros((5, 7), np.uint8)
    labels[1:3, 1:4], labels[4, 6] = 1, 6
    node = labelmaps.create_labelmap(scene, "S_Seg", labels, table, reference=pp)
    assert node.IsA("vtkMRMLLabelMapVolumeNode")
    assert np.array_equal(volumes.label_array(node), labels)
    assert np.allclose(ijk_to_ras(node), ijk_to_ras(pp))
    colors = node.GetDisplayNode().GetColorNode()
    assert colors.GetNumberOfColors() == len(table) + 1
    assert [colors.GetColorName(k) for k in range(1, 7)] == table.names
    rgba = [0.0] * 4
    colors.GetColor(0, rgba)
    assert rgba[3] == 0.0  # background is transparent
    assert labelmaps.labelmap_class_table(node) == table
    with pytest.raises(ThinSegError, match="label value 7"):
        labelmaps.create_labelmap(scene, "bad", np.full((2, 2), 7, np.uint8), table, 0.01)


def test_labelmap_to_segmentation_to_labelmap_keeps_names_colours_values_and_empty_classes(scene):
    table = default_class_table()
    pp = volumes.create_rgb_volume(scene, "S_PP", rgb(8, 10), 0.002, (0.5, -0.5, 0.0))
    labels = np.zeros((8, 10), np.uint8)
    labels[:4, :5], labels[4:, 5:], labels[0, 9] = 1, 4, 6  # Dolomite, Mg-Clay, Quartz have no pixel
    labelmap = labelmaps.create_labelmap(scene, "S_Seg", labels, table, reference=pp)
    labelmaps.set_reference(labelmap, pp)
    segmentation = labelmaps.labelmap_to_segmentation(labelmap)
    seg = segmentation.GetSegmentation()
    assert seg.GetNumberOfSegments() == len(table)
    assert labelmaps.segmentation_class_table(segmentation) == table  # order, names and colours
    assert segmentation.GetNodeReference(labelmaps.PP_REFERENCE) is pp
    back = labelmaps.segmentation_to_labelmap(segmentation, reference=pp)
    assert np.array_equal(volumes.label_array(back), labels)
    assert labelmaps.labelmap_class_table(back) == table
    assert np.allclose(ijk_to_ras(back), ijk_to_ras(pp))
    # without a reference volume the segmentation's own reference geometry gives the same grid
    again = labelmaps.segmentation_to_labelmap(segmentation)
    assert np.array_equal(volumes.label_array(again), labels)
    assert np.allclose(ijk_to_ras(again), ijk_to_ras(pp))


def test_a_foreign_colour_table_is_read_up_to_the_labels_used(scene):
    colors = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "generic")
    colors.SetTypeToUser()
    colors.SetNumberOfColors(300)
    for k in range(300):
        colors.SetColor(k, f"tissue {k}", k / 300, 0.5, 0.5, 1.0)
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "lab")
    volumes.set_thin_section_geometry(node, 0.01)
    volumes.update_volume(node, np.array([[[0, 1, 3]]], np.uint8))
    labelmaps.set_labelmap_colors(node, colors)
    table = labelmaps.labelmap_class_table(node)
    assert table.names == ["tissue 1", "tissue 2", "tissue 3"]


def test_reusing_an_output_labelmap_replaces_its_old_colour_table(scene):
    table = default_class_table()
    node = labelmaps.create_labelmap(scene, "out", np.ones((3, 3), np.uint8), table, 0.01)
    first = node.GetDisplayNode().GetColorNode()
    small = ClassTable.from_names_colors(["A", "B"], ["#ff0000", "#00ff00"])
    labelmaps.create_labelmap(scene, "out", np.full((3, 3), 2, np.uint8), small, 0.01, node=node)
    assert labelmaps.labelmap_class_table(node) == small
    assert scene.GetNodeByID(first.GetID()) is None


def test_results_are_placed_in_the_folder_of_their_image(scene):
    pp = volumes.create_rgb_volume(scene, "S_PP", rgb(), 0.01)
    folder = hierarchy.create_folder(scene, "Well A")
    hierarchy.place(pp, folder)
    lab = labelmaps.create_labelmap(scene, "S_Seg", np.zeros((5, 7), np.uint8), default_class_table(), reference=pp)
    hierarchy.place_beside(lab, pp)
    assert hierarchy.parent_item(lab) == folder
    assert [n.GetName() for n in hierarchy.children_nodes(scene, folder)] == ["S_PP", "S_Seg"]


def test_parameter_node_is_saved_with_the_scene(scene, tmp_path):
    logic = ThinSectionSegmentationLogic(scene)
    params = logic.getParameterNode()
    assert logic.getParameterNode().parameterNode is params.parameterNode  # one per scene
    assert params.values() == ThinSectionSegmentationParameters()
    pp = volumes.create_rgb_volume(scene, "S_PP", rgb(), 0.01)
    params.epochs = 7
    params.confidence = True
    params.trainFiles = ["/a.nc", "/b.nc"]
    params.ppVolume = pp
    scene.SetURL(str(tmp_path / "scene.mrml"))
    assert scene.Commit()
    loaded = slicer.vtkMRMLScene()
    loaded.SetURL(str(tmp_path / "scene.mrml"))
    assert loaded.Connect()
    again = typed(find_parameter_node(loaded))
    assert again.epochs == 7 and again.confidence and again.device is Device.auto
    assert again.trainFiles == ["/a.nc", "/b.nc"]
    assert again.ppVolume.GetName() == "S_PP"


def test_results_are_named_after_the_input_without_its_pp_affix(scene):
    for name, base in (
        ("S12_PP", "S12"),
        ("ABC_3200.5_pp", "ABC_3200.5"),
        ("PP_S3_left", "S3_left"),
        ("apple", "apple"),
    ):
        node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", name)
        assert base_name(node) == base


def test_results_that_do_not_fit_their_image_are_refused_and_leave_nothing(scene):
    pp = volumes.create_rgb_volume(scene, "S_PP", rgb(5, 7), 0.01)
    before = scene.GetNumberOfNodes()
    with pytest.raises(ThinSegError, match="the result is 6x5 px but 'S_PP' is 7x5 px"):
        labelmaps.create_labelmap(scene, "bad", np.zeros((5, 6), np.uint8), default_class_table(), reference=pp)
    with pytest.raises(ThinSegError, match="the result is 7x4 px but 'S_PP' is 7x5 px"):
        volumes.create_scalar_volume(scene, "conf", np.zeros((4, 7), np.uint8), reference=pp)
    assert scene.GetNumberOfNodes() == before


def test_greyscale_volumes_read_as_pictures_but_not_as_photographs(scene):
    grey = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "grey")
    grey.SetIJKToRASDirections(1, 0, 0, 0, 1, 0, 0, 0, 1)  # as slicer.util.addVolumeFromArray makes it
    values = np.arange(12, dtype=np.uint16).reshape(1, 3, 4)
    volumes.update_volume(grey, values)
    assert np.array_equal(volumes.scalar_array(grey), values[0, ::-1, ::-1])  # what Slicer shows
    assert np.array_equal(volumes.label_array(grey), values[0, ::-1, ::-1].astype(np.uint8))
    with pytest.raises(ThinSegError, match="PP image 'grey' is not an RGB image"):
        volumes.rgb_array(grey, "PP image")
