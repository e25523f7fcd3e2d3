"""Evaluate the parameter node's annotations as Slicer's parameterNodeWrapper does, on this interpreter.

    python check_type_hints.py [--lib DIR]

Slicer's wrapper calls `typing.get_type_hints(cls, include_extras=True)` on the class it decorates,
so every string annotation of that class is evaluated when the module loads. On Python 3.9
(Slicer 5.8, GeoSlicer 2.8) an annotation such as `int | None` then raises TypeError, although
`from __future__ import annotations` lets the module itself import. This script imports
`ThinSectionSegmentationLib.parameters` and `.guibinding` from DIR (default: this checkout's) and
evaluates the hints of every class they define and of the class `wrapper_class()` hands to the
wrapper. It prints one JSON object:

    {"python": [3, 9], "hints": {class: {field: type}}, "errors": {class: "TypeError: ..."}}

and exits 1 when a class's hints do not evaluate. Types are written `module.qualname`,
`origin[args]` and `Annotated[type, metadata]`.

Only what Slicer alone provides is stood in for: `slicer` with the MRML classes the fields
name, and `slicer.parameterNodeWrapper` with `WithinRange` and a `parameterNodeWrapper` that hands
back the class unchanged (the real one evaluates the same hints, then builds properties). The
package's `__init__` (the whole MRML logic) is not run: a bare package stands for it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import types
import typing
from pathlib import Path
from typing import Any

LIB = Path(__file__).resolve().parents[3] / "ThinSectionSegmentation" / "ThinSectionSegmentationLib"
MRML_CLASSES = (
    "vtkMRMLVectorVolumeNode",
    "vtkMRMLLabelMapVolumeNode",
    "vtkMRMLMarkupsFiducialNode",
    "vtkMRMLColorTableNode",
)


class WithinRange:
    """Stands for slicer.parameterNodeWrapper.WithinRange (a validator holding inclusive limits)."""

    def __init__(self, minimum: float, maximum: float) -> None:
        self.minimum, self.maximum = minimum, maximum

    def __repr__(self) -> str:
        return f"WithinRange({self.minimum!r}, {self.maximum!r})"


def install_stand_ins(lib: Path) -> None:
    slicer = types.ModuleType("slicer")
    for name in MRML_CLASSES:
        setattr(slicer, name, type(name, (), {"__module__": "slicer"}))
    wrapper = types.ModuleType("slicer.parameterNodeWrapper")
    vars(wrapper).update(WithinRange=WithinRange, parameterNodeWrapper=lambda cls: cls)
    vars(slicer).update(parameterNodeWrapper=wrapper)
    package = types.ModuleType("ThinSectionSegmentationLib")
    package.__path__ = [str(lib)]
    sys.modules.update(
        {"slicer": slicer, "slicer.parameterNodeWrapper": wrapper, "ThinSectionSegmentationLib": package}
    )


def describe(hint: Any) -> str:
    """A type as text that names where it comes from (so a stand-in and the real class differ)."""
    if typing.get_origin(hint) is typing.Annotated:
        metadata = ", ".join(repr(item) for item in hint.__metadata__)
        return f"Annotated[{describe(hint.__origin__)}, {metadata}]"
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is not None:
        return f"{describe(origin)}[{', '.join(describe(arg) for arg in args)}]"
    if isinstance(hint, type):
        return f"{hint.__module__}.{hint.__qualname__}"
    return repr(hint)


def check(lib: Path) -> dict[str, Any]:
    install_stand_ins(lib)
    modules = [importlib.import_module(f"ThinSectionSegmentationLib.{name}") for name in ("parameters", "guibinding")]
    classes = [
        value
        for module in modules
        for value in vars(module).values()
        if isinstance(value, type) and value.__module__ == module.__name__
    ]
    errors: dict[str, str] = {}
    try:
        classes.append(modules[0].wrapper_class())
    except Exception as error:
        errors["wrapper_class()"] = f"{type(error).__name__}: {error}"
    hints: dict[str, dict[str, str]] = {}
    for cls in classes:
        try:
            hints[cls.__qualname__] = {
                name: describe(hint) for name, hint in typing.get_type_hints(cls, include_extras=True).items()
            }
        except Exception as error:
            errors[cls.__qualname__] = f"{type(error).__name__}: {error}"
    return {"python": list(sys.version_info[:2]), "hints": hints, "errors": errors}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lib", type=Path, default=LIB, help="the ThinSectionSegmentationLib folder to check")
    report = check(parser.parse_args().lib)
    print(json.dumps(report, indent=1))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
