"""The module's parameter node: the panel's state, typed, saved with the scene (no Qt).

`ThinSectionSegmentationParameters` lists every setting once: name, type and default. Inside
Slicer 5.4+ the same annotations become a `slicer.parameterNodeWrapper` class, which stores
them in the scene's vtkMRMLScriptedModuleNode and binds them to the widgets named by the
`SlicerParameterName` property in the .ui file. Where Slicer has no wrapper (older builds,
the slicer-core test scene) `PlainParameterNode` gives the same typed access and writes the
same layout: booleans as "True"/"False", numbers and text as strings, enums by member name,
nodes as a reference under the field's name (with an empty parameter marking it present),
lists as "<name>.len" and "<name>.<i>".

Scenes saved before the typed node (parameters "PPVolume", "Epochs", "true"/"false", ...) are
converted on load by `migrate`.
"""

from __future__ import annotations

import enum
import functools
from dataclasses import MISSING, dataclass, field, fields
from typing import Annotated, Any

from slicer import (
    vtkMRMLColorTableNode,
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLMarkupsFiducialNode,
    vtkMRMLVectorVolumeNode,
)

MODULE_NAME = "ThinSectionSegmentation"


class Device(enum.Enum):
    """Where the network runs."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class TransformKind(enum.Enum):
    """The landmark transform of a registration (names as the core spells them)."""

    similarity = "similarity"
    affine = "affine"
    tps = "tps"

    def label(self) -> str:
        """What the transform combo box shows."""
        return {"similarity": "Similarity", "affine": "Affine", "tps": "Thin-plate spline"}[self.value]


class TrainingRecipe(enum.Enum):
    """The training preset, as `thinseg train --recipe` names it (the values are thinseg's
    RECIPE_NAMES; the members are spelled as Python names, which is how the scene stores them)."""

    unet = "unet"
    small_data = "small-data"

    def label(self) -> str:
        """What the recipe combo box shows."""
        return {
            "unet": "U-Net (runs in GeoSlicer)",
            "small-data": "Small data: pre-trained encoder (needs this extension)",
        }[self.value]

    def description(self) -> str:
        """The combo box item's tooltip: what the recipe trains and where its models run."""
        return {
            "unet": "A MONAI U-Net trained from scratch: the network GeoSlicer's own AI Segmenter runs.",
            "small-data": "For a few registered sections: three U-Nets whose encoder starts from ImageNet weights, "
            "each trained with its own seed and their probabilities averaged, sized to train in under 30 minutes "
            "on 2 CPU cores. Its models need this extension (thinseg 0.3 or later): they do not run in GeoSlicer's "
            "own AI Segmenter.",
        }[self.value]


@dataclass
class ThinSectionSegmentationParameters:
    """Every setting of the panel with its type and default. Node fields may hold None (no node
    chosen), as Slicer's wrapper allows for node types."""

    # Segment
    ppVolume: vtkMRMLVectorVolumeNode = None
    xpVolume: vtkMRMLVectorVolumeNode = None
    outputLabelmap: vtkMRMLLabelMapVolumeNode = None
    modelPath: str = ""
    device: Device = Device.auto
    confidence: bool = False
    createSegmentation: bool = False
    ppPattern: str = "PP"
    xpPattern: str = "XP"
    # Register
    qemscanVolume: vtkMRMLLabelMapVolumeNode = None
    qemscanColorTablePath: str = ""
    qemscanMmPerPixel: float = 0.01
    imageLandmarks: vtkMRMLMarkupsFiducialNode = None
    qemscanLandmarks: vtkMRMLMarkupsFiducialNode = None
    transformKind: TransformKind = TransformKind.similarity
    # Train
    trainFiles: list[str] = field(default_factory=list)  # netCDF files of registered sections
    modelName: str = "my-thin-section-model"
    userModelsRoot: str = ""
    trainingRecipe: TrainingRecipe = TrainingRecipe.unet  # `thinseg train --recipe`
    epochs: int = 20
    patchSize: int = 256
    batchSize: int = 8
    stepsPerEpoch: int = 200
    valFraction: float = 0.2
    fineTune: bool = True
    # the classes, mapping, resolution and inputs of a new model (`thinseg train` --classes,
    # --mapping, --model-mm-per-pixel, --pp-only); a class file wins over a colour table node
    trainClassesPath: str = ""
    trainColorTable: vtkMRMLColorTableNode = None
    trainMappingPath: str = ""
    modelMmPerPixel: float = 0.0  # 0: the training sections' own pixel size
    ppOnly: bool = False
    # Grain analysis (`thinseg analyze`): the labelmap, its PP image (optional), the neck ratio
    # below which touching grains of one mineral are split, the smallest grain counted (pixels)
    grainLabelmap: vtkMRMLLabelMapVolumeNode = None
    grainPpVolume: vtkMRMLVectorVolumeNode = None
    grainNeckRatio: float = 0.7
    grainMinPixels: int = 12
    # Stitch tiles (`thinseg stitch`): the tile folder, the output folder, the nominal overlap of
    # neighbours, the flat field ("auto", "none" or a blank-field image) and the layout ("": grid
    # from the names, else from the images; "grid", "auto" or a TileConfiguration file)
    stitchTileFolder: str = ""
    stitchOutputFolder: str = ""
    stitchOverlap: float = 0.15
    stitchFlatField: str = "auto"
    stitchLayout: str = ""
    # Export / import
    exportPath: str = ""
    importPath: str = ""


#: Field name -> its annotation as written above (what the codecs and the .ui check go by).
FIELD_TYPES: dict[str, str] = {f.name: str(f.type) for f in fields(ThinSectionSegmentationParameters)}

#: The allowed range of each number (inclusive): the spin boxes' limits in the .ui file, which
#: Slicer's wrapper sets on them and enforces on every write, as PlainParameterNode does.
RANGES: dict[str, tuple[float, float]] = {
    "qemscanMmPerPixel": (0.00001, 10.0),
    "epochs": (1, 1000),
    "patchSize": (32, 2048),
    "batchSize": (1, 256),
    "stepsPerEpoch": (1, 100000),
    "valFraction": (0.0, 0.9),
    "modelMmPerPixel": (0.0, 10.0),
    "grainNeckRatio": (0.05, 0.99),  # thinseg.analysis.GrainOptions' limits
    "grainMinPixels": (1, 1000000),
    "stitchOverlap": (0.0, 0.89),  # `thinseg stitch --overlap` takes [0, 0.9); the spin box shows 2 decimals
}

#: stitchFlatField and stitchLayout values other than a file, in their combo boxes' order (a
#: file is the row after them): `thinseg stitch --flat-field` and `--layout` ("": the default).
STITCH_FLAT_FIELDS = ("auto", "none")
STITCH_LAYOUTS = ("", "grid", "auto")

#: Parameter names of scenes saved before the typed node -> the field that replaces them.
OLD_NAMES: dict[str, str] = {
    "PPVolume": "ppVolume",
    "XPVolume": "xpVolume",
    "OutputLabelmap": "outputLabelmap",
    "ModelPath": "modelPath",
    "Device": "device",
    "Confidence": "confidence",
    "CreateSegmentation": "createSegmentation",
    "PpPattern": "ppPattern",
    "XpPattern": "xpPattern",
    "QemscanVolume": "qemscanVolume",
    "QemscanMmPerPixel": "qemscanMmPerPixel",
    "ImageLandmarks": "imageLandmarks",
    "QemscanLandmarks": "qemscanLandmarks",
    "TransformKind": "transformKind",
    "TrainFiles": "trainFiles",
    "ModelName": "modelName",
    "UserModelsRoot": "userModelsRoot",
    "Epochs": "epochs",
    "PatchSize": "patchSize",
    "BatchSize": "batchSize",
    "StepsPerEpoch": "stepsPerEpoch",
    "ValFraction": "valFraction",
    "FineTune": "fineTune",
    "ExportPath": "exportPath",
    "ImportPath": "importPath",
}
#: Old parameters and node references nothing reads any more (removed by `migrate`).
OLD_UNUSED = ("Refine", "TransformNode", "RegisteredLabelmap")

ENUMS: dict[str, type[enum.Enum]] = {"Device": Device, "TransformKind": TransformKind, "TrainingRecipe": TrainingRecipe}

#: The panel's fields a recipe sets when it is chosen -> the recipe's (TrainConfig's) setting.
#: The job always gets the panel's values, so these must follow the recipe or they override it.
RECIPE_FIELDS: dict[str, str] = {
    "epochs": "epochs",
    "stepsPerEpoch": "steps_per_epoch",
    "patchSize": "patch_size",
    "batchSize": "batch_size",
    "modelMmPerPixel": "pixels_per_mm",  # shown as mm per pixel; 0: the sections' own
}


def is_node_field(name: str) -> bool:
    return FIELD_TYPES[name].startswith("vtkMRML")


def node_class(name: str) -> type:
    """The MRML class of a node field."""
    return {
        "vtkMRMLVectorVolumeNode": vtkMRMLVectorVolumeNode,
        "vtkMRMLLabelMapVolumeNode": vtkMRMLLabelMapVolumeNode,
        "vtkMRMLMarkupsFiducialNode": vtkMRMLMarkupsFiducialNode,
        "vtkMRMLColorTableNode": vtkMRMLColorTableNode,
    }[FIELD_TYPES[name]]


def default_value(name: str) -> Any:
    spec = next(f for f in fields(ThinSectionSegmentationParameters) if f.name == name)
    return spec.default_factory() if spec.default is MISSING and spec.default_factory is not MISSING else spec.default


def recipe_values(recipe: TrainingRecipe) -> dict[str, float]:
    """The values of RECIPE_FIELDS that `recipe` trains with: its own, else the panel's defaults."""
    from thinseg.training.recipes import recipe_settings  # deferred: the training package loads torch

    settings = recipe_settings(recipe.value)
    values: dict[str, float] = {}
    for name, key in RECIPE_FIELDS.items():
        if key == "pixels_per_mm":
            pixels_per_mm = settings.get(key)
            values[name] = round(1.0 / pixels_per_mm, 6) if pixels_per_mm else default_value(name)
        else:
            values[name] = int(settings.get(key, default_value(name)))
    return values


def choose_recipe(params: Any, recipe: TrainingRecipe) -> None:
    """What picking a recipe in the panel does: the recipe is stored and the epochs, steps per
    epoch, patch and batch sizes and the model's pixel size are set to the recipe's values, which
    the user may then edit.
    One modification of the node, so observers see one change."""
    values = recipe_values(recipe)
    wasModifying = params.parameterNode.StartModify()
    try:
        params.trainingRecipe = recipe
        for name, value in values.items():
            setattr(params, name, value)
    finally:
        params.parameterNode.EndModify(wasModifying)


# -- the stored layout (the one Slicer's parameterNodeWrapper serializers use) -----------------


def _write(node, name: str, value: Any) -> None:
    kind = FIELD_TYPES[name]
    if is_node_field(name):
        node.SetParameter(name, "")  # marks the parameter present even when no node is chosen
        node.SetNodeReferenceID(name, value.GetID() if value is not None else None)
    elif kind == "bool":
        node.SetParameter(name, "True" if value else "False")
    elif kind in ENUMS:
        node.SetParameter(name, ENUMS[kind](value).name)
    elif kind == "list[str]":
        old = int(node.GetParameter(f"{name}.len") or 0) if node.HasParameter(f"{name}.len") else 0
        items = [str(item) for item in value]
        for i, item in enumerate(items):
            node.SetParameter(f"{name}.{i}", item)
        node.SetParameter(f"{name}.len", str(len(items)))
        for i in range(len(items), old):
            node.UnsetParameter(f"{name}.{i}")
    else:
        node.SetParameter(name, str(value))


def _read(node, name: str) -> Any:
    kind = FIELD_TYPES[name]
    if is_node_field(name):
        return node.GetNodeReference(name)
    if kind == "list[str]":
        return [node.GetParameter(f"{name}.{i}") for i in range(int(node.GetParameter(f"{name}.len")))]
    text = node.GetParameter(name)
    if kind == "bool":
        return text == "True"
    if kind in ENUMS:
        return ENUMS[kind][text]
    return {"int": int, "float": float, "str": str}[kind](text)


def _is_in(node, name: str) -> bool:
    return node.HasParameter(f"{name}.len" if FIELD_TYPES[name] == "list[str]" else name)


# -- saved scenes of earlier versions ----------------------------------------------------------


def _in_range(name: str, value: float) -> Any:
    low, high = RANGES[name]
    return type(value)(min(max(value, low), high))


def _old_value(name: str, text: str) -> Any:
    """An old string parameter as the field's value (its default when it does not parse; a
    number outside its range becomes the nearest limit)."""
    kind = FIELD_TYPES[name]
    text = text.strip()
    try:
        if kind == "bool":
            return text.lower() in ("true", "1", "yes", "on")
        if kind == "int":
            return _in_range(name, int(float(text)))
        if kind == "float":
            return _in_range(name, float(text))
        if kind in ENUMS:
            return ENUMS[kind][text.lower()]
        if kind == "list[str]":
            return [line.strip() for line in text.splitlines() if line.strip()]
    except (KeyError, ValueError):
        return default_value(name)
    return text


def migrate(node) -> list[str]:
    """Convert a parameter node saved by an earlier version (capitalised names, "true"/"false",
    files one per line) to the typed layout; returns the fields it filled. A field already
    present is kept, so running it twice changes nothing."""
    migrated = []
    for old, name in OLD_NAMES.items():
        if _is_in(node, name):
            continue
        if is_node_field(name):
            reference = node.GetNodeReferenceID(old)
            if reference is None and not node.HasParameter(old):
                continue
            node.SetParameter(name, "")
            node.SetNodeReferenceID(name, reference)
            node.RemoveNodeReferenceIDs(old)
            node.UnsetParameter(old)
        elif node.HasParameter(old):
            _write(node, name, _old_value(name, node.GetParameter(old)))
            node.UnsetParameter(old)
        else:
            continue
        migrated.append(name)
    for old in OLD_UNUSED:
        node.UnsetParameter(old)
        node.RemoveNodeReferenceIDs(old)
    return migrated


# -- typed access without Slicer's wrapper -----------------------------------------------------


class PlainParameterNode:
    """Typed attribute access to the parameter node (`params.epochs`, `params.ppVolume = node`)
    in the layout of Slicer's parameterNodeWrapper, for Slicer builds without it and for tests.
    Missing parameters are written with their defaults, as the wrapper does."""

    def __init__(self, parameterNode) -> None:
        object.__setattr__(self, "parameterNode", parameterNode)
        for name in FIELD_TYPES:
            if not _is_in(parameterNode, name):
                _write(parameterNode, name, default_value(name))

    def __getattr__(self, name: str) -> Any:
        if name in FIELD_TYPES:
            return _read(self.parameterNode, name)
        raise AttributeError(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in FIELD_TYPES:
            raise AttributeError(f"no parameter {name!r}")
        if name in RANGES and not RANGES[name][0] <= value <= RANGES[name][1]:  # as Slicer's WithinRange says
            raise ValueError(f"Value must be within range [{RANGES[name][0]}, {RANGES[name][1]}], is {value}")
        wasModifying = self.parameterNode.StartModify()
        try:
            _write(self.parameterNode, name, value)
        finally:
            self.parameterNode.EndModify(wasModifying)

    def values(self) -> ThinSectionSegmentationParameters:
        """A snapshot of every field (plain values, for logging or comparison)."""
        return ThinSectionSegmentationParameters(**{name: getattr(self, name) for name in FIELD_TYPES})


# -- Slicer's wrapper, where Slicer provides it -----------------------------------------------


def _slicer_wrapper() -> Any:
    """The slicer.parameterNodeWrapper package, or None on builds without it (and in the
    slicer-core test scene)."""
    try:
        import slicer.parameterNodeWrapper as wrapper  # deferred: absent before Slicer 5.4
    except ImportError:
        return None
    return wrapper


@functools.cache
def wrapper_class() -> type | None:
    """The parameterNodeWrapper class made from ThinSectionSegmentationParameters' annotations
    (a separate class: the wrapper turns the fields of the class it decorates into properties),
    or None where Slicer has no wrapper."""
    wrapper = _slicer_wrapper()
    if wrapper is None:
        return None
    annotations: dict[str, Any] = dict(ThinSectionSegmentationParameters.__annotations__)
    for name, (low, high) in RANGES.items():  # without a range Slicer opens the spin boxes to any value
        annotations[name] = Annotated[{"int": int, "float": float}[FIELD_TYPES[name]], wrapper.WithinRange(low, high)]
    namespace: dict[str, Any] = {
        "__module__": __name__,  # the string annotations are resolved in this module
        "__annotations__": annotations,
        "__doc__": ThinSectionSegmentationParameters.__doc__,
    }
    for spec in fields(ThinSectionSegmentationParameters):
        if spec.default is not MISSING:
            namespace[spec.name] = spec.default
    return wrapper.parameterNodeWrapper(type("ThinSectionSegmentationParameterNode", (), namespace))


def typed(parameterNode):
    """The typed parameter node: Slicer's wrapper where there is one, else PlainParameterNode."""
    cls = wrapper_class()
    return cls(parameterNode) if cls is not None else PlainParameterNode(parameterNode)


# -- the scene's node --------------------------------------------------------------------------


def find_parameter_node(scene):
    """The module's node (the last one when a loaded scene brought a second), or None."""
    found = None
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLScriptedModuleNode")
        if node.GetAttribute("ModuleName") == MODULE_NAME:
            found = node
    return found


def get_parameter_node(scene):
    """The scene's typed parameter node: found (an old one converted by `migrate`) or created,
    missing values filled with their defaults."""
    node = find_parameter_node(scene)
    if node is None:
        node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.UnRegister(None)  # CreateNodeByClass returns a new reference in Python
        node.SetAttribute("ModuleName", MODULE_NAME)
        node.SetSingletonTag(MODULE_NAME)  # a scene loaded later updates this node, not a second one
        node.SetName(scene.GenerateUniqueName(MODULE_NAME))
        node = scene.AddNode(node)
    migrate(node)
    return typed(node)
