"""Grain analysis on a real MRML scene: a labelmap node with two discs of one mineral, a touching
pair of another and a matrix -> analyzeGrains -> the grain, summary and contact table nodes (exact
class names, disc areas in mm^2 from the node's spacing, a symmetric contact table), the
grain-size and modal charts with one series per class in the class colours, all in one folder;
a segmentation gives the same tables; bad inputs fail in one line and cancelling adds nothing."""

from __future__ import annotations

import math

import numpy as np
import pytest
import slicer
import vtk

from ThinSectionSegmentationLib import ThinSectionSegmentationLogic, hierarchy, labelmaps, volumes
from ThinSectionSegmentationLib.grain_nodes import FINER
from ThinSectionSegmentationLib.parameters import get_parameter_node
from thinseg.analysis import Cancelled, GrainOptions
from thinseg.classes.table import ClassTable
from thinseg.errors import ThinSegError

MM = 0.01
H, W = 160, 200
RADIUS = 20  # px, the two Quartz discs
PAIR_RADIUS, PAIR_DISTANCE = 18, 35  # px, the touching Feldspar pair (centres 35 px apart)
CLASSES = ClassTable.from_names_colors(["Quartz", "Feldspar", "Matrix"], ["#e41a1c", "#4daf4a", "#377eb8"])


def disc_labels() -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    labels = np.full((H, W), 3, np.uint8)
    for (cy, cx), r, value in (
        ((40, 40), RADIUS, 1),
        ((110, 50), RADIUS, 1),
        ((80, 130), PAIR_RADIUS, 2),
        ((80, 130 + PAIR_DISTANCE), PAIR_RADIUS, 2),
    ):
        labels[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = value
    return labels


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


@pytest.fixture
def section(scene):
    """A labelmap node (with its colour table) in a folder, as segment/register results are."""
    folder = hierarchy.create_folder(scene, "S1 folder")
    node = labelmaps.create_labelmap(scene, "S1 map", disc_labels(), CLASSES, mm_per_pixel=MM)
    hierarchy.place(node, folder)
    return node, folder


def column(table_node, name):
    table = table_node.GetTable()
    array = table.GetColumnByName(name)
    assert array is not None, f"{table_node.GetName()} has no column {name!r}"
    return [table.GetValue(r, table.GetColumnIndex(name)) for r in range(table.GetNumberOfRows())]


def numbers(table_node, name):
    return np.array([v.ToDouble() for v in column(table_node, name)])


def texts(table_node, name):
    return [v.ToString() for v in column(table_node, name)]


def cells(table_node):
    table = table_node.GetTable()
    return [
        [table.GetValue(r, c).ToString() for c in range(table.GetNumberOfColumns())]
        for r in range(table.GetNumberOfRows())
    ]


def node_ids(scene):
    return {scene.GetNthNode(i).GetID() for i in range(scene.GetNumberOfNodes())}


def series_of(chart):
    scene = chart.GetScene()
    return [scene.GetNodeByID(chart.GetNthPlotSeriesNodeID(i)) for i in range(chart.GetNumberOfPlotSeriesNodes())]


def test_discs_give_grain_summary_and_contact_tables_with_exact_names_and_areas(scene, section):
    node, folder = section
    labels = disc_labels()
    progress = []
    out = ThinSectionSegmentationLogic(scene).analyzeGrains(
        node, progress=lambda done, total: progress.append((done, total))
    )
    assert progress and progress[-1][0] == progress[-1][1]
    assert out.grainCount == 4
    # grains: one row per grain, classes by name, the discs' areas in mm^2 from the node's spacing
    assert out.grains.GetName() == "S1 map grains" and out.grains.GetTable().GetNumberOfRows() == 4
    assert texts(out.grains, "class") == ["Quartz", "Feldspar", "Feldspar", "Quartz"]  # raster order
    area = numbers(out.grains, "area_mm2")
    quartz = np.array(texts(out.grains, "class")) == "Quartz"
    assert area[quartz] == pytest.approx(math.pi * (RADIUS * MM) ** 2, rel=0.02)
    pair_area = (labels == 2).sum() * MM * MM
    assert area[~quartz].sum() == pytest.approx(pair_area, rel=1e-9)  # the split pair keeps every pixel
    assert area[~quartz] == pytest.approx(pair_area / 2, rel=0.02)  # cut at the neck, half each
    assert numbers(out.grains, "equivalent_diameter_mm")[quartz] == pytest.approx(2 * RADIUS * MM, rel=0.01)
    assert texts(out.grains, "neighbours") == ["", "3", "2", ""]  # the pair touch each other only
    assert out.grains.GetColumnUnitLabel("area_mm2") == "mm^2" and out.grains.GetColumnUnitLabel("perimeter_mm") == "mm"
    # summary: per class, area % of the classified pixels, grains, measured, sizes
    assert out.summary.GetName() == "S1 map grain summary"
    assert texts(out.summary, "Class") == ["Quartz", "Feldspar", "Matrix"]
    assert texts(out.summary, "Role") == ["grains", "grains", "matrix"]
    counts = np.bincount(labels.ravel(), minlength=4)[1:]
    assert numbers(out.summary, "Area (%)") == pytest.approx(100 * counts / counts.sum(), rel=1e-12)
    low, high = numbers(out.summary, "Area low (%)"), numbers(out.summary, "Area high (%)")
    assert np.all(low < numbers(out.summary, "Area (%)")) and np.all(numbers(out.summary, "Area (%)") < high)
    assert list(numbers(out.summary, "Grains")) == [2, 2, 0] and list(numbers(out.summary, "Measured")) == [2, 2, 0]
    assert numbers(out.summary, "D50 ECD (mm)")[0] == pytest.approx(2 * RADIUS * MM, rel=0.01)
    assert texts(out.summary, "Sorting")[:2] == ["very well sorted", "very well sorted"]  # one size per class
    assert math.isnan(numbers(out.summary, "Mean ECD (mm)")[2])  # the matrix has no grains
    # contacts: class x class in mm, symmetric, zero where classes do not touch
    assert out.contacts.GetName() == "S1 map contacts"
    assert texts(out.contacts, "Class") == CLASSES.names
    lengths = np.array([numbers(out.contacts, name) for name in CLASSES.names]).T
    assert lengths == pytest.approx(lengths.T, abs=1e-12)
    assert lengths[0, 1] == 0 and lengths[0, 0] == 0  # Quartz touches neither Feldspar nor another Quartz
    assert lengths[0, 2] == pytest.approx(2 * 2 * math.pi * RADIUS * MM, rel=0.05)  # two disc outlines
    chord = 2 * math.sqrt(PAIR_RADIUS**2 - (PAIR_DISTANCE / 2) ** 2) * MM
    assert lengths[1, 1] == pytest.approx(chord, rel=0.3)  # where the pair was cut apart
    assert out.contacts.GetColumnUnitLabel("Matrix") == "mm"
    # one folder beside the input holds everything
    assert hierarchy.item_name(scene, out.folder) == "S1 map grain analysis"
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    assert sh.GetItemParent(out.folder) == folder
    assert {n.GetID() for n in hierarchy.children_nodes(scene, out.folder)} == {n.GetID() for n in out.nodes}
    assert out.statistics["grains"]["count"] == 4


def test_charts_have_one_series_per_class_in_the_class_colours(scene, section):
    node, _folder = section
    out = ThinSectionSegmentationLogic(scene).analyzeGrains(node)
    colors = {c.name: tuple(v / 255 for v in c.rgb) for c in CLASSES.classes}
    # cumulative size curves: the grain classes (not the matrix), x = ECD on a log axis, y = % finer
    curves = series_of(out.sizeChart)
    assert [s.GetXColumnName() for s in curves] == ["Quartz ECD (mm)", "Feldspar ECD (mm)"]
    assert [s.GetYColumnName() for s in curves] == [f"Quartz {FINER}", f"Feldspar {FINER}"]
    for series, name in zip(curves, ("Quartz", "Feldspar")):
        assert series.GetColor() == pytest.approx(colors[name])
        table = series.GetTableNode()
        assert numbers(table, f"{name} {FINER}").tolist() == [50.0, 100.0]  # two grains of one size
    assert numbers(curves[0].GetTableNode(), "Quartz ECD (mm)") == pytest.approx(2 * RADIUS * MM, rel=0.01)
    assert out.sizeChart.GetXAxisLogScale() and "finer" in out.sizeChart.GetYAxisTitle()
    # modal mineralogy: one bar series per class, its colour, its area % on its own row
    bars = series_of(out.modalChart)
    assert len(bars) == 3 and all(s.GetPlotType() == s.PlotTypeBar for s in bars)
    percent = numbers(out.summary, "Area (%)")
    for k, (series, name) in enumerate(zip(bars, CLASSES.names)):
        assert series.GetColor() == pytest.approx(colors[name])
        values = numbers(series.GetTableNode(), series.GetYColumnName())
        assert values[k] == pytest.approx(percent[k]) and np.count_nonzero(values) == 1
        assert texts(series.GetTableNode(), series.GetLabelColumnName()) == CLASSES.names


def test_the_pixel_size_is_the_nodes_spacing(scene, section):
    node, _folder = section
    logic = ThinSectionSegmentationLogic(scene)
    first = logic.analyzeGrains(node)
    node.SetSpacing(2 * MM, 2 * MM, 2 * MM)
    second = logic.analyzeGrains(node)
    assert second.grains.GetName() == "S1 map grains_1"  # a second run adds, it does not overwrite
    assert numbers(second.grains, "area_mm2") == pytest.approx(4 * numbers(first.grains, "area_mm2"), rel=1e-9)
    assert numbers(second.grains, "equivalent_diameter_mm") == pytest.approx(
        2 * numbers(first.grains, "equivalent_diameter_mm"), rel=1e-9
    )
    assert numbers(second.summary, "Area (%)") == pytest.approx(numbers(first.summary, "Area (%)"), rel=1e-12)
    assert numbers(second.contacts, "Matrix") == pytest.approx(2 * numbers(first.contacts, "Matrix"), rel=1e-9)


def test_a_segmentation_gives_the_same_tables_and_leaves_no_temporary_labelmap(scene, section):
    node, _folder = section
    logic = ThinSectionSegmentationLogic(scene)
    from_labelmap = logic.analyzeGrains(node)
    segmentation = labelmaps.labelmap_to_segmentation(node)
    before = node_ids(scene)
    from_segmentation = logic.analyzeGrains(segmentation)
    assert node_ids(scene) - before == {n.GetID() for n in from_segmentation.nodes}
    assert from_segmentation.grains.GetName() == "S1 map_Segmentation grains"
    for a, b in (
        (from_labelmap.grains, from_segmentation.grains),
        (from_labelmap.summary, from_segmentation.summary),
        (from_labelmap.contacts, from_segmentation.contacts),
    ):
        assert cells(a) == cells(b), a.GetName()


def test_a_pp_image_of_the_same_grid_is_accepted_and_one_of_another_size_refused(scene, section):
    node, _folder = section
    logic = ThinSectionSegmentationLogic(scene)
    pp = volumes.create_rgb_volume(scene, "S1_PP", np.zeros((H, W, 3), np.uint8), MM)
    assert logic.analyzeGrains(node, pp).grainCount == 4
    other = volumes.create_rgb_volume(scene, "S2_PP", np.zeros((H, W + 1, 3), np.uint8), MM)
    before = node_ids(scene)
    with pytest.raises(ThinSegError, match=r"^PP 'S2_PP' is 201x160 px but labelmap 'S1 map' is 200x160 px"):
        logic.analyzeGrains(node, other)
    assert node_ids(scene) == before


def _scalar(scene):
    return volumes.create_scalar_volume(scene, "grey", disc_labels(), MM)


def _rgb(scene):
    return volumes.create_rgb_volume(scene, "photo", np.zeros((H, W, 3), np.uint8), MM)


def _unnamed_value(scene):
    node = labelmaps.create_labelmap(scene, "five", disc_labels(), CLASSES, mm_per_pixel=MM)
    labels = disc_labels()
    labels[0, 0] = 5
    volumes.update_volume(node, labels[np.newaxis])
    return node


def _undefined_entry(scene):
    color = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "partial colours")
    color.SetTypeToUser()
    color.SetNumberOfColors(4)
    color.SetColor(0, "Background", 0, 0, 0, 0)
    color.SetColor(1, "Quartz", 1, 0, 0, 1)
    color.SetColor(3, "Matrix", 0, 0, 1, 1)
    node = labelmaps.create_labelmap(scene, "gap", disc_labels(), CLASSES, mm_per_pixel=MM)
    labelmaps.set_labelmap_colors(node, color)
    return node


def _no_colours(scene):
    node = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "bare")
    volumes.set_thin_section_geometry(node, MM)
    volumes.update_volume(node, disc_labels()[np.newaxis])
    return node


def _slices(scene):
    node = labelmaps.create_labelmap(scene, "stack", disc_labels(), CLASSES, mm_per_pixel=MM)
    volumes.update_volume(node, np.stack([disc_labels()] * 3))
    return node


def _oblong(scene):
    node = labelmaps.create_labelmap(scene, "oblong", disc_labels(), CLASSES, mm_per_pixel=MM)
    node.SetSpacing(MM, 2 * MM, MM)
    return node


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_scalar, r"^'grey' is a scalar volume, not a labelmap: grain analysis needs a labelmap whose colour table"),
        (_rgb, r"^'photo' is an RGB image, not a labelmap"),
        (_unnamed_value, r"^labelmap 'five': label values 5 have no class name in colour table 'five_ColorTable'$"),
        (_undefined_entry, r"^labelmap 'gap': label values 2 have no class name in colour table 'partial colours'$"),
        (_no_colours, r"^labelmap 'bare' has no colour table: its classes have no names$"),
        (_slices, r"^labelmap 'stack' has 3 slices of 200x160 px; a thin section is a single slice$"),
        (_oblong, r"^labelmap 'oblong' has 0.01 x 0.02 mm pixels \(width x height\); grain analysis needs square"),
        (lambda scene: None, r"^choose a labelmap \(or segmentation\) to analyse$"),
    ],
    ids=["scalar", "rgb", "value-beyond-table", "undefined-entry", "no-colour-table", "slices", "oblong", "none"],
)
def test_bad_inputs_fail_in_one_line_and_add_nothing(scene, make, message):
    node = make(scene)
    before = node_ids(scene)
    with pytest.raises(ThinSegError, match=message) as raised:
        ThinSectionSegmentationLogic(scene).analyzeGrains(node)
    assert "\n" not in str(raised.value)
    assert node_ids(scene) == before


@pytest.mark.parametrize("kind", ["labelmap", "segmentation"])
def test_cancelling_stops_the_analysis_and_adds_nothing(scene, section, kind):
    node, _folder = section
    if kind == "segmentation":
        node = labelmaps.labelmap_to_segmentation(node)
    before = node_ids(scene)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    items = vtk_items(sh)
    asked = []

    def cancelled():
        asked.append(True)
        return True

    with pytest.raises(Cancelled):
        ThinSectionSegmentationLogic(scene).analyzeGrains(node, cancelled=cancelled)
    assert asked
    assert node_ids(scene) == before and vtk_items(sh) == items


def test_given_options_are_used_with_one_worker(scene, section):
    node, _folder = section
    out = ThinSectionSegmentationLogic(scene).analyzeGrains(node, options=GrainOptions(split=False, workers=4))
    assert out.grainCount == 3  # the touching pair stays one grain
    assert out.statistics["settings"]["split_touching_grains"] is False
    with pytest.raises(ThinSegError, match=r"^neck ratio 2.0 is outside 0.05..0.99$"):
        ThinSectionSegmentationLogic(scene).analyzeGrains(node, neckRatio=2.0)


def vtk_items(sh):
    ids = vtk.vtkIdList()
    sh.GetItemChildren(sh.GetSceneItemID(), ids, True)
    return sorted(ids.GetId(i) for i in range(ids.GetNumberOfIds()))


def test_a_scene_saved_before_grain_analysis_gets_its_defaults_and_keeps_a_choice(tmp_path):
    scene = slicer.vtkMRMLScene()
    params = get_parameter_node(scene)
    params.epochs = 35
    for name in ("grainLabelmap", "grainPpVolume", "grainNeckRatio", "grainMinPixels"):
        params.parameterNode.UnsetParameter(name)  # as the module wrote it before grain analysis
    scene.SetURL(str(tmp_path / "before-grains.mrml"))
    assert scene.Commit()
    loaded = slicer.vtkMRMLScene()
    loaded.SetURL(str(tmp_path / "before-grains.mrml"))
    assert loaded.Import()
    again = get_parameter_node(loaded)
    assert (again.grainLabelmap, again.grainPpVolume, again.grainNeckRatio, again.grainMinPixels) == (
        None,
        None,
        0.7,
        12,
    )
    assert again.epochs == 35
    labelmap = labelmaps.create_labelmap(loaded, "S1 map", disc_labels(), CLASSES, mm_per_pixel=MM)
    again.grainLabelmap, again.grainNeckRatio, again.grainMinPixels = labelmap, 0.5, 30
    with pytest.raises(ValueError, match=r"^Value must be within range \[0.05, 0.99\], is 1.5$"):
        again.grainNeckRatio = 1.5
    assert (again.grainLabelmap, again.grainNeckRatio, again.grainMinPixels) == (labelmap, 0.5, 30)
