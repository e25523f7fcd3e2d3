"""Render a layout preview of the module panel (ThinSectionSegmentation.ui) to a PNG, offscreen.

Slicer is not needed: the Designer file is loaded with PySide6's QUiLoader after each Slicer/CTK
class is replaced by the Qt widget it is drawn as (a node selector as a combo box, a collapsible
button as a group box, a path editor as a line edit, ...), and the widgets are filled with the
kind of content they show in Slicer (node names, the model list and card, a residuals table).
It shows the layout, not Slicer's exact look.

    pip install PySide6-Essentials
    python scripts/render_panel_preview.py [--output docs/panel_preview.png] [--width 440] [--collapsed]
"""

from __future__ import annotations

import argparse
import os
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MODULE = REPO / "ThinSectionSegmentation"
UI_FILE = MODULE / "Resources" / "UI" / "ThinSectionSegmentation.ui"
DEFAULT_OUTPUT = REPO / "docs" / "panel_preview.png"

#: Slicer/CTK class -> the Qt class it is drawn as, and properties renamed on the way.
STAND_INS = {
    "qMRMLWidget": ("QWidget", {}),
    "qSlicerWidget": ("QWidget", {}),
    "ctkCollapsibleButton": ("QGroupBox", {"text": "title"}),
    "ctkCollapsibleGroupBox": ("QGroupBox", {}),
    "ctkPathLineEdit": ("QLineEdit", {}),
    "qMRMLNodeComboBox": ("QComboBox", {}),
    "qMRMLCheckableNodeComboBox": ("QComboBox", {}),
    "qMRMLSubjectHierarchyTreeView": ("QTreeView", {}),
    "qMRMLTableView": ("QTableView", {}),
    "qSlicerMarkupsPlaceWidget": ("QToolButton", {}),
}
#: Properties that only the Slicer/CTK classes have (dropped from the stand-ins).
SLICER_ONLY = {
    "nodeTypes",
    "showChildNodeTypes",
    "noneEnabled",
    "addEnabled",
    "removeEnabled",
    "renameEnabled",
    "editEnabled",
    "noneDisplay",
    "baseName",
    "selectNodeUponCreation",
    "collapsed",
    "filters",
    "nameFilters",
    "showHidden",
}


def qt_base_ui(xml_text: str, collapsed: bool = False) -> str:
    """The Designer XML with every Slicer/CTK widget replaced by its Qt stand-in."""
    root = ET.fromstring(xml_text)
    for widget in root.iter("widget"):
        cls = widget.get("class")
        if cls not in STAND_INS:
            continue
        qt_class, renames = STAND_INS[cls]
        widget.set("class", qt_class)
        for prop in list(widget.findall("property")):
            name = prop.get("name")
            if name == "collapsed" and collapsed and cls == "ctkCollapsibleButton":
                value = prop.find("bool")
                if value is not None and value.text == "true":
                    widget.set("_collapsed", "1")
            if name in SLICER_ONLY:
                widget.remove(prop)
            elif name in renames:
                prop.set("name", renames[name])
    for item in root.iter("customwidgets"):
        root.remove(item)
    connections = root.find("connections")
    if connections is not None:
        root.remove(connections)  # setMRMLScene slots do not exist on the stand-ins
    return ET.tostring(root, encoding="unicode")


def _fill(panel, find) -> None:
    """Content the widgets show in Slicer for a loaded sample section."""
    from PySide6.QtGui import QStandardItem, QStandardItemModel
    from PySide6.QtWidgets import QStyle

    sys.path.insert(0, str(MODULE))
    from ThinSectionSegmentationLib import models

    combos = {
        "ppSelector": ["sample_PP"],
        "xpSelector": ["sample_XP"],
        "outputSelector": ["Create new labelmap"],
        "qemscanSelector": ["sample_QEMSCAN"],
        "imageLandmarksSelector": ["PP landmarks"],
        "qemscanLandmarksSelector": ["QEMSCAN landmarks"],
        "trainSectionsSelector": ["sample_QEMSCAN_registered"],
    }
    for name, items in combos.items():
        find(name).addItems(items)
    found = models.list_models()
    model_selector = find("modelSelector")
    if found:
        for info in found:
            model_selector.addItem(info.label)
        card = models.model_card(found[0])
    else:
        model_selector.addItem("Thin-section U-Net (bundled)")
        card = (
            "**Thin-section U-Net (bundled)**\n\n- Inputs: PP, PX\n- Classes: Calcite, Dolomite, "
            "Mg-Clay minerals, Pores, Quartz, Others"
        )
    find("modelCardBrowser").setMarkdown(card)
    for name in ("imagePlaceWidget", "qemscanPlaceWidget"):
        find(name).setText("+")  # the place widget's "place points" button
    refresh = find("refreshModelsButton")
    refresh.setIcon(refresh.style().standardIcon(QStyle.StandardPixmap.SP_BrowserReload))  # as the widget does
    refresh.setText("")
    find("qemscanColorTablePathLineEdit").setText("sample_QEMSCAN.csv")
    find("modelsRootPathLineEdit").setText(str(Path("~") / "ThinSectionSegmentation" / "Models"))
    find("exportPathLineEdit").setText("results/sample.nc")
    find("stitchTileFolderPathLineEdit").setText(str(Path("wellA") / "S1_tiles"))
    find("stitchOutputFolderPathLineEdit").setText(str(Path("wellA") / "S1_stitched"))
    find("trainFilesList").addItems(["wellA_S1_registered.nc", "wellA_S2_registered.nc"])

    residuals = QStandardItemModel(0, 4)
    residuals.setHorizontalHeaderLabels(["Landmark", "Residual (px)", "Residual (um)", "Outlier"])
    for row in (
        ("PP landmarks-1", "0.41", "0.54", ""),
        ("PP landmarks-2", "0.37", "0.49", ""),
        ("PP landmarks-3", "0.52", "0.69", ""),
        ("PP landmarks-4", "7.90", "10.43", "yes"),
    ):
        residuals.appendRow([QStandardItem(v) for v in row])
    table = find("residualsTableView")
    table.setModel(residuals)
    table.verticalHeader().setVisible(False)
    table.resizeColumnsToContents()
    panel._keep = [residuals]

    tree = QStandardItemModel()
    tree.setHorizontalHeaderLabels(["Node"])
    folder = QStandardItem("sample")
    for name in ("sample_PP", "sample_XP", "sample_Segmentation", "sample_QEMSCAN_registered"):
        folder.appendRow(QStandardItem(name))
    tree.appendRow(folder)
    view = find("exportTreeView")
    view.setModel(tree)
    view.expandAll()
    panel._keep.append(tree)

    find("progressBar").setValue(420)
    find("segmentButton").setText("Cancel")
    find("statusLabel").setText("sample: 5/12 tiles, 1.25 MPix/s")


def render(output: Path = DEFAULT_OUTPUT, width: int = 440, collapsed: bool = False) -> Path:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import QBuffer, QByteArray, QIODevice
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import QApplication, QGroupBox, QWidget

    app = QApplication.instance() or QApplication([])
    xml = qt_base_ui(UI_FILE.read_text(encoding="utf-8"), collapsed=collapsed)
    buffer = QBuffer()
    buffer.setData(QByteArray(xml.encode("utf-8")))
    buffer.open(QIODevice.ReadOnly)
    loader = QUiLoader()
    panel = loader.load(buffer)
    if panel is None:
        raise RuntimeError(f"QUiLoader could not load the panel: {loader.errorString()}")

    def find(name: str):
        widget = panel.findChild(QWidget, name)
        if widget is None:
            raise KeyError(f"no widget named {name!r} in {UI_FILE.name}")
        return widget

    _fill(panel, find)
    if collapsed:
        root = ET.fromstring(xml)
        for node in root.iter("widget"):
            if node.get("_collapsed"):
                box = find(node.get("name"))
                for child in box.findChildren(QWidget):
                    child.setVisible(False)
                box.setFixedHeight(box.fontMetrics().height() + 14)
    for box in panel.findChildren(QGroupBox):
        box.setStyleSheet("QGroupBox { font-weight: bold; }") if box.objectName().endswith(
            "CollapsibleButton"
        ) else None
    panel.setStyleSheet("QWidget#ThinSectionSegmentation { background: palette(window); }")
    width = max(width, panel.minimumSizeHint().width())  # never squeeze the layout
    panel.resize(width, panel.sizeHint().height())
    output.parent.mkdir(parents=True, exist_ok=True)
    if not panel.grab().save(str(output)):
        raise RuntimeError(f"could not write {output}")
    app.processEvents()
    return output


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--width", type=int, default=440)
    parser.add_argument("--collapsed", action="store_true", help="collapse the sections collapsed in the .ui")
    args = parser.parse_args(argv)
    print(render(args.output, args.width, args.collapsed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
