"""Labelled sections named on the command line (`train`, `evaluate`, `compare`), and the
all-or-nothing output sets of `evaluate` and `compare`."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from thinseg.errors import ThinSegError
from thinseg.io.atomic import AtomicOutput, ensure_writable_dir
from thinseg.io.pairing import IMAGE_SUFFIXES, NETCDF_SUFFIXES


def section_items(inputs: Iterable[str | Path]) -> list[Path]:
    """DATA arguments -> one path per section, for `thinseg.training.open_sections`.

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


def open_data(inputs: Sequence[str | Path]) -> list:
    """Open every section named by DATA arguments (a bad one stops everything, one line)."""
    from thinseg.data.sections import open_sections

    return open_sections(section_items(inputs))


def safe_file_name(name: str) -> str:
    """A section name as a file-name part: letters, digits, '.', '-', '_' only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "section"


def unique_names(names: Sequence[str]) -> list[str]:
    """File-name parts for `names`, made unique with _2, _3, ... (sections in different folders
    may share a stem)."""
    out: list[str] = []
    seen: set[str] = set()
    for name in names:
        base = safe_file_name(name)
        candidate, n = base, 2
        while candidate.lower() in seen:
            candidate, n = f"{base}_{n}", n + 1
        seen.add(candidate.lower())
        out.append(candidate)
    return out


class OutputSet:
    """Files of one run, written under temporary names and renamed together at the end.

    `check()` refuses, before any work, targets that exist (unless overwrite); on any exception
    (Ctrl-C included) `discard()` removes every temporary and the targets stay as they were.
    """

    def __init__(self, folder: Path, overwrite: bool) -> None:
        self.folder = Path(folder)
        self.overwrite = overwrite
        self._outputs: dict[Path, AtomicOutput] = {}

    def add(self, name: str) -> Path:
        """Reserve `folder/name`; returns the temporary path to write."""
        target = self.folder / name
        if target not in self._outputs:
            self._outputs[target] = AtomicOutput(target)
        return self._outputs[target].tmp

    def check(self) -> None:
        ensure_writable_dir(self.folder)
        if self.overwrite:
            return
        taken = [p.name for p in self._outputs if p.exists() or p.is_symlink()]
        if taken:
            shown = ", ".join(taken[:4]) + (f" and {len(taken) - 4} more" if len(taken) > 4 else "")
            raise ThinSegError(f"output exists already ({shown}); use --overwrite or another --output", self.folder)

    def path(self, name: str) -> Path:
        return self.folder / name

    def commit(self) -> list[Path]:
        """Rename every written temporary onto its target (reserved files never written are dropped)."""
        done = []
        for target, output in self._outputs.items():
            if output.tmp.exists():
                done.append(output.commit())
            else:
                output.discard()
        return done

    def discard(self) -> None:
        for output in self._outputs.values():
            output.discard()
