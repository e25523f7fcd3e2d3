"""How a labelmap is cut into grains: settings and the role of each class.

Classes named like a matrix (matrix, background, cement, groundmass) are continuous phases,
not grains: they count in the modal mineralogy and the contacts, not in the grain table.
Classes named like pores (pore, porosity, void) are split into pore bodies like grains and give
the porosity and the pore-size distribution. Both can be named explicitly.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from thinseg.classes.table import ClassTable
from thinseg.errors import ThinSegError

MATRIX_PATTERN = re.compile(r"matri|background|cement|groundmass|fundo", re.IGNORECASE)
PORE_PATTERN = re.compile(r"pore|poro|void", re.IGNORECASE)


@dataclass(frozen=True)
class GrainOptions:
    """Settings of a grain analysis (pixels are the labelmap's)."""

    split: bool = True  # cut touching grains of one mineral by a distance-transform watershed
    neck_ratio: float = 0.7  # split where the neck's half-width < neck_ratio x the smaller grain's
    min_pixels: int = 12  # smaller grains count in the areas, not in the grain table
    matrix_classes: tuple[str, ...] | None = None  # None: by name (MATRIX_PATTERN)
    pore_classes: tuple[str, ...] | None = None  # None: by name (PORE_PATTERN)
    workers: int = 1  # processes analysing bands at once
    band_pixels: int = 0  # pixels of a band's own rows; 0: automatic (`scan.band_rows`)
    # a band's rows read, halo included (about 5 bytes each in a worker); grains reaching past it are flagged as cut
    max_read_pixels: int = 120_000_000
    resamples: int = 2000  # block bootstrap of the modal mineralogy
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.05 <= self.neck_ratio <= 0.99:
            raise ThinSegError(f"neck ratio {self.neck_ratio} is outside 0.05..0.99")
        if not 1 <= self.min_pixels <= 1_000_000:
            raise ThinSegError(f"minimum grain size {self.min_pixels} px is outside 1..1000000")
        if not 1 <= self.workers <= 64:
            raise ThinSegError(f"workers {self.workers} is outside 1..64")
        if self.band_pixels < 0:
            raise ThinSegError(f"band size {self.band_pixels} px is negative")


@dataclass(frozen=True)
class ClassRoles:
    """Label values (1-based) by role: grains (incl. pores), matrix, pores."""

    grains: tuple[int, ...]
    matrix: tuple[int, ...]
    pores: tuple[int, ...]


def _named(classes: ClassTable, names: Sequence[str], what: str) -> tuple[int, ...]:
    lowered = {n.lower(): i for i, n in enumerate(classes.names, 1)}
    out = []
    for name in names:
        if name.lower() == "none":
            continue
        if name.lower() not in lowered:
            raise ThinSegError(f"{what} class '{name}' is not one of {', '.join(classes.names)}")
        out.append(lowered[name.lower()])
    return tuple(out)


def class_roles(classes: ClassTable, options: GrainOptions) -> ClassRoles:
    """Which classes are grains, matrix and pores, by the options or else by name."""
    if options.matrix_classes is None:
        matrix = tuple(i for i, n in enumerate(classes.names, 1) if MATRIX_PATTERN.search(n))
    else:
        matrix = _named(classes, options.matrix_classes, "matrix")
    if options.pore_classes is None:
        pores = tuple(i for i, n in enumerate(classes.names, 1) if PORE_PATTERN.search(n) and i not in matrix)
    else:
        pores = _named(classes, options.pore_classes, "pore")
    grains = tuple(i for i in range(1, len(classes) + 1) if i not in matrix)
    return ClassRoles(grains, matrix, tuple(p for p in pores if p in grains))
