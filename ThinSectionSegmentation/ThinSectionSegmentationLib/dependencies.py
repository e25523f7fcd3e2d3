"""The core's Python requirements in the host's Python (3D Slicer, GeoSlicer): what is missing,
and installing only that.

A host such as GeoSlicer ships its own torch, numpy, scipy, MONAI, xarray, netCDF4, zarr, h5py,
SimpleITK, ... at the versions its other modules were built against. So a requirement the host
already meets is left alone; one it meets with too old a version is reported and nothing is
installed; the missing ones are installed by pip with a constraints file that pins every
distribution already in the host at its installed version, so that pip's resolver cannot
upgrade, downgrade or duplicate any of them for a dependency either. pip's dry run says
beforehand exactly what would come in (the question lists it); a plan that would move a host
package, or add a second copy of one the host has without pip metadata, is refused with a
message naming it. Afterwards the user is told what was installed, with versions.

Checking and planning are plain Python (tested with a real pip in a scratch environment).
Installing inside Slicer goes through `slicer.packaging.pip_ensure` (Slicer 5.12+, told not to
ask again) or `slicer.util.pip_install` (older Slicer, GeoSlicer), both given the constraints
file; a missing PyTorch comes from the PyTorch extension's installer where it is available (it
picks the CUDA/CPU build for the machine).
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import logging
import os
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from packaging.requirements import InvalidRequirement, Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import InvalidVersion, Version
else:
    try:
        from packaging.requirements import InvalidRequirement, Requirement
        from packaging.utils import canonicalize_name
        from packaging.version import InvalidVersion, Version
    except ImportError:  # a Python without `packaging`: pip's own copy (pip is wherever anything gets installed)
        from pip._vendor.packaging.requirements import InvalidRequirement, Requirement
        from pip._vendor.packaging.utils import canonicalize_name
        from pip._vendor.packaging.version import InvalidVersion, Version

from thinseg.errors import ThinSegError

#: The core's requirements file: pyproject.toml reads it for pip, this module for the host's Python.
REQUIREMENTS_FILE = Path(__file__).resolve().parents[1] / "thinseg" / "requirements.txt"
#: Distributions whose import name is not their pip name.
IMPORT_NAMES = {"pillow": "PIL", "scikit-image": "skimage", "pyyaml": "yaml"}
REQUESTER = "Thin Section Segmentation"
TORCH = "torch"


def import_name(distribution: str) -> str:
    """The top-level module a distribution provides (its name, unless IMPORT_NAMES says otherwise)."""
    return IMPORT_NAMES.get(canonicalize_name(distribution), distribution.replace("-", "_"))


def read_requirements(path: Path = REQUIREMENTS_FILE, torch: bool = False) -> list[tuple[str, str]]:
    """(import name, pip requirement) for each line of a requirements file (torch only if asked),
    skipping lines whose environment marker does not apply to this Python."""
    requirements = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise ThinSegError.from_os_error(error, "cannot read the requirements file", path) from None
    for number, line in enumerate(lines, 1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        try:
            requirement = Requirement(text)
        except InvalidRequirement as error:
            raise ThinSegError(f"line {number}: not a pip requirement: {error}", path) from None
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        if canonicalize_name(requirement.name) == TORCH and not torch:
            continue
        requirements.append((import_name(requirement.name), text))
    return requirements


#: The core's requirements but torch, which has an installer of its own in Slicer.
REQUIREMENTS: tuple[tuple[str, str], ...] = tuple(read_requirements())


def installed_distributions() -> dict[str, tuple[str, str]]:
    """canonical name -> (name, version) of every distribution this Python has; where one is
    installed twice, the copy first on sys.path (the one `import` finds) counts."""
    importlib.invalidate_caches()
    found: dict[str, tuple[str, str]] = {}
    for distribution in metadata.distributions():
        name, version = distribution.metadata["Name"], distribution.version
        if name and version:  # a broken install without metadata is not a distribution pip sees
            found.setdefault(canonicalize_name(name), (name, version))
    return found


def _version_ok(requirement: Requirement, version: str) -> bool:
    try:
        return requirement.specifier.contains(Version(version), prereleases=True)
    except InvalidVersion:  # not a PEP 440 version (an old custom build): presence is all we can check
        return True


def _status(module: str, requirement: Requirement, installed: dict[str, tuple[str, str]]) -> str:
    """ "ok", "too old", "unregistered" (importable without pip metadata, as some hosts bundle
    modules: accepted as is) or "missing"."""
    present = installed.get(canonicalize_name(requirement.name))
    if present is not None:
        return "ok" if _version_ok(requirement, present[1]) else "too old"
    return "unregistered" if importlib.util.find_spec(module) is not None else "missing"


@dataclass(frozen=True)
class InstallPlan:
    """What the host has and what it lacks, from the metadata on disk (no network, no pip)."""

    #: pip requirements of the core that are not installed at all: these, and only these, get installed
    install: tuple[str, ...]
    #: one line per requirement the host meets with a version the core cannot use (never changed here)
    conflicts: tuple[str, ...]
    #: (name, version) of the core's requirements that are there and stay as they are
    kept: tuple[tuple[str, str], ...]
    #: (name, version) of every distribution in the host: pinned while installing
    pins: tuple[tuple[str, str], ...]

    def needs(self, name: str) -> bool:
        return any(canonicalize_name(Requirement(r).name) == canonicalize_name(name) for r in self.install)


def plan_install(path: Path = REQUIREMENTS_FILE) -> InstallPlan:
    """Sort the requirements of `path` (torch included) into missing, too old and present."""
    installed = installed_distributions()
    install, conflicts, kept = [], [], []
    for module, text in read_requirements(path, torch=True):
        requirement = Requirement(text)
        status = _status(module, requirement, installed)
        present = installed.get(canonicalize_name(requirement.name))
        if status == "missing":
            install.append(text)
        elif present is None:
            kept.append((requirement.name, "(no version information)"))
        elif status == "ok":
            kept.append(present)
        else:
            conflicts.append(f"{present[0]} {present[1]} is installed; {text} is needed")
    pins = tuple(sorted(installed.values(), key=lambda item: item[0].lower()))
    return InstallPlan(tuple(install), tuple(conflicts), tuple(kept), pins)


def _unsatisfied(requirements: Sequence[tuple[str, str]]) -> list[str]:
    installed = installed_distributions()
    return [
        text for module, text in requirements if _status(module, Requirement(text), installed) in ("too old", "missing")
    ]


def missing_requirements(requirements: Sequence[tuple[str, str]] = REQUIREMENTS) -> list[str]:
    """pip requirement strings (torch aside) that are not installed, or installed too old."""
    return _unsatisfied(requirements)


def torch_missing() -> bool:
    """True when torch is not installed, or too old for the core."""
    return bool(_unsatisfied([item for item in read_requirements(torch=True) if item[0] == TORCH]))


def write_constraints(pins: Sequence[tuple[str, str]], folder: Path) -> Path:
    """A pip constraints file pinning each (name, version) exactly: pip may then add
    distributions, never replace one of these. Versions pip cannot parse are left out (the
    dry run catches any plan that would touch them)."""
    lines = []
    for name, version in pins:
        try:
            Version(version)
        except InvalidVersion:
            continue
        lines.append(f"{name}=={version}\n")
    path = folder / "host-constraints.txt"
    path.write_text("".join(lines), encoding="utf-8")
    return path


def host_python() -> str:
    """The interpreter that installs into this Python: the one the module's jobs run in (inside
    the Slicer application the `PythonSlicer` launcher, as sys.executable is the application)."""
    # deferred: this file also runs alone, outside its package, to plan installs in a bare Python
    from .process import python_executable

    return python_executable()


def _pip(python: str, arguments: Sequence[str]) -> subprocess.CompletedProcess[str]:
    environment = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", PYTHONIOENCODING="utf-8")
    return subprocess.run(
        [python, "-m", "pip", *arguments],
        capture_output=True,
        text=True,
        encoding="utf-8",
        errors="replace",
        env=environment,
        creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),  # no console window flashing up on Windows
    )


def _pip_failure(output: str, requirements: Sequence[str]) -> str:
    """pip's own reason, in one message: the lines naming the conflict, else its last ERROR lines."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    if "The conflict is caused by:" in lines:
        start = lines.index("The conflict is caused by:") + 1
        cause = []
        for line in lines[start:]:
            if line.startswith(("To fix this", "ERROR:")):
                break
            if line.startswith("The user requested (constraint) "):
                pinned = line[len("The user requested (constraint) ") :].replace("==", " ", 1)
                line = f"{pinned} is installed and stays"
            cause.append(line)
        return (
            f"cannot install {', '.join(requirements)} without changing packages this application already has "
            f"(nothing was installed): {'; '.join(cause)}"
        )
    errors = [line for line in lines if line.startswith("ERROR:")] or lines[-5:]
    hint = " (is the Python Package Index reachable from this computer?)" if "from versions: none" in output else ""
    return f"pip cannot install {', '.join(requirements)} (nothing was installed){hint}: {' '.join(errors)}"


def resolve(requirements: Sequence[str], python: str, constraints: Path) -> list[tuple[str, str, bool]] | None:
    """pip's dry run: the distributions that installing `requirements` under `constraints` would
    add, as (name, version, requested). Installs nothing. None where pip is too old for a dry
    run (before 22.2). ThinSegError when pip finds no way that leaves the host's packages as they
    are, or when its plan would replace an installed distribution or add a second copy of a
    module the host has without pip metadata."""
    with tempfile.TemporaryDirectory(prefix="thinseg-pip-") as folder:
        report = Path(folder) / "report.json"
        arguments = ["install", "--dry-run", "--report", str(report), "-c", str(constraints), *requirements]
        result = _pip(python, arguments)
        output = f"{result.stdout}\n{result.stderr}"
        if result.returncode != 0:
            if "no such option" in output:
                return None
            raise ThinSegError(_pip_failure(output, requirements))
        items = json.loads(report.read_text(encoding="utf-8")).get("install", [])
    incoming = [(item["metadata"]["name"], item["metadata"]["version"], bool(item.get("requested"))) for item in items]
    installed = installed_distributions()
    moved = [
        f"{name} {installed[canonicalize_name(name)][1]} -> {version}"
        for name, version, _requested in incoming
        if canonicalize_name(name) in installed
    ]
    doubles = [name for name, _version, _requested in incoming if importlib.util.find_spec(import_name(name))]
    if moved or doubles:
        problems = [f"would replace {item}" for item in moved] + [f"would add a second copy of {n}" for n in doubles]
        raise ThinSegError(
            f"installing {', '.join(requirements)} {'; '.join(problems)}, which this application already has "
            "(nothing was installed)"
        )
    return incoming


def describe(plan: InstallPlan, incoming: Sequence[tuple[str, str, bool]] | None, torch_by_extension: bool) -> str:
    """The one question: everything that will be installed (versions where the dry run gave
    them), and what is already there and stays."""
    lines = ["Thin Section Segmentation needs Python packages that this application does not have yet."]
    if torch_by_extension:
        lines.append("- PyTorch, through the PyTorch extension (it picks the CPU or CUDA build for this computer)")
    if incoming is None:
        names = [
            r for r in plan.install if not (torch_by_extension and canonicalize_name(Requirement(r).name) == TORCH)
        ]
        if names:
            lines.append(f"- {', '.join(names)} (and what they need), from the Python Package Index")
    else:
        requested = [f"{name} {version}" for name, version, wanted in incoming if wanted]
        needed = [f"{name} {version}" for name, version, wanted in incoming if not wanted]
        if requested:
            lines.append(f"- {', '.join(requested)}, from the Python Package Index")
        if needed:
            lines.append(f"- which need: {', '.join(needed)}")
    if plan.kept:
        kept = ", ".join(f"{name} {version}" for name, version in plan.kept)
        lines.append(f"\nAlready installed, left exactly as they are: {kept}.")
    lines.append(
        "\nInstall them now into this application's Python? (This downloads them from the internet and may "
        "take several minutes" + ("; PyTorch alone is large" if torch_by_extension else "") + ".)"
    )
    return "\n".join(lines)


@dataclass(frozen=True)
class InstallResult:
    #: (name, version) of each distribution that came in
    added: tuple[tuple[str, str], ...]
    #: (name, before, after) of each distribution whose version changed (only a PyTorch installer may do that)
    changed: tuple[tuple[str, str, str], ...]

    def text(self) -> str:
        lines = [f"Installed: {', '.join(f'{n} {v}' for n, v in self.added) or 'nothing'}."]
        if self.changed:
            lines.append(f"Changed: {', '.join(f'{n} {a} -> {b}' for n, a, b in self.changed)}.")
        return "\n".join(lines)


def _difference(before: dict[str, tuple[str, str]], after: dict[str, tuple[str, str]]) -> InstallResult:
    added = tuple(after[key] for key in sorted(after) if key not in before)
    changed = tuple(
        (after[key][0], before[key][1], after[key][1])
        for key in sorted(after)
        if key in before and before[key][1] != after[key][1]
    )
    return InstallResult(added, changed)


PipInstaller = Callable[[Sequence[str], Path], None]
TorchInstaller = Callable[[str], bool]


def pip_installer(python: str) -> PipInstaller:
    """Outside Slicer: `python -m pip install -c CONSTRAINTS REQUIREMENTS`."""

    def install(requirements: Sequence[str], constraints: Path) -> None:
        result = _pip(python, ["install", "-c", str(constraints), *requirements])
        if result.returncode != 0:
            raise ThinSegError(_pip_failure(f"{result.stdout}\n{result.stderr}", requirements))

    return install


def install_missing(
    confirm: Callable[[str], bool] | None,
    install: PipInstaller,
    python: str,
    path: Path = REQUIREMENTS_FILE,
    torch_installer: TorchInstaller | None = None,
) -> InstallResult | None:
    """Install what `path` lists and the host lacks, asking `confirm` once. None when the user
    declines (nothing installed). ThinSegError, with nothing installed, when the host has a
    required package in a version the core cannot use, or when the missing ones cannot come in
    without moving a host package. `torch_installer(specifier)` (the PyTorch extension) installs a
    missing torch; pip installs everything else, pinned to the host's versions."""
    plan = plan_install(path)
    if plan.conflicts:
        raise ThinSegError(
            "this application's Python has packages that Thin Section Segmentation cannot use, and they are "
            f"left as they are (nothing was installed): {'; '.join(plan.conflicts)}"
        )
    before = installed_distributions()
    if not plan.install:
        return InstallResult((), ())
    torch_first = torch_installer is not None and plan.needs(TORCH)
    with tempfile.TemporaryDirectory(prefix="thinseg-constraints-") as folder:
        incoming = None
        if not torch_first:
            incoming = resolve(plan.install, python, write_constraints(plan.pins, Path(folder)))
        if confirm is not None and not confirm(describe(plan, incoming, torch_first)):
            return None
        if torch_first and torch_installer is not None:
            torch_requirement = next(r for r in plan.install if canonicalize_name(Requirement(r).name) == TORCH)
            if not torch_installer(str(Requirement(torch_requirement).specifier)):
                return None
            plan = plan_install(path)  # torch is the host's now: pinned like the rest
            if plan.install:
                try:
                    resolve(plan.install, python, write_constraints(plan.pins, Path(folder)))
                except ThinSegError as error:
                    raise ThinSegError(f"PyTorch was installed, the rest was not: {error}") from None
        if plan.install:
            install(plan.install, write_constraints(plan.pins, Path(folder)))
    return _difference(before, installed_distributions())


def _slicer_pip_ensure() -> Callable[..., object] | None:
    """`slicer.packaging.pip_ensure` (Slicer 5.12+; a submodule, so it must be imported), or None."""
    try:
        packaging = importlib.import_module("slicer.packaging")
    except ImportError:  # Slicer before 5.12, or no Slicer
        return None
    pip_ensure: Callable[..., object] | None = getattr(packaging, "pip_ensure", None)
    return pip_ensure


def slicer_pip_installer() -> PipInstaller:
    """Slicer's own pip (its progress dialog, its log), given the constraints file."""
    slicer = importlib.import_module("slicer")  # installing through Slicer needs Slicer; the checks run anywhere

    pip_ensure = _slicer_pip_ensure()
    params: Sequence[str] = ()
    if pip_ensure is not None:
        try:
            params = list(inspect.signature(pip_ensure).parameters)
        except (TypeError, ValueError):
            params = ()

    def install(requirements: Sequence[str], constraints: Path) -> None:
        if pip_ensure is not None and "constraints" in params:
            kwargs: dict[str, object] = {"constraints": str(constraints), "requester": REQUESTER}
            if "prompt_install" in params:
                kwargs["prompt_install"] = False  # the user was asked once already
            pip_ensure(list(requirements), **kwargs)
        else:
            slicer.util.pip_install(["-c", str(constraints), *requirements])

    return install


def _pytorch_extension_installer() -> TorchInstaller | None:
    """The PyTorch extension's installer (it picks the CUDA/CPU build for this machine), or None."""
    try:
        pytorch_utils = importlib.import_module("PyTorchUtils")  # only where the user installed the extension
    except ImportError:
        return None

    def install(specifier: str) -> bool:
        torch = pytorch_utils.PyTorchUtilsLogic().installTorch(askConfirmation=False, torchVersionRequirement=specifier)
        return torch is not None

    return install


def ensure_installed(confirm: Callable[[str], bool] | None = None, inform: Callable[[str], None] | None = None) -> bool:
    """Inside Slicer: install what is missing. `confirm(text)` asks the user ONCE, for everything
    (PyTorch included); the installers are then told not to ask again. `inform(text)` is told what
    was installed (default: Slicer's information dialog). True when all is there. A refused plan
    or an installer that fails raises ThinSegError with its message; nothing of the host moves."""
    slicer = importlib.import_module("slicer")  # installing needs Slicer; the checks run anywhere

    if not missing_requirements() and not torch_missing():
        return True
    try:
        result = install_missing(
            confirm, slicer_pip_installer(), host_python(), torch_installer=_pytorch_extension_installer()
        )
    except ThinSegError:
        raise
    except Exception as error:  # pip and the installers raise RuntimeError, CalledProcessError, ...
        raise ThinSegError(f"installing the Python packages failed: {error}") from None
    if result is None:
        return False
    logging.info("Thin Section Segmentation: %s", result.text())
    if result.added or result.changed:
        (inform or (lambda text: slicer.util.infoDisplay(text, windowTitle=REQUESTER)))(result.text())
    return not missing_requirements() and not torch_missing()
