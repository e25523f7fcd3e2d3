"""The core's Python requirements in Slicer's Python: what is missing, and installing it.

Checking is plain Python (tested). Installing needs Slicer: one question for everything, then
`slicer.packaging.pip_ensure` (Slicer 5.9+, told not to ask again) where present, else
`slicer.util.pip_install`; PyTorch through the PyTorch extension's installer when available
(it picks the CUDA/CPU build for the machine), else from PyPI.
"""

from __future__ import annotations

import importlib.util
import inspect
import re
from collections.abc import Callable, Sequence
from importlib import metadata
from pathlib import Path

from thinseg.errors import ThinSegError

#: The core's requirements file: pyproject.toml reads it for pip, this module for Slicer's Python.
REQUIREMENTS_FILE = Path(__file__).resolve().parents[1] / "thinseg" / "requirements.txt"
#: Distributions whose import name is not their pip name.
IMPORT_NAMES = {"pillow": "PIL"}


def read_requirements(path: Path = REQUIREMENTS_FILE) -> list[tuple[str, str]]:
    """(import name, pip requirement) for each line of the core's requirements file but torch."""
    requirements = []
    for line in path.read_text(encoding="utf-8").splitlines():
        requirement = line.split("#", 1)[0].strip()
        if not requirement:
            continue
        name = re.split(r"[<>=!~ ;\[]", requirement, maxsplit=1)[0]
        if name.lower() != "torch":
            requirements.append((IMPORT_NAMES.get(name.lower(), name), requirement))
    return requirements


REQUIREMENTS: tuple[tuple[str, str], ...] = tuple(read_requirements())
#: Any recent torch: in Slicer the PyTorch extension picks the build (CUDA or CPU) for the machine;
#: the exact pin of the requirements file is for the command line and CI, where a CPU wheel is on disk.
TORCH = ("torch", "torch>=2.1")
REQUESTER = "Thin Section Segmentation"


def _satisfied(import_name: str, requirement: str) -> bool:
    if importlib.util.find_spec(import_name) is None:
        return False
    try:
        # deferred: `packaging` is optional here (Slicer ships it; a bare Python may not)
        from packaging.requirements import Requirement
    except ImportError:  # no `packaging`: presence is all we can check
        return True
    req = Requirement(requirement)
    try:
        installed = metadata.version(req.name)
    except metadata.PackageNotFoundError:
        return True  # importable but not pip-installed (e.g. bundled with Slicer): accept
    return req.specifier.contains(installed, prereleases=True)


def missing_requirements(requirements: Sequence[tuple[str, str]] = REQUIREMENTS) -> list[str]:
    """pip requirement strings that are not installed (or too old)."""
    return [req for name, req in requirements if not _satisfied(name, req)]


def torch_missing() -> bool:
    return not _satisfied(*TORCH)


def describe(missing: Sequence[str], torch_needed: bool) -> str:
    names = (["PyTorch"] if torch_needed else []) + [m.split(">")[0].split("=")[0] for m in missing]
    return (
        f"Thin Section Segmentation needs these Python packages: {', '.join(names)}.\n\n"
        "Install them now into Slicer's Python? (This downloads them from the internet and may take "
        "several minutes; PyTorch alone is large.)"
    )


def _slicer_pip_ensure():
    """`slicer.packaging.pip_ensure` (Slicer 5.9+; a submodule, so it must be imported), or None."""
    try:
        # deferred: Slicer's installer exists only inside Slicer; the checks run anywhere
        from slicer import packaging  # type: ignore[attr-defined]
    except ImportError:
        return None
    return getattr(packaging, "pip_ensure", None)


def _call_pip_ensure(pip_ensure, requirements: Sequence[str]) -> None:
    """pip_ensure without its own question (the user was asked once already)."""
    from packaging.requirements import Requirement  # deferred: only pip_ensure hosts (Slicer 5.9+) get here

    kwargs: dict = {"requester": REQUESTER}
    try:
        params = inspect.signature(pip_ensure).parameters
    except (TypeError, ValueError):
        params = {}
    for name in ("prompt_install", "prompt"):  # the name changed while the API settled
        if name in params:
            kwargs[name] = False
            break
    pip_ensure([Requirement(r) for r in requirements], **kwargs)


def ensure_installed(confirm: Callable[[str], bool] | None = None) -> bool:
    """Install what is missing (inside Slicer). `confirm(text)` asks the user ONCE, for everything
    (PyTorch included); the installers are then told not to ask again. True when all is there.
    An installer that fails (or that the user stops) raises ThinSegError with its message."""
    import slicer  # deferred: installing needs Slicer; the checks above run anywhere

    missing = missing_requirements()
    torch_needed = torch_missing()
    if not missing and not torch_needed:
        return True
    if confirm is not None and not confirm(describe(missing, torch_needed)):
        return False
    pip_ensure = _slicer_pip_ensure()
    try:
        if torch_needed:
            try:
                # deferred, optional: the PyTorch extension picks the CUDA/CPU build for this machine
                import PyTorchUtils
            except ImportError:
                PyTorchUtils = None
            if PyTorchUtils is not None:
                torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                    askConfirmation=False, torchVersionRequirement=TORCH[1][len("torch") :]
                )
                if torch is None:
                    return False
            else:
                missing = [TORCH[1]] + missing
        if missing:
            if pip_ensure is not None:
                _call_pip_ensure(pip_ensure, missing)
            else:
                slicer.util.pip_install(missing)
    except Exception as error:  # pip and the installers raise RuntimeError, CalledProcessError, ...
        raise ThinSegError(f"installing the Python packages failed: {error}") from None
    return not missing_requirements() and not torch_missing()
