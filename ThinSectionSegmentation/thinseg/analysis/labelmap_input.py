"""Labelmaps to analyse, read by bands of rows: netCDF (ours or GeoSlicer's), label images with
a class file, or arrays (the Slicer logic, the console).

Every source gives uint8 labels 0..N (0 = not classified, k = k-th class of `classes`), its pixel
size in mm and, where there is one, the PP image on the same grid (the report draws grain
outlines on it). Problems are one-line `ThinSegError`s naming the file: not a labelmap, label
values no class names, no pixel size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt

from thinseg.classes.files import is_value_class_file, read_class_csv, read_value_classes
from thinseg.classes.table import ClassTable
from thinseg.data.section_images import is_netcdf
from thinseg.data.sections import read_label_image
from thinseg.errors import ThinSegError
from thinseg.io.images import RasterSource, open_image
from thinseg.io.netcdf import (
    Window,
    find_image_variable,
    list_variables,
    open_netcdf_image,
    padding_window,
    read_labelmap,
)


class LabelmapSource(Protocol):
    """What the analysis reads: rows of labels, their classes and pixel size."""

    name: str
    classes: ClassTable
    mm_per_pixel: float

    @property
    def path(self) -> Path | None:
        """The file read, if any (error messages name it)."""
        ...

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, columns)."""
        ...

    def read_rows(self, y0: int, y1: int) -> npt.NDArray[np.uint8]: ...

    def open_pp(self) -> RasterSource | None:
        """The PP image on the labelmap's grid, if known; the caller closes it."""
        ...


def _check_values(labels: npt.NDArray[np.uint8], classes: ClassTable, where: Path | None) -> None:
    """Label values above the number of classes have no name: refuse them in one line."""
    top = int(labels.max()) if labels.size else 0
    if top > len(classes):
        present = np.flatnonzero(np.bincount(labels.ravel(), minlength=256))
        unknown = [int(v) for v in present if v > len(classes)]
        shown = ", ".join(str(v) for v in unknown[:8]) + (" ..." if len(unknown) > 8 else "")
        raise ThinSegError(f"label values {shown} name no class (the labelmap has {len(classes)} classes)", where)


def _checked_spacing(mm_per_pixel: float | None, given: float | None, where: Path | None) -> float:
    spacing = given if given is not None else mm_per_pixel
    if spacing is None:
        raise ThinSegError("no pixel size: the labelmap records none, give one with --pixel-size MM", where)
    if not (np.isfinite(spacing) and 1e-6 <= spacing <= 100.0):
        raise ThinSegError(f"pixel size {spacing!r} mm is outside 1e-06..100", where)
    return float(spacing)


@dataclass
class ArrayLabelmap:
    """A labelmap held in memory (a Slicer volume, a console array, a decoded label image)."""

    labels: npt.NDArray[np.uint8]
    classes: ClassTable
    mm_per_pixel: float
    name: str = "labelmap"
    path: Path | None = None
    pp: RasterSource | None = None

    def __post_init__(self) -> None:
        if self.labels.ndim != 2 or self.labels.dtype != np.uint8:
            raise ThinSegError(
                f"a labelmap is a 2-D uint8 array, got {self.labels.dtype} {self.labels.shape}", self.path
            )
        _check_values(self.labels, self.classes, self.path)
        self.mm_per_pixel = _checked_spacing(self.mm_per_pixel, None, self.path)

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.labels.shape[0]), int(self.labels.shape[1])

    def read_rows(self, y0: int, y1: int) -> npt.NDArray[np.uint8]:
        return self.labels[y0:y1]

    def open_pp(self) -> RasterSource | None:
        return self.pp


class NetcdfLabelmap:
    """A labelmap variable of a netCDF file, read by bands (only those rows leave the disk).

    As GeoSlicer imports it: the rows and columns a "same coordinate system" export padded are
    left out; the class names are the variable's `labels` attribute."""

    def __init__(self, path: Path, variable: str | None = None, mm_per_pixel: float | None = None) -> None:
        self.path = path
        self.name = path.stem
        variables = list_variables(path)
        labelmaps = [v for v in variables if v.kind in ("labelmap", "segmentation")]
        if variable is not None:
            chosen = [v for v in variables if v.name == variable]
            if not chosen:
                raise ThinSegError(f"no variable '{variable}' (it has {', '.join(v.name for v in variables)})", path)
            info = chosen[0]
        elif len(labelmaps) == 1:
            info = labelmaps[0]
        elif not labelmaps:
            kinds = ", ".join(f"{v.name} ({v.kind})" for v in variables) or "no variables"
            raise ThinSegError(f"no labelmap in the file ({kinds})", path)
        else:
            names = ", ".join(v.name for v in labelmaps)
            raise ThinSegError(f"several labelmaps ({names}): name one with --variable", path)
        self.variable = info.name
        self.window = padding_window(path, info.name)
        first, classes, spacing, _origin = read_labelmap(
            path, info.name, window=Window(self.window.y0, min(self.window.y0 + 1, self.window.y1), *self.window[2:])
        )
        del first
        if len(classes) == 0:
            raise ThinSegError(f"variable '{info.name}' names no classes (its 'labels' attribute is empty)", path)
        self.classes = classes
        self.shape = self.window.shape
        self.mm_per_pixel = _checked_spacing(spacing, mm_per_pixel, path)
        self._pp_variable = self._pp_on_grid()

    def _pp_on_grid(self) -> str | None:
        name = find_image_variable(self.path, "PP")
        if name is None:
            return None
        pp = open_netcdf_image(self.path, name, crop_padding=True)
        try:
            return name if pp.shape == self.shape else None
        finally:
            pp.close()

    def read_rows(self, y0: int, y1: int) -> npt.NDArray[np.uint8]:
        w = self.window
        labels, _classes, _mm, _origin = read_labelmap(
            self.path, self.variable, window=Window(w.y0 + y0, w.y0 + y1, w.x0, w.x1)
        )
        _check_values(labels, self.classes, self.path)
        return labels

    def open_pp(self) -> RasterSource | None:
        if self._pp_variable is None:
            return None
        return open_netcdf_image(self.path, self._pp_variable, crop_padding=True)


def read_classes(path: str | os.PathLike[str]) -> tuple[ClassTable, npt.NDArray[np.uint8] | None, frozenset[int]]:
    """A class file: (classes, code -> label table or None, codes it lists).

    `value,name,color` files name the codes of a mask (several codes may share a class); a
    `name,color` table numbers its classes 1..N in order, as GeoSlicer does."""
    if is_value_class_file(path):
        value_classes = read_value_classes(path)
        return value_classes.table, value_classes.lut, value_classes.listed
    table = read_class_csv(path)
    return table, None, frozenset(range(len(table) + 1))


def image_labelmap(
    path: Path, classes_file: str | os.PathLike[str] | None, mm_per_pixel: float | None, pp: Path | None = None
) -> ArrayLabelmap:
    """A single-channel label image (PNG/TIFF/...) with the class file that names its values."""
    if classes_file is None:
        raise ThinSegError("a label image needs a class file naming its values: give --classes CSV", path)
    table, lut, listed = read_classes(classes_file)
    codes = read_label_image(path)
    present = {int(v) for v in np.flatnonzero(np.bincount(codes.ravel(), minlength=256))}
    unknown = sorted(present - listed)
    if unknown:
        shown = ", ".join(str(v) for v in unknown[:8]) + (" ..." if len(unknown) > 8 else "")
        raise ThinSegError(f"label values {shown} are not in the class file {Path(classes_file).name}", path)
    labels = lut[codes] if lut is not None else codes
    spacing = _checked_spacing(None, mm_per_pixel, path)
    source = open_image(pp, role="PP") if pp is not None else None
    if source is not None and source.shape != labels.shape:
        source.close()
        raise ThinSegError(
            f"the PP image is {source.shape[1]}x{source.shape[0]}, the labelmap {labels.shape[1]}x{labels.shape[0]}", pp
        )
    name = path.stem[: -len(".ome")] if path.stem.lower().endswith(".ome") else path.stem
    return ArrayLabelmap(np.ascontiguousarray(labels), table, spacing, name, path, source)


def open_labelmap(
    path: str | os.PathLike[str],
    *,
    classes: str | os.PathLike[str] | None = None,
    mm_per_pixel: float | None = None,
    variable: str | None = None,
    pp: str | os.PathLike[str] | None = None,
) -> LabelmapSource:
    """A labelmap file: netCDF (its labelmap variable, or `variable`) or a label image with a
    class file; `mm_per_pixel` overrides (or, for images, gives) the pixel size."""
    path = Path(path)
    if not path.is_file():
        raise ThinSegError("labelmap not found", path)
    if is_netcdf(path):
        return NetcdfLabelmap(path, variable, mm_per_pixel)
    return image_labelmap(path, classes, mm_per_pixel, Path(pp) if pp else None)
