"""Hand-drawn masks and other label images whose pixel values are codes (0 = matrix, 1 = K-feldspar,
...): a class file names each code, gives it a colour, and so turns the mask into a labelmap
with GeoSlicer's convention (label k = k-th class, 0 = not classified).

The file is a CSV with a header naming the columns `value,name,color`:

    value,name,color
    0,Matrix,#8c6e5a
    1,K-feldspar,#f4a6c8
    255,ignore,

Classes are numbered in the order of their first row (rows may send several values to one
class); `ignore` (or an empty name) leaves a value unlabelled. A value that is in the image but
not in the file is an error: a silently unlabelled mineral would bias training and scores.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from thinseg.classes.table import ClassTable, MineralClass
from thinseg.errors import ThinSegError

_IGNORE = {"", "ignore", "ignored", "none", "void"}


@dataclass(frozen=True)
class ValueClasses:
    """Code -> class: `table` (the classes, in file order) and `lut` (code -> label, 0 = none)."""

    table: ClassTable
    lut: np.ndarray  # uint8 (256,)
    listed: frozenset[int]
    path: Path | None = None

    def apply(self, codes: np.ndarray, where: str | os.PathLike[str] | None = None) -> np.ndarray:
        """The labelmap of a code image; codes missing from the file are refused (one line)."""
        codes = np.asarray(codes)
        present = np.flatnonzero(np.bincount(codes.reshape(-1).astype(np.int64), minlength=256))
        missing = sorted(set(int(v) for v in present) - self.listed)
        if missing:
            shown = ", ".join(str(v) for v in missing[:8]) + (" ..." if len(missing) > 8 else "")
            raise ThinSegError(
                f"label values {shown} are not in the class file {self.path.name if self.path else ''}".rstrip(), where
            )
        return self.lut[codes]


def is_value_class_file(path: str | os.PathLike[str]) -> bool:
    """True when the CSV's header has a `value` column (else it is a `name,color` table)."""
    try:
        first = Path(path).read_text(encoding="utf-8-sig").lstrip().splitlines()[0]
    except (OSError, IndexError):
        return False
    return "value" in [c.strip().lower() for c in first.replace(";", ",").split(",")]


def read_value_classes(path: str | os.PathLike[str]) -> ValueClasses:
    """Parse a `value,name,color` class file (see module doc)."""
    from thinseg.classes.csvtext import read_table_text

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
            color = (row.get(fields.get("color", ""), "") or "").strip().lower() if "color" in fields else ""
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


def read_model_classes(path: str | os.PathLike[str]) -> ClassTable:
    """The classes a new model predicts, from a `value,name,color` class file or a
    `name,color` table (one class per row, in label order)."""
    if is_value_class_file(path):
        return read_value_classes(path).table
    from thinseg.data.sections import read_class_csv

    path = Path(path)
    if not path.is_file():
        raise ThinSegError("class file not found", path)
    return read_class_csv(path)
