"""Training sections: PP, optional XP and a label map on one pixel grid.

A section only promises region reads of its images and one read of its label map, so the
patch reader can stay lazy for sections on disk (netCDF variables are sliced, image files are
read by region) while generated sections live in memory. `fingerprint()` identifies the data
for cache keys without reading pixels of files (path, size, modification time).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from thinseg.classes.files import default_class_table, read_class_csv
from thinseg.classes.table import ClassTable
from thinseg.errors import ThinSegError
from thinseg.io.images import ArraySource, RasterSource, check_tiff_page_size, open_image, pillow_image
from thinseg.io.netcdf import (
    VariableInfo,
    check_image_variable,
    find_image_variable,
    list_variables,
    open_netcdf_image,
    read_labelmap,
)
from thinseg.io.pairing import IMAGE_SUFFIXES, find_affix

#: Role names a section answers to; "PX" is GeoSlicer's name for the cross-polarised image.
PP, XP = "PP", "XP"
_ROLE_ALIASES = {"PP": PP, "XP": XP, "PX": XP}

#: A label map: (H, W), value k = k-th class of the section's class table, 0 = not classified.
Labels = npt.NDArray[np.uint8]


def canonical_role(role: str) -> str:
    """ "PP" or "XP" for a role name (case-insensitive; GeoSlicer's "PX" is XP)."""
    try:
        return _ROLE_ALIASES[role.upper()]
    except KeyError:
        raise ThinSegError(f"unknown image role {role!r} (use PP or XP)") from None


@runtime_checkable
class Section(Protocol):
    """What training needs of a section. Label value k means the k-th class of `class_table`."""

    name: str
    shape: tuple[int, int]
    mm_per_pixel: float | None
    class_table: ClassTable

    def source(self, role: str) -> RasterSource | None:
        """Lazy region reader for "PP" or "XP" (None if the section has no such image)."""
        ...

    def read_labels(self) -> Labels:
        """The whole (H, W) uint8 label map (read once, when the run prepares its data)."""
        ...

    def fingerprint(self) -> dict[str, Any]:
        """Plain values identifying the data, for cache keys."""
        ...


class ArraySection:
    """A section held in memory (generated ones, tests)."""

    def __init__(
        self,
        name: str,
        pp: npt.NDArray[np.uint8],
        labels: Labels,
        xp: npt.NDArray[np.uint8] | None = None,
        *,
        class_table: ClassTable | None = None,
        mm_per_pixel: float | None = None,
        origin: str = "in-memory arrays",
    ) -> None:
        labels = np.asarray(labels)
        if labels.ndim != 2 or labels.dtype != np.uint8:
            raise ValueError(f"labels must be a uint8 (H, W) array, got {labels.dtype} {labels.shape}")
        self.name = name
        self.origin = origin  # where the data came from, recorded in the exported model
        self.shape = (int(labels.shape[0]), int(labels.shape[1]))
        self.mm_per_pixel = mm_per_pixel
        self.class_table = class_table or default_class_table()
        self._sources = {PP: ArraySource(pp, name=f"{name}_PP", mm_per_pixel=mm_per_pixel)}
        if xp is not None:
            self._sources[XP] = ArraySource(xp, name=f"{name}_XP", mm_per_pixel=mm_per_pixel)
        for role, src in self._sources.items():
            if src.shape != self.shape:
                raise ValueError(f"{role} image {src.shape} and labels {self.shape} differ in size")
        self._labels = labels
        self._digest: str | None = None

    def source(self, role: str) -> RasterSource | None:
        return self._sources.get(canonical_role(role))

    def read_labels(self) -> Labels:
        return self._labels

    def fingerprint(self) -> dict[str, Any]:
        if self._digest is None:  # content hash: generated sections have no file to point to
            h = hashlib.blake2b(digest_size=16)
            for array in [self._labels] + [s.array for s in self._sources.values()]:
                h.update(str(array.shape).encode())
                h.update(np.ascontiguousarray(array).data)
            self._digest = h.hexdigest()
        return {"kind": "array", "name": self.name, "digest": self._digest, "roles": sorted(self._sources)}

    def __repr__(self) -> str:
        return f"ArraySection({self.name!r}, {self.shape[1]}x{self.shape[0]}, {'+'.join(self._sources)})"


def _file_stamp(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"path": str(path.resolve()), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


class _LazySources:
    """Opens file sources on first use and again in each DataLoader worker process (file
    handles must not be shared across fork)."""

    def __init__(self, openers: dict[str, Callable[[], RasterSource]]) -> None:
        self._openers = openers
        self._open: dict[str, RasterSource] = {}
        self._pid = os.getpid()

    def get(self, role: str) -> RasterSource | None:
        if os.getpid() != self._pid:
            self._open, self._pid = {}, os.getpid()
        if role not in self._openers:
            return None
        if role not in self._open:
            self._open[role] = self._openers[role]()
        return self._open[role]

    def opened(self, role: str) -> RasterSource:
        """The source of a role this section has (KeyError for one it lacks)."""
        source = self.get(role)
        if source is None:
            raise KeyError(role)
        return source

    def __getstate__(self) -> dict[str, Any]:
        return {"_openers": self._openers, "_open": {}, "_pid": -1}


class NetcdfSection:
    """A GeoSlicer netCDF file: PP/XP found by affix, labels = its labelmap variable."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        pp_affix: str = "PP",
        xp_affixes: Sequence[str] = ("XP", "PX"),
        labels_var: str | None = None,
        name: str | None = None,
    ) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise ThinSegError("training section not found", self.path)
        self.name = name or self.path.stem
        self.origin = str(self.path)
        variables = list_variables(self.path)
        pp_var = find_image_variable(self.path, pp_affix)
        if pp_var is None:
            raise ThinSegError(f"no RGB image variable with affix {pp_affix!r} (the PP image)", self.path)
        xp_var = next((v for a in xp_affixes if (v := find_image_variable(self.path, a)) and v != pp_var), None)
        info = {v.name: v for v in variables}
        self.labels_var = labels_var or _pick_labelmap(variables, info[pp_var].image_shape, self.path)
        if self.labels_var not in info:
            raise ThinSegError(f"no variable {self.labels_var!r}", self.path)
        self.shape = _image_shape(info[pp_var], self.path)
        lab_shape = info[self.labels_var].image_shape
        if lab_shape != self.shape:
            raise ThinSegError(
                f"labelmap {self.labels_var!r} {lab_shape} is not on the PP grid {self.shape}: register it first",
                self.path,
            )
        if xp_var is not None and info[xp_var].image_shape != self.shape:
            raise ThinSegError(f"XP image {xp_var!r} is not on the PP grid", self.path)
        check_image_variable(self.path, pp_var)  # size and grid, before any pixel is read
        self.mm_per_pixel = info[pp_var].mm_per_pixel
        self.vars = {PP: pp_var, **({XP: xp_var} if xp_var else {})}
        path_ = self.path
        self._sources = _LazySources({role: _Opener(open_netcdf_image, path_, var) for role, var in self.vars.items()})
        self.class_table = _labels_attr_table(info[self.labels_var].attrs.get("labels"), self.path)

    def source(self, role: str) -> RasterSource | None:
        return self._sources.get(canonical_role(role))

    def read_labels(self) -> Labels:
        labels, _table, _mm, _origin = read_labelmap(self.path, self.labels_var)
        return labels

    def fingerprint(self) -> dict[str, Any]:
        return {"kind": "netcdf", **_file_stamp(self.path), "vars": self.vars, "labels": self.labels_var}

    def __repr__(self) -> str:
        return f"NetcdfSection({str(self.path)!r}, {self.vars}, labels={self.labels_var!r})"


def _image_shape(variable: VariableInfo, path: Path) -> tuple[int, int]:
    """(H, W) of an image variable."""
    shape = variable.image_shape
    if shape is None:
        raise ThinSegError(f"variable {variable.name!r} is not an image", path)
    return shape


def _labels_attr_table(labels: Any, path: Path) -> ClassTable:
    """The labelmap's class table from its GeoSlicer `labels` attribute (no pixels read)."""
    if labels is None or isinstance(labels, str):
        return ClassTable(())
    try:
        return ClassTable.from_geoslicer_labels([str(v) for v in np.atleast_1d(labels)])
    except ValueError as exc:
        raise ThinSegError(f"malformed 'labels' attribute ({exc})", path) from None


class _Opener:
    """Picklable `open(path, var)` closure."""

    def __init__(self, fn: Callable[..., RasterSource], *args: Any) -> None:
        self.fn, self.args = fn, args

    def __call__(self) -> RasterSource:
        return self.fn(*self.args)


def _pick_labelmap(variables: Sequence[VariableInfo], pp_shape: tuple[int, int] | None, path: Path) -> str:
    """The label map on the PP grid; among several, one whose name says truth/QEMSCAN/labels.

    A registration result file holds the original QEMSCAN map (its own grid) and the registered
    one (the PP grid): only the latter can be trained on.
    """
    labelmaps = [v for v in variables if v.kind in ("labelmap", "segmentation")]
    if not labelmaps:
        raise ThinSegError("no labelmap variable: a training section needs a label map on the PP grid", path)
    on_grid = [v.name for v in labelmaps if v.image_shape == pp_shape]
    if not on_grid:
        raise ThinSegError(
            f"no labelmap on the PP grid {pp_shape} ({', '.join(v.name for v in labelmaps)} differ): register it first",
            path,
        )
    if len(on_grid) == 1:
        return on_grid[0]
    preferred = [n for n in on_grid if _is_preferred_labelmap(n)]
    if len(preferred) == 1:
        return preferred[0]
    raise ThinSegError(f"several labelmaps on the PP grid ({', '.join(on_grid)}): name the one to train on", path)


def _is_preferred_labelmap(name: str) -> bool:
    """Registered QEMSCAN maps / label maps are preferred over model predictions."""
    lowered = name.lower()
    return any(k in lowered for k in ("label", "qemscan", "truth", "gt", "registered")) and "pred" not in lowered


class FileSection:
    """Image files on one grid: PP, optional XP (PNG/JPEG/TIFF) and a single-channel label image;
    the class table comes from a CSV (`name,color` or GeoSlicer `name,index,color` rows) or
    defaults to the model's classes (label k = k-th class)."""

    def __init__(
        self,
        pp: str | os.PathLike[str],
        labels: str | os.PathLike[str],
        xp: str | os.PathLike[str] | None = None,
        *,
        classes_csv: str | os.PathLike[str] | None = None,
        mm_per_pixel: float | None = None,
        name: str | None = None,
    ) -> None:
        self.files = {PP: Path(pp), **({XP: Path(xp)} if xp else {})}
        self.labels_path = Path(labels)
        self.name = name or self.files[PP].stem
        self.origin = str(self.files[PP].parent)
        self.mm_per_pixel = mm_per_pixel
        self._sources = _LazySources({r: _Opener(open_image, p) for r, p in self.files.items()})
        self.shape = self._sources.opened(PP).shape
        for role in self.files:
            if self._sources.opened(role).shape != self.shape:
                raise ThinSegError(f"{role} image is not the size of the PP image {self.shape}", self.files[role])
        self.classes_csv = Path(classes_csv) if classes_csv else None
        self.class_table = read_class_csv(self.classes_csv) if self.classes_csv else default_class_table()

    def source(self, role: str) -> RasterSource | None:
        return self._sources.get(canonical_role(role))

    def read_labels(self) -> Labels:
        labels = read_label_image(self.labels_path)
        if labels.shape != self.shape:
            raise ThinSegError(
                f"label image {labels.shape} is not the size of the PP image {self.shape}", self.labels_path
            )
        return labels

    def fingerprint(self) -> dict[str, Any]:
        files = {r: _file_stamp(p) for r, p in self.files.items()}
        files["labels"] = _file_stamp(self.labels_path)
        if self.classes_csv:
            files["classes"] = _file_stamp(self.classes_csv)
        return {"kind": "files", "files": files}


def read_label_image(path: Path) -> Labels:
    """A single-channel 8-bit (or small 16-bit) label image as uint8 (H, W)."""
    if not path.is_file():
        raise ThinSegError("label image not found", path)
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile  # deferred: tifffile costs ~35 ms, paid only for TIFF label images

        with tifffile.TiffFile(path) as tif:
            check_tiff_page_size(tif.pages[0], path)
            data = np.asarray(tif.pages[0].asarray())
    else:
        with pillow_image(path, "label image") as image:
            if image.mode not in ("L", "P", "I", "I;16"):
                raise ThinSegError(f"label image must be single-channel (mode {image.mode})", path)
            data = np.asarray(image)
    if data.ndim != 2 or not np.issubdtype(data.dtype, np.integer):
        raise ThinSegError(f"label image must be a single-channel integer image, got {data.dtype} {data.shape}", path)
    if data.size and (int(data.min()) < 0 or int(data.max()) > 255):
        raise ThinSegError("label values must be 0..255", path)
    return np.ascontiguousarray(data.astype(np.uint8))


_LABEL_AFFIXES = ("labels", "label", "labelmap", "mask", "gt")


def open_section(path: str | os.PathLike[str] | Section, **kwargs: Any) -> Section:
    """A path (netCDF file, or a folder holding one netCDF or PP/XP/labels images) -> Section.

    Sections pass through unchanged, so lists may mix paths and objects.
    """
    if not isinstance(path, (str, os.PathLike)):
        return path  # already a section
    path = Path(path)
    if path.is_file():
        return NetcdfSection(path, **kwargs)
    if not path.is_dir():
        raise ThinSegError("training section not found", path)
    ncs = sorted(p for p in path.iterdir() if p.suffix.lower() in (".nc", ".h5", ".hdf5"))
    if len(ncs) == 1:
        return NetcdfSection(ncs[0], name=path.name, **kwargs)
    if len(ncs) > 1:
        raise ThinSegError("folder holds several netCDF files: give the files instead", path)
    return _folder_section(path)


def _folder_section(folder: Path) -> FileSection:
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)

    def pick(affixes: Sequence[str]) -> Path | None:
        found = [p for p in images if any(find_affix(p.stem, a) for a in affixes)]
        if len(found) > 1:
            raise ThinSegError(f"several images match {'/'.join(affixes)}: {', '.join(p.name for p in found)}", folder)
        return found[0] if found else None

    pp, xp, labels = pick(("PP",)), pick(("XP", "PX")), pick(_LABEL_AFFIXES)
    if pp is None or labels is None:
        raise ThinSegError("a section folder needs a *_PP image and a *_labels image (and optionally *_XP)", folder)
    csvs = sorted(folder.glob("*.csv"))
    return FileSection(pp, labels, xp, classes_csv=csvs[0] if len(csvs) == 1 else None, name=folder.name)


def open_sections(items: Sequence[Any], **kwargs: Any) -> list[Section]:
    return [open_section(item, **kwargs) for item in items]


def synthetic_sections(
    n: int,
    size: int | tuple[int, int] = 1024,
    seed: int = 0,
    *,
    mm_per_pixel: float = 0.00132,
    class_weights: Sequence[float] | None = None,
    name: str = "synth",
    **generate_kwargs: Any,
) -> list[ArraySection]:
    """`n` generated sections (exact labels, default class table), seeds seed..seed+n-1.

    Each section gets a different seed, so train and validation sets built with disjoint
    seed ranges share no texture.
    """
    from thinseg.synth import generate_section  # deferred: the generator loads scipy (~0.7 s)

    height, width = (size, size) if isinstance(size, int) else size
    out = []
    for i in range(n):
        s = generate_section(
            height, width, seed=seed + i, mm_per_pixel=mm_per_pixel, class_weights=class_weights, **generate_kwargs
        )
        out.append(
            ArraySection(
                f"{name}-{seed + i:04d}",
                s.pp,
                s.labels.astype(np.uint8, copy=False),
                s.xp,
                class_table=default_class_table(),
                mm_per_pixel=s.mm_per_pixel,
                origin=f"thinseg.synth.generate_section({height}x{width}, seed={seed + i}"
                + (f", class_weights={list(class_weights)}" if class_weights is not None else "")
                + ")",
            )
        )
    return out
