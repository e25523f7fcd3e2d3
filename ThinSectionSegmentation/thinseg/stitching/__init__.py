"""Microscope tiles -> PP and XP panoramas: which files are tiles (tiles.py), where they roughly lie
(layout.py), how far neighbours are apart (pairwise.py), all positions at once (solve.py), the
vignetting (flatfield.py), from files to positions (placement.py) and the streamed blend (compose.py)."""

from thinseg.stitching.compose import ArraySink, Cancelled, Composition, RowSink, SeamVisibility, compose
from thinseg.stitching.placement import PlacementOptions, TilePlan, plan_tiles, read_rgb
from thinseg.stitching.tiles import Tile, collect_tiles

__all__ = [
    "ArraySink",
    "Cancelled",
    "Composition",
    "PlacementOptions",
    "RowSink",
    "SeamVisibility",
    "Tile",
    "TilePlan",
    "collect_tiles",
    "compose",
    "plan_tiles",
    "read_rgb",
]
