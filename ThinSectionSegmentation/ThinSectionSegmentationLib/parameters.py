"""The module's parameter node: the panel's state, saved with the scene (no Qt).

A vtkMRMLScriptedModuleNode tagged with ModuleName = "ThinSectionSegmentation" (what
ScriptedLoadableModuleLogic.getParameterNode finds), holding string parameters and node
references. `Parameters` gives typed access; the widget copies between it and the GUI.
"""

from __future__ import annotations

from dataclasses import dataclass

MODULE_NAME = "ThinSectionSegmentation"

#: name -> default (stored as strings, as vtkMRMLScriptedModuleNode does).
DEFAULTS: dict[str, str] = {
    # Segment
    "ModelPath": "",
    "Device": "auto",
    "Confidence": "false",
    "CreateSegmentation": "false",
    "PpPattern": "PP",
    "XpPattern": "XP",
    # Register
    "TransformKind": "similarity",
    "Refine": "true",
    "QemscanMmPerPixel": "0.01",
    # Train
    "Epochs": "20",
    "PatchSize": "256",
    "BatchSize": "8",
    "StepsPerEpoch": "200",
    "ValFraction": "0.2",
    "FineTune": "true",
    "ModelName": "my-thin-section-model",
    "UserModelsRoot": "",
    "TrainFiles": "",  # netCDF files, one per line
    # Export / import
    "ExportPath": "",
    "ImportPath": "",
}

#: node reference roles the panel uses.
REFERENCES = (
    "PPVolume",
    "XPVolume",
    "OutputLabelmap",
    "QemscanVolume",
    "ImageLandmarks",
    "QemscanLandmarks",
    "TransformNode",
    "RegisteredLabelmap",
)


def find_parameter_node(scene):
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLScriptedModuleNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLScriptedModuleNode")
        if node.GetAttribute("ModuleName") == MODULE_NAME:
            return node
    return None


def get_parameter_node(scene):
    """The scene's parameter node (created with defaults if missing; missing values filled)."""
    node = find_parameter_node(scene)
    if node is None:
        node = scene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
        node.UnRegister(None)  # CreateNodeByClass returns a new reference in Python
        node.SetAttribute("ModuleName", MODULE_NAME)
        node.SetName(scene.GenerateUniqueName(MODULE_NAME))
        node = scene.AddNode(node)
    set_defaults(node)
    return node


def set_defaults(node) -> None:
    for key, value in DEFAULTS.items():
        if not node.GetParameter(key):
            node.SetParameter(key, value)


@dataclass
class Parameters:
    """Typed view of the parameter node."""

    node: object

    def get(self, key: str) -> str:
        value = self.node.GetParameter(key)
        return value if value else DEFAULTS.get(key, "")

    def set(self, key: str, value) -> None:
        if isinstance(value, bool):
            value = "true" if value else "false"
        self.node.SetParameter(key, str(value))

    def bool(self, key: str) -> bool:
        return self.get(key).strip().lower() in ("true", "1", "yes", "on")

    def int(self, key: str) -> int:
        try:
            return int(float(self.get(key)))
        except ValueError:
            return int(DEFAULTS[key])

    def float(self, key: str) -> float:
        try:
            return float(self.get(key))
        except ValueError:
            return float(DEFAULTS[key])

    def lines(self, key: str) -> list[str]:
        return [line.strip() for line in self.get(key).splitlines() if line.strip()]

    def node_ref(self, role: str):
        return self.node.GetNodeReference(role)

    def set_node_ref(self, role: str, node) -> None:
        self.node.SetNodeReferenceID(role, node.GetID() if node is not None else None)
