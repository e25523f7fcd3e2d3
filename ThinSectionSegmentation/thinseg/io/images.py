"""Lazy, bounded-memory reading of PP/XP photographs (PNG, JPEG, TIFF).

Thin-section scans reach 20k x 30k pixels (1.8 GB as RGB). The inference engine reads them in
bands of rows, so a source only has to deliver `read(y0, y1, x0, x1)`:
- tiled or stripped TIFF (BigTIFF, any compression): only the tiles/strips that overlap the
  region are read and decoded (tifffile's zarr store);
- uncompressed contiguous TIFF: memory-mapped;
- PNG/JPEG: cannot be decoded partially, so they are decoded once (band by band, to keep the
  peak near the size of the result) and sliced.
Everything a user can get wrong (missing, truncated, grayscale, RGBA, 16-bit, stacks) is
refused at `open_image` with a one-line `ThinSegError`, not discovered mid-segmentation.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from thinseg.errors import ThinSegError

#: Tiles/strips larger than this are not re-decoded per band (see TiffSource._decode_whole).
WHOLE_DECODE_SEGMENT_BYTES = 64 * 2**20
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


@runtime_checkable
class RasterSource(Protocol):
    """An RGB image that can be read region by region.

    `path` is None for in-memory sources. `mm_per_pixel` and `origin_mm` (RAS, mm) are known
    only for netCDF variables; image files carry no trustworthy spacing.
    """

    name: str
    shape: tuple[int, int]
    mm_per_pixel: float | None
    origin_mm: tuple[float, float, float] | None

    @property
    def path(self) -> Path | None:
        """The file read, None for in-memory sources (read-only, so sources may narrow it to Path)."""
        ...

    def read(self, y0: int, y1: int, x0: int = 0, x1: int | None = None) -> npt.NDArray[np.uint8]:
        """uint8 (y1-y0, x1-x0, 3), C-contiguous, owned by the caller."""
        ...

    def close(self) -> None:
        """Release the file (reads fail afterwards)."""
        ...


def check_region(shape: tuple[int, int], y0: int, y1: int, x0: int, x1: int | None) -> tuple[int, int, int, int]:
    """Validate a region against (H, W); a bad region is a caller bug, hence ValueError."""
    h, w = shape
    x1 = w if x1 is None else x1
    if not (0 <= y0 <= y1 <= h and 0 <= x0 <= x1 <= w):
        raise ValueError(f"region y[{y0}:{y1}] x[{x0}:{x1}] is outside the {h}x{w} image")
    return int(y0), int(y1), int(x0), int(x1)


class ArraySource:
    """An in-memory (H, W, 3) uint8 image behind the RasterSource interface."""

    def __init__(
        self,
        array: np.ndarray,
        name: str = "image",
        mm_per_pixel: float | None = None,
        origin_mm: tuple[float, float, float] | None = None,
        path: Path | None = None,
    ) -> None:
        array = np.asarray(array)
        if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
            raise ValueError(f"expected a uint8 (H, W, 3) array, got {array.dtype} {array.shape}")
        self.array = array
        self.path = path
        self.name = name
        self.shape = (int(array.shape[0]), int(array.shape[1]))
        self.mm_per_pixel = mm_per_pixel
        self.origin_mm = origin_mm

    def read(self, y0: int, y1: int, x0: int = 0, x1: int | None = None) -> npt.NDArray[np.uint8]:
        y0, y1, x0, x1 = check_region(self.shape, y0, y1, x0, x1)
        return np.array(self.array[y0:y1, x0:x1], dtype=np.uint8, order="C", copy=True)

    def close(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"ArraySource({self.name!r}, {self.shape[1]}x{self.shape[0]})"


# ---------------------------------------------------------------------------------------------
# open_image


def open_image(path: str | os.PathLike[str], *, role: str = "image") -> RasterSource:
    """Open a PNG/JPEG/TIFF RGB image for region reads; `role` ("PP image") names it in errors."""
    path = Path(path)
    magic = _check_file(path, role)
    if magic[:4] in _TIFF_MAGIC:
        return _open_tiff(path, role)
    if magic.startswith(_HDF5_MAGIC) or magic[:3] == b"CDF":
        raise ThinSegError(f"{role} is a netCDF/HDF5 file, not a PNG/JPEG/TIFF image", path)
    return _open_pillow(path, role)


def _check_file(path: Path, role: str) -> bytes:
    if not path.exists():
        raise ThinSegError(f"{role} file not found", path)
    if path.is_dir():
        raise ThinSegError(f"{role} is a folder, not an image file", path)
    try:
        with open(path, "rb") as f:
            magic = f.read(8)
    except OSError as error:
        raise ThinSegError(f"{role} cannot be read: {error.strerror or error}", path) from None
    if not magic:
        raise ThinSegError(f"{role} is an empty file (0 bytes)", path)
    return magic


def _refuse(path: Path, role: str, what: str, expected: str = "an RGB image") -> ThinSegError:
    return ThinSegError(f"{role} {what}; {expected} is expected", path)


_EIGHT_BIT = "an 8-bit RGB image"


# ---------------------------------------------------------------------------------------------
# PNG / JPEG (Pillow)

#: Pillow mode -> why it is not accepted (modes missing here and not RGB/P/YCbCr are refused too).
_PIL_REFUSED = {
    "1": "is black-and-white (1 bit per pixel)",
    "L": "is grayscale (1 channel)",
    "I;16": "is 16-bit grayscale",
    "I;16B": "is 16-bit grayscale",
    "I;16L": "is 16-bit grayscale",
    "I;16N": "is 16-bit grayscale",
    "I": "is 32-bit integer grayscale",
    "F": "is 32-bit float grayscale",
    "LA": "has 2 channels (grayscale + alpha)",
    "La": "has 2 channels (grayscale + alpha)",
    "PA": "has a transparency channel (palette + alpha)",
    "RGBA": "has 4 channels (RGBA)",
    "RGBa": "has 4 channels (RGBA)",
    "RGBX": "has 4 channels (RGBX)",
    "CMYK": "has 4 channels (CMYK)",
}

_PIL_DEEP = {"I;16", "I;16B", "I;16L", "I;16N", "I", "F"}  # refused for their bit depth


class PillowSource:
    """A PNG/JPEG decoded once into a uint8 array (these formats cannot be read by region)."""

    mm_per_pixel: float | None = None
    origin_mm: tuple[float, float, float] | None = None

    def __init__(self, path: Path, array: npt.NDArray[np.uint8]) -> None:
        self.path = path
        self.name = path.stem
        self.array: npt.NDArray[np.uint8] | None = array
        self.shape = (int(array.shape[0]), int(array.shape[1]))

    def read(self, y0: int, y1: int, x0: int = 0, x1: int | None = None) -> npt.NDArray[np.uint8]:
        if self.array is None:
            raise ValueError(f"{self.path} is closed")
        y0, y1, x0, x1 = check_region(self.shape, y0, y1, x0, x1)
        return np.array(self.array[y0:y1, x0:x1], order="C", copy=True)

    def close(self) -> None:
        self.array = None

    def __repr__(self) -> str:
        return f"PillowSource({str(self.path)!r}, {self.shape[1]}x{self.shape[0]})"


def _open_pillow(path: Path, role: str) -> PillowSource:
    from PIL import Image, UnidentifiedImageError  # deferred: Pillow costs ~25 ms at start-up

    Image.MAX_IMAGE_PIXELS = None  # thin sections are legitimately gigapixel
    try:
        image = Image.open(path)
    except UnidentifiedImageError:
        raise ThinSegError(f"{role} is not a readable image (PNG, JPEG or TIFF expected)", path) from None
    except OSError as error:
        raise ThinSegError(f"{role} cannot be read: {error}", path) from None
    with image:
        _check_pillow_mode(image, path, role)
        try:
            image.load()  # decodes everything: a truncated file fails here, not mid-run
        except (OSError, SyntaxError, ValueError) as error:
            raise ThinSegError(f"{role} is truncated or corrupt ({error})", path) from None
        # palette / YCbCr: lossless colour expansion
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        return PillowSource(path, _pillow_to_array(rgb))


def _check_pillow_mode(image: Any, path: Path, role: str) -> None:
    frames = getattr(image, "n_frames", 1)
    if frames > 1:
        raise ThinSegError(f"{role} has {frames} frames; a single RGB image is expected", path)
    mode = image.mode
    # the raw mode of each tile (codec, extents, offset, args): a plain tuple before Pillow 10.3
    raw_modes = [str(tile[3]) for tile in (image.tile or []) if len(tile) > 3]
    if mode == "I" and any(raw.startswith("I;16") for raw in raw_modes):
        mode = "I;16"  # Pillow before 10 opens 16-bit grayscale PNGs as 32-bit "I"
    if mode in _PIL_REFUSED:
        raise _refuse(path, role, _PIL_REFUSED[mode], _EIGHT_BIT if mode in _PIL_DEEP else "an RGB image")
    if mode == "P" and "transparency" in image.info:
        raise _refuse(path, role, "has a transparency channel (palette with alpha)")
    if mode not in ("RGB", "P", "YCbCr"):
        raise _refuse(path, role, f"has colour mode {mode}")
    if mode == "RGB" and any(";16" in raw for raw in raw_modes):
        # Pillow silently truncates 48-bit PNGs to 8 bits; refuse rather than guess the scaling.
        raise _refuse(path, role, "is 16-bit per channel (48-bit RGB)", _EIGHT_BIT)


def _pillow_to_array(image: Any, band_rows: int = 1024) -> npt.NDArray[np.uint8]:
    """Copy band by band: np.asarray(image) would go through one more full-size bytes object."""
    width, height = image.size
    out = np.empty((height, width, 3), np.uint8)
    for y0 in range(0, height, band_rows):
        y1 = min(height, y0 + band_rows)
        out[y0:y1] = np.asarray(image.crop((0, y0, width, y1)))
    return out


# ---------------------------------------------------------------------------------------------
# TIFF (tifffile)


class TiffSource:
    """A TIFF read by region: memory-mapped when uncompressed and contiguous, else tile/strip-wise.

    `axes` is the level-0 series' axis string (e.g. "YXS", "SYX", "CYX", "QYXS"); reads index
    singleton axes with 0 and put the colour axis last.
    """

    mm_per_pixel: float | None = None
    origin_mm: tuple[float, float, float] | None = None

    def __init__(
        self, path: Path, tiff: Any, series: Any, level: Any, axes: str, colormap: np.ndarray | None, role: str
    ) -> None:
        self.path = path
        self.name = path.stem
        self.role = role
        self._tiff = tiff
        self._axes = axes
        self._colormap = colormap
        self.shape = (int(level.shape[axes.index("Y")]), int(level.shape[axes.index("X")]))
        self._lock = threading.Lock()
        self._store: Any = None
        self._array: Any = _memmap_level(path, level)
        self.memory_mapped = self._array is not None
        self.decoded_whole = False
        if self._array is None:
            import zarr  # deferred: zarr costs ~0.2 s, paid only for compressed TIFFs

            self._store = series.aszarr(level=0)  # level 0 alone, also for pyramids
            self._array = zarr.open_array(self._store, mode="r")
            if int(np.prod(self._array.chunks)) > WHOLE_DECODE_SEGMENT_BYTES:
                self._decode_whole(level)

    def _decode_whole(self, level: Any) -> None:
        """A compressed TIFF stored as one huge strip would be decoded again for every band
        read; decode it once instead (the PNG/JPEG trade-off: memory = image size)."""
        try:
            array = level.asarray()
        except Exception as error:
            raise ThinSegError(f"{self.role} could not be decoded: {error}", self.path) from None
        self._store.close()
        self._store = None
        self._array = array
        self.decoded_whole = True

    def read(self, y0: int, y1: int, x0: int = 0, x1: int | None = None) -> npt.NDArray[np.uint8]:
        if self._array is None:
            raise ValueError(f"{self.path} is closed")
        y0, y1, x0, x1 = check_region(self.shape, y0, y1, x0, x1)
        index: list[Any] = []
        for axis in self._axes:
            index.append(
                slice(y0, y1) if axis == "Y" else slice(x0, x1) if axis == "X" else slice(None) if axis in "SC" else 0
            )
        try:
            with self._lock:
                region = np.asarray(self._array[tuple(index)])
        except Exception as error:  # decoder errors surface here for corrupt tiles
            raise ThinSegError(f"{self.role} could not be decoded at rows {y0}-{y1}: {error}", self.path) from None
        kept = [a for a in self._axes if a in "YXSC"]
        region = np.moveaxis(region, [kept.index("Y"), kept.index("X")], [0, 1])
        if self._colormap is not None:
            return np.ascontiguousarray(self._colormap[region])
        return np.array(region, dtype=np.uint8, order="C", copy=True)

    def close(self) -> None:
        self._array = None
        if self._store is not None:
            self._store.close()
            self._store = None
        if self._tiff is not None:
            self._tiff.close()
            self._tiff = None

    def __repr__(self) -> str:
        how = "memory-mapped" if self.memory_mapped else "decoded" if self.decoded_whole else "tiled/stripped"
        return f"TiffSource({str(self.path)!r}, {self.shape[1]}x{self.shape[0]}, {how})"


def _open_tiff(path: Path, role: str) -> TiffSource:
    import tifffile  # deferred: tifffile costs ~35 ms at start-up

    try:
        tiff = tifffile.TiffFile(path)
    except Exception as error:  # TiffFileError, struct.error, ValueError on garbage
        raise ThinSegError(f"{role} is not a readable TIFF (truncated or corrupt: {error})", path) from None
    try:
        series, level, axes, colormap = _tiff_level(tiff, path, role)
        _check_tiff_extents(level, path, role)
        return TiffSource(path, tiff, series, level, axes, colormap, role)
    except BaseException:
        tiff.close()
        raise


def _tiff_level(tiff: Any, path: Path, role: str) -> tuple[Any, Any, str, np.ndarray | None]:
    """The full-resolution image of the first series, checked to be one 8-bit RGB plane."""
    try:
        series = tiff.series
    except Exception as error:
        raise ThinSegError(f"{role} is not a readable TIFF ({error})", path) from None
    if not series:
        raise ThinSegError(f"{role} contains no image", path)
    level = series[0].levels[0] if series[0].levels else series[0]  # pyramids / OME: level 0
    axes, shape = level.axes, tuple(level.shape)
    if "Y" not in axes or "X" not in axes:
        raise ThinSegError(f"{role} has unsupported TIFF axes {axes}", path)
    extra = {a: n for a, n in zip(axes, shape) if a not in "YXSC" and n > 1}
    if extra:
        planes = int(np.prod(list(extra.values())))
        raise ThinSegError(f"{role} is a stack of {planes} images (axes {axes}); a single RGB image is expected", path)
    channel_axes = [a for a, n in zip(axes, shape) if a in "SC" and n > 1]
    channels = int(np.prod([shape[axes.index(a)] for a in channel_axes])) if channel_axes else 1
    page = level.keyframe
    photometric = int(getattr(page, "photometric", -1))
    colormap = None
    if channels == 1 and photometric == 3 and getattr(page, "colormap", None) is not None:  # PALETTE
        colormap = _palette_lut(np.asarray(page.colormap))
        channels = 3
    dtype = np.dtype(level.dtype)
    if dtype == np.bool_ or int(getattr(page, "bitspersample", 8)) == 1:
        raise _refuse(path, role, "is black-and-white (1 bit per pixel)")
    if dtype != np.uint8:
        raise _refuse(path, role, f"is {dtype.itemsize * 8}-bit ({dtype})", _EIGHT_BIT)
    if channels == 1:
        raise _refuse(path, role, "is grayscale (1 channel)")
    if channels != 3 or len(channel_axes) > 1:
        kind = {2: " (grayscale + alpha)", 4: " (CMYK)" if photometric == 5 else " (RGBA)"}.get(channels, "")
        raise _refuse(path, role, f"has {channels} channels{kind}")
    # "_" marks singleton axes that reads index with 0; Y, X and the colour axis are sliced.
    index_axes = "".join(a if (a in "YX" or (a in "SC" and n > 1)) else "_" for a, n in zip(axes, shape))
    return series[0], level, index_axes, colormap


def _palette_lut(colormap: np.ndarray) -> np.ndarray:
    """TIFF colormaps are (3, 2**bits) uint16; a (N, 3) uint8 lookup table."""
    lut = colormap.T
    if lut.dtype != np.uint8:
        lut = (lut.astype(np.uint32) >> 8).astype(np.uint8) if lut.max() > 255 else lut.astype(np.uint8)
    return np.ascontiguousarray(lut)


def _check_tiff_extents(level: Any, path: Path, role: str) -> None:
    """Truncated TIFFs keep their header; detect them by tiles/strips ending past the file."""
    size = os.path.getsize(path)
    for page in level.pages:
        if page is None:
            continue
        offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        counts = np.asarray(page.databytecounts, dtype=np.int64)
        if offsets.size == 0 or counts.sum() == 0:
            raise ThinSegError(f"{role} has no image data (empty or truncated TIFF)", path)
        ends = offsets + counts
        if int(ends.max()) > size:
            missing = int((ends > size).sum())
            raise ThinSegError(
                f"{role} is truncated: {missing} of {offsets.size} tiles/strips end past the end of the file "
                f"({size} bytes)",
                path,
            )


def _memmap_level(path: Path, level: Any) -> np.ndarray | None:
    """A read-only memory map of an uncompressed, contiguous level, else None."""
    offset = getattr(level, "dataoffset", None)
    page = level.keyframe
    if offset is None or int(getattr(page, "compression", 0)) != 1 or int(getattr(page, "fillorder", 1)) != 1:
        return None
    if np.dtype(level.dtype) != np.uint8:
        return None
    try:
        return np.memmap(path, dtype=np.uint8, mode="r", offset=int(offset), shape=tuple(level.shape))
    except (OSError, ValueError):
        return None
