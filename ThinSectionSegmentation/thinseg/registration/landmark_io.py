"""Landmark pairs from files: a CSV of pixel coordinates, or Slicer markups (`.mrk.json`).

CSV: a header naming `qemscan_x, qemscan_y, image_x, image_y` (pixels, x = column, y = row,
from the centre of the first pixel; `moving_*`/`fixed_*` are accepted as synonyms) and an
optional `name` column. Markups: control-point positions in mm (LPS or RAS, as the file says),
converted to pixels with the grid spacing and origin (GeoSlicer thin sections: identity LPS
direction). Pairs are matched by order: the k-th image point goes with the k-th QEMSCAN point.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from thinseg.errors import ThinSegError
from thinseg.jsonio import read_json

#: Largest landmark file read (bytes): thousands of clicks fit in a few hundred kilobytes.
MAX_LANDMARK_FILE_BYTES = 10 * 1024 * 1024

_COLUMNS = {
    "qemscan_x": ("qemscan_x", "moving_x"),
    "qemscan_y": ("qemscan_y", "moving_y"),
    "image_x": ("image_x", "fixed_x", "pp_x"),
    "image_y": ("image_y", "fixed_y", "pp_y"),
}


@dataclass
class LandmarkPairs:
    qemscan_px: np.ndarray  # (n, 2)
    image_px: np.ndarray  # (n, 2)
    names: list[str] = field(default_factory=list)
    path: Path | None = None


def read_landmarks(
    path: str | os.PathLike[str],
    qemscan_path: str | os.PathLike[str] | None = None,
    *,
    image_mm_per_pixel: float = 1.0,
    qemscan_mm_per_pixel: float = 1.0,
    image_origin_mm: tuple[float, float] = (0.0, 0.0),
    qemscan_origin_mm: tuple[float, float] = (0.0, 0.0),
) -> LandmarkPairs:
    """Pairs from a CSV, from two `.mrk.json` files (image points, QEMSCAN points), or from one
    `.mrk.json` holding two point lists (the first on the image, the second on the QEMSCAN map).
    Spacings/origins (LPS mm) only matter for markups, whose positions are physical."""
    path = Path(path)
    _check_file(path)
    if path.suffix.lower() == ".csv":
        return _read_csv(path)
    if not path.name.lower().endswith(".json"):
        raise ThinSegError("landmarks must be a .csv or a Slicer markups .mrk.json file", path)
    lists = _read_markups(path)
    if qemscan_path is not None:
        qemscan_path = Path(qemscan_path)
        _check_file(qemscan_path)
        lists = lists[:1] + _read_markups(qemscan_path)[:1]
    if len(lists) != 2:
        raise ThinSegError(
            "a markups file must hold two point lists (image, then QEMSCAN), or give the QEMSCAN points "
            "in a second file",
            path,
        )
    (img_mm, names), (q_mm, _) = lists
    if len(img_mm) != len(q_mm):
        raise ThinSegError(f"{len(img_mm)} image points but {len(q_mm)} QEMSCAN points: they pair by order", path)
    image_px = (img_mm - np.asarray(image_origin_mm)) / image_mm_per_pixel
    qemscan_px = (q_mm - np.asarray(qemscan_origin_mm)) / qemscan_mm_per_pixel
    return LandmarkPairs(qemscan_px, image_px, names, path)


def _check_file(path: Path) -> None:
    """Refuse a landmark file that is missing, not a file, or too large to be clicks."""
    if not path.is_file():
        raise ThinSegError("no such landmark file", path)
    size = path.stat().st_size
    if size > MAX_LANDMARK_FILE_BYTES:
        raise ThinSegError(
            f"the landmark file holds {size:,} bytes, more than the {MAX_LANDMARK_FILE_BYTES:,} landmarks take", path
        )


def _read_csv(path: Path) -> LandmarkPairs:
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError) as error:
        raise ThinSegError(f"cannot read the landmark CSV: {error}", path) from None
    if not rows:
        raise ThinSegError("the landmark CSV has no rows", path)
    keys = {k.strip().lower(): k for k in rows[0] if k is not None}
    cols = {}
    for want, options in _COLUMNS.items():
        found = next((keys[o] for o in options if o in keys), None)
        if found is None:
            raise ThinSegError(f"the landmark CSV needs columns {', '.join(_COLUMNS)} (missing {want})", path)
        cols[want] = found
    try:
        data = np.array([[float(r[cols[c]]) for c in _COLUMNS] for r in rows], dtype=np.float64)
    except (TypeError, ValueError):
        raise ThinSegError("the landmark CSV has a value that is not a number", path) from None
    name_key = keys.get("name") or keys.get("label")
    names = [str(r[name_key]) for r in rows] if name_key else [str(i + 1) for i in range(len(rows))]
    return LandmarkPairs(data[:, 0:2], data[:, 2:4], names, path)


def _read_markups(path: Path) -> list[tuple[np.ndarray, list[str]]]:
    """Each point list of a markups file as ((n, 2) LPS mm, labels)."""
    try:
        doc = read_json(path, max_bytes=MAX_LANDMARK_FILE_BYTES)
        markups = doc["markups"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ThinSegError("not a Slicer markups file (no `markups` list)", path) from None
    out = []
    try:
        for m in markups:
            system = str(m.get("coordinateSystem", "LPS")).upper()
            points: list[tuple[float, float]] = []
            labels: list[str] = []
            for p in m.get("controlPoints", []):
                pos = p.get("position")
                if pos is None or len(pos) < 2:
                    continue
                x, y = float(pos[0]), float(pos[1])
                points.append((-x, -y) if system == "RAS" else (x, y))
                labels.append(str(p.get("label", len(labels) + 1)))
            out.append((np.array(points, dtype=np.float64).reshape(-1, 2), labels))
    except (AttributeError, TypeError, ValueError):
        raise ThinSegError(
            "a markups point list or control point is malformed (positions must be numbers)", path
        ) from None
    return out
