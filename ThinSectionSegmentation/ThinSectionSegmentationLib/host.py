"""Which application hosts the module: GeoSlicer or plain 3D Slicer.

GeoSlicer lists a module in its Module Installer, module search and environment menus only when
the module class derives from its `LTracePlugin` and sets `self.parent.categories` to a literal
list; its finder reads the class statement as source text, so the base must be spelled
`LTracePlugin` there. Plain 3D Slicer has no `ltrace` package and takes any
`ScriptedLoadableModule`. The module file therefore binds the name `LTracePlugin` to the base
that this host offers, chosen here.
"""

from __future__ import annotations

import importlib


def geoslicer_plugin_base() -> type | None:
    """GeoSlicer's `ltrace.slicer_utils.LTracePlugin`, or None outside GeoSlicer."""
    try:
        slicer_utils = importlib.import_module("ltrace.slicer_utils")  # GeoSlicer only; it loads Qt
    except ImportError:  # plain Slicer (or an unrelated `ltrace` distribution)
        return None
    base: type = slicer_utils.LTracePlugin
    return base


def module_base(fallback: type) -> type:
    """The module class's base: GeoSlicer's LTracePlugin where it exists, else `fallback`
    (Slicer's ScriptedLoadableModule, passed in because this package imports no Qt)."""
    return geoslicer_plugin_base() or fallback
