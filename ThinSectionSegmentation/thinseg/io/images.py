"""Lazy, bounded-memory reading of PP/XP photographs (PNG, JPEG, TIFF).

Thin-section scans reach 20k x 30k pixels (1.8 GB as RGB). The inference engine reads them in
bands of rows, so a source only has to deliver `read(y0, y1, x0, x1)`:
- tiled or stripped TIFF (BigTIFF, any compression): only the tiles/strips that overlap the
  region are read and decoded (tifffile's zarr store);
- uncompressed contiguous TIFF: memory-mapped;
- PNG/JPEG: cannot be decoded partially, so they are decoded once (band by band, to keep the
  peak near the size of the result) and sliced.
Everything a user can get wrong (missing, truncated, grayscale, RGBA, 16-bit, stacks) is
refused at `open_image` with a one-line `ThinSegError`, not discovered mid-segmentation. So is a
file that declares more than it holds: its declared size is checked against the section bound
(`limits.check_section_size`) before anything is decoded, TIFF strips/tiles must lie inside the
file, and image data that ends before the last row is refused rather than padded with blank rows.
Every source shows the picture upright, as image viewers do: the EXIF/TIFF orientation tag is
applied (a quarter turn swaps height and width).
"""

from __future__ import annotations

import contextlib
import math
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable
from xml.etree import ElementTree

import numpy as np
import numpy.typing as npt

from thinseg import limits
from thinseg.errors import ThinSegError

#: Tiles/strips larger than this are not re-decoded per band (see TiffSource._decode_whole).
WHOLE_DECODE_SEGMENT_BYTES = 64 * 2**20
_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
_HDF5_MAGIC = b"\x89HDF\r\n\x1a\n"


@runtime_checkable
class RasterSource(Protocol):
    """An RGB image that can be read region by region.

    `path` is None for in-memory sources. `mm_per_pixel` and `origin_mm` (RAS, mm) are known
    for netCDF variables; of image files only OME-TIFFs record a trustworthy pixel size
    (`mm_per_pixel`: PhysicalSizeX/Y), the others none.
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


_PILLOW_LOCK = threading.Lock()


@contextlib.contextmanager
def _our_bound_only(image_module: Any) -> Iterator[None]:
    """Pillow's own decompression-bomb check off while we open and decode: `open_image` checks
    the declared size against the section bound itself, before decoding, in a message saying how
    to raise it, where Pillow would warn (by default at 89 Mpx) and refuse at twice that, with
    neither the bound nor the option. The setting is process-wide, hence restored afterwards:
    other Pillow readers in the process keep their own check."""
    with _PILLOW_LOCK:
        previous = image_module.MAX_IMAGE_PIXELS
        image_module.MAX_IMAGE_PIXELS = None
        try:
            yield
        finally:
            image_module.MAX_IMAGE_PIXELS = previous


@contextlib.contextmanager
def pillow_image(path: Path, role: str = "image", expected: str = "") -> Iterator[Any]:
    """`PIL.Image.open(path)` for every Pillow reader (PP/XP, label images, QEMSCAN maps): its
    declared size checked against the section bound before anything is decoded, and Pillow's
    own bomb check (which would refuse a legitimate 20k x 30k mask at 179 Mpx) off while the
    block decodes it. Unreadable files are one-line ThinSegErrors (`expected` says what would do)."""
    from PIL import Image, UnidentifiedImageError  # deferred: Pillow costs ~25 ms at start-up

    with _our_bound_only(Image):
        try:
            image = Image.open(path)  # reads the header only
        except UnidentifiedImageError:
            raise ThinSegError(" ".join(filter(None, (f"{role} is not a readable image", expected))), path) from None
        except OSError as error:
            raise ThinSegError(f"{role} cannot be read: {error}", path) from None
        with image:
            width, height = image.size
            limits.check_section_size(height, width, path)
            yield image


def check_tiff_page_size(page: Any, path: Path) -> None:
    """Refuse a TIFF page (tifffile) whose declared height x width (times its slices, for a
    volume) is above the section bound, before its data is read: the tags, not `page.shape`,
    whose first axis is the samples of a planar image."""
    depth = max(1, int(getattr(page, "imagedepth", 1) or 1))
    limits.check_section_size(int(page.imagelength) * depth, int(page.imagewidth), path)


def _open_pillow(path: Path, role: str) -> PillowSource:
    with pillow_image(path, role, "(PNG, JPEG or TIFF expected)") as image:
        _check_pillow_mode(image, path, role)
        if image.format == "PNG":
            _check_png_can_hold_its_rows(path, role)
        try:
            image.load()  # decodes everything: a truncated file fails here, not mid-run
        except (OSError, SyntaxError, ValueError, struct.error, zlib.error) as error:
            raise ThinSegError(f"{role} is truncated or corrupt ({error})", path) from None
        _check_rows_present(image, path, role)
        orientation = _pillow_orientation(image)
        # palette / YCbCr: lossless colour expansion
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        return PillowSource(path, _pillow_to_array(rgb, orientation))


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


def _pillow_to_array(image: Any, orientation: int = 1, band_rows: int = 1024) -> npt.NDArray[np.uint8]:
    """Copy band by band, upright: np.asarray(image) would go through one more full-size bytes
    object, and turning the whole result through one more array. Each band of displayed rows is
    cut from the stored image and turned by Pillow (what `ImageOps.exif_transpose` does)."""
    width, height = image.size
    swap = _ORIENTATIONS[orientation][0]
    shape = (width, height) if swap else (height, width)
    out = np.empty((*shape, 3), np.uint8)
    for y0 in range(0, shape[0], band_rows):
        y1 = min(shape[0], y0 + band_rows)
        r0, r1, c0, c1 = _stored_region(orientation, shape, y0, y1, 0, shape[1])
        band = image.crop((c0, r0, c1, r1))
        if orientation != 1:
            band = band.transpose(_PILLOW_TRANSPOSE[orientation])
        out[y0:y1] = np.asarray(band)
    return out


# ---------------------------------------------------------------------------------------------
# short image data

#: PNG colour type -> samples per pixel.
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}
#: Adam7 passes: (first column, first row, column step, row step).
_ADAM7 = ((0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2))
#: Deflate's largest ratio of inflated to compressed bytes (258-byte matches in about 2 bits).
_DEFLATE_MAX_RATIO = 1032
#: Bytes inflated at a time when counting a PNG's image data.
_INFLATE_STEP = 16 * 2**20


def _check_rows_present(image: Any, path: Path, role: str) -> None:
    """Refuse a PNG/JPEG whose image data ends before its last row.

    Pillow pads such an image without a word: a PNG whose compressed stream ends cleanly keeps
    blank rows, a JPEG cut short and closed with an end marker decodes the rest as mid-gray.
    Both leave the last row uniform, so only such images pay for the exact PNG count.
    """
    width, height = image.size
    if image.format == "PNG":
        last = np.asarray(image.crop((0, height - 1, width, height))).reshape(width, -1)
        if image.info.get("interlace") or bool((last == last[0]).all()):
            _refuse_short_png(path, role)
    elif image.format in ("JPEG", "MPO") and _jpeg_ends_blank(image):
        raise ThinSegError(
            f"{role} ends before its last rows: they decode as blank mid-gray, as the rows of a JPEG cut short"
            " do (truncated JPEG)",
            path,
        )


def _check_png_can_hold_its_rows(path: Path, role: str) -> None:
    """Before Pillow allocates the declared image: refuse a PNG whose compressed data could not
    inflate to its rows even at deflate's best ratio (a few kilobytes declaring gigapixels)."""
    with open(path, "rb") as f:
        f.read(8)
        header = f.read(8 + 13)
        if len(header) < 21 or header[4:8] != b"IHDR":
            return  # Pillow has just read this header: the file changed under us
        f.read(4)
        held = 0
        while True:
            head = f.read(8)
            if len(head) < 8:
                break
            length, kind = struct.unpack(">I4s", head)
            if kind == b"IEND":
                break
            held += length if kind == b"IDAT" else 0
            f.seek(length + 4, os.SEEK_CUR)
    if held * _DEFLATE_MAX_RATIO < _png_passes(header[8:21])[1]:
        _refuse_short_png(path, role)


def _refuse_short_png(path: Path, role: str) -> None:
    rows, declared = _png_rows_present(path)
    if rows < declared:
        raise ThinSegError(
            f"{role} ends after {rows} of {declared} rows: its image data stops short (truncated PNG)", path
        )


def _png_passes(header: bytes) -> tuple[list[tuple[int, int, int, int]], int]:
    """From IHDR's 13 bytes: each pass's (first row, row step, rows, bytes per row with its
    filter byte), one pass unless interlaced; and the bytes they inflate to in all."""
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    bits = depth * _PNG_CHANNELS.get(colour, 3)
    passes = []
    for x0, y0, dx, dy in _ADAM7 if interlace else ((0, 0, 1, 1),):
        columns = (width - x0 + dx - 1) // dx if width > x0 else 0
        rows = (height - y0 + dy - 1) // dy if height > y0 else 0
        if columns and rows:
            passes.append((y0, dy, rows, 1 + (columns * bits + 7) // 8))
    return passes, sum(rows * size for _, _, rows, size in passes)


def _png_rows_present(path: Path) -> tuple[int, int]:
    """(rows from the top that the PNG's compressed data completes, rows its header declares),
    counted by inflating its IDAT chunks a step at a time and discarding the output. For an
    interlaced image a row is complete when every pass covering it has reached it."""
    with open(path, "rb") as f:
        f.read(8)
        header = f.read(8 + 13)
        if len(header) < 21 or header[4:8] != b"IHDR":
            return 0, 1  # Pillow has just read this header: the file changed under us
        f.read(4)  # its CRC
        height = struct.unpack(">I", header[12:16])[0]
        passes, expected = _png_passes(header[8:21])
        left = _inflated_idat_bytes(f, expected)
    complete = height
    for y0, dy, rows, size in passes:
        present = min(rows, left // size)
        left -= present * size
        if present < rows:
            complete = min(complete, y0 + present * dy)
    return complete, height


def _inflated_idat_bytes(f: Any, wanted: int) -> int:
    """How many bytes the IDAT chunks from `f`'s position inflate to (stops once at `wanted`)."""
    inflater = zlib.decompressobj()
    total = 0
    while total < wanted and not inflater.eof:
        head = f.read(8)
        if len(head) < 8:
            break
        length, kind = struct.unpack(">I4s", head)
        if kind == b"IEND":
            break
        data = f.read(length)
        f.read(4)  # CRC
        if kind != b"IDAT":
            continue
        try:
            total += len(inflater.decompress(data, _INFLATE_STEP))
            while inflater.unconsumed_tail and total < wanted:
                total += len(inflater.decompress(inflater.unconsumed_tail, _INFLATE_STEP))
        except zlib.error:
            break
    return total


def _jpeg_ends_blank(image: Any) -> bool:
    """Whether the JPEG's last MCU decoded as exact mid-gray (128, 128, 128): what libjpeg fills
    every block with once the data stops early (all coefficients zero). The MCU's first row and
    column are left out where it has more, as smooth chroma upsampling blends them with the block
    before; a real photograph never has that block exactly neutral mid-gray."""
    width, height = image.size
    layers = getattr(image, "layer", None) or [("", 1, 1, 0)]
    mcu_w = 8 * max(int(layer[1]) for layer in layers)
    mcu_h = 8 * max(int(layer[2]) for layer in layers)
    x0 = (width - 1) // mcu_w * mcu_w
    y0 = (height - 1) // mcu_h * mcu_h
    x0 += 1 if width - x0 > 1 else 0
    y0 += 1 if height - y0 > 1 else 0
    corner = np.asarray(image.crop((x0, y0, width, height)))
    return bool(corner.size) and bool((corner == 128).all())


# ---------------------------------------------------------------------------------------------
# orientation

#: EXIF/TIFF orientation (tag 274) -> (swap axes, flip rows, flip columns): the displayed image
#: is the stored one transposed if `swap`, then flipped. Pillow's `ImageOps.exif_transpose`
#: does the same (2 mirror, 3 half turn, 4 flip, 5 transpose, 6 quarter turn clockwise,
#: 7 transverse, 8 quarter turn anticlockwise).
_ORIENTATIONS: dict[int, tuple[bool, bool, bool]] = {
    1: (False, False, False),
    2: (False, False, True),
    3: (False, True, True),
    4: (False, True, False),
    5: (True, False, False),
    6: (True, False, True),
    7: (True, True, True),
    8: (True, True, False),
}
_ORIENTATION_TAG = 274
#: The same as Pillow's `Image.Transpose` members (FLIP_LEFT_RIGHT 0, FLIP_TOP_BOTTOM 1,
#: ROTATE_90 2, ROTATE_180 3, ROTATE_270 4, TRANSPOSE 5, TRANSVERSE 6), as exif_transpose maps them.
_PILLOW_TRANSPOSE = {2: 0, 3: 3, 4: 1, 5: 5, 6: 4, 7: 6, 8: 2}


def _orientation_value(value: Any) -> int:
    """A tag value as an orientation; anything else is upright, as viewers take it."""
    try:
        number = int(value if not isinstance(value, (tuple, list)) else value[0])
    except (TypeError, ValueError, IndexError):
        return 1
    return number if number in _ORIENTATIONS else 1


def _pillow_orientation(image: Any) -> int:
    try:
        return _orientation_value(image.getexif().get(_ORIENTATION_TAG, 1))
    except Exception:  # a malformed EXIF block: viewers show such images as stored
        return 1


def _stored_region(
    orientation: int, shape: tuple[int, int], y0: int, y1: int, x0: int, x1: int
) -> tuple[int, int, int, int]:
    """The stored rows and columns that hold the displayed region [y0:y1, x0:x1] of an image
    displayed as `shape` (H, W)."""
    swap, flip_rows, flip_columns = _ORIENTATIONS[orientation]
    height, width = shape
    if flip_rows:
        y0, y1 = height - y1, height - y0
    if flip_columns:
        x0, x1 = width - x1, width - x0
    return (x0, x1, y0, y1) if swap else (y0, y1, x0, x1)


def _upright(region: np.ndarray, orientation: int) -> np.ndarray:
    """A stored region (rows, columns, colour) turned as displayed."""
    swap, flip_rows, flip_columns = _ORIENTATIONS[orientation]
    if swap:
        region = region.swapaxes(0, 1)
    if flip_rows:
        region = region[::-1]
    if flip_columns:
        region = region[:, ::-1]
    return region


# ---------------------------------------------------------------------------------------------
# TIFF (tifffile)


class TiffSource:
    """A TIFF read by region: memory-mapped when uncompressed and contiguous, else tile/strip-wise.

    `axes` is the level-0 series' axis string (e.g. "YXS", "SYX", "CYX", "QYXS"); reads index
    singleton axes with 0 and put the colour axis last. `orientation` is the TIFF Orientation
    tag: `shape` and reads are upright, each region read from the stored rows and columns that
    hold it (a quarter-turned strip-wise TIFF is decoded whole, as its displayed rows are stored
    columns spread over every strip).
    """

    mm_per_pixel: float | None = None
    origin_mm: tuple[float, float, float] | None = None

    def __init__(
        self,
        path: Path,
        tiff: Any,
        series: Any,
        level: Any,
        axes: str,
        colormap: np.ndarray | None,
        role: str,
        orientation: int = 1,
    ) -> None:
        self.path = path
        self.name = path.stem
        self.role = role
        self._tiff = tiff
        self._axes = axes
        self._colormap = colormap
        self.orientation = orientation
        stored = (int(level.shape[axes.index("Y")]), int(level.shape[axes.index("X")]))
        swap = _ORIENTATIONS[orientation][0]
        self.shape = (stored[1], stored[0]) if swap else stored
        self._lock = threading.Lock()
        self._store: Any = None
        self._array: Any = _memmap_level(path, level)
        self.memory_mapped = self._array is not None
        self.decoded_whole = False
        if self._array is None:
            import zarr  # deferred: zarr costs ~0.2 s, paid only for compressed TIFFs

            self._store = series.aszarr(level=0)  # level 0 alone, also for pyramids
            self._array = zarr.open_array(self._store, mode="r")
            strips_across = swap and not bool(getattr(level.keyframe, "is_tiled", False))
            if strips_across or int(np.prod(self._array.chunks)) > WHOLE_DECODE_SEGMENT_BYTES:
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
        r0, r1, c0, c1 = _stored_region(self.orientation, self.shape, y0, y1, x0, x1)
        index: list[Any] = []
        for axis in self._axes:
            index.append(
                slice(r0, r1) if axis == "Y" else slice(c0, c1) if axis == "X" else slice(None) if axis in "SC" else 0
            )
        try:
            with self._lock:
                region = np.asarray(self._array[tuple(index)])
        except Exception as error:  # decoder errors surface here for corrupt tiles
            raise ThinSegError(f"{self.role} could not be decoded at rows {y0}-{y1}: {error}", self.path) from None
        kept = [a for a in self._axes if a in "YXSC"]
        region = _upright(np.moveaxis(region, [kept.index("Y"), kept.index("X")], [0, 1]), self.orientation)
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
        height, width = int(level.shape[axes.index("Y")]), int(level.shape[axes.index("X")])
        limits.check_section_size(height, width, path)
        _check_tiff_extents(level, path, role)
        orientation = _orientation_value(_tag_value(level.keyframe, _ORIENTATION_TAG, 1))
        source = TiffSource(path, tiff, series, level, axes, colormap, role, orientation)
        source.mm_per_pixel = ome_mm_per_pixel(tiff)
        return source
    except BaseException:
        tiff.close()
        raise


#: OME length units -> millimetres (PhysicalSizeX/Y are in micrometres when no unit is given).
_OME_UNIT_MM = {"µm": 1e-3, "μm": 1e-3, "um": 1e-3, "nm": 1e-6, "mm": 1.0, "cm": 10.0, "m": 1000.0}


def ome_mm_per_pixel(tiff: Any) -> float | None:
    """The pixel size (mm) an OME-TIFF records for its first image: PhysicalSizeX/Y with their
    units, the geometric mean when they differ, the one given when only one is. None for other
    TIFFs and for sizes missing, unparsable or outside the sane range. The plain TIFF
    X/YResolution tags are not read: cameras write 72 dpi whatever the optics."""
    text = getattr(tiff, "ome_metadata", None)
    if not text:
        return None
    try:
        root = ElementTree.fromstring(text)
    except (ElementTree.ParseError, ValueError):
        return None
    pixels = next((e for e in root.iter() if str(e.tag).rsplit("}", 1)[-1] == "Pixels"), None)
    if pixels is None:
        return None
    sizes = []
    for axis in "XY":
        unit = pixels.get(f"PhysicalSize{axis}Unit", "µm")
        try:
            size = float(pixels.get(f"PhysicalSize{axis}", "")) * _OME_UNIT_MM[unit]
        except (ValueError, KeyError):
            continue
        if math.isfinite(size) and size > 0:
            sizes.append(size)
    if not sizes:
        return None
    mm = sizes[0] if len(sizes) == 1 else math.sqrt(sizes[0] * sizes[1])
    return mm if limits.MIN_MM_PER_PIXEL <= mm <= limits.MAX_MM_PER_PIXEL else None


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


def _tag_value(page: Any, code: int, default: Any) -> Any:
    tag = page.tags.get(code) if getattr(page, "tags", None) is not None else None
    return default if tag is None else tag.value


def _check_tiff_extents(level: Any, path: Path, role: str) -> None:
    """Refuse a TIFF that declares more than it holds: strips/tiles ending past the file (a
    truncated TIFF keeps its header), tiles larger than the section bound (one would be decoded
    whole), and uncompressed data shorter than the pixels it declares. Tiles sharing one offset
    are left alone: writers store identical empty tiles once, and the declared size is bounded."""
    size = os.path.getsize(path)
    for page in level.pages:
        if page is None:
            continue
        offsets = np.asarray(page.dataoffsets, dtype=np.int64)
        counts = np.asarray(page.databytecounts, dtype=np.int64)
        if offsets.size == 0 or counts.sum() == 0:
            raise ThinSegError(f"{role} has no image data (empty or truncated TIFF)", path)
        ends = offsets + counts
        if int(offsets.min()) < 0 or int(counts.min()) < 0 or int(ends.max()) > size:
            missing = int(((ends > size) | (offsets < 0) | (counts < 0)).sum())
            raise ThinSegError(
                f"{role} is truncated: {missing} of {offsets.size} tiles/strips end past the end of the file "
                f"({size} bytes)",
                path,
            )
        if bool(getattr(page, "is_tiled", False)):
            tile = int(page.tilelength) * int(page.tilewidth) * max(1, int(getattr(page, "tiledepth", 1) or 1))
            if tile > limits.max_section_pixels():
                raise ThinSegError(
                    f"{role} declares tiles of {int(page.tilewidth)} x {int(page.tilelength)} px, more than the"
                    f" {limits.max_section_pixels() / 1e6:,.0f} Mpx limit",
                    path,
                )
        if int(getattr(page, "compression", 1)) == 1:
            needed = int(page.imagelength) * int(page.imagewidth) * int(page.samplesperpixel)
            needed = needed * int(page.bitspersample) // 8
            held = int(counts.sum())
            if held < needed:
                raise ThinSegError(
                    f"{role} declares {int(page.imagewidth)} x {int(page.imagelength)} px uncompressed"
                    f" ({needed:,} bytes) but its strips/tiles hold only {held:,} bytes (truncated TIFF)",
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
