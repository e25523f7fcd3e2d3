"""Installing the core's requirements into a host's Python (Slicer, GeoSlicer): only what is
missing comes in, and nothing the host has is upgraded, downgraded or doubled.

The installs run a real pip in scratch virtual environments ("hosts") with packages pinned at
old versions. The package index is a folder of tiny wheels built here (offline, deterministic):
it also holds newer releases of the host's packages, and a newer release of a missing package
that would need one, so that an unpinned pip would move the host (the control test shows it).
Only Slicer's own installer entry points are stood in for (they exist only inside Slicer).
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
import textwrap
import types
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MODULE_DIR = REPO / "ThinSectionSegmentation"
DEPENDENCIES = MODULE_DIR / "ThinSectionSegmentationLib" / "dependencies.py"

#: (name, version, Requires-Dist) of the index's wheels.
WHEELS = [
    ("hostlib", "1.0", []),
    ("hostlib", "2.0", []),
    ("keepme", "1.0", []),
    ("keepme", "1.5", []),
    ("newdep", "1.0", []),
    ("newpkg", "1.0", ["hostlib>=1.0", "newdep>=1.0"]),
    ("newpkg", "1.1", ["hostlib>=2.0", "newdep>=1.0"]),  # the newest would need the host's hostlib moved
    ("blocked", "1.0", ["hostlib>=2.0"]),  # installable only by moving the host's hostlib
    ("sneaky", "1.0", []),
    ("needs-sneaky", "1.0", ["sneaky>=1.0"]),
]
HOST = {"hostlib": "1.0", "keepme": "1.0"}


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(folder: Path, name: str, version: str, requires: list[str]) -> None:
    """A pure-Python wheel: one package `name` (dashes as underscores) and its metadata."""
    package = name.replace("-", "_")
    dist_info = f"{package}-{version}.dist-info"
    files = {
        f"{package}/__init__.py": f'__version__ = "{version}"\n',
        f"{dist_info}/METADATA": "".join(
            [f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"] + [f"Requires-Dist: {r}\n" for r in requires]
        ),
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [f"{path},{_record_hash(text.encode())},{len(text.encode())}" for path, text in files.items()]
    files[f"{dist_info}/RECORD"] = "\n".join([*record, f"{dist_info}/RECORD,,"]) + "\n"
    with zipfile.ZipFile(folder / f"{package}-{version}-py3-none-any.whl", "w") as wheel:
        for path, text in files.items():
            wheel.writestr(path, text)


@pytest.fixture(scope="module")
def index(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("index")
    for name, version, requires in WHEELS:
        build_wheel(folder, name, version, requires)
    return folder


#: The script a host runs: the installer's planning and installing code, in the host's own Python.
SCENARIO = textwrap.dedent(
    """
    import importlib.util, json, sys
    from pathlib import Path

    sys.path.insert(0, sys.argv[1])  # the module folder: `thinseg.errors`
    spec = importlib.util.spec_from_file_location("dependencies", sys.argv[2])
    dependencies = sys.modules["dependencies"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(dependencies)
    from thinseg.errors import ThinSegError

    requirements, answer = Path(sys.argv[3]), sys.argv[4]
    questions = []

    def confirm(text):
        questions.append(text)
        return answer == "yes"

    out = {}
    plan = dependencies.plan_install(requirements)
    out["plan"] = {"install": plan.install, "kept": plan.kept, "conflicts": plan.conflicts}
    out["constraints"] = dependencies.write_constraints(plan.pins, requirements.parent).read_text().splitlines()
    try:
        result = dependencies.install_missing(
            confirm, dependencies.pip_installer(sys.executable), sys.executable, requirements
        )
        out["result"] = None if result is None else {"added": result.added, "changed": result.changed,
                                                      "text": result.text()}
    except ThinSegError as error:
        out["error"] = str(error)
    out["questions"] = questions
    print(json.dumps(out))
    """
)


class Host:
    """A scratch Python environment with the host's packages installed from the test index."""

    def __init__(self, folder: Path, index: Path) -> None:
        self.folder = folder
        venv.EnvBuilder(with_pip=True).create(folder / "env")
        self.python = str(folder / "env" / ("Scripts/python.exe" if os.name == "nt" else "bin/python"))
        self.environment = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "PYTHON"))}
        self.environment.update(
            PIP_NO_INDEX="1",
            PIP_FIND_LINKS=str(index),
            PIP_CONFIG_FILE=os.devnull,
            PIP_DISABLE_PIP_VERSION_CHECK="1",
            PIP_NO_CACHE_DIR="1",
        )
        self.pip("install", *(f"{name}=={version}" for name, version in HOST.items()))

    def pip(self, *arguments: str) -> str:
        result = subprocess.run(
            [self.python, "-m", "pip", *arguments], capture_output=True, text=True, env=self.environment
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    def packages(self) -> dict[str, str]:
        return {item["name"].lower(): item["version"] for item in json.loads(self.pip("list", "--format", "json"))}

    def run(self, requirements: str, answer: str = "yes", extra_path: Path | None = None) -> dict:
        """Plan and install `requirements` (a requirements file's text) the way the module does."""
        path = self.folder / "requirements.txt"
        path.write_text(requirements, encoding="utf-8")
        (self.folder / "scenario.py").write_text(SCENARIO, encoding="utf-8")
        environment = dict(self.environment)
        if extra_path is not None:
            environment["PYTHONPATH"] = str(extra_path)
        result = subprocess.run(
            [self.python, str(self.folder / "scenario.py"), str(MODULE_DIR), str(DEPENDENCIES), str(path), answer],
            capture_output=True,
            text=True,
            env=environment,
            cwd=str(self.folder),
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout.splitlines()[-1])


@pytest.fixture(scope="module")
def shared_host(index, tmp_path_factory) -> Host:
    """One host for the scenarios that must leave it untouched (each checks that it did)."""
    return Host(tmp_path_factory.mktemp("host"), index)


def test_only_the_missing_packages_come_in_and_the_hosts_stay_where_they_are(index, tmp_path):
    host = Host(tmp_path, index)
    before = host.packages()
    out = host.run("hostlib>=1.0\nkeepme\nnewpkg>=1.0\n")

    assert "error" not in out, out.get("error")
    assert out["plan"]["install"] == ["newpkg>=1.0"]
    assert sorted(map(tuple, out["plan"]["kept"])) == [("hostlib", "1.0"), ("keepme", "1.0")]
    [question] = out["questions"]  # asked once, listing everything
    assert "newpkg 1.0, from the Python Package Index" in question and "which need: newdep 1.0" in question
    assert "left exactly as they are: hostlib 1.0, keepme 1.0" in question
    # newpkg 1.1 (the newest) would need hostlib 2.0: pip had to take newpkg 1.0 instead
    assert out["result"] == {
        "added": [["newdep", "1.0"], ["newpkg", "1.0"]],
        "changed": [],
        "text": "Installed: newdep 1.0, newpkg 1.0.",
    }
    assert host.packages() == {**before, "newdep": "1.0", "newpkg": "1.0"}


def test_without_the_constraints_pip_would_move_the_host(shared_host):
    """The control: the same request to a plain pip upgrades the host's hostlib."""
    report = shared_host.folder / "control.json"
    shared_host.pip("install", "--dry-run", "--report", str(report), "newpkg>=1.0")
    incoming = {
        item["metadata"]["name"]: item["metadata"]["version"] for item in json.loads(report.read_text())["install"]
    }
    assert incoming == {"newpkg": "1.1", "hostlib": "2.0", "newdep": "1.0"}


def test_the_constraints_pin_every_distribution_of_the_host(shared_host):
    out = shared_host.run("hostlib>=1.0\n")
    assert out["result"] == {"added": [], "changed": [], "text": "Installed: nothing."}
    assert out["questions"] == []  # nothing missing: nothing to ask
    pinned = {line.split("==")[0].lower(): line.split("==")[1] for line in out["constraints"]}
    pinned.pop("thinseg", None)  # a development checkout's own egg-info, on the path for `thinseg.errors`
    assert pinned == shared_host.packages()
    assert pinned["hostlib"] == "1.0" and "pip" in pinned


def test_declining_installs_nothing(shared_host):
    before = shared_host.packages()
    out = shared_host.run("newpkg>=1.0\n", answer="no")
    assert out["result"] is None and len(out["questions"]) == 1
    assert shared_host.packages() == before


def test_a_host_package_too_old_is_reported_and_not_upgraded(shared_host):
    before = shared_host.packages()
    out = shared_host.run("hostlib>=2.0\nnewpkg>=1.0\n")
    assert out["plan"]["conflicts"] == ["hostlib 1.0 is installed; hostlib>=2.0 is needed"]
    assert "hostlib 1.0 is installed; hostlib>=2.0 is needed" in out["error"]
    assert "nothing was installed" in out["error"]
    assert out["questions"] == []
    assert shared_host.packages() == before


def test_a_missing_package_that_would_move_a_host_package_is_refused_before_asking(shared_host):
    before = shared_host.packages()
    out = shared_host.run("hostlib>=1.0\nblocked>=1.0\n")
    assert out["plan"]["install"] == ["blocked>=1.0"]
    error = out["error"]
    assert error.startswith("cannot install blocked>=1.0 without changing packages this application already has")
    assert "blocked 1.0 depends on hostlib>=2.0" in error and "hostlib 1.0 is installed and stays" in error
    assert out["questions"] == []
    assert shared_host.packages() == before


def test_a_second_copy_of_a_module_the_host_has_without_metadata_is_refused(shared_host, tmp_path):
    """Hosts bundle some modules without pip metadata (pip cannot see, so cannot pin them)."""
    (tmp_path / "sneaky").mkdir()
    (tmp_path / "sneaky" / "__init__.py").write_text("", encoding="utf-8")
    before = shared_host.packages()

    out = shared_host.run("sneaky>=1.0\n", extra_path=tmp_path)
    assert out["plan"]["install"] == [] and out["plan"]["kept"] == [["sneaky", "(no version information)"]]

    out = shared_host.run("needs-sneaky>=1.0\n", extra_path=tmp_path)
    assert "would add a second copy of sneaky" in out["error"] and out["questions"] == []
    assert shared_host.packages() == before


# -- the core's own requirements in this environment --------------------------------------------------


def test_the_cores_requirements_are_met_here_and_nothing_would_be_installed():
    import numpy
    import torch

    from ThinSectionSegmentationLib import dependencies

    plan = dependencies.plan_install()
    assert plan.install == () and plan.conflicts == ()
    kept = dict(plan.kept)
    assert kept["torch"] == torch.__version__ and kept["numpy"] == numpy.__version__
    assert dependencies.missing_requirements() == []
    assert not dependencies.torch_missing()
    wanted = [
        ("numpy", "numpy>=1.0"),
        ("numpy", "numpy>=9999"),
        ("surely_not_installed_xyz", "surely-not-installed-xyz>=1"),
    ]
    assert dependencies.missing_requirements(wanted) == ["numpy>=9999", "surely-not-installed-xyz>=1"]


def test_pip_runs_in_pythonslicer_next_to_the_application_not_in_the_application(monkeypatch, tmp_path):
    from ThinSectionSegmentationLib import dependencies, process

    assert dependencies.host_python() == sys.executable  # outside Slicer: this Python
    application = tmp_path / "Slicer-5.8" / "bin" / "SlicerApp-real"
    application.parent.mkdir(parents=True)
    application.write_text("")
    launcher = application.parent / ("PythonSlicer.exe" if os.name == "nt" else "PythonSlicer")
    launcher.write_text("")
    slicer = types.ModuleType("slicer")
    slicer.app = object()  # inside the application, whose binary is sys.executable
    monkeypatch.setitem(sys.modules, "slicer", slicer)
    monkeypatch.setattr(sys, "executable", str(application))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # not on PATH: found beside the application
    assert dependencies.host_python() == str(launcher) == process.python_executable()


def test_requirements_are_one_list_for_pip_and_for_slicer():
    """pip's metadata of the installed core and the Slicer installer's list come from one file."""
    import re
    from importlib import metadata

    from ThinSectionSegmentationLib import dependencies

    runtime = [req for req in metadata.requires("thinseg") or [] if "extra ==" not in req]
    declared = {re.split(r"[<>=!~ ;]", req)[0].lower() for req in runtime}
    ours = {re.split(r"[<>=!~ ]", req)[0].lower() for _name, req in dependencies.read_requirements(torch=True)}
    assert ours == declared
    assert "torch" not in {name for name, _req in dependencies.REQUIREMENTS}  # torch has its own installer
    assert any(name == "PIL" and req.startswith("pillow") for name, req in dependencies.REQUIREMENTS)
    assert "xarray" not in declared  # only the tests read netCDF files through xarray


# -- Slicer's installers receive the constraints ------------------------------------------------------


def pip_ensure_5_12(calls: list):
    """slicer.packaging.pip_ensure with its Slicer 5.12 signature; records what it was given."""

    def pip_ensure(
        requirements,
        constraints=None,
        skip_packages=None,
        prompt_install=True,
        prompt_restart=True,
        requester=None,
        skip_in_testing=True,
        show_progress=True,
    ):
        calls.append((list(requirements), Path(constraints).read_text(encoding="utf-8"), prompt_install, requester))

    return pip_ensure


@pytest.fixture
def missing_here(monkeypatch):
    """A core requirement this environment lacks (pip's dry run answered as the index would)."""
    from ThinSectionSegmentationLib import dependencies

    state = {"missing": ["surely-not-installed-xyz>=1"]}
    real_plan = dependencies.plan_install()
    plan = dependencies.InstallPlan(("surely-not-installed-xyz>=1",), (), real_plan.kept, real_plan.pins)
    monkeypatch.setattr(dependencies, "missing_requirements", lambda *args: list(state["missing"]))
    monkeypatch.setattr(dependencies, "plan_install", lambda *args: plan)
    monkeypatch.setattr(dependencies, "resolve", lambda *args: [("surely-not-installed-xyz", "1.0", True)])
    return dependencies, state


def test_slicer_5_12_pip_ensure_gets_the_constraints_and_does_not_ask_again(monkeypatch, missing_here):
    import numpy

    dependencies, state = missing_here
    calls: list = []
    packaging = types.ModuleType("slicer.packaging")
    packaging.pip_ensure = pip_ensure_5_12(calls)
    monkeypatch.setitem(sys.modules, "slicer.packaging", packaging)
    questions = []

    def confirm(text):
        questions.append(text)
        state["missing"] = []  # as if installed by the call that follows
        return True

    assert dependencies.ensure_installed(confirm, inform=lambda text: None) is True
    assert len(questions) == 1 and "surely-not-installed-xyz 1.0" in questions[0]
    [(requirements, constraints, prompt_install, requester)] = calls
    assert requirements == ["surely-not-installed-xyz>=1"]
    assert f"numpy=={numpy.__version__}\n" in constraints  # the host's numpy is pinned
    assert prompt_install is False and requester == "Thin Section Segmentation"


def test_older_slicer_pip_install_gets_the_constraints(monkeypatch, missing_here):
    import slicer

    dependencies, state = missing_here
    monkeypatch.setitem(sys.modules, "slicer.packaging", None)  # Slicer 5.8/5.10, GeoSlicer: no slicer.packaging
    calls = []

    def pip_install(arguments):
        constraints = Path(arguments[1]).read_text(encoding="utf-8")
        calls.append((arguments[0], arguments[2:], constraints))
        state["missing"] = []

    monkeypatch.setattr(slicer.util, "pip_install", pip_install, raising=False)
    assert dependencies.ensure_installed(lambda text: True, inform=lambda text: None) is True
    [(flag, requirements, constraints)] = calls
    assert flag == "-c" and requirements == ["surely-not-installed-xyz>=1"]
    assert "torch==" in constraints


def test_declining_or_a_failing_installer(monkeypatch, missing_here):
    import slicer

    from thinseg.errors import ThinSegError

    dependencies, _state = missing_here
    monkeypatch.setitem(sys.modules, "slicer.packaging", None)
    calls = []

    def failing(arguments):
        calls.append(arguments)
        raise RuntimeError("pip install exited with 1")

    monkeypatch.setattr(slicer.util, "pip_install", failing, raising=False)
    assert dependencies.ensure_installed(lambda text: False) is False
    assert calls == []
    with pytest.raises(ThinSegError, match="installing the Python packages failed: pip install exited with 1"):
        dependencies.ensure_installed(lambda text: True)


def test_a_missing_torch_comes_from_the_pytorch_extension_then_pip_pins_it(monkeypatch):
    """Only where torch is missing does the PyTorch extension install it (the build for this
    machine); the rest is then planned again with torch pinned like any host package."""
    import slicer

    from ThinSectionSegmentationLib import dependencies

    real_plan = dependencies.plan_install()
    plans = [
        dependencies.InstallPlan(("torch>=1.12", "surely-not-installed-xyz>=1"), (), (), real_plan.pins),
        dependencies.InstallPlan(("surely-not-installed-xyz>=1",), (), (), real_plan.pins),
    ]
    events = []
    monkeypatch.setattr(dependencies, "missing_requirements", lambda *args: ["surely-not-installed-xyz>=1"])
    monkeypatch.setattr(dependencies, "plan_install", lambda *args: plans.pop(0))
    monkeypatch.setattr(dependencies, "resolve", lambda requirements, *args: events.append(("resolve", requirements)))

    class Logic:
        def installTorch(self, askConfirmation=True, torchVersionRequirement=None):
            events.append(("torch", askConfirmation, torchVersionRequirement))
            return object()

    monkeypatch.setitem(sys.modules, "PyTorchUtils", types.SimpleNamespace(PyTorchUtilsLogic=Logic))
    monkeypatch.setitem(sys.modules, "slicer.packaging", None)
    monkeypatch.setattr(
        slicer.util, "pip_install", lambda arguments: events.append(("pip", arguments[2:])), raising=False
    )
    questions = []
    dependencies.ensure_installed(lambda text: questions.append(text) or True, inform=lambda text: None)
    assert len(questions) == 1 and "PyTorch, through the PyTorch extension" in questions[0]
    assert events == [
        ("torch", False, ">=1.12"),
        ("resolve", ("surely-not-installed-xyz>=1",)),
        ("pip", ["surely-not-installed-xyz>=1"]),
    ]
