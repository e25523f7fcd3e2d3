"""Label maps in other vocabularies (QEMSCAN minerals) -> the model's classes.

Rules, per source class name (case and spacing ignored):
1. a row of the mapping table names it -> that target class (target "ignore" -> ignored);
2. it is a target class name (QEMSCAN's "Calcite (0-1% MgO)" counts as "Calcite") -> itself;
3. it means "no mineral known here" (Unknown, Background, Outside sample, ...) -> ignored;
4. any other mineral -> Others (if the model has such a class, else ignored).
Ignored pixels get label 0, which the loss never sees. The default table is GeoSlicer's QEMSCAN
palette shipped with the package (`thinseg.classes.files.qemscan_palette`), Portuguese and English
names, matched by English name.
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from thinseg.classes.files import qemscan_palette, read_table_text
from thinseg.classes.table import ClassTable
from thinseg.errors import ThinSegError

IGNORE = "ignore"
_IGNORE_TARGETS = {"", "ignore", "ignored", "none", "0", "void", "-"}
#: Names meaning "no mineral identified": these pixels carry no truth.
UNKNOWN_NAMES = {
    "unknown",
    "unclassified",
    "not classified",
    "no data",
    "nodata",
    "background",
    "outside",
    "outside sample",
    "out of sample",
    "none",
    "void",
    "empty",
    "resin",
    "mounting medium",
    "desconhecido",
    "nao classificado",
    "não classificado",
    "fundo",
    "fora da amostra",
    "vazio",
}
OTHERS = "others"


def normalize(name: str) -> str:
    return re.sub(r"\s+", " ", name.strip().lower())


def _base_name(name: str) -> str:
    """'Calcite (0-1% MgO)' -> 'calcite': QEMSCAN qualifies a mineral in brackets."""
    return normalize(re.sub(r"\s*\(.*\)\s*$", "", name))


def default_mapping(target: ClassTable) -> dict[str, str]:
    """QEMSCAN palette names (pt and en) -> target class name, or Others when unmatched."""
    targets = {normalize(n): n for n in target.names}
    others = targets.get(OTHERS)
    table: dict[str, str] = {}
    for pt, en, _rgb in qemscan_palette():
        hit = targets.get(normalize(en)) or targets.get(_base_name(en)) or targets.get(normalize(pt))
        dest = hit or others
        if dest is not None:
            table[normalize(pt)] = dest
            table[normalize(en)] = dest
    return table


def load_mapping_csv(path: str | os.PathLike[str]) -> dict[str, str]:
    """Rows `mineral,target class` (',' or ';', header optional) -> {normalized mineral: target}."""
    path = Path(path)
    text, delimiter = read_table_text(path, "mapping table")
    rows = [r for r in csv.reader(text.splitlines(), delimiter=delimiter) if r and any(c.strip() for c in r)]
    if rows and normalize(rows[0][0]) in ("mineral", "name", "source", "from"):
        rows = rows[1:]
    table = {}
    for row in rows:
        if len(row) < 2:
            raise ThinSegError(f"mapping row {delimiter.join(row)!r} needs 'mineral{delimiter}class'", path)
        table[normalize(row[0])] = row[1].strip()
    return table


@dataclass(frozen=True)
class ClassMapping:
    """A lookup table source label value -> target label value (0 = ignored)."""

    lut: npt.NDArray[np.uint8]  # (256,)
    assignments: tuple[tuple[str, str], ...]  # (source name, target name or "ignore"), for the record

    def apply(self, labels: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
        """`labels` in the target classes."""
        mapped: npt.NDArray[np.uint8] = self.lut[labels]
        return mapped

    @property
    def is_identity(self) -> bool:
        """True when every label keeps its value."""
        return bool(np.array_equal(self.lut, np.arange(256, dtype=np.uint8)))


def build_mapping(source: ClassTable, target: ClassTable, table: Mapping[str, str] | None = None) -> ClassMapping:
    """Mapping for a label map with classes `source`; `table` holds the user's name -> class rows."""
    targets = {normalize(n): i for i, n in enumerate(target.names, 1)}
    user = {normalize(k): v for k, v in (table or {}).items()}
    palette = default_mapping(target)
    lut = np.zeros(256, np.uint8)
    assignments = []
    for value, name in enumerate(source.names[:255], 1):
        dest = _resolve(normalize(name), user, palette, targets, target)
        lut[value] = dest
        assignments.append((name, target.names[dest - 1] if dest else IGNORE))
    return ClassMapping(lut, tuple(assignments))


def _resolve(
    name: str, user: Mapping[str, str], palette: Mapping[str, str], targets: Mapping[str, int], target: ClassTable
) -> int:
    """Target label for one source name, by the rules in the module docstring."""
    if name in user:
        dest = normalize(user[name])
        if dest in _IGNORE_TARGETS:
            return 0
        if dest not in targets:
            raise ThinSegError(
                f"mapping table sends {name!r} to {user[name]!r}, "
                f"which is not a model class ({', '.join(target.names)})"
            )
        return targets[dest]
    for candidate in (name, _base_name(name)):
        if candidate in targets:
            return targets[candidate]
    if name in UNKNOWN_NAMES or _base_name(name) in UNKNOWN_NAMES:
        return 0
    if name in palette:  # Portuguese QEMSCAN names ("Calcita (0% a 1%MgO)" -> Calcite)
        return targets[normalize(palette[name])]
    return targets.get(OTHERS, 0)


def mapping_for(section_table: ClassTable, target: ClassTable, csv_path: str | os.PathLike[str] | None) -> ClassMapping:
    """The mapping a run uses for one section: identity when the section already uses the
    model's classes in the same order, else by name with the CSV table (if any)."""
    table = load_mapping_csv(csv_path) if csv_path else None
    if section_table.names == target.names and not table:
        lut = np.zeros(256, np.uint8)
        lut[: len(target) + 1] = np.arange(len(target) + 1)
        return ClassMapping(lut, tuple((n, n) for n in target.names))
    return build_mapping(section_table, target, table)
