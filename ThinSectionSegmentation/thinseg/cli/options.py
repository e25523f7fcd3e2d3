"""Value types and ranges of the command-line options, shared by every sub-command.

Each type refuses a value at parsing, before any file is read or any folder made, so a bad
option costs nothing and leaves nothing behind: not-a-number, infinity, a negative count, a
tile no network can take, a batch that would fill the machine. argparse turns the refusal into
one `thinseg: error: argument --OPTION: ...` line (after the usage) and exit status 2.
Bounds that belong to the data (pixel sizes, section pixels, tile and pass sizes) come from
`thinseg.limits`, so the jobs the Slicer panel starts refuse the same values.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from collections.abc import Callable
from typing import NoReturn

from thinseg import limits
from thinseg.errors import ThinSegError

#: Widest band around class boundaries left out of scores or of the loss, in px: wider bands
#: leave nothing to score and cost a disk filter of that radius per pixel.
MAX_VOID_BORDER_PX = 64.0
#: Most sections given pictures or comparison sheets, epochs, batches per epoch, patience.
MAX_COUNT = 100_000
#: Largest batch of tiles or patches per forward pass (the pixels per pass are bounded too).
MAX_BATCH = 4096
#: Peak learning rate: above 1 every optimiser diverges.
MAX_LEARNING_RATE = 1.0
#: Time budget of one training run: a year, in minutes.
MAX_MINUTES = 525_600.0
#: Data-loading processes of one training run.
MAX_WORKERS = 256
#: U-Net levels a new model may have (each halves the resolution).
MAX_DEPTH = 10
#: numpy and torch seeds are unsigned 32-bit numbers.
MAX_SEED = 2**32 - 1

_HEX_COLOUR = re.compile(r"#?[0-9a-fA-F]{6}")


class CommandParser(argparse.ArgumentParser):
    """A sub-command's parser whose usage errors end in the one line every thinseg failure
    prints: `thinseg: error: <problem>`, exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        self.exit(2, f"thinseg: error: {message}\n")


def _number(text: str, kind: type[float] | type[int]) -> float:
    """`text` as a finite number; a whole number when `kind` is int."""
    try:
        value = float(text) if kind is float else int(text.strip())
    except ValueError:
        what = "a number" if kind is float else "a whole number"
        raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def int_range(low: int, high: int) -> Callable[[str], int]:
    """An argparse type: a whole number from `low` to `high`."""

    def parse(text: str) -> int:
        value = int(_number(text, int))
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"{text} is outside {low} to {high}")
        return value

    parse.__name__ = "whole number"
    return parse


def float_range(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Callable[[str], float]:
    """An argparse type: a finite number from `low` to `high` (ends excluded when open)."""
    left, right = "(" if low_open else "[", ")" if high_open else "]"

    def parse(text: str) -> float:
        value = _number(text, float)
        above = value > low if low_open else value >= low
        below = value < high if high_open else value <= high
        if not (above and below):
            raise argparse.ArgumentTypeError(f"{text} is outside {left}{low:g}, {high:g}{right}")
        return value

    parse.__name__ = "number"
    return parse


def mm_per_pixel(text: str) -> float:
    """An argparse type: a pixel size in mm within `limits`' sane range."""
    value = _number(text, float)
    try:
        return limits.check_mm_per_pixel(value)
    except ThinSegError as error:
        raise argparse.ArgumentTypeError(error.problem) from None


def max_pixels(text: str) -> int:
    """An argparse type: a positive whole number of pixels (`1e9` is accepted)."""
    try:
        return limits.parse_max_pixels(text, repr(text))
    except ThinSegError as error:
        raise argparse.ArgumentTypeError(error.problem) from None


def tile(text: str) -> int:
    """An argparse type: a tile side in px a network can take (its multiple is checked with the model)."""
    return int_range(limits.MIN_TILE, limits.MAX_TILE)(text)


def colour(text: str) -> str:
    """An argparse type: a `#rrggbb` colour, returned as lower-case `#rrggbb`."""
    if not _HEX_COLOUR.fullmatch(text.strip()):
        raise argparse.ArgumentTypeError(f"{text!r} is not a #rrggbb colour (six hexadecimal digits)")
    return "#" + text.strip().lstrip("#").lower()


#: Shared ranges, named for the options that use them.
fraction = float_range(0.0, 1.0, high_open=True)
unit = float_range(0.0, 1.0)
void_border_px = float_range(0.0, MAX_VOID_BORDER_PX)
count = int_range(0, MAX_COUNT)
positive_count = int_range(1, MAX_COUNT)
#: Epochs whose weights are averaged: each is a copy of the network held in memory.
MAX_AVERAGED_EPOCHS = 20
averaged_epochs = int_range(0, MAX_AVERAGED_EPOCHS)
ensemble_members = int_range(1, limits.MAX_ENSEMBLE_MEMBERS)
overlap = int_range(0, limits.MAX_TILE // 2)
batch_size = int_range(1, MAX_BATCH)
learning_rate = float_range(0.0, MAX_LEARNING_RATE, low_open=True)
minutes = float_range(0.0, MAX_MINUTES, low_open=True)
workers = int_range(0, MAX_WORKERS)
seed = int_range(0, MAX_SEED)
neck_ratio = float_range(0.05, 0.99)
min_grain_pixels = int_range(1, 1_000_000)
analysis_workers = int_range(1, 64)
tile_overlap = float_range(0.0, 0.9, high_open=True)
stage_error = float_range(0.0, 0.5, low_open=True)
columns = int_range(1, 100_000)


def default_workers() -> int:
    """Processes for work split into bands: the CPUs this process may use, at most 2 (more
    rarely pays off against the memory each needs)."""
    try:
        available = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        available = os.cpu_count() or 1
    return max(1, min(2, available))


channels = int_range(1, limits.MAX_NETWORK_CHANNELS)
depth = int_range(2, MAX_DEPTH)


def add_max_pixels(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """`--max-pixels N` (stored as args.max_pixels) for a command that reads sections."""
    parser.add_argument(
        "--max-pixels",
        type=max_pixels,
        default=None,
        metavar="N",
        help=f"raise (or lower) the bound on section size, in pixels (default {limits.DEFAULT_MAX_SECTION_PIXELS:,} "
        f"or ${limits.MAX_PIXELS_VARIABLE}; 1e9 is accepted): a bigger section costs about 3 bytes of memory per "
        "pixel for each image a command holds whole (PP, XP), plus its labels",
    )


#: --tta values, as thinseg.inference.tta.CHOICES (which imports torch: a usage error must not
#: wait for it); a test keeps the two equal.
TTA_CHOICES = ("auto", "none", "flips", "dihedral")


def pixels_or_off(text: str) -> int:
    """A whole number of pixels, 0 meaning off."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of pixels (0: off)")
    return value


def min_region(text: str) -> int | str:
    """--min-region: "auto" or a whole number of pixels (0: off)."""
    if text == "auto":
        return text
    try:
        return pixels_or_off(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number of pixels, 0 (off) or auto") from None


def add_min_region(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """`--min-region PX` (stored as args.min_region) for a command that runs a model over sections."""
    parser.add_argument(
        "--min-region",
        default="auto",
        type=min_region,
        metavar="PX",
        help="minimum-region sieve: connected regions of one class smaller than PX pixels (of the model's "
        "grid) take each pixel's runner-up class, removing specks no real grain is that small; 0: off; auto "
        "(default): what the model's meta.json recommends (min_region_px), else off",
    )


def add_tta(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """`--tta MODE` (stored as args.tta) for a command that runs a model over sections."""
    parser.add_argument(
        "--tta",
        default="auto",
        choices=TTA_CHOICES,
        help="test-time augmentation: average the class probabilities of the network over flipped (flips: 4 "
        "passes) or flipped and 90-degree-rotated (dihedral: 8 passes) copies of each tile, at 4x or 8x the "
        "network time; auto (default): what the model's meta.json recommends (test_time_augmentation), else none",
    )
