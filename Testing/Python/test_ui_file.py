"""The panel's Qt Designer file: valid XML, every widget the widget code uses exists, every
Slicer/CTK class is declared, MRML widgets get the scene, and (with PySide6) it loads with the
Slicer classes drawn as Qt ones, which is how scripts/render_panel_preview.py draws the README
picture."""

import importlib.util
import re
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE = REPO / "ThinSectionSegmentation"
UI = MODULE / "Resources" / "UI" / "ThinSectionSegmentation.ui"
#: The code that uses the .ui file's widgets: the panel, and the module file's in-Slicer test.
WIDGET_CODE = (MODULE / "ThinSectionSegmentationLib" / "panel.py", MODULE / "ThinSectionSegmentation.py")
#: Slicer/CTK widget base classes that are themselves declared in Slicer's own Designer plugins.
SLICER_PREFIXES = ("qMRML", "qSlicer", "ctk")


@pytest.fixture(scope="module")
def root():
    return ET.parse(UI).getroot()  # raises on malformed XML


def widget_names(root):
    return [w.get("name") for w in root.iter("widget")]


def test_ui_is_a_designer_file_for_the_module(root):
    assert root.tag == "ui" and root.get("version") == "4.0"
    top = root.find("widget")
    assert top.get("class") == "qMRMLWidget" and top.get("name") == "ThinSectionSegmentation"
    assert root.findtext("class") == "ThinSectionSegmentation"
    names = widget_names(root)
    assert len(names) == len(set(names)), "duplicate widget names"


def test_every_widget_the_code_uses_exists(root):
    code = "\n".join(path.read_text(encoding="utf-8") for path in WIDGET_CODE)
    used = set(re.findall(r"\bui\.([A-Za-z_]\w*)", code))
    assert used, "the widget code uses no ui.* names?"
    missing = used - set(widget_names(root))
    assert not missing, f"the widget code uses widgets missing from the .ui file: {sorted(missing)}"


def test_sections_and_controls_of_the_issue_are_there(root):
    by_name = {w.get("name"): w for w in root.iter("widget")}
    for name in (
        "segmentCollapsibleButton",
        "registerCollapsibleButton",
        "trainCollapsibleButton",
        "exportCollapsibleButton",
        "ppSelector",
        "xpSelector",
        "modelSelector",
        "modelCardBrowser",
        "outputSelector",
        "createSegmentationCheckBox",
        "deviceComboBox",
        "confidenceCheckBox",
        "segmentButton",
        "progressBar",
        "statusLabel",
        "qemscanSelector",
        "loadQemscanButton",
        "imageLandmarksSelector",
        "qemscanLandmarksSelector",
        "residualsTableView",
        "transformTypeComboBox",
        "registerButton",
        "refineButton",
        "trainSectionsSelector",
        "trainFilesList",
        "trainingRecipeComboBox",
        "epochsSpinBox",
        "trainButton",
        "exportTreeView",
        "exportButton",
        "importButton",
    ):
        assert name in by_name, name
    texts = {w.get("name"): w.findtext("property[@name='text']/string") for w in root.iter("widget")}
    assert texts["segmentButton"] == "Segment" and texts["refineButton"] == "Refine automatically"
    assert texts["exportButton"] == "Export to netCDF"
    pp_types = [s.text for s in by_name["ppSelector"].findall("property[@name='nodeTypes']/stringlist/string")]
    assert pp_types == ["vtkMRMLVectorVolumeNode"]


def _form_rows(layout):
    """Row number -> {column: widget name} of a QFormLayout."""
    rows = {}
    for item in layout.findall("item"):
        widget = item.find("widget")
        if widget is not None:
            rows.setdefault(int(item.get("row")), {})[int(item.get("column"))] = widget.get("name")
    return rows


def test_the_recipe_is_chosen_above_the_epochs_it_sets_and_says_where_its_models_run(root):
    combo = next(w for w in root.iter("widget") if w.get("name") == "trainingRecipeComboBox")
    assert combo.get("class") == "QComboBox"
    bound = combo.find("property[@name='SlicerParameterName']")
    assert bound.get("stdset") == "0" and bound.findtext("string") == "trainingRecipe"
    items = [i.findtext("property/string") for i in combo.findall("item")]
    assert items == ["U-Net (runs in GeoSlicer)", "Small data: pre-trained encoder (needs this extension)"]
    tip = combo.findtext("property[@name='toolTip']/string")
    assert "do not run in GeoSlicer's own AI Segmenter" in tip and "ImageNet" in tip
    rows = _form_rows(next(layout for layout in root.iter("layout") if layout.get("name") == "trainFormLayout"))
    recipe_row = next(r for r, row in rows.items() if row.get(1) == "trainingRecipeComboBox")
    assert rows[recipe_row][0] == "trainingRecipeLabel" and rows[recipe_row + 1][1] == "epochsSpinBox"
    assert sorted(rows) == list(range(len(rows)))  # no two widgets share a row, none is skipped
    texts = {w.get("name"): w.findtext("property[@name='text']/string") for w in root.iter("widget")}
    assert texts["trainingRecipeLabel"] == "Recipe:"


def test_custom_classes_are_declared_with_header_and_a_qt_base(root):
    declared = {}
    for custom in root.iter("customwidget"):
        cls = custom.findtext("class")
        assert custom.findtext("header") == f"{cls}.h", cls
        declared[cls] = custom.findtext("extends")
    used = {w.get("class") for w in root.iter("widget")}
    custom_used = {c for c in used if c.startswith(SLICER_PREFIXES)}
    assert custom_used <= set(declared), f"undeclared: {sorted(custom_used - set(declared))}"
    for cls in declared:
        seen, base = [cls], declared[cls]
        while base in declared:  # e.g. qMRMLCheckableNodeComboBox -> qMRMLNodeComboBox -> QWidget
            assert base not in seen, f"cycle in extends: {seen}"
            seen.append(base)
            base = declared[base]
        assert base and base.startswith("Q"), f"{cls} does not extend a Qt class ({seen} -> {base})"


def test_mrml_widgets_receive_the_scene(root):
    receivers = {
        c.findtext("receiver")
        for c in root.iter("connection")
        if c.findtext("sender") == "ThinSectionSegmentation"
        and c.findtext("signal") == "mrmlSceneChanged(vtkMRMLScene*)"
        and c.findtext("slot") == "setMRMLScene(vtkMRMLScene*)"
    }
    mrml = {
        w.get("name")
        for w in root.iter("widget")
        if w.get("class", "").startswith(("qMRML", "qSlicer")) and w.get("name") != "ThinSectionSegmentation"
    }
    assert mrml == receivers
    names = set(widget_names(root))
    for connection in root.iter("connection"):
        assert connection.findtext("sender") in names and connection.findtext("receiver") in names


def _preview_module():
    spec = importlib.util.spec_from_file_location("render_panel_preview", REPO / "scripts" / "render_panel_preview.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_stand_ins_cover_every_slicer_class(root):
    preview = _preview_module()
    custom_used = {w.get("class") for w in root.iter("widget") if w.get("class").startswith(SLICER_PREFIXES)}
    assert custom_used <= set(preview.STAND_INS)
    converted = ET.fromstring(preview.qt_base_ui(UI.read_text(encoding="utf-8")))
    assert all(w.get("class").startswith("Q") for w in converted.iter("widget"))


def test_panel_loads_and_renders_offscreen_with_pyside6(tmp_path, monkeypatch):
    pytest.importorskip("PySide6.QtUiTools")
    monkeypatch.setenv("QT_QPA_PLATFORM", "offscreen")
    preview = _preview_module()
    png = preview.render(tmp_path / "panel.png", width=400)
    from PIL import Image

    with Image.open(png) as image:
        assert image.width >= 400 and image.height > 1000  # the panel may need a little more width
