"""Labelled sections named on the command line (`train`, `evaluate`, `compare`)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from thinseg.data.sections import Section, open_sections
from thinseg.errors import ThinSegError
from thinseg.io.pairing import IMAGE_SUFFIXES, NETCDF_SUFFIXES


def section_items(inputs: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """DATA arguments -> one path per section, for `thinseg.data.sections.open_sections`.

    A netCDF file is a section. A folder stands for the netCDF files in it (sorted); a folder
    without netCDF files but with images is one section folder (*_PP, *_XP, *_labels images);
    a folder of such folders gives each of them. Missing paths and empty folders are errors.
    """
    items: list[Path] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_file():
            items.append(path)
            continue
        if not path.is_dir():
            raise ThinSegError("not found", path)
        netcdfs = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in NETCDF_SUFFIXES)
        if netcdfs:
            items.extend(netcdfs)
            continue
        if any(p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES for p in path.iterdir()):
            items.append(path)
            continue
        subfolders = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
        if not subfolders:
            raise ThinSegError("folder holds no netCDF files and no section images", path)
        items.extend(subfolders)
    return items


def open_data(inputs: Sequence[str | os.PathLike[str]]) -> list[Section]:
    """Open every section named by DATA arguments (a bad one stops everything, one line)."""
    return open_sections(section_items(inputs))
