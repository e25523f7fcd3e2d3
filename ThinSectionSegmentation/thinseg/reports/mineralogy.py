"""Modal mineralogy: the area of each class per section, in % of the section and in mm^2.

Pixels the model left unclassified (label 0, or a value outside the class table) are a row of
their own, "not classified", so the rows of a section always sum to 100% of its pixels: the
classes never silently add up to 100% of less than the section. A section is the labelmap as
written (the padding a GeoSlicer "same coordinate system" export carries is cropped before
segmentation and is not part of it).

An output folder keeps ONE table, `modal_mineralogy.csv`, that each run updates
(`update_mineralogy_table`): one block of rows per section, a section written again replaces its
own block, the other sections' rows stay. A file under that name which this module did not write
(another format, an older table without "not classified" rows) is never changed without
overwrite: the table then lives under the first free or own numbered name.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from thinseg.classes.table import ClassTable
from thinseg.errors import ThinSegError
from thinseg.io.atomic import atomic_output
from thinseg.metrics.fractions import class_pixel_counts

#: The row of the pixels no class was given to (label 0).
UNCLASSIFIED = "not classified"


@dataclass(frozen=True)
class ClassArea:
    """One row of a section: its pixels, % of the section's pixels and area in mm^2."""

    name: str
    pixels: int
    percent: float  # of all the section's pixels, "not classified" included
    area_mm2: float


@dataclass(frozen=True)
class ModalMineralogy:
    """The class areas of one section at its pixel size, and the pixels left unclassified."""

    section: str
    mm_per_pixel: float
    areas: tuple[ClassArea, ...]  # one per class, in class order
    unclassified: ClassArea

    @property
    def rows(self) -> tuple[ClassArea, ...]:
        """Every row of the table: the classes, then "not classified" (sums to the section)."""
        return self.areas + (self.unclassified,)

    @property
    def classified_pixels(self) -> int:
        return sum(a.pixels for a in self.areas)

    @property
    def section_pixels(self) -> int:
        return self.classified_pixels + self.unclassified.pixels


def modal_mineralogy(section: str, labels: np.ndarray, table: ClassTable, mm_per_pixel: float) -> ModalMineralogy:
    """Area of each class of `table` in `labels` (label k = k-th class); every other value
    (0, or one the table lacks) counts as "not classified"."""
    return mineralogy_from_counts(
        section, class_pixel_counts(labels, len(table)), int(np.asarray(labels).size), table, mm_per_pixel
    )


def mineralogy_from_counts(
    section: str, counts: np.ndarray, total: int, table: ClassTable, mm_per_pixel: float
) -> ModalMineralogy:
    """`modal_mineralogy` from (len(table) + 1,) pixel counts of the values 0..N (summed over
    the bands of a section streamed row by row) and the section's pixel total."""
    unclassified = total - int(counts[1:].sum())
    pixel_area = mm_per_pixel * mm_per_pixel

    def row(name: str, pixels: int) -> ClassArea:
        return ClassArea(name, pixels, 100.0 * pixels / total if total else 0.0, float(pixels * pixel_area))

    areas = tuple(row(name, int(counts[k])) for k, name in enumerate(table.names, start=1))
    return ModalMineralogy(section, mm_per_pixel, areas, row(UNCLASSIFIED, unclassified))


CSV_FIELDS = ("section", "class", "pixels", "percent", "area_mm2")


def _csv_rows(result: ModalMineralogy) -> list[list[str]]:
    return [[result.section, a.name, str(a.pixels), f"{a.percent:.3f}", f"{a.area_mm2:.6f}"] for a in result.rows]


def _csv_text(rows: Sequence[Sequence[str]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(CSV_FIELDS)
    writer.writerows(rows)
    return buffer.getvalue()


def fractions_csv_text(results: Sequence[ModalMineralogy]) -> str:
    """Long format (one row per section and class, "not classified" last): easy to filter,
    pivot and plot."""
    return _csv_text([row for result in results for row in _csv_rows(result)])


def format_table(result: ModalMineralogy) -> str:
    """Fixed-width terminal table of one section's modal mineralogy, "not classified" included."""
    width = max(len("class"), *(len(a.name) for a in result.rows))
    lines = [f"{'class':<{width}}  {'%':>7}  {'mm^2':>10}  {'pixels':>12}"]
    lines.append("-" * len(lines[0]))
    for a in result.rows:
        lines.append(f"{a.name:<{width}}  {a.percent:7.2f}  {a.area_mm2:10.4f}  {a.pixels:12d}")
    return "\n".join(lines)


def write_mineralogy_csv(path: Path, results: Sequence[ModalMineralogy], *, overwrite: bool = False) -> Path:
    """Write `fractions_csv_text(results)` all or nothing; an existing file is kept and a free
    numbered name used instead unless `overwrite`. Returns the path written."""
    output = atomic_output(path, unique=not overwrite)  # the free name is taken at commit, atomically
    with output as tmp:
        tmp.write_text(fractions_csv_text(results), encoding="utf-8")
    return output.path


def read_mineralogy_table(path: Path) -> dict[str, list[list[str]]] | None:
    """The rows of a table written here, by section in file order; None when `path` holds
    something else (another format, an older table without "not classified" rows, a folder):
    such a file is not ours to rewrite. A file that cannot be read is a ThinSegError."""
    try:
        text = path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, IsADirectoryError):
        return None
    except FileNotFoundError:
        return None if path.is_symlink() else {}  # a dangling link occupies the name
    except OSError as error:
        raise ThinSegError.from_os_error(error, "cannot read the modal mineralogy table", path) from None
    try:
        records = list(csv.reader(io.StringIO(text)))
    except csv.Error:
        return None
    if not records or tuple(records[0]) != CSV_FIELDS:
        return None
    blocks: dict[str, list[list[str]]] = {}
    for record in records[1:]:
        if not record:
            continue
        if len(record) != len(CSV_FIELDS):
            return None
        blocks.setdefault(record[0], []).append(record)
    if any(not any(r[1] == UNCLASSIFIED for r in rows) for rows in blocks.values()):
        return None
    return blocks


def update_mineralogy_table(path: Path, results: Sequence[ModalMineralogy], *, overwrite: bool = False) -> Path:
    """Add `results` to the table at `path`: a section already there gets its rows replaced in
    place, new sections are appended, every other section's rows are kept. The file is rewritten
    under a temporary name and renamed, so a reader (or a crash) sees the old or the new table,
    never a mix. A file at `path` that is not such a table is replaced only with `overwrite`;
    otherwise the first numbered name (`stem_1.csv`, ...) that is free or holds such a table is
    used. Runs in parallel hold `thinseg.io.locks.file_lock(path)` around the update.
    Returns the path written."""
    target, n = Path(path), 0
    while True:
        blocks = read_mineralogy_table(target) if _taken(target) else {}
        if blocks is not None or overwrite:
            break
        n += 1
        target = path.with_name(f"{path.stem}_{n}{path.suffix}")
    merged = dict(blocks or {})
    for result in results:
        merged[result.section] = _csv_rows(result)
    with atomic_output(target) as tmp:
        tmp.write_text(_csv_text([row for rows in merged.values() for row in rows]), encoding="utf-8")
    return target


def _taken(path: Path) -> bool:
    return path.exists() or path.is_symlink()
