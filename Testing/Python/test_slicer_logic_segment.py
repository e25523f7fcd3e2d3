"""MRML logic on a real scene: segment() in-process, the result nodes (labelmap named after
the input with the class colour table, confidence, segmentation, area table and bar chart, the
input's folder, the slice views), the model list with cards, and segmentFiles() batches."""

import json

import numpy as np
import pytest
import slicer
from helpers import make_bundle, section_images, write_pair

from ThinSectionSegmentationLib import ThinSectionSegmentationLogic, hierarchy, labelmaps, models, results, volumes
from thinseg.errors import ThinSegError
from thinseg.inference.engine import Cancelled
from thinseg.io.netcdf import read_labelmap

MM = 0.00132


@pytest.fixture(scope="module")
def model_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    make_bundle(root / "ThinSectionEnv" / "tiny-ppxp", inputs=("PP", "PX"), title="Tiny PP+XP")
    make_bundle(root / "ThinSectionEnv" / "tiny-pp", inputs=("PP",), title="Tiny PP only")
    return root


@pytest.fixture
def scene():
    s = slicer.vtkMRMLScene()
    s.AddNewNodeByClass("vtkMRMLSliceCompositeNode")  # what a slice view observes
    return s


def pair(scene, name="S1", h=80, w=96):
    pp, xp = section_images(h, w, seed=3)
    folder = hierarchy.create_folder(scene, f"{name} folder")
    nodes = []
    for role, image in (("PP", pp), ("XP", xp)):
        node = volumes.create_rgb_volume(scene, f"{name}_{role}", image, MM)
        hierarchy.place(node, folder)
        nodes.append(node)
    return nodes[0], nodes[1], folder


def test_segment_returns_a_labelmap_named_after_the_input_with_its_results(scene, model_root):
    pp, xp, folder = pair(scene)
    logic = ThinSectionSegmentationLogic(scene)
    out = logic.segment(pp, xp, model_root / "ThinSectionEnv" / "tiny-ppxp", confidence=True, createSegmentation=True)
    labelmap = out.labelmap
    from thinseg.model.bundle import load_bundle

    table = load_bundle(model_root / "ThinSectionEnv" / "tiny-ppxp").class_table
    assert labelmap.GetName() == "S1_Segmentation"
    labels = volumes.label_array(labelmap)
    assert labels.shape == (80, 96) and labels.max() <= len(table)
    assert labelmaps.labelmap_class_table(labelmap) == table
    assert labelmap.GetSpacing() == pp.GetSpacing()
    assert labelmap.GetNodeReference(labelmaps.PP_REFERENCE) is pp
    assert labelmap.GetNodeReference(labelmaps.XP_REFERENCE) is xp
    # everything lands in the input's folder
    for node in (labelmap, out.table, out.chart, out.confidence, out.segmentation):
        assert hierarchy.parent_item(node) == folder, node.GetName()
    # area fractions: one row per class, then "not classified"; percentages of the section
    vtable = out.table.GetTable()
    assert vtable.GetNumberOfRows() == len(table) + 1
    assert [vtable.GetValue(r, 0).ToString() for r in range(len(table) + 1)] == table.names + ["not classified"]
    counts = np.bincount(labels.ravel(), minlength=len(table) + 1)
    counts = np.append(counts[1:], counts[0])
    percent = [vtable.GetValue(r, 1).ToDouble() for r in range(len(table) + 1)]
    assert percent == pytest.approx(100 * counts / labels.size)
    assert sum(percent) == pytest.approx(100)
    assert [vtable.GetValue(r, 3).ToDouble() for r in range(len(table) + 1)] == list(counts)
    series = scene.GetNodeByID(out.chart.GetNthPlotSeriesNodeID(0))
    assert series.GetPlotType() == series.PlotTypeBar and series.GetTableNode() is out.table
    # shown over PP in the slice views
    composite = scene.GetFirstNodeByClass("vtkMRMLSliceCompositeNode")
    assert composite.GetBackgroundVolumeID() == pp.GetID() and composite.GetLabelVolumeID() == labelmap.GetID()
    # confidence: max probability x 255 on the PP grid; segmentation: one segment per class
    conf = volumes.scalar_array(out.confidence)
    assert conf.shape == labels.shape and conf.dtype == np.uint8 and conf.max() > 0
    assert labelmaps.segmentation_class_table(out.segmentation) == table


def test_area_table_counts_unclassified_pixels_of_the_section(scene):
    """Known labels with zeros: the table and chart show "not classified", % of the section."""
    from thinseg.classes.files import default_class_table

    table = default_class_table()
    labels = np.zeros((4, 10), np.uint8)  # 40 px: 6 Calcite, 4 Quartz, 30 label 0
    labels.flat[:6] = 1
    labels.flat[6:10] = 5
    labelmap = labelmaps.create_labelmap(scene, "K_Segmentation", labels, table, mm_per_pixel=0.01)
    node = results.fractions_table(scene, labelmap)
    vtable = node.GetTable()
    rows = [[vtable.GetValue(r, c).ToString() for c in range(1)] for r in range(vtable.GetNumberOfRows())]
    assert [r[0] for r in rows] == table.names + ["not classified"]
    values = [[vtable.GetValue(r, c).ToDouble() for c in (1, 2, 3)] for r in range(vtable.GetNumberOfRows())]
    assert values[0] == pytest.approx([15.0, 0.0006, 6])
    assert values[4] == pytest.approx([10.0, 0.0004, 4])
    assert values[-1] == pytest.approx([75.0, 0.003, 30])
    assert sum(v[0] for v in values) == pytest.approx(100.0) and sum(v[2] for v in values) == labels.size
    # the chart takes its colour from the most abundant CLASS, not from the larger "not classified" row
    chart = results.fractions_chart(scene, node, labelmap)
    series = scene.GetNodeByID(chart.GetNthPlotSeriesNodeID(0))
    assert series.GetColor() == pytest.approx([v / 255.0 for v in table.classes[0].rgb])


def test_existing_output_node_is_filled_and_results_are_reused(scene, model_root):
    pp, xp, _ = pair(scene)
    logic = ThinSectionSegmentationLogic(scene)
    output = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "my result")
    first = logic.segment(pp, xp, model_root / "ThinSectionEnv" / "tiny-ppxp", outputNode=output)
    again = logic.segment(pp, xp, model_root / "ThinSectionEnv" / "tiny-ppxp", outputNode=output)
    assert first.labelmap is output and again.labelmap is output and output.GetName() == "my result"
    assert again.table is first.table and again.chart is first.chart  # updated, not duplicated
    assert scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == 1


def test_pp_only_models_need_no_xp_and_pp_xp_models_say_so(scene, model_root):
    pp, _xp, _ = pair(scene)
    logic = ThinSectionSegmentationLogic(scene)
    out = logic.segment(pp, None, model_root / "ThinSectionEnv" / "tiny-pp")
    assert volumes.label_array(out.labelmap).shape == (80, 96) and out.confidence is None and out.segmentation is None
    before = scene.GetNumberOfNodes()
    with pytest.raises(ThinSegError, match="needs an XP image"):
        logic.segment(pp, None, model_root / "ThinSectionEnv" / "tiny-ppxp")
    with pytest.raises(ThinSegError, match="model folder not found"):
        logic.segment(pp, None, model_root / "missing")
    assert scene.GetNumberOfNodes() == before


def test_cancel_leaves_the_scene_as_it_was(scene, model_root):
    pp, xp, _ = pair(scene)
    logic = ThinSectionSegmentationLogic(scene)
    before = scene.GetNumberOfNodes()
    seen = []
    with pytest.raises(Cancelled):
        logic.segment(
            pp,
            xp,
            model_root / "ThinSectionEnv" / "tiny-ppxp",
            progress=lambda d, t: seen.append((d, t)),
            cancel=lambda: len(seen) >= 1,
            tile=64,
        )  # small tiles: several batches
    assert scene.GetNumberOfNodes() == before


def test_images_without_a_pixel_size_use_the_core_default(scene, model_root):
    pp, xp, _ = pair(scene)
    for node in (pp, xp):
        node.SetSpacing(1.0, 1.0, 1.0)  # what Slicer gives a JPEG
    logic = ThinSectionSegmentationLogic(scene)
    assert logic.imageSpacing(pp) == pytest.approx(MM)
    assert any("no pixel size" in m for m in logic.messages)
    assert logic.imageSpacing(pp, 0.002) == 0.002


def test_model_list_shows_bundled_and_user_models_with_cards(model_root, tmp_path):
    found = models.list_models([model_root])
    titles = {m.title: m for m in found}
    assert {"Tiny PP+XP", "Tiny PP only"} <= set(titles)
    assert titles["Tiny PP+XP"].needs_xp and not titles["Tiny PP only"].needs_xp
    assert titles["Tiny PP only"].classes[0] == "Calcite"
    card = models.model_card(titles["Tiny PP+XP"])
    assert "Tiny PP+XP" in card and "Calcite" in card and "PP, PX" in card
    # a MODEL_CARD.md is shown as written; a broken meta.json is listed, marked, not hidden
    other = tmp_path / "ThinSectionEnv" / "carded"
    other.mkdir(parents=True)
    (other / "meta.json").write_text(json.dumps({"title": "Carded", "inputs": {"PP": {}}}), encoding="utf-8")
    (other / "model.pth").write_bytes(b"")
    (other / "MODEL_CARD.md").write_text("# Carded model\nTrained on well B.", encoding="utf-8")
    broken = tmp_path / "ThinSectionEnv" / "broken"
    broken.mkdir()
    (broken / "meta.json").write_text("{not json", encoding="utf-8")
    (broken / "model.pth").write_bytes(b"")
    (tmp_path / "ThinSectionEnv" / ".partial-write").mkdir()
    listed = {m.path.name: m for m in models.list_models([tmp_path])}
    assert "carded" in listed and "broken" in listed and ".partial-write" not in listed
    assert models.model_card(listed["carded"]).startswith("# Carded model")
    assert listed["broken"].problem and "unreadable" in listed["broken"].label
    fresh = models.new_model_dir(tmp_path, "carded")  # new models go where GeoSlicer lists them
    assert fresh.relative_to(tmp_path).parts == ("ThinSectionEnv", "Multiphase", "carded")
    fresh.mkdir(parents=True)
    assert models.new_model_dir(tmp_path, "carded").name == "carded_1"


def test_segment_files_batch_from_the_console(scene, model_root, tmp_path):
    inputs = tmp_path / "in"
    write_pair(inputs, "A_PP", "A_XP", height=64, width=80, seed=1)
    write_pair(inputs, "B_PP", "B_XP", height=64, width=80, seed=2)
    (inputs / "lonely_PP.png").write_bytes(b"\x89PNG broken")
    logic = ThinSectionSegmentationLogic(scene)
    batch = logic.segmentFiles([inputs], tmp_path / "out", model_root / "ThinSectionEnv" / "tiny-ppxp", load=True)
    assert sorted(r.netcdf.name for r in batch.results) == ["A_PP.nc", "B_PP.nc"]
    assert len(batch.failures) == 1 and "lonely_PP" in str(batch.failures[0][0])
    assert (tmp_path / "out" / "modal_mineralogy.csv").is_file()
    names = {scene.GetNthNode(i).GetName() for i in range(scene.GetNumberOfNodes())}
    assert {"A_PP", "A_XP", "B_PP"} <= names
    assert sorted(f.pp.GetName() for f in batch.imported) == ["A_PP", "B_PP"]
    assert [f.path.name for f in batch.imported] == [r.netcdf.name for r in batch.results]


def test_segment_files_batch_on_a_dask_cluster_from_the_console(scene, model_root, tmp_path):
    """`cluster=` runs each section as a task on a LocalCluster: the same results, failures and
    imported nodes as a batch in the console's own process."""
    pytest.importorskip("distributed")
    inputs = tmp_path / "in"
    write_pair(inputs, "A_PP", "A_XP", height=64, width=80, seed=1)
    (inputs / "lonely_PP.png").write_bytes(b"\x89PNG broken")
    logic = ThinSectionSegmentationLogic(scene)
    model = model_root / "ThinSectionEnv" / "tiny-ppxp"
    batch = logic.segmentFiles([inputs], tmp_path / "out", model, load=True, cluster="local:1")
    assert [r.netcdf.name for r in batch.results] == ["A_PP.nc"]
    assert len(batch.failures) == 1 and "lonely_PP" in str(batch.failures[0][0])
    assert [f.pp.GetName() for f in batch.imported] == ["A_PP"]
    here = logic.segmentFiles([inputs / "A_PP.png"], tmp_path / "local", model)
    assert here.results[0].mineralogy == batch.results[0].mineralogy


def test_segment_files_shares_one_section_among_cluster_workers_from_the_console(scene, model_root, tmp_path):
    """`bandRows=` shares a section among the workers in parts of tile rows: the labels equal a
    run in the console's own process."""
    pytest.importorskip("distributed")
    inputs = tmp_path / "in"
    write_pair(inputs, "Tall_PP", "Tall_XP", height=1400, width=64, seed=1)
    logic = ThinSectionSegmentationLogic(scene)
    model = model_root / "ThinSectionEnv" / "tiny-ppxp"
    batch = logic.segmentFiles([inputs], tmp_path / "out", model, load=True, cluster="local:1", bandRows=1)
    assert [r.netcdf.name for r in batch.results] == ["Tall_PP.nc"] and not batch.failures
    parts = [m for m in batch.results[0].messages if "shared by the cluster's workers" in m]
    assert len(parts) == 1 and not parts[0].endswith(" 1 part")
    here = logic.segmentFiles([inputs], tmp_path / "local", model)
    assert here.results[0].mineralogy == batch.results[0].mineralogy
    shared = read_labelmap(batch.results[0].netcdf, "Tall_Segmentation")[0]
    assert np.array_equal(shared, read_labelmap(here.results[0].netcdf, "Tall_Segmentation")[0])
    assert [f.pp.GetName() for f in batch.imported] == ["Tall_PP"]


def test_segment_warns_when_the_rock_is_out_of_the_models_depth(scene):
    """The bundled synthetic model on a real sandstone field: the result's messages say the map is
    unreliable; on its own synthetic sample they do not."""
    from helpers import REPO, read_rgb, real_field

    logic = ThinSectionSegmentationLogic(scene)
    files = real_field("2a")
    pp = volumes.create_rgb_volume(scene, "2a_PP", read_rgb(files["pp"]), MM)
    xp = volumes.create_rgb_volume(scene, "2a_XP", read_rgb(files["xp"]), MM)
    out = logic.segment(pp, xp, show=False)
    assert len(out.messages) == 1 and out.messages[0].startswith("warning: 2a_PP: the map is unreliable")
    assert out.messages[0] in logic.messages
    sample = REPO / "Resources" / "Sample"
    pp = volumes.create_rgb_volume(scene, "sample_PP", read_rgb(sample / "sample_PP.jpg"), MM)
    xp = volumes.create_rgb_volume(scene, "sample_XP", read_rgb(sample / "sample_XP.jpg"), MM)
    assert logic.segment(pp, xp, show=False).messages == []


def test_the_background_job_sends_the_out_of_depth_warning_as_a_warning_event(scene):
    """The panel runs segmentation as a job: the warning reaches it as a typed warning event (shown
    on the status line), not only as a log message."""
    import sys

    from helpers import read_rgb, real_field

    from ThinSectionSegmentationLib import process
    from thinseg.jobs import WarningEvent

    logic = ThinSectionSegmentationLogic(scene)
    files = real_field("2a")
    pp = volumes.create_rgb_volume(scene, "2a_PP", read_rgb(files["pp"]), MM)
    xp = volumes.create_rgb_volume(scene, "2a_XP", read_rgb(files["xp"]), MM)
    job = logic.prepareSegmentation(pp, xp, device="cpu", python=sys.executable)
    try:
        proc = logic.startJob(job)
        received = proc.wait(timeout=300)
        proc.check()
    finally:
        logic.discardJob(job)
    warnings = [e.text for e in received if isinstance(e, WarningEvent)]
    assert any("the map is unreliable" in text for text in warnings), warnings
    assert not any(isinstance(e, process.OutputLine) and "unreliable" in e.text for e in received)
