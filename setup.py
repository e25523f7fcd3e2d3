"""Packaging hook (metadata lives in pyproject.toml): a built wheel carries the bundled model,
the sample section and the class tables as `thinseg/_resources`, where `thinseg.resources`
looks first, so `pip install .` segments with the bundled model like a checkout does.
Editable installs keep using the checkout's `Resources/`."""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
RESOURCE_PARTS = ("Models", "Sample", "ClassTables")


class BuildPyWithResources(build_py):
    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "thinseg" / "_resources"
        for part in RESOURCE_PARTS:
            shutil.copytree(ROOT / "Resources" / part, target / part, dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildPyWithResources})
