"""Widgets <-> the typed parameter node, for what Slicer's `connectGui` does not cover.

Slicer's parameterNodeWrapper binds the widgets whose `SlicerParameterName` property names a
field. It has no connector for a text field shown in a ctkPathLineEdit or for a list shown in
a QListWidget, so those widgets name their field in `ThinSegParameterName` and are bound here;
on Slicer builds without the wrapper every named widget is bound here.

Only the Qt property system is used (`property`, `setProperty`, signals by name), which Slicer's
PythonQt and PySide6 share: this module imports no Qt and is tested with PySide6 widgets on a
real MRML scene.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from .parameters import ENUMS, FIELD_TYPES, is_node_field

#: The property Slicer's connectGui reads.
SLICER_PROPERTY = "SlicerParameterName"
#: The property of widgets bound here also where Slicer's wrapper exists.
THINSEG_PROPERTY = "ThinSegParameterName"

#: Widget class -> (value property, change signal); the first class the widget inherits wins.
_WIDGETS: tuple[tuple[str, str, str], ...] = (
    ("qMRMLNodeComboBox", "currentNodeID", "currentNodeIDChanged"),
    ("ctkPathLineEdit", "currentPath", "currentPathChanged"),
    ("QCheckBox", "checked", "toggled"),
    ("QAbstractSpinBox", "value", "valueChanged"),
    ("QLineEdit", "text", "textChanged"),
    ("QComboBox", "currentIndex", "currentIndexChanged"),
    ("QListWidget", "", ""),  # shows a list field; the panel edits the field, not the widget
)


def named_widgets(widgets: Iterable[Any], properties: Sequence[str]) -> dict[str, Any]:
    """Field name -> widget, for the widgets that name a field in one of `properties`."""
    found = {}
    for widget in widgets:
        for name in properties:
            value = widget.property(name) if hasattr(widget, "property") else None
            if value:
                found[str(value)] = widget
    return found


def _kind(widget: Any) -> tuple[str, str, str]:
    for kind in _WIDGETS:
        if widget.inherits(kind[0]):
            return kind
    raise TypeError(f"no binding for a {widget.metaObject().className()} widget")


class GuiBinding:
    """Keeps `widgets` (field name -> widget) and the typed parameter node `params` in step:
    a widget edit writes its field, a parameter node change rewrites the widgets."""

    def __init__(self, params: Any, widgets: dict[str, Any]) -> None:
        unknown = sorted(set(widgets) - set(FIELD_TYPES))
        if unknown:
            raise ValueError(f"widgets name unknown parameters: {', '.join(unknown)}")
        self.params = params
        self.widgets = widgets
        self._updating = False
        self._callbacks: dict[str, Callable[..., None]] = {}
        self._observer: int | None = None

    def connect(self) -> GuiBinding:
        """Fill the widgets from the parameters, then follow both ways."""
        for name, widget in self.widgets.items():
            if widget.inherits("QComboBox") and FIELD_TYPES[name] in ENUMS:
                widget.clear()
                for member in ENUMS[FIELD_TYPES[name]]:
                    label = getattr(member, "label", None)
                    widget.addItem(label() if callable(label) else member.name)
        self.update_gui()
        for name, widget in self.widgets.items():
            signal = _kind(widget)[2]
            if signal:
                callback = self._make_callback(name)
                self._callbacks[name] = callback
                getattr(widget, signal).connect(callback)
        node = self.params.parameterNode
        self._observer = node.AddObserver("ModifiedEvent", lambda caller, event: self.update_gui())
        return self

    def disconnect(self) -> None:
        for name, callback in self._callbacks.items():
            getattr(self.widgets[name], _kind(self.widgets[name])[2]).disconnect(callback)
        self._callbacks.clear()
        if self._observer is not None:
            self.params.parameterNode.RemoveObserver(self._observer)
            self._observer = None

    def _make_callback(self, name: str) -> Callable[..., None]:
        def changed(*_args: Any) -> None:
            if not self._updating:
                setattr(self.params, name, self.read(name))

        return changed

    def read(self, name: str) -> Any:
        """The value the widget of field `name` shows, as the field's type."""
        widget, kind = self.widgets[name], FIELD_TYPES[name]
        prop = _kind(widget)[1]
        if not prop:
            return [widget.item(i).text() for i in range(widget.property("count"))] if kind == "list[str]" else None
        value = widget.property(prop)
        if is_node_field(name):
            scene = self.params.parameterNode.GetScene()
            return scene.GetNodeByID(value) if value and scene is not None else None
        if kind in ENUMS:
            members = list(ENUMS[kind])
            return members[value] if 0 <= value < len(members) else members[0]
        return {"bool": bool, "int": int, "float": float}.get(kind, str)(value)

    def write(self, name: str, value: Any) -> None:
        """Show `value` in the widget of field `name`."""
        widget, kind = self.widgets[name], FIELD_TYPES[name]
        prop = _kind(widget)[1]
        if not prop:
            widget.clear()
            for item in value:
                widget.addItem(str(item))
        elif is_node_field(name):
            widget.setProperty(prop, value.GetID() if value is not None else "")
        elif kind in ENUMS:
            widget.setProperty(prop, list(ENUMS[kind]).index(value))
        else:
            widget.setProperty(prop, value)

    def update_gui(self) -> None:
        """Rewrite every widget from the parameters (a node change, or after connecting)."""
        if self._updating:
            return
        self._updating = True
        try:
            for name in self.widgets:
                value = getattr(self.params, name)
                if self.read(name) != value:
                    self.write(name, value)
        finally:
            self._updating = False
