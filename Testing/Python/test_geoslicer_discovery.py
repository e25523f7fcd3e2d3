"""GeoSlicer finds, installs and files the module; plain Slicer loads the same file.

GeoSlicer's own module finder (module_info.py) and Module Installer (ModuleInstaller.py) run
here unmodified from the GeoSlicer reference folder, on this repository and on copies of it as
people download it (a folder, GitHub's zip). Only what exists solely inside GeoSlicer (Qt,
`slicer.app`, the other `ltrace` modules) is stood in for, each stand-in as small as the code
path needs.
"""

from __future__ import annotations

import functools
import importlib.util
import io
import os
import shutil
import subprocess
import sys
import types
import zipfile
from pathlib import Path

import pytest
from geoslicer_reference import load_reference_module, stand_ins

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "ThinSectionSegmentation"
MODULE_FILE = MODULE_DIR / "ThinSectionSegmentation.py"
MODULE_INFO = "src/ltrace/ltrace/slicer/module_info.py"
#: What a download of the extension holds (a GitHub zip, a clone without its build outputs).
DOWNLOAD_IGNORE = shutil.ignore_patterns(
    ".*", "__pycache__", "*.egg-info", "results", "bench", "build", "dist", "shared"
)


@pytest.fixture(scope="module")
def module_info():
    return load_reference_module(MODULE_INFO, "geoslicer_reference_module_info")


def found_here(module_info, path: Path, depth: int = 2):
    return {m.key: m for m in module_info.ModuleInfo.findModules(str(path), depth)}


def test_geoslicer_finds_the_module_in_this_repository_under_thin_section(module_info):
    found = found_here(module_info, REPO)
    assert set(found) == {"ThinSectionSegmentation"}
    module = found["ThinSectionSegmentation"]
    assert module.categories == ["Segmentation", "Thin Section"]  # the Thin Section environment's category
    assert module.hidden is False  # hidden modules stay out of GeoSlicer's module search
    assert Path(module.path) == MODULE_FILE
    assert Path(module.searchPath) == MODULE_DIR  # what GeoSlicer adds to the module paths
    # the module folder itself is found too (installing only that folder), the libraries in it are not
    assert set(found_here(module_info, MODULE_DIR)) == {"ThinSectionSegmentation"}


@pytest.mark.parametrize("encoding", ["utf-8", "cp1252"])
def test_geoslicer_reads_the_module_file_in_the_locale_encoding_of_its_users(module_info, encoding, monkeypatch):
    """GeoSlicer opens module files with the platform's default encoding (cp1252 on a Western
    Windows): a byte that encoding cannot decode would hide the module without a word."""
    monkeypatch.setattr(module_info, "open", functools.partial(io.open, encoding=encoding), raising=False)
    assert [m.key for m in module_info.ModuleInfo.findModules(str(MODULE_DIR), 0)] == ["ThinSectionSegmentation"]


# -- the module class on both hosts -----------------------------------------------------------------


class _Anything(types.ModuleType):
    """A host module of which the module file only names classes at import time (qt, ctk)."""

    def __getattr__(self, name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        value = type(name, (), {"__init__": lambda self, *args, **kwargs: None})
        setattr(self, name, value)
        return value


def _scripted_loadable_module():
    """Slicer's slicer.ScriptedLoadableModule as far as the module class uses it: the base keeps
    `parent`, and a fresh module's parent starts with empty categories (as in Slicer)."""
    module = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModule:
        def __init__(self, parent):
            self.parent = parent
            self.moduleName = type(self).__name__
            parent.title, parent.categories, parent.dependencies = "", [], []

    module.ScriptedLoadableModule = ScriptedLoadableModule
    for name in ("ScriptedLoadableModuleWidget", "ScriptedLoadableModuleLogic", "ScriptedLoadableModuleTest"):
        setattr(module, name, type(name, (), {}))
    return module


def _ltrace(scripted):
    """GeoSlicer's ltrace.slicer_utils.LTracePlugin as far as a module class meets it: it derives
    from ScriptedLoadableModule and refuses a class without SETTING_KEY."""

    class LTracePlugin(scripted.ScriptedLoadableModule):
        SETTING_KEY = None

        def __init__(self, *args, **kwargs):
            scripted.ScriptedLoadableModule.__init__(self, *args, **kwargs)
            if self.SETTING_KEY is None:
                raise NotImplementedError

    package = types.ModuleType("ltrace")
    package.__path__ = []
    slicer_utils = types.ModuleType("ltrace.slicer_utils")
    slicer_utils.LTracePlugin = LTracePlugin
    package.slicer_utils = slicer_utils
    return {"ltrace": package, "ltrace.slicer_utils": slicer_utils}


def _load_module_file(extra):
    scripted = _scripted_loadable_module()
    modules = {"qt": _Anything("qt"), "ctk": _Anything("ctk"), "slicer.ScriptedLoadableModule": scripted}
    modules.update(extra(scripted))
    with stand_ins(modules):
        spec = importlib.util.spec_from_file_location("ThinSectionSegmentation_under_test", MODULE_FILE)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    return module, scripted, modules


def _instantiate(module):
    parent = types.SimpleNamespace(path=str(MODULE_FILE))
    return module.ThinSectionSegmentation(parent), parent


def test_in_geoslicer_the_module_class_is_an_ltrace_plugin():
    module, scripted, modules = _load_module_file(_ltrace)
    plugin = modules["ltrace.slicer_utils"].LTracePlugin
    assert issubclass(module.ThinSectionSegmentation, plugin)
    instance, parent = _instantiate(module)  # LTracePlugin's own check (SETTING_KEY) passes
    assert isinstance(instance, plugin) and isinstance(instance, scripted.ScriptedLoadableModule)
    assert parent.categories == ["Segmentation", "Thin Section"]
    assert parent.title == "Thin Section Segmentation"
    assert instance.parent is parent


def test_in_plain_slicer_the_module_class_is_a_scripted_loadable_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "ltrace", None)  # `import ltrace` fails, as outside GeoSlicer
    module, scripted, _modules = _load_module_file(lambda scripted: {})
    assert module.ThinSectionSegmentation.__mro__[1] is scripted.ScriptedLoadableModule
    _instance, parent = _instantiate(module)
    assert parent.categories == ["Segmentation", "Thin Section"]


# -- GeoSlicer's Module Installer -------------------------------------------------------------------


@pytest.fixture
def geoslicer(tmp_path, module_info):
    """ModuleInstaller.py loaded with stand-ins for what only GeoSlicer has; its extern-modules
    folder is a temporary one, and the calls it makes into GeoSlicer are recorded."""
    calls: dict[str, list] = {"loadModules": [], "addModules": [], "info": [], "error": []}
    extern = tmp_path / "lib" / "GeoSlicer-2.8" / "qt-scripted-extern-modules"
    extern.mkdir(parents=True)

    def extract_archive(archive, folder):  # slicer.util.extractArchive
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(folder)
        return True

    manager = types.SimpleNamespace(addModules=lambda modules: calls["addModules"].append(list(modules)))
    slicer = types.ModuleType("slicer")
    slicer.util = types.SimpleNamespace(
        extractArchive=extract_archive,
        infoDisplay=lambda text, *args, **kwargs: calls["info"].append(text),
        errorDisplay=lambda text, *args, **kwargs: calls["error"].append(text),
        warningDisplay=lambda text, *args, **kwargs: calls["error"].append(text),
    )
    slicer.modules = types.SimpleNamespace(AppContextInstance=types.SimpleNamespace(modules=manager))

    ltrace = types.ModuleType("ltrace")
    ltrace.__path__ = []
    ltrace_slicer = types.ModuleType("ltrace.slicer")
    ltrace_slicer.__path__ = []
    module_utils = types.ModuleType("ltrace.slicer.module_utils")
    module_utils.ModuleInfo = module_info.ModuleInfo  # GeoSlicer's own finder
    module_utils.loadModules = lambda modules, permanent=False, favorite=False: calls["loadModules"].append(
        (list(modules), permanent)
    )
    slicer_utils = types.ModuleType("ltrace.slicer_utils")
    slicer_utils.externalModulesPath = lambda: extern
    for name in ("LTracePlugin", "LTracePluginWidget", "LTracePluginLogic"):
        setattr(slicer_utils, name, type(name, (), {"__init__": lambda self, *args, **kwargs: None}))
    helpers = types.ModuleType("ltrace.slicer.helpers")
    ltrace_slicer.helpers = helpers
    modules = {
        "ctk": _Anything("ctk"),
        "qt": _Anything("qt"),
        "slicer": slicer,
        "ltrace": ltrace,
        "ltrace.slicer": ltrace_slicer,
        "ltrace.slicer.module_utils": module_utils,
        "ltrace.slicer_utils": slicer_utils,
        "ltrace.slicer.helpers": helpers,
    }
    with stand_ins(modules):
        installer = load_reference_module("src/modules/ModuleInstaller/ModuleInstaller.py")
    return types.SimpleNamespace(logic=installer.ModuleInstallerLogic(), extern=extern, calls=calls)


def download(tmp_path: Path, name: str) -> Path:
    folder = tmp_path / "downloads" / name
    shutil.copytree(REPO, folder, ignore=DOWNLOAD_IGNORE)
    return folder


def bundled_model_seen_from(module_dir: Path) -> Path:
    """Where the installed copy's `thinseg` finds its bundled model (in a fresh interpreter)."""
    code = "from thinseg.resources import default_model_dir; print(default_model_dir())"
    environment = {k: v for k, v in os.environ.items() if k not in ("THINSEG_RESOURCES", "PYTHONPATH")}
    environment["PYTHONPATH"] = str(module_dir)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=environment, cwd=str(module_dir), check=True
    )
    return Path(result.stdout.strip())


def check_installed(geoslicer, installed: Path) -> None:
    """One module registered permanently from the copy under GeoSlicer's extern-modules folder,
    the copy complete enough to run (its core finds the bundled model inside the copy)."""
    assert geoslicer.calls["error"] == []
    [(modules, permanent)] = geoslicer.calls["loadModules"]
    assert permanent is True  # GeoSlicer adds each module's searchPath to Modules/AdditionalPaths
    assert [(m.key, m.categories) for m in modules] == [("ThinSectionSegmentation", ["Segmentation", "Thin Section"])]
    assert Path(modules[0].searchPath) == installed / "ThinSectionSegmentation"
    assert geoslicer.calls["addModules"] == [modules]  # searchable in this session already
    assert len(geoslicer.calls["info"]) == 1
    model = bundled_model_seen_from(installed / "ThinSectionSegmentation")
    assert model.is_relative_to(installed) and (model / "meta.json").is_file()


def test_module_installer_installs_a_downloaded_folder(geoslicer, tmp_path):
    source = download(tmp_path, "ThinSectionSegmentation")
    assert geoslicer.logic.run(str(source)) is True
    installed = geoslicer.extern / "ThinSectionSegmentation"  # the whole folder is copied there
    assert (
        installed / "ThinSectionSegmentation" / "ThinSectionSegmentation.py"
    ).read_bytes() == MODULE_FILE.read_bytes()
    check_installed(geoslicer, installed)


def test_module_installer_installs_githubs_zip(geoslicer, tmp_path):
    """GitHub's "Download ZIP" holds one folder named like the archive (ThinSectionSegmentation-main)."""
    source = download(tmp_path, "ThinSectionSegmentation-main")
    archive = tmp_path / "ThinSectionSegmentation-main.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zipped:
        for path in sorted(source.rglob("*")):
            zipped.write(path, path.relative_to(source.parent).as_posix())
    assert geoslicer.logic.run(str(archive)) is True
    check_installed(geoslicer, geoslicer.extern / "ThinSectionSegmentation-main")
