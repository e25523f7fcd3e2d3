"""Class and colour tables read from CSV files: the files people write and the bundled palette.

Every reader here takes its text from `read_table_text`, which reads the whole (small) file and
picks the delimiter: ',' or ';' (spreadsheets in comma-decimal locales write ';').

* `read_value_classes`: a class file naming the codes of a hand-drawn mask, header
  `value,name,color`::

      value,name,color
      0,Matrix,#8c6e5a
      1,K-feldspar,#f4a6c8
      255,ignore,

  Classes are numbered in the order of their first row (rows may send several values to one
  class); `ignore` (or an empty name) leaves a value unlabelled. A value that is in the image
  but not in the file is an error: a silently unlabelled mineral would bias training and scores.
  The result turns a mask into a labelmap with GeoSlicer's convention (label k = k-th class,
  0 = not classified).
* `read_class_csv`: a class table, one class per row in label order, `name,#rrggbb` or
  GeoSlicer's `name,index,#rrggbb` (header optional). `read_model_classes` takes either kind.
* `read_color_table`: a QEMSCAN colour table, GeoSlicer's `Mineral;R;G;B[;English]` or rows
  `name,r,g,b` / `name,#rrggbb`.
* `qemscan_palette` / `default_class_table`: GeoSlicer's QEMSCAN colours shipped with the
  package (`qemscan_colors.csv`) and the bundled model's six classes in those colours.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from thinseg.classes.table import ClassTable, MineralClass, hex_to_rgb, rgb_to_hex
from thinseg.errors import ThinSegError

#: GeoSlicer's default QEMSCAN mineral colours (`Mineral;R;G;B;English`), shipped with the package.
QEMSCAN_COLORS_FILE = Path(__file__).resolve().with_name("qemscan_colors.csv")

#: The six classes the bundled model predicts, in label order, with GeoSlicer's QEMSCAN colours.
DEFAULT_CLASS_NAMES = ("Calcite", "Dolomite", "Mg-Clay minerals", "Pores", "Quartz", "Others")

_IGNORE = {"", "ignore", "ignored", "none", "void"}


def read_table_text(path: str | os.PathLike[str], what: str) -> tuple[str, str]:
    """(text, delimiter) of a small CSV file; `what` names the file in the one-line error
    ("class file cannot be read: ..."). The delimiter is whichever of ';' and ',' occurs more
    often in the file (',' on a tie)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ThinSegError(f"{what} cannot be read: {exc.strerror or exc}", path) from None
    except UnicodeDecodeError:
        raise ThinSegError(f"{what} is not UTF-8 text", path) from None
    return text, (";" if text.count(";") > text.count(",") else ",")


# -- class files naming the codes of a mask ----------------------------------------------------


@dataclass(frozen=True)
class ValueClasses:
    """Code -> class: `table` (the classes, in file order) and `lut` (code -> label, 0 = none)."""

    table: ClassTable
    lut: npt.NDArray[np.uint8]  # (256,)
    listed: frozenset[int]
    path: Path | None = None

    def apply(self, codes: npt.ArrayLike, where: str | os.PathLike[str] | None = None) -> npt.NDArray[np.uint8]:
        """The labelmap of a code image; codes missing from the file are refused (one line)."""
        codes = np.asarray(codes)
        present = np.flatnonzero(np.bincount(codes.reshape(-1).astype(np.int64), minlength=256))
        missing = sorted({int(v) for v in present} - self.listed)
        if missing:
            shown = ", ".join(str(v) for v in missing[:8]) + (" ..." if len(missing) > 8 else "")
            raise ThinSegError(
                f"label values {shown} are not in the class file {self.path.name if self.path else ''}".rstrip(), where
            )
        labels: npt.NDArray[np.uint8] = self.lut[codes]
        return labels


def is_value_class_file(path: str | os.PathLike[str]) -> bool:
    """True when the CSV's header has a `value` column (else it is a `name,color` table)."""
    try:
        text, _delimiter = read_table_text(path, "class file")
        first = text.lstrip().splitlines()[0]
    except (ThinSegError, IndexError):
        return False
    return "value" in [c.strip().lower() for c in first.replace(";", ",").split(",")]


def read_value_classes(path: str | os.PathLike[str]) -> ValueClasses:
    """Parse a `value,name,color` class file (see module doc)."""
    path = Path(path)
    text, delimiter = read_table_text(path, "class file")
    reader = csv.DictReader(text.splitlines(), delimiter=delimiter)
    fields = {(f or "").strip().lower(): f for f in (reader.fieldnames or [])}
    if not {"value", "name"} <= set(fields):
        raise ThinSegError("class file needs a header with the columns value,name,color", path)
    lut = np.zeros(256, np.uint8)
    listed: set[int] = set()
    classes: list[MineralClass] = []
    index: dict[str, int] = {}
    for line, row in enumerate(reader, 2):
        raw_value = (row.get(fields["value"]) or "").strip()
        if not raw_value:
            continue
        try:
            value = int(raw_value)
        except ValueError:
            raise ThinSegError(f"line {line}: value {raw_value!r} is not an integer", path) from None
        if not 0 <= value <= 255:
            raise ThinSegError(f"line {line}: value {value} is outside 0..255", path)
        if value in listed:
            raise ThinSegError(f"line {line}: value {value} is listed twice", path)
        listed.add(value)
        name = (row.get(fields["name"]) or "").strip()
        if name.lower() in _IGNORE:
            continue
        key = name.lower()
        if key not in index:
            color = (row.get(fields["color"]) or "").strip().lower() if "color" in fields else ""
            if not (len(color) == 7 and color.startswith("#") and all(c in "0123456789abcdef" for c in color[1:])):
                raise ThinSegError(f"line {line}: class {name!r} needs a colour as #rrggbb, got {color!r}", path)
            classes.append(MineralClass(name, color))
            index[key] = len(classes)
        lut[value] = index[key]
    if not classes:
        raise ThinSegError("class file names no class", path)
    if len(classes) > 255:
        raise ThinSegError("class file names more than 255 classes", path)
    return ValueClasses(ClassTable(tuple(classes)), lut, frozenset(listed), path)


# -- class tables (one class per row) ----------------------------------------------------------


def read_class_csv(path: str | os.PathLike[str]) -> ClassTable:
    """`name,#rrggbb` or GeoSlicer `name,index,#rrggbb` per line (header optional)."""
    path = Path(path)
    text, delimiter = read_table_text(path, "class table")
    rows = [r for r in csv.reader(text.splitlines(), delimiter=delimiter) if r and any(c.strip() for c in r)]
    if rows and rows[0][0].strip().lower() == "name":
        rows = rows[1:]
    names, colors = [], []
    for row in rows:
        if len(row) < 2:
            raise ThinSegError(f"class table row {row!r} needs a name and a colour", path)
        names.append(row[0].strip())
        colors.append(row[-1].strip())
    try:
        return ClassTable.from_names_colors(names, colors)
    except ValueError as exc:
        raise ThinSegError(f"bad class table: {exc}", path) from None


def read_model_classes(path: str | os.PathLike[str]) -> ClassTable:
    """The classes a new model predicts, from a `value,name,color` class file or a
    `name,color` table (one class per row, in label order)."""
    if is_value_class_file(path):
        return read_value_classes(path).table
    path = Path(path)
    if not path.is_file():
        raise ThinSegError("class file not found", path)
    return read_class_csv(path)


# -- QEMSCAN colour tables ---------------------------------------------------------------------


def read_color_table(path: str | os.PathLike[str]) -> ClassTable:
    """A colour table file: GeoSlicer's `Mineral;R;G;B[;English]` CSV, or rows `name,r,g,b`
    or `name,#rrggbb` (optionally `name,index,#rrggbb`, the netCDF `labels` form). Blank lines
    and lines starting with '#' are skipped."""
    path = Path(path)
    text, delimiter = read_table_text(path, "the colour table")
    lines = [ln for ln in text.splitlines() if ln.strip() and not ln.lstrip().startswith("#")]
    if not lines:
        raise ThinSegError("the colour table is empty", path)
    rows = [[c.strip() for c in r] for r in csv.reader(lines, delimiter=delimiter)]
    header = [c.lower() for c in rows[0]]
    if {"r", "g", "b"} <= set(header):
        name_col = header.index("english") if "english" in header else 0
        try:
            classes = [
                MineralClass(r[name_col], rgb_to_hex([int(r[header.index(k)]) for k in "rgb"])) for r in rows[1:]
            ]
        except (ValueError, IndexError):
            raise ThinSegError("the colour table has a row that is not name;R;G;B", path) from None
    else:
        body = rows[1:] if header[-1] in ("color", "colour") else rows
        classes = []
        for r in body:
            try:
                if r[-1].startswith("#"):
                    classes.append(MineralClass(r[0], rgb_to_hex(hex_to_rgb(r[-1]))))
                else:
                    classes.append(MineralClass(r[0], rgb_to_hex([int(v) for v in r[-3:]])))
            except (ValueError, IndexError):
                raise ThinSegError(
                    f"the colour table row {','.join(r)!r} is not name,#rrggbb or name,r,g,b", path
                ) from None
    if not classes:
        raise ThinSegError("the colour table lists no classes", path)
    return ClassTable(tuple(classes))


def qemscan_palette() -> list[tuple[str, str, tuple[int, int, int]]]:
    """GeoSlicer's default QEMSCAN minerals: (Portuguese name, English name, rgb)."""
    text, delimiter = read_table_text(QEMSCAN_COLORS_FILE, "the QEMSCAN colour table")
    rows = list(csv.DictReader(text.splitlines(), delimiter=delimiter))
    return [(r["Mineral"], r["English"], (int(r["R"]), int(r["G"]), int(r["B"]))) for r in rows]


def default_class_table() -> ClassTable:
    """The bundled model's classes (`DEFAULT_CLASS_NAMES`) in GeoSlicer's QEMSCAN colours."""
    by_english = {}
    for _pt, en, rgb in qemscan_palette():
        by_english[en.split(" (")[0]] = rgb  # "Calcite (0-1% MgO)" -> "Calcite"
    return ClassTable(tuple(MineralClass(n, rgb_to_hex(by_english[n])) for n in DEFAULT_CLASS_NAMES))
