"""GeoSlicer-layout netCDF files: streaming writer and lazy reader.

The layout is GeoSlicer's own export (see shared/specs/geoslicer-netcdf.md), so results open in
GeoSlicer exactly like its own files, and GeoSlicer exports open here:
- one variable per image/labelmap, array order (z, y, x) or (z, y, x, c), z of length 1;
- per-variable dimensions `z_<var>`, `y_<var>`, `x_<var>` with float64 coordinate variables in
  mm (`_FillValue` NaN, as xarray writes them); x and y coordinates are the NEGATED RAS
  positions (GeoSlicer's IJK-to-RAS directions are diag(-1, -1, 1)), z is not;
- one shared `c` dimension with string coordinates ["r", "g", "b"] for RGB (uint8) variables;
- attribute `transform`: the 4x4 IJK-to-RAS matrix, row-major, 16 floats;
- labelmaps: `type="labelmap"`, `labels` = list of "name,index,#rrggbb" after a header, and
  `reference` = the source image's variable name.

Geometry is a whole IJK-to-RAS matrix (`Geometry`): spacing per axis, axis directions and flips
travel from an input image to everything written on its grid. A variable without `transform`
(GeoSlicer's "same coordinate system" export, several images on one grid) is read the way
GeoSlicer imports it: edge rows and columns entirely of the padding value (255 for images, 0
for labels) are cropped and the origin moves with them (`padding_window`).

The writer uses netCDF4 directly (not xarray) so that a 20k x 30k RGB image is copied band by
band from a `RasterSource` instead of being held in memory; the file it produces is the one
xarray would write for the same dataset (checked by the tests with `xr.open_dataset`). Large
arrays are chunked (1, 512, 512[, 3]) so readers can stream tiles; label data is
zlib-compressed (it shrinks ~50x). Every file is written to a temporary name and renamed when
complete.

Readers refuse, before reading any data, a variable that declares more pixels than the section
bound (a few KB of file can declare 100k x 100k px) and a grid that cannot be a thin section's
(NaN or infinite coordinates, repeated or back-and-forth coordinates, a pixel size outside the
sane range); a write that fails (a full disk, a file-size limit) is one `ThinSegError` naming
the output, and the temporary file is removed.

All netCDF4/HDF5 calls hold one process-wide lock: HDF5 is usually built without thread
safety, and the inference engine reads the next band in a background thread.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import sys
import threading
import unicodedata
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple

import numpy as np
import numpy.typing as npt

from thinseg.classes.table import ClassTable
from thinseg.errors import ThinSegError
from thinseg.io.atomic import AtomicOutput
from thinseg.io.images import ArraySource, RasterSource, check_region
from thinseg.limits import check_mm_per_pixel, check_section_size

#: Guards every netCDF4 call (HDF5 is not thread-safe); re-entrant for nested use.
NC_LOCK = threading.RLock()
_HDF5_QUIET = threading.local()
#: Files HDF5 could not close (a write failed on a full disk): it retries at process exit.
_LEFT_OPEN: list[Path] = []


@functools.lru_cache(maxsize=1)
def _hdf5_libraries() -> tuple[Any, ...]:
    """The HDF5 libraries netCDF4 loaded (found in /proc/self/maps; none elsewhere)."""
    import ctypes  # deferred: needed only where HDF5's error printing is switched off

    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            paths = {line.split()[-1] for line in maps if "/libhdf5" in line}
    except OSError:
        return ()
    libraries = []
    for path in sorted(paths):
        name = os.path.basename(path)
        if name.startswith(("libhdf5-", "libhdf5.so")):  # not libhdf5_hl
            with contextlib.suppress(OSError):
                libraries.append(ctypes.CDLL(path))
    return tuple(libraries)


def _quiet_hdf5() -> None:
    """Silence HDF5's own printing of its error stack in the calling thread. A failed write (a
    full disk) otherwise prints dozens of HDF5-DIAG lines to stderr: thread-safe HDF5 builds
    (GeoSlicer's netCDF4 1.5) keep that setting per thread and netCDF-C turns it off only in the
    thread that first used it. The failure still reaches the user, as one line."""
    if getattr(_HDF5_QUIET, "done", False):
        return
    _HDF5_QUIET.done = True
    import ctypes  # deferred: needed only where a netCDF file is written

    for library in _hdf5_libraries():
        with contextlib.suppress(AttributeError, OSError):
            library.H5Eset_auto2(ctypes.c_int64(0), None, None)  # H5E_DEFAULT, no printing


def end_process_if_files_left_open(code: int) -> None:
    """End the process now with `code` if HDF5 holds a file it could not close. At normal exit
    HDF5 would try again, print its error stack and, in HDF5 1.10 (GeoSlicer's), crash with a
    segmentation fault after the one-line error was given. Only for a process's own end."""
    if not _LEFT_OPEN:
        return
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)


RGB_COORDS = ("r", "g", "b")
COLOR_DIM = "c"
TABLE_DIM_PREFIX = "table__"
#: Tile edge of chunked arrays; writers stream bands of this many rows.
CHUNK = 512
#: Arrays at least this large are chunked even when not compressed.
CHUNK_MIN_BYTES = 4 * 2**20
#: HDF5 chunk cache of each variable being written (netCDF's default is 64 MiB a variable, held
#: until the file is closed: 256 MiB for PP, XP, labels and confidence). Bands of whole rows
#: write each compressed chunk once; the partial chunks at the edges of a band are written out
#: and completed from the file (uncompressed RGB: cheap).
WRITE_CACHE_BYTES = 4 * 2**20
WRITE_CACHE_SLOTS = 101  # a prime, many times the chunks that fit
#: zlib level for label data (xarray's default for `zlib=True` is also 4).
ZLIB_LEVEL = 4
#: Rows per band when copying, chosen so that one band stays under this many bytes.
COPY_BAND_BYTES = 64 * 2**20

VariableKind = str  # "rgb" | "vector" | "labelmap" | "segmentation" | "scalar" | "table" | "other"


# ---------------------------------------------------------------------------------------------
# names and geometry


def sanitize_name(name: str) -> str:
    """GeoSlicer's variable-name rules: no control characters, "/" -> U+2215, runs of "_" become
    one ("__" is reserved for tables), "_" prefixed unless the name starts with a letter, digit
    or "_". Also NFC-normalised and right-stripped, as netCDF stores names that way."""
    text = "".join(ch for ch in str(name) if unicodedata.category(ch) != "Cc")
    text = unicodedata.normalize("NFC", text).replace("/", "\u2215")
    text = re.sub(r"_+", "_", text).rstrip()
    if not text or not (text[0].isalnum() or text[0] == "_"):
        text = "_" + text
    return text


def ijk_to_ras(mm_per_pixel: float, origin_mm: Sequence[float], z_spacing: float | None = None) -> np.ndarray:
    """GeoSlicer's IJK-to-RAS for an image: directions diag(-1, -1, 1), square pixels."""
    return Geometry.thin_section(mm_per_pixel, origin_mm, z_spacing=z_spacing).matrix


def grid_coordinates(shape_zyx: Sequence[int], mm_per_pixel: float, origin_mm: Sequence[float]) -> list[np.ndarray]:
    """The z, y, x coordinate values GeoSlicer stores: linspace from (oz, -oy, -ox)."""
    return Geometry.thin_section(mm_per_pixel, origin_mm).coordinates(shape_zyx)


class Window(NamedTuple):
    """Rows y0:y1 and columns x0:x1 of a stored (1, H, W[, c]) array."""

    y0: int
    y1: int
    x0: int
    x1: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.y1 - self.y0, self.x1 - self.x0

    @classmethod
    def whole(cls, shape: Sequence[int]) -> Window:
        return cls(0, int(shape[0]), 0, int(shape[1]))


class Geometry:
    """Where a single-slice array lies: its 4x4 IJK-to-RAS matrix (mm), as a GeoSlicer node
    holds it and a `transform` attribute stores it. Column 0 is the RAS step of one column
    (i), column 1 of one row (j), column 2 of one slice (k): spacing per axis, axis directions
    and flips are kept together, so whatever is written on an image's grid lies on it exactly."""

    __slots__ = ("matrix",)

    def __init__(self, matrix: npt.ArrayLike) -> None:
        m = np.array(matrix, dtype=np.float64).reshape(4, 4)
        if not np.all(np.isfinite(m)) or np.any(np.linalg.norm(m[:3, :3], axis=0) == 0):
            raise ValueError(f"not an IJK-to-RAS matrix (a zero or non-finite axis): {m.ravel().tolist()}")
        self.matrix = m

    @classmethod
    def thin_section(
        cls,
        mm_per_pixel: float,
        origin_mm: Sequence[float] = (0.0, 0.0, 0.0),
        mm_per_row: float | None = None,
        z_spacing: float | None = None,
    ) -> Geometry:
        """GeoSlicer's default grid: directions diag(-1, -1, 1), `mm_per_pixel` along x and
        (unless `mm_per_row` is given) along y."""
        sx = _check_spacing(mm_per_pixel)
        sy = sx if mm_per_row is None else _check_spacing(mm_per_row)
        sz = sx if z_spacing is None else float(z_spacing)
        ox, oy, oz = _check_origin(origin_mm)
        return cls(np.array([[-sx, 0, 0, ox], [0, -sy, 0, oy], [0, 0, sz, oz], [0, 0, 0, 1]], dtype=np.float64))

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Millimetres per step along x (columns), y (rows) and z."""
        sx, sy, sz = (float(v) for v in np.linalg.norm(self.matrix[:3, :3], axis=0))
        return sx, sy, sz

    @property
    def origin(self) -> tuple[float, float, float]:
        """RAS position (mm) of the first pixel's centre."""
        ox, oy, oz = (float(v) for v in self.matrix[:3, 3])
        return ox, oy, oz

    @property
    def mm_per_pixel(self) -> float:
        """The pixel size; for non-square pixels the side of a square of the same area (so
        areas computed from it are exact)."""
        sx, sy, _ = self.spacing
        return float(np.sqrt(sx * sy))

    @property
    def is_square(self) -> bool:
        """Whether pixels are as tall as they are wide (to a relative 1e-6)."""
        sx, sy, _ = self.spacing
        return abs(sx - sy) <= 1e-6 * max(sx, sy)

    def shifted(self, rows: int, cols: int) -> Geometry:
        """The grid of a crop starting at (rows, cols): same axes, origin at that pixel."""
        m = self.matrix.copy()
        m[:3, 3] = (self.matrix @ np.array([cols, rows, 0.0, 1.0]))[:3]
        return Geometry(m)

    def coordinates(self, shape_zyx: Sequence[int]) -> list[np.ndarray]:
        """The z, y, x coordinate values GeoSlicer writes beside the matrix: from the origin
        (x and y negated) in steps of the spacing."""
        sx, sy, sz = self.spacing
        ox, oy, oz = self.origin
        starts, steps = (oz, -oy, -ox), (sz, sy, sx)
        return [np.linspace(a, a + d * (n - 1), n) for a, d, n in zip(starts, steps, shape_zyx)]

    def transform(self) -> list[float]:
        """The `transform` attribute: the matrix row-major, 16 floats."""
        return [float(v) for v in self.matrix.ravel()]

    def allclose(self, other: Geometry, rtol: float = 1e-9, atol: float = 1e-12) -> bool:
        return bool(np.allclose(self.matrix, other.matrix, rtol=rtol, atol=atol))

    def __repr__(self) -> str:
        sx, sy, _ = self.spacing
        return f"Geometry(spacing {sx:g} x {sy:g} mm, origin {self.origin}, matrix {self.matrix.ravel().tolist()})"


def labels_problem(table: ClassTable) -> str | None:
    """Why GeoSlicer would misread `table` in a `labels` attribute, or None.

    GeoSlicer splits each "Name,Index,Color" entry at every comma and skips an entry that does
    not give three fields, so a comma in a class name drops that class and gives every later
    label value the next class's name and colour; a colour must be "#rrggbb"."""
    for k, mineral in enumerate(table.classes, 1):
        if "," in mineral.name:
            return (
                f"class {k} {mineral.name!r} has a comma in its name: GeoSlicer reads labels as "
                f"'Name,Index,Color' and would give label {k} and every later label the wrong class; "
                "rename the class without commas"
            )
        if re.fullmatch(r"#[0-9A-Fa-f]{6}", mineral.color) is None:
            return f"class {k} {mineral.name!r} has the colour {mineral.color!r}; GeoSlicer needs '#rrggbb'"
    return None


def _check_spacing(mm_per_pixel: float) -> float:
    value = float(mm_per_pixel)
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"mm_per_pixel must be a positive number, got {mm_per_pixel!r}")
    return value


def _check_origin(origin_mm: Sequence[float]) -> tuple[float, float, float]:
    values = tuple(float(v) for v in origin_mm)
    if len(values) != 3 or not all(np.isfinite(values)):
        raise ValueError(f"origin_mm must be three finite numbers (R, A, S), got {origin_mm!r}")
    return values


# ---------------------------------------------------------------------------------------------
# writer


def _set_attr(obj: Any, key: str, value: Any) -> None:
    """Write an attribute the way xarray does: lists of strings as NC_STRING arrays.

    None is skipped (netCDF has no null), so optional metadata never aborts a finished run."""
    if value is None:
        return
    if isinstance(value, str):
        obj.setncattr(key, value)
    elif isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        obj.setncattr_string(key, list(value))
    elif isinstance(value, (bool, np.bool_)):
        obj.setncattr(key, np.int8(value))
    elif isinstance(value, (int, float, np.integer, np.floating)):
        obj.setncattr(key, value)
    elif isinstance(value, (list, tuple, np.ndarray)):
        array = np.asarray(value)
        if array.dtype.kind not in "iuf":
            raise TypeError(f"attribute {key!r}: unsupported value {value!r}")
        obj.setncattr(key, array)
    else:
        raise TypeError(f"attribute {key!r}: unsupported value type {type(value).__name__}")


def _chunks(shape: Sequence[int], itemsize: int, force: bool) -> tuple[int, ...] | None:
    """(1, 512, 512[, c]) tiles for large or compressed arrays, None (contiguous) otherwise."""
    nbytes = int(np.prod(shape)) * itemsize
    if not force and nbytes < CHUNK_MIN_BYTES:
        return None
    tile = [1, min(CHUNK, shape[1]), min(CHUNK, shape[2])] + list(shape[3:])
    # netCDF/HDF5 chunk dimensions must be >= 1 even for empty axes
    return tuple(max(1, int(v)) for v in tile)


class NetcdfWriter:
    """Writes one GeoSlicer-layout netCDF file; use as a context manager.

    The file is built under a hidden temporary name next to `path` and renamed onto `path` by
    `close()`; on an exception inside the `with` block (or `abort()`), it is removed and `path`
    is left untouched. A write that fails (netCDF4 raises RuntimeError for a full disk or a file
    size limit) becomes a `ThinSegError` naming `shown_as` (default `path`): the file the user
    asked for when `path` is itself a temporary name. Each `add_*` returns the sanitised,
    de-duplicated variable name.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        attrs: Mapping[str, Any] | None = None,
        *,
        shown_as: str | os.PathLike[str] | None = None,
    ) -> None:
        import netCDF4  # deferred: netCDF4 costs ~35 ms, and the CLI starts without it

        self.path = Path(path)
        self.shown_as = Path(shown_as) if shown_as is not None else self.path
        self._output = AtomicOutput(self.path)
        self._ds: netCDF4.Dataset | None = None
        try:
            with NC_LOCK:
                self._ds = netCDF4.Dataset(self._output.tmp, "w", format="NETCDF4")
                _quiet_hdf5()
                self._ds.set_fill_off()  # every value is written; pre-filling would double the I/O
        except (OSError, RuntimeError) as error:
            self.abort()
            raise self._failed(error, "cannot create the netCDF file") from None
        except BaseException:  # Ctrl-C or SIGTERM while the file is being created: it goes too
            self.abort()
            raise
        try:
            for key, value in (attrs or {}).items():
                with self._writing():
                    _set_attr(self._ds, key, value)
        except BaseException:
            self.abort()
            raise

    # -- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> NetcdfWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def close(self) -> Path:
        """Finish the file and move it to `path`."""
        if self._ds is not None:
            try:
                with NC_LOCK:
                    _quiet_hdf5()
                    self._ds.close()
            except BaseException as error:
                self._ds = None
                _LEFT_OPEN.append(self.path)
                self._output.discard()
                if isinstance(error, (OSError, RuntimeError)):
                    raise self._failed(error) from None
                raise
            self._ds = None
        return self._output.commit()

    def _failed(self, error: BaseException, what: str = "cannot write the output") -> ThinSegError:
        """A failed netCDF4 call as one line naming the output: the system's reason when there
        is one, else the likely causes (netCDF4 reports a full disk or a file size limit as a
        bare RuntimeError "HDF error")."""
        reason = getattr(error, "strerror", None)
        if reason:
            return ThinSegError(f"{what}: {reason}", self.shown_as)
        detail = str(error) or type(error).__name__
        return ThinSegError(f"{what} (disk full or file too large?): {detail}", self.shown_as)

    @contextmanager
    def _writing(self) -> Iterator[None]:
        """Hold the netCDF lock around writer calls; turn their failures (not a caller's) into
        one `ThinSegError`, the file then being dropped by `abort` as for any exception."""
        try:
            with NC_LOCK:
                _quiet_hdf5()
                yield
        except (OSError, RuntimeError) as error:
            raise self._failed(error) from None

    def abort(self) -> None:
        """Drop the partial file; `path` is left as it was."""
        if self._ds is not None:
            try:
                with NC_LOCK:
                    _quiet_hdf5()
                    self._ds.close()
            except Exception:
                _LEFT_OPEN.append(self.path)
            self._ds = None
        self._output.discard()

    @property
    def _dataset(self) -> Any:
        if self._ds is None:
            raise ValueError(f"NetcdfWriter for {self.path} is closed")
        return self._ds

    # -- names and grids --------------------------------------------------------------------

    def _taken(self, name: str) -> bool:
        ds = self._dataset
        names = set(ds.variables) | set(ds.dimensions)
        return name in names or name == COLOR_DIM or any(f"{a}_{name}" in names for a in "zyx")

    def unique_name(self, name: str) -> str:
        """Sanitised `name`, with `_1`, `_2`, ... appended if it (or its z/y/x dims) is taken."""
        base = sanitize_name(name)
        candidate, n = base, 1
        while self._taken(candidate):
            candidate = f"{base}{n}" if base.endswith("_") else f"{base}_{n}"
            n += 1
        return candidate

    def _add_grid(
        self,
        var: str,
        values_zyx: Sequence[np.ndarray],
        dtypes: Sequence[Any] = ("f8", "f8", "f8"),
        attrs: Sequence[Mapping[str, Any]] = ({}, {}, {}),
    ) -> tuple[str, ...]:
        """Dimensions `z_<var>`, `y_<var>`, `x_<var>` and their coordinate variables (float64
        with `_FillValue` NaN, as xarray writes them)."""
        ds = self._dataset
        dims = tuple(f"{a}_{var}" for a in "zyx")
        for dim, values, dtype, coord_attrs in zip(dims, values_zyx, dtypes, attrs):
            dtype = np.dtype(dtype)
            ds.createDimension(dim, len(values))
            coord = ds.createVariable(dim, dtype, (dim,), fill_value=np.nan if dtype.kind == "f" else None)
            for key, value in coord_attrs.items():
                _set_attr(coord, key, value)
            coord[:] = np.asarray(values, dtype=dtype)
        return dims

    def _ensure_color_dim(self, size: int = 3) -> None:
        ds = self._dataset
        if COLOR_DIM in ds.dimensions:
            if len(ds.dimensions[COLOR_DIM]) != size:
                raise ValueError(
                    f"the shared '{COLOR_DIM}' dimension has {len(ds.dimensions[COLOR_DIM])} entries, not {size}"
                )
            return
        ds.createDimension(COLOR_DIM, size)
        coord = ds.createVariable(COLOR_DIM, str, (COLOR_DIM,))
        coord[:] = np.array(RGB_COORDS, dtype=object)

    def _create(
        self,
        var: str,
        dtype: Any,
        dims: Sequence[str],
        shape: Sequence[int],
        compress: bool,
        attrs: Mapping[str, Any],
        fill_value: Any = None,
    ) -> Any:
        chunks = _chunks(shape, np.dtype(dtype).itemsize, force=compress)
        kwargs: dict[str, Any] = {}
        if chunks is not None:
            kwargs["chunksizes"] = chunks
        if compress:
            kwargs.update(zlib=True, complevel=ZLIB_LEVEL, shuffle=True)
        if fill_value is not None:
            kwargs["fill_value"] = fill_value
        variable = self._dataset.createVariable(var, dtype, tuple(dims), **kwargs)
        if chunks is not None:  # written once, in bands of whole rows: a few chunks of cache do
            variable.set_var_chunk_cache(size=WRITE_CACHE_BYTES, nelems=WRITE_CACHE_SLOTS, preemption=1.0)
        for key, value in attrs.items():
            _set_attr(variable, key, value)
        return variable

    @staticmethod
    def _merge_attrs(fixed: Mapping[str, Any], extra: Mapping[str, Any] | None) -> dict[str, Any]:
        out = dict(fixed)
        for key, value in (extra or {}).items():
            if key in fixed:
                raise ValueError(f"attribute {key!r} is set by the writer and cannot be overridden")
            out[key] = value
        return out

    # -- adding variables ---------------------------------------------------------------------

    def add_rgb_image(
        self,
        name: str,
        source: RasterSource | np.ndarray,
        mm_per_pixel: float | None = None,
        origin_mm: Sequence[float] = (0.0, 0.0, 0.0),
        band_rows: int = CHUNK,
        attrs: Mapping[str, Any] | None = None,
        compress: bool = False,
        *,
        geometry: Geometry | None = None,
    ) -> str:
        """An RGB image (uint8, (1, H, W, 3)), copied from `source` band by band."""
        if isinstance(source, np.ndarray):
            source = ArraySource(source, name=name)
        height, width = (int(v) for v in source.shape)
        image = self.begin_rgb_image(name, (height, width), mm_per_pixel, origin_mm, attrs, compress, geometry=geometry)
        step = max(1, int(band_rows))
        for y0 in range(0, height, step):
            y1 = min(height, y0 + step)
            image.write_rows(y0, np.asarray(source.read(y0, y1, 0, width)))
        return image.name

    def begin_rgb_image(
        self,
        name: str,
        shape: tuple[int, int],
        mm_per_pixel: float | None = None,
        origin_mm: Sequence[float] = (0.0, 0.0, 0.0),
        attrs: Mapping[str, Any] | None = None,
        compress: bool = False,
        *,
        geometry: Geometry | None = None,
    ) -> RgbRowWriter:
        """Create an RGB variable now and fill it later, row band by row band (e.g. while the
        same bands are being segmented, so that a compressed input is decoded only once).

        The grid is `geometry` when given (an input image's, kept exactly), else GeoSlicer's
        default directions with `mm_per_pixel` and `origin_mm`."""
        grid = _grid(mm_per_pixel, origin_mm, geometry)
        height, width = (int(v) for v in shape)
        with self._writing():
            var = self.unique_name(name)
            dims = self._add_grid(var, grid.coordinates((1, height, width)))
            self._ensure_color_dim()
            fixed = {"transform": grid.transform()}
            variable = self._create(
                var, "u1", dims + (COLOR_DIM,), (1, height, width, 3), compress, self._merge_attrs(fixed, attrs)
            )
        return RgbRowWriter(var, variable, height, width, self._writing)

    def add_labelmap(
        self,
        name: str,
        labels: np.ndarray,
        table: ClassTable,
        mm_per_pixel: float | None = None,
        origin_mm: Sequence[float] = (0.0, 0.0, 0.0),
        reference: str | None = None,
        attrs: Mapping[str, Any] | None = None,
        band_rows: int = CHUNK,
        kind: str = "labelmap",
        *,
        geometry: Geometry | None = None,
    ) -> str:
        """A labelmap (uint8 (1, H, W), zlib): value k = k-th class of `table`, 0 = none.

        `reference` names the source image variable (GeoSlicer uses it as reference geometry);
        `geometry` is that image's grid (else GeoSlicer's default from `mm_per_pixel`).
        `kind` is the `type` attribute: "labelmap" (GeoSlicer imports a labelmap volume) or
        "segmentation" (GeoSlicer imports a segmentation node). Class names GeoSlicer would
        misread (see `labels_problem`) are refused: its labels would shift in silence.
        """
        array = _as_2d(labels, "labels")
        if array.dtype.kind not in "iub":
            raise ValueError(f"labels must be integers, got {array.dtype}")
        writer = self.begin_labelmap(
            name, array.shape, table, reference, attrs, kind, geometry=_grid(mm_per_pixel, origin_mm, geometry)
        )
        _write_bands(writer, array, band_rows)
        return writer.name

    def add_scalar_image(
        self,
        name: str,
        array: np.ndarray,
        mm_per_pixel: float | None = None,
        origin_mm: Sequence[float] = (0.0, 0.0, 0.0),
        attrs: Mapping[str, Any] | None = None,
        compress: bool = True,
        band_rows: int = CHUNK,
        *,
        geometry: Geometry | None = None,
    ) -> str:
        """A single-channel image ((1, H, W), any numeric dtype), e.g. a confidence map."""
        data = _as_2d(array, "array")
        if data.dtype == np.bool_:
            data = data.view(np.uint8)
        if data.dtype.kind not in "iuf":
            raise ValueError(f"scalar images must be numeric, got {data.dtype}")
        writer = self.begin_scalar_image(
            name, data.shape, data.dtype, attrs, compress, geometry=_grid(mm_per_pixel, origin_mm, geometry)
        )
        _write_bands(writer, data, band_rows)
        return writer.name

    def begin_labelmap(
        self,
        name: str,
        shape: tuple[int, int],
        table: ClassTable,
        reference: str | None = None,
        attrs: Mapping[str, Any] | None = None,
        kind: str = "labelmap",
        *,
        geometry: Geometry,
    ) -> BandRowWriter:
        """`add_labelmap`'s variable, created now and filled row band by row band (e.g. while a
        section is segmented, so that its labels never exist whole in memory)."""
        if kind not in ("labelmap", "segmentation"):
            raise ValueError(f"kind must be 'labelmap' or 'segmentation', got {kind!r}")
        problem = labels_problem(table)
        if problem is not None:
            raise ThinSegError(f"labelmap '{name}': {problem}", self.path)
        height, width = (int(v) for v in shape)
        fixed: dict[str, Any] = {"type": kind, "labels": table.geoslicer_labels()}
        if reference is not None:
            fixed["reference"] = reference
        fixed["transform"] = geometry.transform()
        with self._writing():
            var = self.unique_name(name)
            dims = self._add_grid(var, geometry.coordinates((1, height, width)))
            variable = self._create(var, "u1", dims, (1, height, width), True, self._merge_attrs(fixed, attrs))
        n_classes = len(table)
        return BandRowWriter(
            var, variable, height, width, np.dtype(np.uint8), self._writing, lambda band: _label_band(band, n_classes)
        )

    def begin_scalar_image(
        self,
        name: str,
        shape: tuple[int, int],
        dtype: npt.DTypeLike,
        attrs: Mapping[str, Any] | None = None,
        compress: bool = True,
        *,
        geometry: Geometry,
    ) -> BandRowWriter:
        """`add_scalar_image`'s variable, created now and filled row band by row band."""
        data_type = np.dtype(dtype)
        if data_type.kind not in "iuf":
            raise ValueError(f"scalar images must be numeric, got {data_type}")
        height, width = (int(v) for v in shape)
        fixed = {"transform": geometry.transform()}
        with self._writing():
            var = self.unique_name(name)
            dims = self._add_grid(var, geometry.coordinates((1, height, width)))
            variable = self._create(var, data_type, dims, (1, height, width), compress, self._merge_attrs(fixed, attrs))
        return BandRowWriter(var, variable, height, width, data_type, self._writing)

    def copy_variable(
        self,
        src_path: str | os.PathLike[str],
        var_name: str,
        name: str | None = None,
        *,
        window: Window | None = None,
    ) -> str:
        """Copy an image/labelmap/segmentation from another GeoSlicer netCDF file, streaming.

        Data, dtype, coordinate values and attributes are kept unchanged; the dimensions are
        renamed after the (sanitised, de-duplicated) new name, which also turns a
        "same coordinate system" variable (shared z/y/x) into the per-image layout. `window`
        copies only those rows and columns (coordinates and `transform` follow them).
        """
        src_path = Path(src_path)
        with NC_LOCK, _open_dataset(src_path) as src:
            source = _data_variable(src, var_name, src_path)
            dims, shape = source.dimensions, tuple(int(v) for v in source.shape)
            if len(shape) not in (3, 4) or (len(shape) == 4 and dims[3] != COLOR_DIM):
                raise ThinSegError(
                    f"variable '{var_name}' (dimensions {dims}) is not an image, labelmap or segmentation", src_path
                )
            _check_declared_size(shape, var_name, src_path, allow_empty=True)
            if source.dtype == str or np.dtype(source.dtype).kind not in "iufb":
                raise ThinSegError(f"variable '{var_name}' has non-numeric data ({source.dtype})", src_path)
            attrs = {key: source.getncattr(key) for key in source.ncattrs() if key != "_FillValue"}
            fill = source.getncattr("_FillValue") if "_FillValue" in source.ncattrs() else None
            compress = bool((source.filters() or {}).get("zlib")) or "labels" in attrs
            values, dtypes, coord_attrs = _source_grid(src, source)
            if window is not None:
                window = _check_window(window, shape[1:3], var_name)
                values = [values[0], values[1][window.y0 : window.y1], values[2][window.x0 : window.x1]]
                shape = (shape[0], *window.shape, *shape[3:])
                stored = _transform_attr(attrs)
                if stored is not None:
                    attrs["transform"] = stored.shifted(window.y0, window.x0).transform()
            y_off, x_off = (window.y0, window.x0) if window is not None else (0, 0)
            if len(shape) == 4 and shape[3] != 3:
                raise ThinSegError(
                    f"variable '{var_name}' has {shape[3]} colour channels; only RGB (3) can be copied", src_path
                )
            with self._writing():
                var = self.unique_name(name or var_name)
                out_dims = self._add_grid(var, values, dtypes, coord_attrs)
                if len(shape) == 4:
                    self._ensure_color_dim()
                    out_dims = out_dims + (COLOR_DIM,)
                target = self._create(var, source.dtype, out_dims, shape, compress, attrs, fill_value=fill)
            row_bytes = int(np.prod(shape[2:])) * np.dtype(source.dtype).itemsize
            rows = max(1, min(shape[1], COPY_BAND_BYTES // max(1, row_bytes)))
            if rows > CHUNK:  # whole chunk rows: each compressed chunk written once (small cache)
                rows -= rows % CHUNK
            for z in range(shape[0]):
                for y0 in range(0, shape[1], rows):
                    y1 = min(shape[1], y0 + rows)
                    band = source[z, y_off + y0 : y_off + y1, x_off : x_off + shape[2]]
                    with self._writing():
                        target[z, y0:y1] = band
        return var


def _grid(mm_per_pixel: float | None, origin_mm: Sequence[float], geometry: Geometry | None) -> Geometry:
    if geometry is not None:
        return geometry
    if mm_per_pixel is None:
        raise ValueError("give mm_per_pixel or geometry")
    return Geometry.thin_section(mm_per_pixel, origin_mm)


def _check_window(window: Window, shape_hw: Sequence[int], var_name: str) -> Window:
    y0, y1, x0, x1 = (int(v) for v in window)
    height, width = (int(v) for v in shape_hw)
    if not (0 <= y0 <= y1 <= height and 0 <= x0 <= x1 <= width):
        raise ValueError(f"window {tuple(window)} is outside variable '{var_name}' ({height}x{width})")
    return Window(y0, y1, x0, x1)


@contextmanager
def _locked() -> Iterator[None]:
    with NC_LOCK:
        yield


class RgbRowWriter:
    """Writes rows of one RGB variable created by `NetcdfWriter.begin_rgb_image`."""

    def __init__(
        self,
        name: str,
        variable: Any,
        height: int,
        width: int,
        writing: Callable[[], contextlib.AbstractContextManager[None]] | None = None,
    ) -> None:
        self.name, self._variable, self.height, self.width = name, variable, height, width
        self._writing = writing or _locked  # the writer's: a failed write names its output

    def write_rows(self, y0: int, band: np.ndarray) -> None:
        y1 = y0 + band.shape[0]
        if band.shape[1:] != (self.width, 3) or band.dtype != np.uint8 or y0 < 0 or y1 > self.height:
            raise ValueError(
                f"rows {y0}:{y1} of {band.dtype} {band.shape} do not fit uint8 ({self.height}, {self.width}, 3)"
            )
        self.write_window(y0, 0, band)

    def write_window(self, y0: int, x0: int, window: np.ndarray) -> None:
        """Write `window` (h, w, 3) uint8 at row `y0`, column `x0` (wide images come in windows)."""
        y1, x1 = y0 + window.shape[0], x0 + window.shape[1]
        if window.ndim != 3 or window.shape[2] != 3 or window.dtype != np.uint8 or min(y0, x0) < 0:
            raise ValueError(f"a window of {window.dtype} {window.shape} is not uint8 (h, w, 3) at ({y0}, {x0})")
        if y1 > self.height or x1 > self.width:
            raise ValueError(f"window {y0}:{y1}, {x0}:{x1} lies outside ({self.height}, {self.width})")
        with self._writing():
            self._variable[0, y0:y1, x0:x1, :] = window


class BandRowWriter:
    """Writes the rows of one (1, H, W) variable in order, gathered into CHUNK-row bands: each
    compressed chunk is then written once, whatever the height of the bands handed in.

    A wide image may come in column stripes (`x0`): each stripe's rows in order, gathered into
    its own CHUNK-row buffer, so what is held is a stripe wide, not the image. Stripes that
    start and end on multiples of CHUNK (or at the image's edge) write whole chunks too."""

    def __init__(
        self,
        name: str,
        variable: Any,
        height: int,
        width: int,
        dtype: np.dtype[Any],
        writing: Callable[[], contextlib.AbstractContextManager[None]] | None = None,
        check: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        self.name, self._variable, self.height, self.width = name, variable, height, width
        self._writing = writing or _locked
        self._check = check
        self._dtype = dtype
        self._open: dict[tuple[int, int], _StripeBuffer] = {}  # (x0, x1) -> the stripe's rows not written yet
        self._done: list[tuple[int, int]] = []  # stripes written to the bottom

    @property
    def next_row(self) -> int:
        """Rows before this one have been handed in, in every column."""
        if _covered([*self._done, *self._open]) < self.width:
            return 0  # some columns have had no rows yet
        return min((b.next_row for b in self._open.values()), default=self.height)

    def write_rows(self, y0: int, band: np.ndarray, x0: int = 0) -> None:
        """Rows `y0`.. of columns `x0`.. (the next rows of those columns: each column's rows come
        in order, each once)."""
        rows = np.asarray(band)
        if self._check is not None:
            rows = self._check(rows)
        if rows.ndim != 2:
            raise ValueError(f"rows of shape {rows.shape} are not (h, w)")
        columns = (x0, x0 + rows.shape[1])
        stripe = self._open.get(columns)
        if stripe is None:
            stripe = self._start(columns)
        y1 = y0 + rows.shape[0]
        if y0 != stripe.next_row or y1 > self.height:
            raise ValueError(
                f"rows {y0}:{y1} of columns {columns[0]}:{columns[1]} do not follow row {stripe.next_row} "
                f"of ({self.height}, {self.width})"
            )
        done = 0
        while done < rows.shape[0]:
            at = stripe.next_row - stripe.start
            n = min(rows.shape[0] - done, stripe.buffer.shape[0] - at)
            stripe.buffer[at : at + n] = rows[done : done + n]
            done += n
            stripe.next_row += n
            if stripe.next_row - stripe.start == stripe.buffer.shape[0] or stripe.next_row == self.height:
                self._flush(columns, stripe)
        if stripe.next_row == self.height:
            del self._open[columns]
            self._done.append(columns)

    def _start(self, columns: tuple[int, int]) -> _StripeBuffer:
        x0, x1 = columns
        taken = [*self._done, *self._open]
        if not 0 <= x0 < x1 <= self.width or any(a < x1 and x0 < b for a, b in taken):
            raise ValueError(
                f"columns {x0}:{x1} are not new columns of ({self.height}, {self.width}) "
                f"(written or open: {sorted(taken)})"
            )
        stripe = _StripeBuffer(np.empty((min(CHUNK, max(self.height, 1)), x1 - x0), self._dtype))
        self._open[columns] = stripe
        return stripe

    def _flush(self, columns: tuple[int, int], stripe: _StripeBuffer) -> None:
        n = stripe.next_row - stripe.start
        if n > 0:
            with self._writing():
                self._variable[0, stripe.start : stripe.next_row, columns[0] : columns[1]] = stripe.buffer[:n]
        stripe.start = stripe.next_row

    def finish(self) -> None:
        """Check that every row of every column was written."""
        if self.next_row != self.height:
            raise ValueError(f"{self.name}: only {self.next_row} of {self.height} rows were written")


@dataclass
class _StripeBuffer:
    """Rows [start, next_row) of one column stripe, not written yet."""

    buffer: np.ndarray
    start: int = 0
    next_row: int = 0


def _covered(stripes: Sequence[tuple[int, int]]) -> int:
    """Columns the (non-overlapping) stripes cover together."""
    return sum(b - a for a, b in stripes)


def _write_bands(writer: BandRowWriter, array: np.ndarray, band_rows: int) -> None:
    """A whole (H, W) array through a row writer, `band_rows` rows at a time."""
    step = max(1, int(band_rows))
    for y0 in range(0, array.shape[0], step):
        writer.write_rows(y0, np.ascontiguousarray(array[y0 : y0 + step]))
    writer.finish()


def _as_2d(array: np.ndarray, what: str) -> np.ndarray:
    data = np.asarray(array)
    if data.ndim == 3 and data.shape[0] == 1:
        data = data[0]
    if data.ndim != 2:
        raise ValueError(f"{what} must be (H, W) or (1, H, W), got shape {data.shape}")
    return data


def _label_band(band: np.ndarray, n_classes: int) -> np.ndarray:
    """The band as uint8, refusing values that have no class (GeoSlicer would drop them)."""
    if band.size == 0:
        return band.astype(np.uint8)
    low, high = int(band.min()), int(band.max())
    if low < 0 or high > n_classes:
        raise ValueError(f"label values must be 0..{n_classes} for a table of {n_classes} classes, found {low}..{high}")
    return np.ascontiguousarray(band, dtype=np.uint8)


# ---------------------------------------------------------------------------------------------
# reader


#: Read handles, one per file, shared by every reader and counted. HDF5 can crash the process
#: (segfault in H5F_addr_decode) when one process holds two handles of a file that has a string
#: variable, as GeoSlicer's colour coordinate `c` = r, g, b is, and opens or reads it once more
#: (Unidata/netcdf4-python#1444, HDFGroup/hdf5#5359): e.g. the PP and XP sources of a section
#: are open and its labelmap is read. Sharing one handle per file never opens a second one.
_SHARED: dict[tuple[Any, ...], list[Any]] = {}


def _file_key(path: Path) -> tuple[Any, ...]:
    st = path.stat()
    return (os.getpid(), str(path.resolve()), st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def _acquire(path: Path) -> tuple[tuple[Any, ...] | None, Any]:
    """(key, dataset): the file's shared read handle (opened if needed); give it back with _release."""
    path = Path(path)
    with NC_LOCK:
        try:
            key = _file_key(path)
        except OSError:
            return None, _open_raw(path)  # raises the right ThinSegError (missing, unreadable)
        entry = _SHARED.get(key)
        if entry is None:
            entry = _SHARED[key] = [_open_raw(path), 0]
        entry[1] += 1
        return key, entry[0]


def _release(key: tuple[Any, ...] | None, ds: Any) -> None:
    with NC_LOCK:
        entry = _SHARED.get(key) if key is not None else None
        if key is None or entry is None or entry[0] is not ds:
            ds.close()
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del _SHARED[key]
            ds.close()


@contextmanager
def _open_dataset(path: Path) -> Iterator[Any]:
    """Open for reading with masking/scaling off (raw stored values), ThinSegError on failure.

    The handle is the file's shared one (see _SHARED): do not close it, do not change settings."""
    with NC_LOCK:
        key, ds = _acquire(path)
        try:
            yield ds
        finally:
            _release(key, ds)


def _open_raw(path: Path) -> Any:
    import netCDF4  # deferred: netCDF4 costs ~35 ms, and the CLI starts without it

    path = Path(path)
    if not path.exists():
        raise ThinSegError("file not found", path)
    if path.is_dir():
        raise ThinSegError("is a folder, not a netCDF file", path)
    try:
        with NC_LOCK:
            ds = netCDF4.Dataset(path, "r")
            ds.set_auto_maskandscale(False)
    except (OSError, RuntimeError, ValueError, IndexError) as error:
        detail = getattr(error, "strerror", None) or str(error)
        raise ThinSegError(
            f"not a readable netCDF file (truncated, corrupt or another format: {detail})", path
        ) from None
    return ds


def _is_coordinate(ds: Any, name: str) -> bool:
    variable = ds.variables[name]
    return name in ds.dimensions and tuple(variable.dimensions) == (name,)


def _data_variable(ds: Any, name: str, path: Path) -> Any:
    if name not in ds.variables or _is_coordinate(ds, name):
        available = ", ".join(n for n in ds.variables if not _is_coordinate(ds, n)) or "none"
        raise ThinSegError(f"has no variable '{name}' (variables: {available})", path)
    return ds.variables[name]


def _attrs(variable: Any) -> dict[str, Any]:
    return {key: variable.getncattr(key) for key in variable.ncattrs()}


#: Coordinate values read at a time when a grid is checked (bounds the memory of one read).
_COORDINATE_BLOCK = 1 << 20


def _check_declared_size(shape: Sequence[int], var_name: str, path: Path, *, allow_empty: bool = False) -> None:
    """Refuse a (z, y, x[, c]) variable declaring more pixels than the section bound, before any
    of its data is read (the file itself can be a few KB: chunks never written cost nothing)."""
    if len(shape) < 3 or (allow_empty and 0 in tuple(shape)[1:3]):
        return
    try:
        check_section_size(int(shape[1]), int(shape[2]), path)
    except ThinSegError as error:
        raise ThinSegError(f"variable '{var_name}': {error.problem}", path) from None


def _check_coordinate(ds: Any, dim: str, axis: str, where: str, path: Path) -> None:
    """Refuse a coordinate variable with NaN/inf values, a repeated value (a pixel of size 0) or
    values that go back and forth; read a block at a time."""
    if dim not in ds.variables or not _is_coordinate(ds, dim) or ds.variables[dim].dtype == str:
        return
    coord = ds.variables[dim]
    n = int(coord.shape[0])
    direction = 0.0
    for a in range(0, n, _COORDINATE_BLOCK):
        values = np.asarray(coord[a : min(n, a + _COORDINATE_BLOCK + 1)], dtype=np.float64)
        if not np.all(np.isfinite(values)):
            raise ThinSegError(f"{where}: its {axis} coordinates are not finite (NaN or infinite values)", path)
        signs = np.sign(np.diff(values))
        if np.any(signs == 0):
            raise ThinSegError(f"{where}: its {axis} coordinates repeat a value (a pixel of size 0)", path)
        if signs.size:
            direction = direction or float(signs[0])
            if np.any(signs != direction):
                raise ThinSegError(f"{where}: its {axis} coordinates are not monotonic (they go back and forth)", path)


def _checked_geometry(
    ds: Any, variable: Any, attrs: Mapping[str, Any], var_name: str, path: Path, window: Window | None = None
) -> Geometry | None:
    """`_geometry`, refusing a grid no thin section has: a `transform` that is not 16 finite
    numbers with non-zero axes, x/y coordinates that are not finite or not strictly monotonic,
    a pixel width or height outside the sane range. None when the file records no grid."""
    where = f"variable '{var_name}'"
    transform = attrs.get("transform")
    if transform is not None and not isinstance(transform, str):
        try:
            flat = np.asarray(transform, dtype=np.float64).ravel()
        except (TypeError, ValueError):
            raise ThinSegError(f"{where}: its transform attribute is not a list of numbers", path) from None
        if flat.size != 16:
            raise ThinSegError(f"{where}: its transform attribute has {flat.size} values, not 16 (a 4x4 matrix)", path)
        if not np.all(np.isfinite(flat)):
            raise ThinSegError(
                f"{where}: its transform attribute holds NaN or infinite values: coordinates are not finite", path
            )
        if np.any(np.linalg.norm(flat.reshape(4, 4)[:3, :3], axis=0) == 0):
            raise ThinSegError(f"{where}: its transform attribute has a zero axis (a pixel of size 0)", path)
        source = "transform attribute"
    else:
        for axis, dim in zip("yx", tuple(variable.dimensions)[1:3]):
            _check_coordinate(ds, dim, axis, where, path)
        source = "x/y coordinates"
    geometry = _geometry(ds, variable, attrs, window)
    if geometry is None:
        return None
    sx, sy, _ = geometry.spacing
    for side, value in (("width", sx), ("height", sy)):
        try:
            check_mm_per_pixel(value, f"{where}: pixel {side}", path)
        except ThinSegError as error:
            raise ThinSegError(
                f"{error.problem} (from its {source}): the file's spacing is most likely wrong; the variable "
                "must give its pixel size in mm in its 'transform' attribute or its x/y coordinates",
                path,
            ) from None
    return geometry


def check_image_variable(path: str | os.PathLike[str], var_name: str) -> Geometry | None:
    """Check a stored image or labelmap before it is read: its declared size within the section
    bound and its grid usable (see `_checked_geometry`); returns that grid (None: none recorded)."""
    path = Path(path)
    with _open_dataset(path) as ds:
        variable = _data_variable(ds, var_name, path)
        _check_declared_size(tuple(int(v) for v in variable.shape), var_name, path)
        return _checked_geometry(ds, variable, _attrs(variable), var_name, path)


def _kind(variable: Any, attrs: Mapping[str, Any]) -> VariableKind:
    """How GeoSlicer would import the variable (labels first, then a `c` dimension)."""
    dims = tuple(variable.dimensions)
    if len(dims) == 1 and dims[0].startswith(TABLE_DIM_PREFIX):
        return "table"
    if len(dims) == 3 and "labels" in attrs:
        return "labelmap" if attrs.get("type") == "labelmap" else "segmentation"
    if len(dims) == 4 and dims[3] == COLOR_DIM:
        is_rgb = variable.shape[3] == 3 and variable.dtype != str and np.dtype(variable.dtype) == np.uint8
        return "rgb" if is_rgb else "vector"
    if len(dims) == 3:
        return "scalar"
    return "other"


def _coordinate_start_step(ds: Any, dim: str, start: int = 0) -> tuple[float, float] | None:
    """The value at index `start` and the step (first two values; 1 when there is one) of a
    coordinate variable."""
    if dim not in ds.variables or not _is_coordinate(ds, dim):
        return None
    coord = ds.variables[dim]
    n = coord.shape[0]
    if n == 0 or coord.dtype == str or not 0 <= start < n:
        return None
    values = np.asarray(coord[: min(n, 2)], dtype=np.float64)
    first = float(values[0]) if start == 0 else float(np.asarray(coord[start], dtype=np.float64))
    return first, float(values[1] - values[0]) if n > 1 else 1.0


def _transform_attr(attrs: Mapping[str, Any]) -> Geometry | None:
    """The `transform` attribute as a Geometry, None when absent or unusable."""
    transform = attrs.get("transform")
    if transform is None or isinstance(transform, str):
        return None
    flat = np.asarray(transform, dtype=np.float64).ravel()
    if flat.size != 16:
        return None
    try:
        return Geometry(flat)
    except ValueError:
        return None


def _geometry(ds: Any, variable: Any, attrs: Mapping[str, Any], window: Window | None = None) -> Geometry | None:
    """The grid GeoSlicer's importer gives the array (from `window`'s first row and column):
    the `transform` matrix when there is one, else spacing = coordinate steps of the whole
    axis (signed, as GeoSlicer takes them), origin = (-x, -y, z) at the first pixel kept and
    directions diag(-1, -1, 1)."""
    y_start, x_start = (window.y0, window.x0) if window is not None else (0, 0)
    stored = _transform_attr(attrs)
    if stored is not None:
        return stored.shifted(y_start, x_start) if (y_start, x_start) != (0, 0) else stored
    dims = tuple(variable.dimensions)[:3]
    if len(dims) < 3:
        return None
    parts = [_coordinate_start_step(ds, d, start) for d, start in zip(dims, (0, y_start, x_start))]
    if any(p is None for p in parts):
        return None
    (z0, sz), (y0, sy), (x0, sx) = (p for p in parts if p is not None)
    try:
        return Geometry(np.array([[-sx, 0, 0, -x0], [0, -sy, 0, -y0], [0, 0, sz, z0], [0, 0, 0, 1]], dtype=np.float64))
    except ValueError:  # repeated coordinate values: no usable grid
        return None


def _source_grid(ds: Any, variable: Any) -> tuple[list[np.ndarray], list[Any], list[dict[str, Any]]]:
    """Coordinate values/dtypes/attrs of a variable's z, y, x axes for copying; missing
    coordinate variables are rebuilt from the geometry (GeoSlicer needs them to import)."""
    dims, shape = tuple(variable.dimensions)[:3], tuple(variable.shape)[:3]
    values: list[np.ndarray | None] = []
    dtypes: list[Any] = []
    attrs: list[dict[str, Any]] = []
    for dim in dims:
        if dim in ds.variables and _is_coordinate(ds, dim) and ds.variables[dim].dtype != str:
            coord = ds.variables[dim]
            values.append(np.asarray(coord[:]))
            dtypes.append(np.dtype(coord.dtype))
            attrs.append({k: coord.getncattr(k) for k in coord.ncattrs() if k != "_FillValue"})
        else:
            values.append(None)
            dtypes.append(np.dtype("f8"))
            attrs.append({})
    if any(v is None for v in values):
        geometry = _geometry(ds, variable, _attrs(variable)) or Geometry.thin_section(1.0)
        rebuilt = geometry.coordinates(shape)
        values = [v if v is not None else r for v, r in zip(values, rebuilt)]
    return [v for v in values if v is not None], dtypes, attrs  # every axis has values now


def _raw(variable: Any, attrs: Mapping[str, Any], index: Any) -> np.ndarray:
    """Stored values, with netCDF's `_Unsigned` bytes read as uint8 (as xarray decodes them)."""
    data = np.asarray(variable[index])
    if data.dtype == np.int8 and str(attrs.get("_Unsigned", "")).lower() == "true":
        data = data.view(np.uint8)
    return data


def _padding_window(variable: Any, attrs: Mapping[str, Any]) -> Window:
    """GeoSlicer's import crop of a variable without `transform` (see `padding_window`).

    Reads only what it must: row bands from each end until a row holds data, then column
    strips of the rows kept, from each side; bands grow, so wide padding costs few reads."""
    shape = tuple(int(v) for v in variable.shape)
    whole = Window.whole(shape[1:3]) if len(shape) >= 3 else Window(0, 0, 0, 0)
    if "transform" in attrs or len(shape) < 3 or shape[0] != 1 or 0 in shape:
        return whole
    fill = 0 if "labels" in attrs else 255
    height, width = shape[1], shape[2]
    pixel_bytes = int(np.prod(shape[3:])) * np.dtype(variable.dtype).itemsize

    def rows_fill(y0: int, y1: int) -> np.ndarray:
        block = _raw(variable, attrs, (0, slice(y0, y1)))
        return np.asarray((block == fill).reshape(y1 - y0, -1).all(axis=1))

    top = _first_kept(height, rows_fill, False, COPY_BAND_BYTES // max(1, width * pixel_bytes))
    if top is None:
        return whole  # all padding: GeoSlicer keeps the whole array
    bottom = _first_kept(height, rows_fill, True, COPY_BAND_BYTES // max(1, width * pixel_bytes))
    y0, y1 = top, int(bottom if bottom is not None else top) + 1

    def cols_fill(x0: int, x1: int) -> np.ndarray:
        block = _raw(variable, attrs, (0, slice(y0, y1), slice(x0, x1)))
        return np.asarray((block == fill).swapaxes(0, 1).reshape(x1 - x0, -1).all(axis=1))

    strip = COPY_BAND_BYTES // max(1, (y1 - y0) * pixel_bytes)
    left = _first_kept(width, cols_fill, False, strip)
    right = _first_kept(width, cols_fill, True, strip)
    x0 = int(left) if left is not None else 0
    x1 = int(right) + 1 if right is not None else width
    return Window(y0, y1, x0, x1)


def _first_kept(n: int, is_fill: Callable[[int, int], np.ndarray], from_end: bool, max_step: int) -> int | None:
    """Index of the first (from_end: last) of n rows/columns that is not all padding, or None."""
    step, done, cap = 8, 0, max(8, int(max_step))
    while done < n:
        size = min(step, n - done)
        a, b = (n - done - size, n - done) if from_end else (done, done + size)
        kept = np.flatnonzero(~is_fill(a, b))
        if kept.size:
            return a + int(kept[-1] if from_end else kept[0])
        done += size
        step = min(2 * step, cap)
    return None


@dataclass
class VariableInfo:
    """One data variable of a netCDF file, classified the way GeoSlicer imports it.

    `geometry` is the stored array's grid (before any padding crop); `mm_per_pixel` and
    `origin_mm` are read from it (`Geometry.mm_per_pixel` for non-square pixels)."""

    name: str
    kind: VariableKind
    shape: tuple[int, ...]  # as stored: (z, y, x) or (z, y, x, c)
    mm_per_pixel: float | None
    origin_mm: tuple[float, float, float] | None
    attrs: dict[str, Any] = field(default_factory=dict)
    dtype: str = ""
    geometry: Geometry | None = None
    dims: tuple[str, ...] = ()

    @property
    def image_shape(self) -> tuple[int, int] | None:
        """(H, W) for image-like variables."""
        return (self.shape[1], self.shape[2]) if len(self.shape) >= 3 else None

    @property
    def on_shared_grid(self) -> bool:
        """Whether the variable has no `transform`: GeoSlicer's "same coordinate system"
        export, where images of different extents are padded onto one grid."""
        return self.kind not in ("table", "other") and "transform" not in self.attrs


def _info(ds: Any, name: str) -> VariableInfo:
    variable = ds.variables[name]
    attrs = _attrs(variable)
    kind = _kind(variable, attrs)
    geometry = _geometry(ds, variable, attrs) if kind not in ("table", "other") else None
    dtype = "str" if variable.dtype == str else str(np.dtype(variable.dtype))
    mm = geometry.mm_per_pixel if geometry is not None else None
    origin = geometry.origin if geometry is not None else None
    shape = tuple(int(v) for v in variable.shape)
    return VariableInfo(name, kind, shape, mm, origin, attrs, dtype, geometry, tuple(variable.dimensions))


def list_variables(path: str | os.PathLike[str]) -> list[VariableInfo]:
    """The data variables (not coordinates) of a netCDF file, in file order."""
    path = Path(path)
    with _open_dataset(path) as ds:
        return [_info(ds, name) for name in ds.variables if not _is_coordinate(ds, name)]


def padding_window(path: str | os.PathLike[str], var_name: str) -> Window:
    """The rows and columns of a variable that GeoSlicer keeps when it imports it.

    A variable without `transform` comes from a "same coordinate system" export: every image
    was resampled onto one grid covering them all and padded with 255 (images) or 0 (labels).
    GeoSlicer's importer then drops the edge rows and columns made only of that value (real
    data included, if an edge row happens to be all white) and moves the origin to the first
    row and column kept; an array that is all padding is kept whole. With `transform`, the
    whole array."""
    path = Path(path)
    with _open_dataset(path) as ds:
        variable = _data_variable(ds, var_name, path)
        _check_declared_size(tuple(int(v) for v in variable.shape), var_name, path, allow_empty=True)
        return _padding_window(variable, _attrs(variable))


def _affix_is_token(name: str, affix: str) -> bool:
    pattern = rf"(?<![A-Za-z0-9]){re.escape(affix)}(?![A-Za-z0-9])"
    return re.search(pattern, name, re.IGNORECASE) is not None


def find_image_variable(path: str | os.PathLike[str], affix: str | None) -> str | None:
    """The first RGB variable whose name contains `affix` (case-insensitive), or None.

    A variable where the affix stands alone ("s1_PP", not "APPLE") is preferred; an empty affix
    matches the first RGB variable.
    """
    names = [v.name for v in list_variables(path) if v.kind == "rgb"]
    if not affix:
        return names[0] if names else None
    for name in names:
        if _affix_is_token(name, affix):
            return name
    for name in names:
        if affix.lower() in name.lower():
            return name
    return None


class NetcdfImageSource:
    """An RGB variable of a netCDF file read by region (netCDF slicing reads only that part).

    `window` limits it to those stored rows and columns; `crop_padding` to the ones GeoSlicer
    keeps on import (`padding_window`). `shape`, `geometry`, `mm_per_pixel` and `origin_mm`
    are the window's; `window` and `full_shape` say where it lies in the stored array."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        var_name: str,
        *,
        window: Window | None = None,
        crop_padding: bool = False,
    ) -> None:
        self.path = Path(path)
        self.name = var_name
        with NC_LOCK:
            self._key, self._ds = _acquire(self.path)  # shared with other readers of the file
            try:
                variable = _data_variable(self._ds, var_name, self.path)
                info = _info(self._ds, var_name)
                if info.kind != "rgb":
                    raise ThinSegError(
                        f"variable '{var_name}' is not an RGB image (it is {_describe(info)})", self.path
                    )
                if info.shape[0] != 1:
                    raise ThinSegError(
                        f"variable '{var_name}' has {info.shape[0]} slices; "
                        "a single-slice thin-section image is expected",
                        self.path,
                    )
                _check_declared_size(info.shape, var_name, self.path)  # before the padding scan reads data
                full = (info.shape[1], info.shape[2])
                if window is None:
                    window = _padding_window(variable, info.attrs) if crop_padding else Window.whole(full)
                window = _check_window(window, full, var_name)
                geometry = _checked_geometry(self._ds, variable, info.attrs, var_name, self.path, window)
            except BaseException:
                _release(self._key, self._ds)
                self._ds = None
                raise
        self._variable = variable
        self.full_shape = full
        self.window = window
        self.dims: tuple[str, ...] = info.dims
        self.shape = window.shape
        self.geometry = geometry
        self.mm_per_pixel = self.geometry.mm_per_pixel if self.geometry is not None else None
        self.origin_mm = self.geometry.origin if self.geometry is not None else None
        self.attrs = info.attrs

    def read(self, y0: int, y1: int, x0: int = 0, x1: int | None = None) -> np.ndarray:
        if self._ds is None:
            raise ValueError(f"{self.path} is closed")
        y0, y1, x0, x1 = check_region(self.shape, y0, y1, x0, x1)
        dy, dx = self.window.y0, self.window.x0
        try:
            with NC_LOCK:
                data = self._variable[0, dy + y0 : dy + y1, dx + x0 : dx + x1, :]
        except (RuntimeError, OSError) as error:
            raise ThinSegError(
                f"variable '{self.name}' could not be read at rows {y0}-{y1}: {error}", self.path
            ) from None
        return np.ascontiguousarray(data, dtype=np.uint8)

    def close(self) -> None:
        if self._ds is not None:
            _release(self._key, self._ds)
            self._ds = None

    def __repr__(self) -> str:
        return f"NetcdfImageSource({str(self.path)!r}, {self.name!r}, {self.shape[1]}x{self.shape[0]})"


def _describe(info: VariableInfo) -> str:
    """Words for error messages: "a labelmap", "a 4-channel uint8 image", ..."""
    words = {
        "labelmap": "a labelmap",
        "segmentation": "a segmentation",
        "scalar": "a single-channel image",
        "vector": f"a {info.shape[-1]}-channel {info.dtype} image",
        "table": "a table column",
    }
    return words.get(info.kind, f"of shape {info.shape}")


def open_netcdf_image(
    path: str | os.PathLike[str], var_name: str, *, window: Window | None = None, crop_padding: bool = False
) -> NetcdfImageSource:
    """A lazy RasterSource over an RGB variable, with its grid from `transform` or coordinates;
    `window` / `crop_padding` as in NetcdfImageSource."""
    return NetcdfImageSource(path, var_name, window=window, crop_padding=crop_padding)


def read_labelmap(
    path: str | os.PathLike[str], var_name: str, *, window: Window | None = None, crop_padding: bool = False
) -> tuple[np.ndarray, ClassTable, float | None, tuple[float, float, float] | None]:
    """(labels uint8 (H, W), class table, mm_per_pixel, RAS origin) of a labelmap/segmentation.

    `window` reads only those stored rows and columns, `crop_padding` the ones GeoSlicer keeps
    on import; the origin is then the window's."""
    path = Path(path)
    with _open_dataset(path) as ds:
        variable = _data_variable(ds, var_name, path)
        info = _info(ds, var_name)
        if info.kind not in ("labelmap", "segmentation"):
            raise ThinSegError(
                f"variable '{var_name}' is not a labelmap (no 'labels' attribute; it is {_describe(info)})", path
            )
        if info.shape[0] != 1:
            raise ThinSegError(
                f"variable '{var_name}' has {info.shape[0]} slices; a single-slice labelmap is expected", path
            )
        _check_declared_size(info.shape, var_name, path)
        if window is None:
            window = _padding_window(variable, info.attrs) if crop_padding else Window.whole(info.shape[1:3])
        window = _check_window(window, info.shape[1:3], var_name)
        geometry = _checked_geometry(ds, variable, info.attrs, var_name, path, window)
        data = _raw(variable, info.attrs, (0, slice(window.y0, window.y1), slice(window.x0, window.x1)))
    table = _class_table(info.attrs.get("labels"), path, var_name)
    if data.dtype != np.uint8:
        low, high = (int(data.min()), int(data.max())) if data.size else (0, 0)
        if low < 0 or high > 255:
            raise ThinSegError(f"variable '{var_name}' has label values {low}..{high}; 0..255 are supported", path)
        data = data.astype(np.uint8)
    mm = geometry.mm_per_pixel if geometry is not None else None
    return np.ascontiguousarray(data), table, mm, geometry.origin if geometry is not None else None


def global_attribute(path: str | os.PathLike[str], name: str) -> str | None:
    """The file's global attribute `name` as text (None when it has none)."""
    path = Path(path)
    with _open_dataset(path) as ds:
        return str(ds.getncattr(name)) if name in ds.ncattrs() else None


def _class_table(labels: Any, path: Path, var_name: str) -> ClassTable:
    """Parse `labels`; a single string means "no labels" in GeoSlicer (so does a lone header)."""
    if labels is None or isinstance(labels, str):
        return ClassTable(())
    try:
        return ClassTable.from_geoslicer_labels([str(v) for v in np.atleast_1d(labels)])
    except ValueError as error:
        raise ThinSegError(f"variable '{var_name}' has a malformed 'labels' attribute ({error})", path) from None
