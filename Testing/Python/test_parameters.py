"""The typed parameter node: its fields, types and defaults; the .ui file's bindings (every
`SlicerParameterName` / `ThinSegParameterName` names a field of a type that widget can show);
the stored layout on a real MRML scene (the one Slicer's parameterNodeWrapper reads); and scenes
saved before the typed node, written to a real .mrml file and loaded again.

Slicer's own wrapper is not part of slicer-core: here the typed access is PlainParameterNode,
which writes the same layout."""

import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import slicer

from ThinSectionSegmentationLib import ThinSectionSegmentationLogic, parameters, volumes
from ThinSectionSegmentationLib.parameters import (
    FIELD_TYPES,
    Device,
    PlainParameterNode,
    ThinSectionSegmentationParameters,
    TrainingRecipe,
    TransformKind,
    choose_recipe,
    get_parameter_node,
    migrate,
)
from thinseg.training.recipes import RECIPE_NAMES, recipe_settings

UI = Path(__file__).resolve().parents[2] / "ThinSectionSegmentation" / "Resources" / "UI" / "ThinSectionSegmentation.ui"

#: Widget classes Slicer's parameterNodeWrapper connects, and the field types each can show.
SLICER_CONNECTORS = {
    "QCheckBox": {"bool"},
    "QSpinBox": {"int"},
    "QDoubleSpinBox": {"float"},
    "QLineEdit": {"str"},
    "QComboBox": set(parameters.ENUMS),
    "qMRMLNodeComboBox": {
        "vtkMRMLVectorVolumeNode",
        "vtkMRMLLabelMapVolumeNode",
        "vtkMRMLMarkupsFiducialNode",
        "vtkMRMLColorTableNode",
    },
}
#: Widgets bound by guibinding.py (Slicer has no connector for these pairs).
OUR_CONNECTORS = {"ctkPathLineEdit": {"str"}, "QListWidget": {"list[str]"}}
#: Qt's own limits where the .ui file sets none.
QT_DEFAULTS = {"minimum": 0.0, "maximum": 99.0, "decimals": 2}


def test_fields_types_and_defaults():
    assert FIELD_TYPES == {
        "ppVolume": "vtkMRMLVectorVolumeNode",
        "xpVolume": "vtkMRMLVectorVolumeNode",
        "outputLabelmap": "vtkMRMLLabelMapVolumeNode",
        "modelPath": "str",
        "device": "Device",
        "confidence": "bool",
        "createSegmentation": "bool",
        "ppPattern": "str",
        "xpPattern": "str",
        "qemscanVolume": "vtkMRMLLabelMapVolumeNode",
        "qemscanColorTablePath": "str",
        "qemscanMmPerPixel": "float",
        "imageLandmarks": "vtkMRMLMarkupsFiducialNode",
        "qemscanLandmarks": "vtkMRMLMarkupsFiducialNode",
        "transformKind": "TransformKind",
        "trainFiles": "list[str]",
        "modelName": "str",
        "userModelsRoot": "str",
        "trainingRecipe": "TrainingRecipe",
        "epochs": "int",
        "patchSize": "int",
        "batchSize": "int",
        "stepsPerEpoch": "int",
        "valFraction": "float",
        "fineTune": "bool",
        "trainClassesPath": "str",
        "trainColorTable": "vtkMRMLColorTableNode",
        "trainMappingPath": "str",
        "modelMmPerPixel": "float",
        "ppOnly": "bool",
        "grainLabelmap": "vtkMRMLLabelMapVolumeNode",
        "grainPpVolume": "vtkMRMLVectorVolumeNode",
        "grainNeckRatio": "float",
        "grainMinPixels": "int",
        "stitchTileFolder": "str",
        "stitchOutputFolder": "str",
        "stitchOverlap": "float",
        "stitchFlatField": "str",
        "stitchLayout": "str",
        "exportPath": "str",
        "importPath": "str",
    }
    d = ThinSectionSegmentationParameters()
    assert (d.device, d.transformKind, d.confidence, d.fineTune) == (Device.auto, TransformKind.similarity, False, True)
    assert (d.epochs, d.patchSize, d.batchSize, d.stepsPerEpoch, d.valFraction) == (20, 256, 8, 200, 0.2)
    assert (d.qemscanMmPerPixel, d.ppPattern, d.xpPattern, d.modelName) == (0.01, "PP", "XP", "my-thin-section-model")
    assert d.trainFiles == [] and d.trainFiles is not ThinSectionSegmentationParameters().trainFiles
    assert all(getattr(d, n) is None for n in FIELD_TYPES if parameters.is_node_field(n))
    # every number has its range (Slicer's spin box connectors would otherwise accept any value)
    assert set(parameters.RANGES) == {n for n, kind in FIELD_TYPES.items() if kind in ("int", "float")}
    assert all(low <= parameters.default_value(n) <= high for n, (low, high) in parameters.RANGES.items())
    assert [k.value for k in TransformKind] == ["similarity", "affine", "tps"]  # the core's names
    assert d.trainingRecipe is TrainingRecipe.unet
    assert [r.value for r in TrainingRecipe] == list(RECIPE_NAMES)  # `thinseg train --recipe`'s names, in order
    # without Slicer's wrapper (slicer-core) the typed node is the plain one
    assert parameters.wrapper_class() is None


def _ui_bindings():
    bindings = []
    for widget in ET.parse(UI).getroot().iter("widget"):
        props = {p.get("name"): p for p in widget.findall("property")}
        for prop in ("SlicerParameterName", "ThinSegParameterName"):
            if prop in props:
                assert props[prop].get("stdset") == "0", f"{widget.get('name')}: {prop} must be a dynamic property"
                bindings.append((prop, widget, props[prop].findtext("string")))
    return bindings


def _number(widget, name, default):
    prop = widget.find(f"property[@name='{name}']")
    return float(prop[0].text) if prop is not None else default


def test_every_parameter_name_in_the_ui_names_a_field_of_a_type_its_widget_shows():
    bindings = _ui_bindings()
    fields = [field for _prop, _widget, field in bindings]
    assert len(fields) == len(set(fields)), "a field bound twice"
    # model list; no widget; the stitch combo boxes (a choice or a file) the panel keeps in step
    assert set(FIELD_TYPES) - set(fields) == {"modelPath", "ppPattern", "xpPattern", "stitchFlatField", "stitchLayout"}
    for prop, widget, field in bindings:
        cls, name = widget.get("class"), widget.get("name")
        assert field in FIELD_TYPES, f"{name} names no field: {field}"
        kind = FIELD_TYPES[field]
        connectors = SLICER_CONNECTORS if prop == "SlicerParameterName" else OUR_CONNECTORS
        assert kind in connectors.get(cls, set()), f"{name} ({cls}, {prop}) cannot show {field}: {kind}"
        default = parameters.default_value(field)
        if cls == "qMRMLNodeComboBox":  # Slicer sets nodeTypes from the field type: keep the .ui equal
            assert [s.text for s in widget.findall("property[@name='nodeTypes']/stringlist/string")] == [kind]
        elif cls == "QComboBox":  # the items the binding writes are the ones the .ui shows
            member = list(parameters.ENUMS[kind])
            labels = [m.label() if hasattr(m, "label") else m.name for m in member]
            assert [i.findtext("property/string") for i in widget.findall("item")] == labels
        elif cls in ("QSpinBox", "QDoubleSpinBox"):  # the limits Slicer's wrapper sets are the .ui's
            low, high = _number(widget, "minimum", QT_DEFAULTS["minimum"]), _number(widget, "maximum", 99.0)
            assert (low, high) == pytest.approx(parameters.RANGES[field]), f"{name}: .ui limits differ"
            assert low <= default <= high, f"{name}: default {default} outside [{low}, {high}]"
            assert _number(widget, "value", default) == pytest.approx(default), f"{name} shows another default"
            if cls == "QDoubleSpinBox":
                decimals = int(_number(widget, "decimals", QT_DEFAULTS["decimals"]))
                assert round(default, decimals) == default, f"{name}: {decimals} decimals cannot show {default}"


def test_the_stored_layout_is_the_one_slicers_wrapper_reads():
    scene = slicer.vtkMRMLScene()
    params = get_parameter_node(scene)
    node = params.parameterNode
    assert isinstance(params, PlainParameterNode)
    assert (
        node.GetAttribute("ModuleName") == "ThinSectionSegmentation"
        and node.GetSingletonTag() == "ThinSectionSegmentation"
    )
    assert get_parameter_node(scene).parameterNode is node  # found again, not a second node
    assert params.values() == ThinSectionSegmentationParameters()  # missing values are written as defaults
    pp = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "S1_PP")
    params.ppVolume, params.confidence, params.device, params.epochs = pp, True, Device.cuda, 7
    params.transformKind, params.valFraction, params.trainFiles = TransformKind.tps, 0.35, ["/a.nc", "/b.nc"]
    stored = {name: node.GetParameter(name) for name in ("ppVolume", "confidence", "device", "epochs", "transformKind")}
    assert stored == {"ppVolume": "", "confidence": "True", "device": "cuda", "epochs": "7", "transformKind": "tps"}
    assert node.GetNodeReferenceID("ppVolume") == pp.GetID() and node.GetParameter("valFraction") == "0.35"
    assert [node.GetParameter(k) for k in ("trainFiles.len", "trainFiles.0", "trainFiles.1")] == ["2", "/a.nc", "/b.nc"]
    params.trainFiles = ["/c.nc"]  # a shorter list leaves no stale items
    assert node.GetParameter("trainFiles.len") == "1" and not node.HasParameter("trainFiles.1")
    params.ppVolume = None
    assert node.HasParameter("ppVolume") and node.GetNodeReferenceID("ppVolume") is None
    with pytest.raises(ValueError, match=r"^Value must be within range \[1, 1000\], is 0$"):
        params.epochs = 0
    assert node.GetParameter("epochs") == "7"
    params.trainingRecipe = TrainingRecipe.small_data
    assert node.GetParameter("trainingRecipe") == "small_data"  # by member name, as Slicer's wrapper stores enums
    params.trainingRecipe = "unet"  # a recipe name is accepted as the member it names
    assert params.trainingRecipe is TrainingRecipe.unet and node.GetParameter("trainingRecipe") == "unet"
    with pytest.raises(ValueError, match="'fast' is not a valid TrainingRecipe"):
        params.trainingRecipe = "fast"
    assert node.GetParameter("trainingRecipe") == "unet"
    with pytest.raises(AttributeError, match="no parameter 'epoch'"):
        params.epoch = 3
    with pytest.raises(AttributeError):
        params.epoch  # noqa: B018


def _old_scene(path: Path) -> Path:
    """A scene as the module saved it before the typed node: capitalised names, lower-case
    booleans, train files one per line, node references by capitalised role."""
    scene = slicer.vtkMRMLScene()
    pp = volumes.create_rgb_volume(scene, "S1_PP", np.zeros((4, 4, 3), np.uint8), 0.01)
    points = scene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", "QEMSCAN points")
    node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode", "ThinSectionSegmentation")
    node.SetAttribute("ModuleName", "ThinSectionSegmentation")
    for key, value in {
        "ModelPath": "/models/ThinSectionEnv/Multiphase/well-A",
        "Device": "cpu",
        "Confidence": "true",
        "CreateSegmentation": "false",
        "PpPattern": "c1",
        "XpPattern": "c2",
        "TransformKind": "tps",
        "Refine": "true",
        "QemscanMmPerPixel": "0.005",
        "Epochs": "5000",  # above the limit: the limit
        "PatchSize": "128",
        "BatchSize": "many",  # unreadable: the default is kept
        "StepsPerEpoch": "150.0",
        "ValFraction": "0.25",
        "FineTune": "false",
        "ModelName": "well A",
        "UserModelsRoot": "/models",
        "TrainFiles": "/data/a.nc\n/data/b.nc\n",
        "ExportPath": "/out/S1.nc",
        "ImportPath": "",
    }.items():
        node.SetParameter(key, value)
    node.SetNodeReferenceID("PPVolume", pp.GetID())
    node.SetNodeReferenceID("QemscanLandmarks", points.GetID())
    node.SetNodeReferenceID("TransformNode", points.GetID())  # an old role nothing reads any more
    scene.SetURL(str(path))
    assert scene.Commit()
    return path


def test_a_scene_saved_before_the_typed_node_is_read(tmp_path):
    scene = slicer.vtkMRMLScene()
    scene.SetURL(str(_old_scene(tmp_path / "old.mrml")))
    assert scene.Import()
    params = get_parameter_node(scene)
    pp = scene.GetFirstNodeByName("S1_PP")
    points = scene.GetFirstNodeByName("QEMSCAN points")
    assert params.values() == ThinSectionSegmentationParameters(
        ppVolume=pp,
        qemscanLandmarks=points,
        modelPath="/models/ThinSectionEnv/Multiphase/well-A",
        device=Device.cpu,
        confidence=True,
        createSegmentation=False,
        ppPattern="c1",
        xpPattern="c2",
        transformKind=TransformKind.tps,
        qemscanMmPerPixel=0.005,
        epochs=1000,
        patchSize=128,
        batchSize=8,
        stepsPerEpoch=150,
        valFraction=0.25,
        fineTune=False,
        modelName="well A",
        userModelsRoot="/models",
        trainFiles=["/data/a.nc", "/data/b.nc"],
        exportPath="/out/S1.nc",
        importPath="",
    )
    assert params.trainingRecipe is TrainingRecipe.unet  # the only recipe there was
    node = params.parameterNode
    names = set(node.GetParameterNamesAsCommaSeparatedList().split(","))
    assert not {n for n in names if n[:1].isupper()}  # the old names are gone
    assert node.GetNodeReferenceID("PPVolume") is None and node.GetNodeReferenceID("TransformNode") is None
    assert migrate(node) == []  # a second pass changes nothing


def test_the_typed_node_survives_saving_and_loading(tmp_path):
    scene = slicer.vtkMRMLScene()
    params = get_parameter_node(scene)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "QEMSCAN")
    params.qemscanVolume, params.trainFiles, params.transformKind = labelmap, ["/x.nc"], TransformKind.affine
    params.qemscanColorTablePath, params.fineTune = "/colors.csv", False
    saved = params.values()
    scene.SetURL(str(tmp_path / "new.mrml"))
    assert scene.Commit()
    loaded = slicer.vtkMRMLScene()
    loaded.SetURL(str(tmp_path / "new.mrml"))
    assert loaded.Import()
    again = get_parameter_node(loaded).values()
    assert again.qemscanVolume.GetName() == "QEMSCAN" and again.qemscanVolume is not labelmap
    again.qemscanVolume = saved.qemscanVolume
    assert again == saved


def test_a_typed_scene_saved_before_the_recipe_existed_trains_the_unet_and_keeps_its_epochs(tmp_path):
    scene = slicer.vtkMRMLScene()
    params = get_parameter_node(scene)
    params.epochs, params.stepsPerEpoch = 35, 120
    params.parameterNode.UnsetParameter("trainingRecipe")  # as the module wrote it before the recipe
    scene.SetURL(str(tmp_path / "before-recipe.mrml"))
    assert scene.Commit()
    loaded = slicer.vtkMRMLScene()
    loaded.SetURL(str(tmp_path / "before-recipe.mrml"))
    assert loaded.Import()
    assert "trainingRecipe" not in (tmp_path / "before-recipe.mrml").read_text()
    again = get_parameter_node(loaded)
    assert (again.trainingRecipe, again.epochs, again.stepsPerEpoch) == (TrainingRecipe.unet, 35, 120)
    assert again.parameterNode.GetParameter("trainingRecipe") == "unet"  # written, as Slicer's wrapper does


def test_choosing_a_recipe_sets_its_epochs_and_sizes_which_stay_editable():
    scene = slicer.vtkMRMLScene()
    params = get_parameter_node(scene)
    small = recipe_settings("small-data")
    events = []
    params.parameterNode.AddObserver("ModifiedEvent", lambda caller, event: events.append(event))
    choose_recipe(params, TrainingRecipe.small_data)
    assert len(events) == 1  # one change for the panel to redraw
    chosen = (params.trainingRecipe, params.epochs, params.stepsPerEpoch, params.patchSize, params.batchSize)
    expected = (small["epochs"], small["steps_per_epoch"], small["patch_size"], small["batch_size"])
    assert chosen == (TrainingRecipe.small_data, *expected)
    assert params.modelMmPerPixel == pytest.approx(1 / small["pixels_per_mm"])
    assert params.modelMmPerPixel == pytest.approx(0.00264)
    assert (params.epochs, params.stepsPerEpoch) != (20, 200)  # the recipe's, not the panel's defaults
    params.epochs = 12  # the user's own number is kept: the job gets it
    assert (params.trainingRecipe, params.epochs) == (TrainingRecipe.small_data, 12)
    choose_recipe(params, TrainingRecipe.unet)  # "unet" has TrainConfig's sizes and the panel's 20 epochs
    chosen = (params.trainingRecipe, params.epochs, params.stepsPerEpoch, params.patchSize, params.batchSize)
    assert chosen == (TrainingRecipe.unet, 20, 200, 256, 8)
    assert params.modelMmPerPixel == 0.0  # "the sections' own" again
    assert parameters.recipe_values(TrainingRecipe.unet) == {
        name: parameters.default_value(name) for name in parameters.RECIPE_FIELDS
    }
    assert all(label for label in (r.label() for r in TrainingRecipe))
    assert "do not run in GeoSlicer's own AI Segmenter" in TrainingRecipe.small_data.description()


def test_the_logic_fills_in_pp_and_xp_by_their_names():
    scene = slicer.vtkMRMLScene()
    for name in ("overview", "A_XP", "A_PP"):
        volumes.create_rgb_volume(scene, name, np.zeros((4, 4, 3), np.uint8), 0.01)
    logic = ThinSectionSegmentationLogic(scene)
    params = logic.getParameterNode()
    logic.chooseInputImages(params)
    assert (params.ppVolume.GetName(), params.xpVolume.GetName()) == ("A_PP", "A_XP")
    params.ppVolume = scene.GetFirstNodeByName("overview")
    logic.chooseInputImages(params)  # a choice already made is kept
    assert params.ppVolume.GetName() == "overview"
