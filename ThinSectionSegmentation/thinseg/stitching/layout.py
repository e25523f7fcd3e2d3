"""Where the tiles roughly lie before the images say exactly: a grid, or a tile-position file.

Fiji's Grid/Collection stitching (and MIST, BigStitcher's import) read and write tile positions
as a `TileConfiguration.txt`: `dim = 2`, then one `file; ; (x, y)` line per tile, x and y the
tile's top-left corner in pixels. The same format carries the positions found here
(`TileConfiguration.registered.txt`), so a panorama can be rebuilt, or opened in Fiji, from them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from thinseg.errors import ThinSegError
from thinseg.io.atomic import write_text_atomic
from thinseg.stitching.tiles import Tile

_LINE = re.compile(
    r"^\s*(?P<name>[^;]+?)\s*;\s*(?P<series>[^;]*?)\s*;\s*\(\s*(?P<x>[-+0-9.eE]+)\s*,\s*(?P<y>[-+0-9.eE]+)"
    r"(?:\s*,\s*[-+0-9.eE]+)?\s*\)\s*$"
)
_DIM = re.compile(r"^\s*dim\s*=\s*(\d+)\s*$", re.IGNORECASE)


def grid_positions(
    places: Sequence[tuple[int, int]], tile_shape: tuple[int, int], overlap: float
) -> npt.NDArray[np.float64]:
    """(y, x) top-left of every tile on a regular grid whose neighbours overlap by `overlap` of a tile."""
    if not 0.0 <= overlap < 0.9:
        raise ThinSegError(f"--overlap {overlap}: must be a fraction of a tile from 0 to 0.9")
    step = np.array(tile_shape, dtype=np.float64) * (1.0 - overlap)
    return np.array(places, dtype=np.float64).reshape(-1, 2) * step


def read_tile_configuration(path: str | os.PathLike[str], tiles: Sequence[Tile]) -> npt.NDArray[np.float64]:
    """(y, x) of every tile from a Fiji TileConfiguration file, matched by PP or XP file name (or stem).

    A tile the file does not list, a line that is not `name; ; (x, y)` and a 3-D file are refused
    in one line naming the file."""
    file = Path(path)
    try:
        text = file.read_text(encoding="utf-8", errors="replace")
    except OSError as error:
        raise ThinSegError.from_os_error(error, "cannot read the tile positions", file) from None
    found: dict[str, tuple[float, float]] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        dim = _DIM.match(stripped)
        if dim is not None:
            if dim.group(1) != "2":
                raise ThinSegError(f"line {number}: dim = {dim.group(1)}; only 2-D tile positions can be used", file)
            continue
        match = _LINE.match(stripped)
        if match is None:
            raise ThinSegError(f"line {number} is not 'file; ; (x, y)': {stripped[:80]!r}", file)
        name = Path(match.group("name").replace("\\", "/")).name
        found[name] = found[Path(name).stem] = (float(match.group("y")), float(match.group("x")))
    positions = np.zeros((len(tiles), 2))
    for k, tile in enumerate(tiles):
        keys = [tile.pp.name, tile.pp.stem, tile.name] + ([tile.xp.name, tile.xp.stem] if tile.xp else [])
        hit = next((found[key] for key in keys if key in found), None)
        if hit is None:
            raise ThinSegError(f"does not list tile {tile.pp.name}", file)
        positions[k] = hit
    return positions


def tile_configuration_text(tiles: Sequence[Tile], positions: npt.ArrayLike, *, registered: bool = True) -> str:
    """The Fiji TileConfiguration text of the PP tiles at (y, x) `positions`."""
    yx = np.asarray(positions, dtype=np.float64).reshape(-1, 2)
    head = "registered by thinseg stitch" if registered else "tile positions"
    lines = [f"# {head}: x, y = the tile's top-left corner in panorama pixels", "dim = 2"]
    lines += [f"{tile.pp.name}; ; ({x:.1f}, {y:.1f})" for tile, (y, x) in zip(tiles, yx)]
    return "\n".join(lines) + "\n"


def write_tile_configuration(path: str | os.PathLike[str], tiles: Sequence[Tile], positions: npt.ArrayLike) -> Path:
    return write_text_atomic(path, tile_configuration_text(tiles, positions))
