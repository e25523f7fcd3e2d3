"""Which files are the tiles of one section: PP/XP pairs told apart by affix, and their grid places.

A microscope writes one photograph per field and, with crossed polars, a second one of the same
field: `S1_r02_c03_PP.png` and `S1_r02_c03_XP.png`. The affixes are the ones `thinseg segment`
uses. A tile's place in the acquisition grid is read from its name when the name carries it
(`r02_c03`, `row2_col3`, Fiji's `x003_y002`), or from the order of the names with a column count
(`tile_017` in a raster or serpentine grid).
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from thinseg.errors import ThinSegError
from thinseg.io.pairing import IMAGE_SUFFIXES, check_affixes, find_affix

#: Name tokens that give a tile's grid place: row then column, or Fiji's x (column) then y (row).
_ROW_COL = re.compile(r"(?<![A-Za-z0-9])(?:r|row)[_-]?(\d+)[_-]?(?:c|col|column)[_-]?(\d+)(?![0-9])", re.IGNORECASE)
_X_Y = re.compile(r"(?<![A-Za-z0-9])x[_-]?(\d+)[_-]?y[_-]?(\d+)(?![0-9])", re.IGNORECASE)
_INDEX = re.compile(r"(\d+)(?!.*\d)")


@dataclass(frozen=True)
class Tile:
    """One field: its PP photograph, its XP photograph when there is one, and its name without affix."""

    name: str
    pp: Path
    xp: Path | None = None


def _cut_affix(stem: str, affix: str) -> str | None:
    match = find_affix(stem, affix)
    if match is None:
        return None
    return (stem[: match.start()].rstrip("_-. ") + "_" + stem[match.end() :].lstrip("_-. ")).strip("_")


def _image_files(inputs: Sequence[str | os.PathLike[str]]) -> list[Path]:
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            try:
                entries = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
            except OSError as error:
                raise ThinSegError.from_os_error(error, "cannot list the tile folder", path) from None
            if not entries:
                raise ThinSegError("holds no PNG/JPEG/TIFF tiles", path)
            files.extend(entries)
        elif path.is_file():
            if path.suffix.lower() not in IMAGE_SUFFIXES:
                raise ThinSegError("is not a PNG/JPEG/TIFF tile", path)
            files.append(path)
        else:
            raise ThinSegError("no such file or folder", path)
    return files


def collect_tiles(
    inputs: Sequence[str | os.PathLike[str]], pp_pattern: str = "PP", xp_pattern: str | None = "XP"
) -> list[Tile]:
    """The tiles named by files and folders, PP with XP paired by affix, in name order.

    Names with neither affix are PP tiles of a PP-only set when no name carries an affix; mixed
    with affixed names they are refused, as is a PP tile without its XP (and the reverse) once
    any XP tile is given: a panorama pair with holes in one of its images cannot be segmented.
    """
    check_affixes(pp_pattern, xp_pattern)
    files = _image_files(inputs)
    if not files:
        raise ThinSegError("no tiles given")
    pp: dict[str, Path] = {}
    xp: dict[str, Path] = {}
    plain: list[Path] = []
    for path in files:
        xp_name = _cut_affix(path.stem, xp_pattern) if xp_pattern else None
        pp_name = _cut_affix(path.stem, pp_pattern) if xp_name is None else None
        if xp_name is not None:
            _add(xp, xp_name, path)
        elif pp_name is not None:
            _add(pp, pp_name, path)
        else:
            plain.append(path)
    if plain and (pp or xp):
        raise ThinSegError(
            f"carries neither the PP affix ({pp_pattern}) nor the XP affix ({xp_pattern}) while other tiles do",
            plain[0],
        )
    if plain:
        return [Tile(p.stem, p) for p in plain]
    if xp:
        lonely_pp = sorted(set(pp) - set(xp))
        if lonely_pp:
            raise ThinSegError(f"PP tile without its XP tile ({len(lonely_pp)} in all)", pp[lonely_pp[0]])
        lonely_xp = sorted(set(xp) - set(pp))
        if lonely_xp:
            raise ThinSegError(f"XP tile without its PP tile ({len(lonely_xp)} in all)", xp[lonely_xp[0]])
    return [Tile(name, pp[name], xp.get(name)) for name in sorted(pp)]


def _add(found: dict[str, Path], name: str, path: Path) -> None:
    if name in found and found[name] != path:
        raise ThinSegError(f"is the same tile as {found[name].name} (one name without its affix)", path)
    found[name] = path


def grid_from_names(tiles: Sequence[Tile]) -> list[tuple[int, int]] | None:
    """(row, column) of every tile from `r<row>_c<col>` or `x<col>_y<row>` in its name, or None
    when not every name carries one (then the order of the names, or the images, must tell)."""
    places: list[tuple[int, int]] = []
    for tile in tiles:
        stem = tile.pp.stem
        row_col = _ROW_COL.findall(stem)
        x_y = _X_Y.findall(stem)
        if row_col:
            places.append((int(row_col[-1][0]), int(row_col[-1][1])))
        elif x_y:
            places.append((int(x_y[-1][1]), int(x_y[-1][0])))
        else:
            return None
    first_row, first_col = min(r for r, _ in places), min(c for _, c in places)
    places = [(r - first_row, c - first_col) for r, c in places]
    _check_unique(tiles, places)
    return places


def grid_from_order(tiles: Sequence[Tile], columns: int, serpentine: bool = False) -> list[tuple[int, int]]:
    """(row, column) of tiles numbered in acquisition order, `columns` to a row: by the last number
    in each name, row by row (`serpentine`: every second row right to left, as many stages move)."""
    if columns < 1:
        raise ThinSegError(f"--columns {columns}: must be at least 1")
    numbers: list[int] = []
    for tile in tiles:
        found = _INDEX.search(tile.pp.stem)
        if found is None:
            raise ThinSegError(
                "has no number in its name to place it in the grid (use --layout auto or a file)", tile.pp
            )
        numbers.append(int(found.group(1)))
    first = min(numbers)
    places = []
    for number in numbers:
        index = number - first
        row, col = divmod(index, columns)
        if serpentine and row % 2 == 1:
            col = columns - 1 - col
        places.append((row, col))
    _check_unique(tiles, places)
    return places


def _check_unique(tiles: Sequence[Tile], places: Sequence[tuple[int, int]]) -> None:
    seen: dict[tuple[int, int], Tile] = {}
    for tile, place in zip(tiles, places):
        if place in seen:
            raise ThinSegError(
                f"has the grid place (row {place[0]}, column {place[1]}) of {seen[place].pp.name} as well", tile.pp
            )
        seen[place] = tile


def common_name(tiles: Sequence[Tile]) -> str:
    """A name for the panorama: what the tile names share once their grid places and numbers are
    taken out ('S1_r00_c00' ... -> 'S1', 'tile_017' ... -> 'tile'), else 'panorama'."""
    stems = []
    for tile in tiles:
        stem = _X_Y.sub("", _ROW_COL.sub("", tile.name))
        stems.append(re.sub(r"[_\-. ]*\d*$", "", stem) if len(tiles) > 1 else stem)
    prefix = os.path.commonprefix(stems).strip("_-. ")  # noqa: RUF071 (names, not paths: by character)
    return prefix or "panorama"
