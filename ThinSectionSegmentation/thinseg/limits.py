"""The bounds every run stays within, checked before any large allocation.

A few kilobytes of file can declare gigapixels, and one odd spacing can ask for a resampling
hundreds of times over; both would exhaust the machine long before any real work fails. Every
reader, resampler and network builder checks its request here first and refuses it in one line
(`ThinSegError`) naming the file and the bound, with the option that raises it.

The section-size bound can be raised per run (`--max-pixels`, or `THINSEG_MAX_PIXELS` for every
run, e.g. on a machine with plenty of memory); the others are physical sanity ranges.
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator
from pathlib import Path

from thinseg.errors import ThinSegError

#: Largest section read by default, in pixels: a 30k x 40k scan, about 3.6 GB decoded as RGB.
DEFAULT_MAX_SECTION_PIXELS = 1_200_000_000
#: Environment variable that sets the section bound for every run (an integer, pixels).
MAX_PIXELS_VARIABLE = "THINSEG_MAX_PIXELS"
#: Largest per-axis factor between a section's pixel size and the model's, either way: a
#: 0.0013 mm/px scan meets models from 0.00016 to 0.0104 mm/px.
MAX_RESAMPLING_FACTOR = 8.0
#: Sane pixel sizes for a thin-section image or a QEMSCAN map, in mm/px (0.1 um to 1 mm).
MIN_MM_PER_PIXEL = 1e-4
MAX_MM_PER_PIXEL = 1.0
#: The same range as a model's `pixels_per_mm`.
MIN_PIXELS_PER_MM = 1.0 / MAX_MM_PER_PIXEL
MAX_PIXELS_PER_MM = 1.0 / MIN_MM_PER_PIXEL
#: Largest network a model bundle may describe: channels per layer and parameters in total.
MAX_NETWORK_CHANNELS = 4096
#: Most networks in one ensemble model: each is trained in turn and runs on every tile.
MAX_ENSEMBLE_MEMBERS = 8
MAX_NETWORK_PARAMETERS = 500_000_000

_override: list[int] = []


def max_section_pixels() -> int:
    """The section bound in force: a `section_pixel_limit` block, else $THINSEG_MAX_PIXELS, else
    the default."""
    if _override:
        return _override[-1]
    text = os.environ.get(MAX_PIXELS_VARIABLE, "").strip()
    if text:
        return parse_max_pixels(text, f"{MAX_PIXELS_VARIABLE}={text!r}")
    return DEFAULT_MAX_SECTION_PIXELS


#: The largest section bound anyone may ask for: a million gigapixels, beyond any memory (the
#: bound is the machine's to set).
MAX_PIXELS_BOUND = 10**15


def parse_max_pixels(value: object, source: str) -> int:
    """A section bound given as text or a number (`1e9` accepted): a finite whole number of
    pixels from 1 to MAX_PIXELS_BOUND, else one line naming `source` (the option, variable or
    file field it came from)."""
    try:
        number = float(value)  # type: ignore[arg-type]  # any text or number; others refused below
    except (TypeError, ValueError, OverflowError):
        raise ThinSegError(f"{source} is not a number of pixels") from None
    if isinstance(value, bool) or not math.isfinite(number) or number != int(number):
        raise ThinSegError(f"{source} is not a whole number of pixels")
    if not 1 <= number <= MAX_PIXELS_BOUND:
        raise ThinSegError(f"{source} is outside 1 to {MAX_PIXELS_BOUND:.0e} pixels")
    return int(number)


@contextlib.contextmanager
def section_pixel_limit(pixels: int | None) -> Iterator[None]:
    """Run a block with another section bound (None keeps the one in force)."""
    if pixels is None:
        yield
        return
    if pixels <= 0:
        raise ThinSegError(f"--max-pixels {pixels} must be a positive number of pixels")
    _override.append(int(pixels))
    try:
        yield
    finally:
        _override.pop()


def check_section_size(height: int, width: int, path: str | os.PathLike[str] | None = None) -> None:
    """Refuse a section whose declared size is empty or above the bound, before reading it."""
    if height <= 0 or width <= 0:
        raise ThinSegError(f"the image declares an empty size ({height} x {width} px)", path)
    bound = max_section_pixels()
    if height * width > bound:
        raise ThinSegError(
            f"the image declares {width} x {height} px ({_pixels(height * width)}), more than the"
            f" {_pixels(bound)} limit (raise it with --max-pixels or {MAX_PIXELS_VARIABLE} if the"
            " machine has the memory)",
            path,
        )


def _pixels(count: int) -> str:
    """A pixel count as people read it: 1,200 Mpx, 6.1 Mpx, 1,000 px."""
    if count >= 10_000_000:
        return f"{count / 1e6:,.0f} Mpx"
    if count >= 1_000_000:
        return f"{count / 1e6:.1f} Mpx"
    return f"{count:,} px"


def check_mm_per_pixel(value: float, what: str = "pixel size", path: str | os.PathLike[str] | None = None) -> float:
    """`value` as a float if it is a finite pixel size in the sane range, else a one-line refusal."""
    number = float(value)
    if not math.isfinite(number) or not MIN_MM_PER_PIXEL <= number <= MAX_MM_PER_PIXEL:
        raise ThinSegError(
            f"{what} {value!r} mm/px is outside the sane range {MIN_MM_PER_PIXEL:g} to {MAX_MM_PER_PIXEL:g} mm/px",
            path,
        )
    return number


def check_pixels_per_mm(value: float, path: str | os.PathLike[str] | None = None) -> float:
    """A model's `pixels_per_mm` as a float if finite and in the sane range, else a refusal."""
    number = float(value)
    if not math.isfinite(number) or not MIN_PIXELS_PER_MM <= number <= MAX_PIXELS_PER_MM:
        raise ThinSegError(
            f"pixels_per_mm {value!r} is outside the sane range {MIN_PIXELS_PER_MM:g} to {MAX_PIXELS_PER_MM:g}",
            path,
        )
    return number


def check_resampling(factor: float, path: str | os.PathLike[str] | None = None, what: str = "section") -> float:
    """Refuse resampling a `what` by `factor` per axis (new pixels per old pixel) beyond the bound
    either way: a spacing that far from the model's is a wrong spacing, not a scan to upsample."""
    number = float(factor)
    if not math.isfinite(number) or number <= 0:
        raise ThinSegError(f"cannot resample the {what} by a factor of {factor!r}", path)
    if not 1.0 / MAX_RESAMPLING_FACTOR <= number <= MAX_RESAMPLING_FACTOR:
        raise ThinSegError(
            f"the {what} would be resampled by a factor of {number:.3g} per axis, beyond the limit of"
            f" {MAX_RESAMPLING_FACTOR:g} either way: its pixel size is most likely wrong (check the file's"
            " spacing or give --mm-per-pixel)",
            path,
        )
    return number


def path_text(path: str | os.PathLike[str]) -> str:
    """A path as printable text, whatever bytes its name holds (undecodable bytes as \\xNN)."""
    raw = os.fsencode(Path(path))
    return raw.decode("utf-8", errors="backslashreplace")


#: Tile sides a run may ask for, in px: below 16 no U-Net level fits, and one 4096 px tile of the
#: bundled network already takes about 3 GB in a forward pass.
MIN_TILE = 16
MAX_TILE = 4096
#: Most tile (or training patch) pixels in one forward pass: 16 times the default pass.
MAX_PASS_PIXELS = 16 * 1024 * 1024


def check_tiling(tile: tuple[int, int], multiple: int, batch_size: int, what: str = "tile") -> None:
    """Refuse a tile the network cannot take (outside MIN_TILE..MAX_TILE, or not a multiple of
    its total stride `multiple`) or a batch whose pixels per forward pass exceed the bound."""
    for side in tile:
        if not MIN_TILE <= side <= MAX_TILE:
            raise ThinSegError(f"{what} {side} px is outside {MIN_TILE} to {MAX_TILE} px")
        if multiple > 1 and side % multiple:
            raise ThinSegError(f"{what} {side} px must be a multiple of {multiple} px for this model")
    if batch_size < 1 or batch_size * tile[0] * tile[1] > MAX_PASS_PIXELS:
        raise ThinSegError(
            f"a batch of {batch_size} x {tile[0]} x {tile[1]} px is more than the {MAX_PASS_PIXELS // 2**20} MPix a"
            " forward pass may take: give a smaller batch size or tile"
        )
