"""Streamed writing of RGB uint8 panoramas as tiled, pyramidal BigTIFF (OME-TIFF) files.

A stitched thin section reaches 30k x 20k pixels (1.8 GB as RGB), more than a process should
hold. `PyramidTiffWriter` takes it as bands of rows, top to bottom, and holds one tile-row of
full-resolution pixels: tifffile encodes it in a thread of its own while the caller makes its
next band.

Viewers (QuPath, Fiji/Bio-Formats, OpenSlide-style readers, GeoSlicer) open a panorama fast
only with reduced levels; they are stored as SubIFDs of the full image (SubFileType 1), each
half the size of the previous, until the longer side is at most `smallest_level`. Reduced levels
can only follow the full image in the file, so while it streams, its 2x2 means (level 1) are
appended to a raw temporary file beside the output, read back tile-row by tile-row at
`close()` while level 2's raw file is built the same way, and so on; the raw files are deleted.

The pixel size is written twice: as OME-XML PhysicalSizeX/Y (micrometres), which Bio-Formats
and `thinseg.io.images` read, and as X/YResolution in pixels per centimetre, which other
readers use.
"""

from __future__ import annotations

import contextlib
import math
import os
import queue
import threading
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import numpy as np
import numpy.typing as npt

from thinseg.errors import ThinSegError
from thinseg.io.atomic import temporary_name
from thinseg.limits import check_mm_per_pixel

#: Compression name -> (tifffile's name, its arguments): fast levels, as a panorama is written once
#: and read many times and deflate's best levels cost several times the time for a few percent.
COMPRESSIONS: dict[str, tuple[str | None, dict[str, int] | None]] = {
    "zlib": ("zlib", {"level": 1}),
    "zstd": ("zstd", {"level": 1}),
    "lzw": ("lzw", None),
    "none": (None, None),
}
#: Full-resolution tile-rows held at most. With 2 the caller fills one while tifffile encodes the
#: other (more overlap, one more tile-row of memory: 46 MB for a 30k-wide image at tile 512).
TILE_ROWS_HELD = 1
#: Rows of a band halved at a time: bounds the uint16 temporaries of the 2x2 means.
_HALVE_ROWS = 64
#: Seconds between checks that the level-0 writer thread still runs while waiting for it.
_POLL_S = 0.1


class _Aborted(Exception):
    """Raised inside the tile iterator to stop tifffile when the writer is aborted."""


def level_shapes(shape: tuple[int, int], smallest_level: int) -> list[tuple[int, int]]:
    """(H, W) of every level, full resolution first: each the ceiling of half the previous,
    until the longer side is at most `smallest_level`."""
    shapes = [shape]
    while max(shapes[-1]) > smallest_level:
        h, w = shapes[-1]
        shapes.append(((h + 1) // 2, (w + 1) // 2))
    return shapes


def halve(band: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """The 2x2 means of a (h, w, 3) uint8 band, rounded half up: (ceil(h/2), ceil(w/2), 3).
    An odd last row or column is averaged with itself (the mean of the pixels present)."""
    return np.concatenate(list(halved_parts(band)), axis=0)


def halved_parts(band: npt.NDArray[np.uint8]) -> Iterator[npt.NDArray[np.uint8]]:
    """`halve(band)` a few rows at a time, so that its temporaries stay small."""
    w = band.shape[1]
    for r0 in range(0, band.shape[0], _HALVE_ROWS):
        part = band[r0 : r0 + _HALVE_ROWS]
        rows = part.shape[0]
        pairs = part[0::2].astype(np.uint16)
        pairs[: rows // 2] += part[1::2]
        if rows % 2:
            pairs[-1] += part[-1]
        sums = np.ascontiguousarray(pairs[:, 0::2])
        sums[:, : w // 2] += pairs[:, 1::2]
        if w % 2:
            sums[:, -1] += pairs[:, -1]
        sums += 2
        sums >>= 2
        yield sums.astype(np.uint8)


class PyramidTiffWriter:
    """Writes an (H, W, 3) uint8 image given as bands of rows to a tiled pyramidal BigTIFF.

    Bands come top to bottom (`write_rows(y0, band)`, any heights); `close()` adds the reduced
    levels and returns the path. Memory stays near one tile-row of the full image
    (tile x W x 3 bytes) whatever its height. A failed write raises ThinSegError naming the
    file; `abort()` (also what leaving a `with` block by an exception does) removes the file and
    its raw temporaries. The file appears under `path` as it is written: give an
    `atomic.AtomicOutput` temporary for an all-or-nothing output, and the name the user will see
    as `shown_as` (errors name it; default `path`).
    """

    def __init__(
        self,
        path: Path | str,
        shape: tuple[int, int],
        *,
        mm_per_pixel: float | None = None,
        tile: int = 512,
        compression: str = "zlib",
        smallest_level: int = 1024,
        shown_as: Path | str | None = None,
    ) -> None:
        import tifffile  # deferred: tifffile costs ~35 ms at start-up, paid by commands that write TIFFs

        self.path = Path(path)
        self.shown_as = Path(shown_as) if shown_as is not None else self.path
        height, width = (int(n) for n in shape)
        if height < 1 or width < 1:
            raise ValueError(f"image shape must be positive, got {shape}")
        if tile < 16 or tile % 16:
            raise ValueError(f"tile must be a positive multiple of 16 (TIFF), got {tile}")
        if smallest_level < 1:
            raise ValueError(f"smallest_level must be positive, got {smallest_level}")
        if compression not in COMPRESSIONS:
            raise ValueError(f"compression must be one of {sorted(COMPRESSIONS)}, got {compression!r}")
        if mm_per_pixel is not None:
            mm_per_pixel = check_mm_per_pixel(mm_per_pixel, "pixel size", self.shown_as)
        self.shape = (height, width)
        self.tile = int(tile)
        self.mm_per_pixel = mm_per_pixel
        self.levels = level_shapes(self.shape, int(smallest_level))
        self._compression, self._compression_args = COMPRESSIONS[compression]
        self._rows_written = 0
        self._buffer: npt.NDArray[np.uint8] | None = None
        self._filled = 0
        self._bands: queue.Queue[npt.NDArray[np.uint8] | None] = queue.Queue()
        self._slots = threading.Semaphore(TILE_ROWS_HELD)
        self._failure: BaseException | None = None
        self._raw_paths: list[Path] = []
        self._done = False
        self._aborted = False
        try:
            self._tif: Any = tifffile.TiffWriter(self.path, bigtiff=True, ome=True)
        except OSError as error:
            raise self._write_error(error) from None
        self._thread = threading.Thread(target=self._write_level0, name="pyramid-tiff-level0", daemon=True)
        self._thread.start()

    # -- the caller's side -----------------------------------------------------------------

    def write_rows(self, y0: int, band: npt.NDArray[np.uint8]) -> None:
        """Append rows y0 .. y0 + len(band) (a (rows, W, 3) uint8 array; y0 = rows written so far)."""
        if self._done or self._aborted:
            raise ValueError(f"{self.path} is closed")
        height, width = self.shape
        if y0 != self._rows_written:
            raise ValueError(f"rows must come in order: expected y0={self._rows_written}, got {y0}")
        if band.ndim != 3 or band.shape[1:] != (width, 3) or band.dtype != np.uint8:
            raise ValueError(f"expected a uint8 (rows, {width}, 3) band, got {band.dtype} {band.shape}")
        if y0 + band.shape[0] > height:
            raise ValueError(f"rows {y0}..{y0 + band.shape[0]} run past the image height {height}")
        taken = 0
        while taken < band.shape[0]:
            if self._buffer is None:
                self._acquire_slot()
                start = self._rows_written
                self._buffer = np.empty((min(self.tile, height - start), width, 3), np.uint8)
                self._filled = 0
            n = min(self._buffer.shape[0] - self._filled, band.shape[0] - taken)
            self._buffer[self._filled : self._filled + n] = band[taken : taken + n]
            self._filled += n
            taken += n
            self._rows_written += n
            if self._filled == self._buffer.shape[0]:
                self._bands.put(self._buffer)
                self._buffer = None

    def close(self) -> Path:
        """Finish level 0, write the reduced levels, close the file; every row must be written."""
        if self._done:
            return self.path
        if self._aborted:
            raise ValueError(f"{self.path} was aborted")
        if self._rows_written != self.shape[0]:
            self.abort()
            raise ValueError(f"only {self._rows_written} of {self.shape[0]} rows were written to {self.path}")
        try:
            self._thread.join()
            self._raise_failure()
            with self._failures_named():
                for level in range(1, len(self.levels)):
                    self._write_reduced(level)
                self._tif.close()
        except BaseException:
            self.abort()
            raise
        self._done = True
        return self.path

    def abort(self) -> None:
        """Stop writing and remove the file and its raw temporaries (safe to call twice)."""
        if self._done or self._aborted:
            return
        self._aborted = True
        self._buffer = None
        self._bands.put(None)  # stops the level-0 tiles
        self._thread.join()
        with contextlib.suppress(Exception):
            self._tif.close()
        for path in [self.path, *self._raw_paths]:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)

    def __enter__(self) -> PyramidTiffWriter:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    # -- level 0: tifffile in a thread, fed tile-row by tile-row ---------------------------

    def _acquire_slot(self) -> None:
        """Wait until fewer than TILE_ROWS_HELD tile-rows are held; a failure of the writer
        thread (a full disk) is raised here, in the caller's thread."""
        while True:
            self._raise_failure()
            if self._slots.acquire(timeout=_POLL_S):
                return
            if not self._thread.is_alive():
                self._raise_failure()
                raise ThinSegError("the image writer stopped", self.shown_as)

    def _raise_failure(self) -> None:
        failure = self._failure
        if failure is None:
            return
        if isinstance(failure, OSError):
            raise self._write_error(failure) from failure
        raise failure

    def _write_error(self, error: OSError) -> ThinSegError:
        """One line naming the output, also when the system names a raw temporary beside it."""
        return ThinSegError(f"cannot write the image: {error.strerror or error}", self.shown_as)

    def _write_level0(self) -> None:
        try:
            raw = self._open_raw(1) if len(self.levels) > 1 else None
            try:
                self._tif.write(
                    self._level0_tiles(raw),
                    shape=(*self.shape, 3),
                    dtype=np.uint8,
                    subifds=len(self.levels) - 1,
                    metadata=self._ome_metadata(),
                    **self._options(0),
                )
            finally:
                if raw is not None:
                    raw.close()
        except _Aborted:
            pass
        except BaseException as error:  # reported to the caller's thread
            self._failure = error
        finally:
            for _ in range(TILE_ROWS_HELD):  # a caller waiting for a slot goes on and sees the failure
                self._slots.release()

    def _level0_tiles(self, raw: IO[bytes] | None) -> Iterator[npt.NDArray[np.uint8]]:
        for _ in range(math.ceil(self.shape[0] / self.tile)):
            band = self._bands.get()
            if band is None:
                raise _Aborted
            if raw is not None:
                for part in halved_parts(band):
                    part.tofile(raw)
            yield from self._tiles(band)
            del band
            self._slots.release()

    # -- reduced levels, from the raw files, after level 0 --------------------------------

    def _write_reduced(self, level: int) -> None:
        source = self._raw_paths[level - 1]
        target = self._open_raw(level + 1) if level + 1 < len(self.levels) else None
        try:
            with open(source, "rb") as raw:
                self._tif.write(
                    self._reduced_tiles(raw, self.levels[level], target),
                    shape=(*self.levels[level], 3),
                    dtype=np.uint8,
                    subfiletype=1,
                    metadata=None,
                    **self._options(level),
                )
        finally:
            if target is not None:
                target.close()
        os.unlink(source)

    def _reduced_tiles(
        self, raw: IO[bytes], shape: tuple[int, int], target: IO[bytes] | None
    ) -> Iterator[npt.NDArray[np.uint8]]:
        height, width = shape
        for y0 in range(0, height, self.tile):
            rows = min(self.tile, height - y0)
            band = np.fromfile(raw, np.uint8, rows * width * 3)
            if band.size != rows * width * 3:
                raise ThinSegError(f"temporary level file {raw.name} ends early", self.shown_as)
            band = band.reshape(rows, width, 3)
            if target is not None:
                for part in halved_parts(band):
                    part.tofile(target)
            yield from self._tiles(band)

    # -- shared ----------------------------------------------------------------------------

    def _tiles(self, band: npt.NDArray[np.uint8]) -> Iterator[npt.NDArray[np.uint8]]:
        """The tiles of one tile-row, left to right, each padded to full size with zeros (what
        tifffile does itself only for compressed tiles). Copies, not views: tifffile keeps the
        first tile it is given to the end of the level, which must not pin a whole tile-row (it
        copies views before encoding them anyway)."""
        t = self.tile
        for x0 in range(0, band.shape[1], t):
            tile = band[:, x0 : x0 + t]
            if tile.shape[:2] == (t, t):
                yield np.ascontiguousarray(tile)
            else:
                padded = np.zeros((t, t, 3), np.uint8)
                padded[: tile.shape[0], : tile.shape[1]] = tile
                yield padded

    def _open_raw(self, level: int) -> IO[bytes]:
        path = temporary_name(self.path.with_name(f"{self.path.name}.level{level}"))
        self._raw_paths.append(path)
        return open(path, "wb")

    def _options(self, level: int) -> dict[str, Any]:
        width = self.levels[level][1]
        tiles_across = math.ceil(width / self.tile)
        options: dict[str, Any] = {
            "photometric": "rgb",
            "planarconfig": "contig",
            "tile": (self.tile, self.tile),
            "compression": self._compression,
            "compressionargs": self._compression_args,
            # tifffile gathers this many bytes of tiles before encoding them in parallel: one tile-row
            "buffersize": tiles_across * self.tile * self.tile * 3,
            "software": "thinseg",
        }
        if self.mm_per_pixel is not None:
            per_cm = 10.0 / (self.mm_per_pixel * 2**level)
            options.update(resolution=(per_cm, per_cm), resolutionunit="CENTIMETER")
        return options

    def _ome_metadata(self) -> dict[str, Any]:
        metadata: dict[str, Any] = {"axes": "YXS"}
        if self.mm_per_pixel is not None:
            um = self.mm_per_pixel * 1000.0
            metadata.update(PhysicalSizeX=um, PhysicalSizeXUnit="µm", PhysicalSizeY=um, PhysicalSizeYUnit="µm")
        return metadata

    @contextlib.contextmanager
    def _failures_named(self) -> Iterator[None]:
        try:
            yield
        except OSError as error:
            raise self._write_error(error) from error
