"""GeoSlicer's own code as a test oracle: load its unmodified files from outside the repository.

GeoSlicer 2.8.9's files (Apache-2.0) are kept read-only beside the checkout, never copied into
it. A test loads one of them as a module, with the smallest stand-ins for the host modules
(`slicer.app`, `qt`, other `ltrace` modules) that a real MRML scene cannot provide, and runs it
on our outputs: what GeoSlicer does with them is then known, not guessed.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

#: Set this to the GeoSlicer reference folder (holding `src/`) when there is no
#: `shared/reference/geoslicer-2.8.9` folder beside or inside the checkout.
REFERENCE_ENV = "THINSEG_GEOSLICER_REFERENCE"
_RELATIVE = Path("reference") / "geoslicer-2.8.9"


def reference_root() -> Path | None:
    """The GeoSlicer reference folder, or None when it is not on this machine."""
    named = os.environ.get(REFERENCE_ENV)
    candidates = [Path(named)] if named else [REPO.parent / "shared" / _RELATIVE, REPO / "shared" / _RELATIVE]
    return next((c for c in candidates if (c / "src").is_dir()), None)


def reference_file(relative: str) -> Path:
    """A file of the reference (e.g. "src/ltrace/ltrace/slicer/netcdf.py"); skips the test when
    the reference is not on this machine, saying where it looked and what to set."""
    root = reference_root()
    if root is None:
        pytest.skip(f"GeoSlicer reference files not found beside or inside {REPO}; set {REFERENCE_ENV}")
    path = root / relative
    assert path.is_file(), f"{path} is missing from the GeoSlicer reference folder"
    return path


@contextmanager
def stand_ins(modules: Mapping[str, types.ModuleType]) -> Iterator[None]:
    """Put host modules that only exist inside GeoSlicer into sys.modules for the duration, and
    restore whatever was there before."""
    saved = {name: sys.modules.get(name) for name in modules}
    sys.modules.update(modules)
    try:
        yield
    finally:
        for name, previous in saved.items():
            if previous is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = previous


def load_reference_module(relative: str, name: str | None = None) -> types.ModuleType:
    """Execute one reference file as a fresh module (call it inside `stand_ins` when the file
    imports host modules at its top)."""
    path = reference_file(relative)
    module_name = name or f"geoslicer_reference_{path.stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---------------------------------------------------------------------------------------------
# GeoSlicer's netCDF import/export on a real MRML scene

NETCDF_REFERENCE = "src/ltrace/ltrace/slicer/netcdf.py"
#: The version string GeoSlicer's exporter records as `geoslicer_version`.
GEOSLICER_VERSION = "2.8.9"


def _module(name: str, **attrs: object) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attrs)
    return module


def _unused(what: str):
    def fail(*_args: object, **_kwargs: object) -> None:
        raise AssertionError(f"stand-in {what} was called; the test needs a fuller stand-in")

    return fail


def _geoslicer_netcdf_stand_ins(scene) -> dict[str, types.ModuleType]:
    """The host modules GeoSlicer's netcdf.py imports, as small as its thin-section paths need.

    Labelmaps get their colour tables the way GeoSlicer builds them (entry 0 = background,
    entry k = class k), `labels` entries are "name,index,#rrggbb" per colour entry from 1, and
    `reference` follows the reference-image-geometry role: what the exporter and importer read
    and write. Temporary nodes live in the scene until removeTemporaryNodes, as in GeoSlicer.
    """
    import slicer  # deferred: slicer-core loads VTK and MRML, only for the tests that use a scene

    temporary: list[object] = []
    role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()

    def create_color_table(name, colors, color_names, add_background=False):
        table = scene.AddNewNodeByClass("vtkMRMLColorTableNode", name)
        table.SetTypeToUser()
        entries = ([("Background", (0.0, 0.0, 0.0))] if add_background else []) + list(zip(color_names, colors))
        table.SetNumberOfColors(len(entries))
        for index, (entry_name, rgb) in enumerate(entries):
            alpha = 0.0 if add_background and index == 0 else 1.0
            table.SetColor(index, entry_name, *rgb[:3], alpha)
        return table

    def create_temporary_volume_node(cls, name, uniqueName=True):
        node = scene.AddNewNodeByClass(cls.__name__, scene.GenerateUniqueName(name) if uniqueName else name)
        node.CreateDefaultDisplayNodes()
        temporary.append(node)
        return node

    def make_temporary_node_permanent(node, show=False):
        if node in temporary:
            temporary.remove(node)

    def remove_temporary_nodes() -> None:
        while temporary:
            scene.RemoveNode(temporary.pop())

    def update_segmentation_from_label_map(segmentation, labelmap, includeEmptySegments=False):
        logic = slicer.vtkSlicerSegmentationsModuleLogic()
        logic.SetMRMLScene(scene)
        logic.ImportLabelmapToSegmentationNode(labelmap, segmentation)

    def hex_colour(rgba) -> str:
        """#rrggbb, each 0..1 channel scaled by 255 and truncated."""
        return "#" + bytes(int(channel * 255) for channel in rgba[:3]).hex()

    def labels_csv(node, withColor=False):
        """ "name,index[,#rrggbb]" for every colour entry but the background (entry 0)."""
        table = node.GetDisplayNode().GetColorNode()
        lookup = table.GetLookupTable()

        def fields(index: int) -> list[str]:
            colour = [hex_colour(lookup.GetTableValue(index))] if withColor else []
            return [table.GetColorName(index), str(index), *colour]

        return [",".join(fields(index)) for index in range(1, table.GetNumberOfColors())]

    def get_metadata(_node_or_item) -> dict:
        return {}

    class Callback:
        def __init__(self, on_update=None) -> None:
            self.on_update = on_update or (lambda *args, **kwargs: None)

    ltrace = _module("ltrace")
    ltrace.__path__ = []  # a package, so that submodule imports resolve through sys.modules
    ltrace_slicer = _module("ltrace.slicer")
    ltrace_slicer.__path__ = []
    return {
        "ltrace": ltrace,
        "ltrace.slicer": ltrace_slicer,
        "ltrace.readers": _module("ltrace.readers", __path__=[]),
        "ltrace.readers.microtom": _module("ltrace.readers.microtom"),
        "ltrace.utils": _module("ltrace.utils", __path__=[]),
        "ltrace.utils.callback": _module("ltrace.utils.callback", Callback=Callback),
        "ltrace.slicer.export": _module("ltrace.slicer.export", getLabelMapLabelsCSV=labels_csv),
        "ltrace.slicer.metadata": _module(
            "ltrace.slicer.metadata",
            get_node_metadata=get_metadata,
            set_node_metadata=lambda node, attrs: None,
            get_item_metadata=get_metadata,
            set_item_metadata=lambda item, attrs: None,
        ),
        "ltrace.slicer.helpers": _module(
            "ltrace.slicer.helpers",
            autoDetectColumnType=lambda node: None,
            create_color_table=create_color_table,
            createTemporaryVolumeNode=create_temporary_volume_node,
            makeTemporaryNodePermanent=make_temporary_node_permanent,
            removeTemporaryNodes=remove_temporary_nodes,
            updateSegmentationFromLabelMap=update_segmentation_from_label_map,
            getSourceVolume=lambda node: node.GetNodeReference(role),
            safe_convert_array=_unused("safe_convert_array"),
        ),
        "ltrace.slicer.data_utils": _module(
            "ltrace.slicer.data_utils",
            dataFrameToTableNode=_unused("dataFrameToTableNode"),
            tableNodeToDataFrame=_unused("tableNodeToDataFrame"),
        ),
    }


def _missing_packages() -> dict[str, types.ModuleType]:
    """Packages GeoSlicer imports for other file kinds (HDF5 beamline files, TOML metadata):
    stand-ins only where they are not installed."""
    wanted = {
        "h5py": {"File": _unused("h5py.File")},
        "pint": {"UnitRegistry": _unused("pint.UnitRegistry")},
        "tomli": {"loads": _unused("tomli.loads")},
        "tomli_w": {"dumps": _unused("tomli_w.dumps")},
    }
    return {name: _module(name, **attrs) for name, attrs in wanted.items() if importlib.util.find_spec(name) is None}


@contextmanager
def geoslicer_netcdf(scene) -> Iterator[types.ModuleType]:
    """GeoSlicer's own netcdf.py (exportNetcdf, import_file) working on `scene`, a real MRML
    scene: `slicer.mrmlScene` is the scene, `slicer.app` only carries the version, and showing
    volumes in views (there are none) only creates their display nodes."""
    import slicer  # deferred: slicer-core loads VTK and MRML, only for the tests that use a scene
    import slicer.util  # deferred: as above

    def show_in_views(background=None, foreground=None, label=None, **_options):
        for node in (background, foreground, label):
            if node is not None and not isinstance(node, str) and node.GetDisplayNode() is None:
                node.CreateDefaultDisplayNodes()

    saved = {name: getattr(slicer, name, None) for name in ("mrmlScene", "app")}
    saved_show = slicer.util.setSliceViewerLayers
    slicer.mrmlScene = scene
    slicer.app = types.SimpleNamespace(applicationVersion=GEOSLICER_VERSION)
    slicer.util.setSliceViewerLayers = show_in_views
    try:
        with stand_ins({**_geoslicer_netcdf_stand_ins(scene), **_missing_packages()}):
            yield load_reference_module(NETCDF_REFERENCE, "geoslicer_reference_netcdf")
    finally:
        slicer.util.setSliceViewerLayers = saved_show
        for name, value in saved.items():
            if value is None:
                delattr(slicer, name)
            else:
                setattr(slicer, name, value)
