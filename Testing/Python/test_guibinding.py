"""Widgets <-> the typed parameter node (guibinding.py) with real Qt widgets (PySide6, offscreen)
and a real MRML scene: filled from the parameters on connect, a widget edit writes its field,
a parameter change rewrites the widget, and nothing follows after disconnect. Slicer's
qMRMLNodeComboBox and ctkPathLineEdit are stood in for by widgets with the same property and
change signal (the only part of them the binding uses)."""

import pytest

QtWidgets = pytest.importorskip("PySide6.QtWidgets")
QtCore = pytest.importorskip("PySide6.QtCore")

import slicer  # noqa: E402

from ThinSectionSegmentationLib.guibinding import (  # noqa: E402
    SLICER_PROPERTY,
    THINSEG_PROPERTY,
    GuiBinding,
    named_widgets,
)
from ThinSectionSegmentationLib.parameters import Device, TransformKind, get_parameter_node  # noqa: E402


class qMRMLNodeComboBox(QtWidgets.QWidget):  # named as Slicer's class: the binding goes by class name
    currentNodeIDChanged = QtCore.Signal(str)

    def __init__(self):
        super().__init__()
        self._id = ""

    def _get(self):
        return self._id

    def _set(self, value):
        if value != self._id:
            self._id = value
            self.currentNodeIDChanged.emit(value)

    currentNodeID = QtCore.Property(str, _get, _set, notify=currentNodeIDChanged)


class ctkPathLineEdit(QtWidgets.QWidget):
    currentPathChanged = QtCore.Signal(str)

    def __init__(self):
        super().__init__()
        self._path = ""

    def _get(self):
        return self._path

    def _set(self, value):
        if value != self._path:
            self._path = value
            self.currentPathChanged.emit(value)

    currentPath = QtCore.Property(str, _get, _set, notify=currentPathChanged)


@pytest.fixture(scope="module")
def app():
    import os

    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    return QtWidgets.QApplication.instance() or QtWidgets.QApplication([])


def named(widget, field, prop=SLICER_PROPERTY):
    widget.setProperty(prop, field)
    return widget


@pytest.fixture
def panel(app):
    """A scene with two images, its parameter node, and one widget of each kind naming a field."""
    scene = slicer.vtkMRMLScene()
    images = [scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", name) for name in ("S1_PP", "S2_PP")]
    params = get_parameter_node(scene)
    params.epochs, params.ppVolume, params.trainFiles = 35, images[1], ["/a.nc"]
    transform = QtWidgets.QComboBox()
    transform.addItems(["stale item"])
    widgets = [
        named(QtWidgets.QCheckBox(), "confidence"),
        named(QtWidgets.QSpinBox(), "epochs"),
        named(QtWidgets.QDoubleSpinBox(), "valFraction"),
        named(QtWidgets.QLineEdit(), "modelName"),
        named(QtWidgets.QComboBox(), "device"),
        named(transform, "transformKind"),
        named(qMRMLNodeComboBox(), "ppVolume"),
        named(ctkPathLineEdit(), "exportPath", THINSEG_PROPERTY),
        named(QtWidgets.QListWidget(), "trainFiles", THINSEG_PROPERTY),
        QtWidgets.QLabel("not bound"),
    ]
    for widget in widgets:
        if isinstance(widget, QtWidgets.QSpinBox):
            widget.setMaximum(1000)
    bound = named_widgets(widgets, [SLICER_PROPERTY, THINSEG_PROPERTY])
    yield scene, images, params, bound
    for widget in widgets:
        widget.deleteLater()


def test_widgets_are_found_by_the_field_they_name(panel):
    _scene, _images, _params, bound = panel
    assert sorted(bound) == sorted(
        [
            "confidence",
            "epochs",
            "valFraction",
            "modelName",
            "device",
            "transformKind",
            "ppVolume",
            "exportPath",
            "trainFiles",
        ]
    )
    only_ours = named_widgets(bound.values(), [THINSEG_PROPERTY])
    assert sorted(only_ours) == ["exportPath", "trainFiles"]
    with pytest.raises(ValueError, match="unknown parameters: epoch"):
        GuiBinding(_params, {"epoch": bound["epochs"]})


def test_connect_fills_the_widgets_and_both_sides_follow(panel):
    scene, images, params, w = panel
    binding = GuiBinding(params, w).connect()
    # filled from the parameters (enum combo boxes get their members, labels where they have them)
    assert w["epochs"].value() == 35 and w["valFraction"].value() == pytest.approx(0.2)
    assert w["modelName"].text() == "my-thin-section-model" and not w["confidence"].isChecked()
    assert [w["device"].itemText(i) for i in range(w["device"].count())] == ["auto", "cpu", "cuda"]
    labels = [w["transformKind"].itemText(i) for i in range(w["transformKind"].count())]
    assert labels == ["Similarity", "Affine", "Thin-plate spline"]
    assert w["ppVolume"].currentNodeID == images[1].GetID()
    assert [w["trainFiles"].item(i).text() for i in range(w["trainFiles"].count())] == ["/a.nc"]

    # widget edits write the typed fields
    w["confidence"].setChecked(True)
    w["epochs"].setValue(12)
    w["valFraction"].setValue(0.35)
    w["modelName"].setText("well B")
    w["device"].setCurrentIndex(2)
    w["transformKind"].setCurrentIndex(1)
    w["ppVolume"].currentNodeID = images[0].GetID()
    w["exportPath"].currentPath = "/out/S1.nc"
    assert (params.confidence, params.epochs, params.valFraction, params.modelName) == (True, 12, 0.35, "well B")
    assert (params.device, params.transformKind) == (Device.cuda, TransformKind.affine)
    assert params.ppVolume is images[0] and params.exportPath == "/out/S1.nc"
    assert params.parameterNode.GetParameter("confidence") == "True"

    # parameter changes (another module, Undo, a loaded scene) rewrite the widgets
    params.epochs, params.device, params.ppVolume = 40, Device.cpu, None
    params.trainFiles, params.exportPath = ["/b.nc", "/c.nc"], ""
    assert w["epochs"].value() == 40 and w["device"].currentIndex() == 1 and w["ppVolume"].currentNodeID == ""
    assert [w["trainFiles"].item(i).text() for i in range(w["trainFiles"].count())] == ["/b.nc", "/c.nc"]
    assert w["exportPath"].currentPath == ""

    # after disconnect neither side follows the other
    binding.disconnect()
    w["epochs"].setValue(99)
    params.modelName = "other"
    assert params.epochs == 40 and w["modelName"].text() == "well B"
    assert scene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode") == 1
