"""Class tables: names, label values 1..N and colours, shared by models, labelmaps and reports.

GeoSlicer numbers labels by position (k-th entry -> value k, 0 = not classified), so a
`ClassTable` is an ordered list and the label value is never stored separately.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class MineralClass:
    """One class: its name and its colour as "#rrggbb"."""

    name: str
    color: str  # "#rrggbb"

    @property
    def rgb(self) -> tuple[int, int, int]:
        """The colour as (r, g, b) 0..255."""
        return hex_to_rgb(self.color)


def hex_to_rgb(color: str) -> tuple[int, int, int]:
    """ "#rrggbb" -> (r, g, b); ValueError when it is not six hex digits."""
    c = color.lstrip("#")
    if len(c) != 6:
        raise ValueError(f"not a #rrggbb colour: {color!r}")
    return int(c[0:2], 16), int(c[2:4], 16), int(c[4:6], 16)


def rgb_to_hex(rgb: Sequence[int]) -> str:
    """(r, g, b[, a]) -> "#rrggbb" (lower case; alpha ignored)."""
    r, g, b = (int(v) for v in rgb[:3])
    return f"#{r:02x}{g:02x}{b:02x}"


@dataclass(frozen=True)
class ClassTable:
    """Ordered classes; class k (1-based) has label value k."""

    classes: tuple[MineralClass, ...]

    @classmethod
    def from_names_colors(cls, names: Iterable[str], colors: Iterable[str]) -> ClassTable:
        """Classes from parallel lists of names and colours (colours lower-cased)."""
        names, colors = list(names), list(colors)
        if len(names) != len(colors):
            raise ValueError(f"{len(names)} class names but {len(colors)} colours")
        return cls(tuple(MineralClass(n, c.lower()) for n, c in zip(names, colors)))

    @property
    def names(self) -> list[str]:
        """Class names in label order."""
        return [c.name for c in self.classes]

    @property
    def colors(self) -> list[str]:
        """Class colours ("#rrggbb") in label order."""
        return [c.color for c in self.classes]

    def __len__(self) -> int:
        return len(self.classes)

    def lut(self, background: tuple[int, int, int] = (0, 0, 0)) -> list[tuple[int, int, int]]:
        """RGB per label value, index 0 = background."""
        return [background] + [c.rgb for c in self.classes]

    def geoslicer_labels(self) -> list[str]:
        """The netCDF `labels` attribute: header then "name,index,#rrggbb" per class."""
        return ["Name,Index,Color"] + [f"{c.name},{i},{c.color}" for i, c in enumerate(self.classes, 1)]

    @classmethod
    def from_geoslicer_labels(cls, labels: Sequence[str]) -> ClassTable:
        """Parse a `labels` attribute; the Index field is ignored, as GeoSlicer does."""
        entries = list(labels)
        if entries and entries[0].replace(" ", "").lower() == "name,index,color":
            entries = entries[1:]
        out = []
        for entry in entries:
            name, _index, color = entry.rsplit(",", 2)
            out.append(MineralClass(name, color.strip().lower()))
        return cls(tuple(out))
