"""Read a QEMSCAN mineral map as labels 0..N plus its ClassTable.

Accepted: an RGB TIFF/PNG whose colours come from a mineral colour table, a paletted TIFF/PNG
(the palette gives each index its colour), a single-channel TIFF/PNG of label values 1..N with a
table, or a labelmap variable of a GeoSlicer netCDF file (its `labels` attribute is the table).
Without a table, GeoSlicer's default QEMSCAN colours name the minerals. A colour or value that
the table does not know is an error: guessing would silently mislabel training data.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from thinseg.classes.files import qemscan_palette, read_color_table
from thinseg.classes.table import ClassTable, MineralClass, hex_to_rgb, rgb_to_hex
from thinseg.errors import ThinSegError
from thinseg.io.images import check_tiff_page_size, pillow_image
from thinseg.io.netcdf import list_variables, read_labelmap
from thinseg.jsonio import loads

NETCDF_SUFFIXES = (".nc", ".h5", ".hdf5")

Labels = npt.NDArray[np.uint8]


@dataclass
class QemscanMap:
    """labels (h, w) uint8: k = k-th class of `table`, 0 = outside the sample / unclassified."""

    labels: Labels
    table: ClassTable
    mm_per_pixel: float | None = None
    path: Path | None = None


def default_qemscan_table() -> ClassTable:
    """GeoSlicer's QEMSCAN colours with English names."""
    return ClassTable(tuple(MineralClass(en, rgb_to_hex(rgb)) for _pt, en, rgb in qemscan_palette()))


def _pack(rgb: npt.NDArray[np.integer]) -> npt.NDArray[np.integer]:
    """(..., 3) colours -> (...) 0xRRGGBB integers, so a colour compares as one number."""
    wide = rgb.astype(np.uint32)
    packed: npt.NDArray[np.integer] = (wide[..., 0] << 16) | (wide[..., 1] << 8) | wide[..., 2]
    return packed


def labels_from_colors(
    rgb: npt.NDArray[np.integer],
    table: ClassTable,
    *,
    background: str | None = None,
    compact: bool = False,
    path: str | os.PathLike[str] | None = None,
) -> tuple[Labels, ClassTable]:
    """Label image from an RGB mineral map; every colour must be in `table` (or be `background`).

    compact: keep only the classes present (in table order), numbered 1..N.
    """
    packed = _pack(rgb)
    values, inverse = np.unique(packed, return_inverse=True)
    lookup = {int(_pack(np.array(c.rgb))): k for k, c in enumerate(table.classes, 1)}
    if background is not None:
        lookup[int(_pack(np.array(hex_to_rgb(background))))] = 0
    unknown = [v for v in values if int(v) not in lookup]
    if unknown:
        counts = np.bincount(inverse.ravel(), minlength=len(values))
        idx = {int(v): i for i, v in enumerate(values)}
        worst = sorted(unknown, key=lambda v: -counts[idx[int(v)]])[:3]
        listed = ", ".join(f"#{int(v):06x} ({counts[idx[int(v)]]} px)" for v in worst)
        raise ThinSegError(f"the QEMSCAN map has {len(unknown)} colour(s) not in its colour table, e.g. {listed}", path)
    per_value = np.array([lookup[int(v)] for v in values], dtype=np.uint8)
    labels: Labels = per_value[inverse].reshape(packed.shape)
    return _compact(labels, table) if compact else (labels, table)


def _compact(labels: Labels, table: ClassTable) -> tuple[Labels, ClassTable]:
    """Keep only the classes present, renumbered 1..N in table order."""
    present = [k for k in range(1, len(table) + 1) if np.any(labels == k)]
    remap = np.zeros(max(len(table) + 1, 256), dtype=np.uint8)
    for new, old in enumerate(present, 1):
        remap[old] = new
    compacted: Labels = remap[labels]
    return compacted, ClassTable(tuple(table.classes[k - 1] for k in present))


def check_label_values(
    labels: npt.NDArray[np.integer], table: ClassTable, path: str | os.PathLike[str] | None = None
) -> Labels:
    """`labels` as uint8, refused (one line) when a value is past the table's classes."""
    top = int(labels.max()) if labels.size else 0
    if labels.min() < 0 or top > len(table):
        raise ThinSegError(f"the QEMSCAN map has label value {top} but its table lists {len(table)} classes", path)
    return labels.astype(np.uint8)


def load_qemscan(
    path: str | os.PathLike[str],
    table: ClassTable | str | os.PathLike[str] | None = None,
    *,
    variable: str | None = None,
    background: str | None = None,
) -> QemscanMap:
    """Read a QEMSCAN map file (see module doc). `table`: a ClassTable or a colour table file
    (see `thinseg.classes.files.read_color_table`). `background`: a #rrggbb colour meaning "outside
    the sample" (label 0) in RGB/paletted maps."""
    path = Path(path)
    if not path.is_file():
        raise ThinSegError("no such QEMSCAN map file", path)
    if table is not None and not isinstance(table, ClassTable):
        table = read_color_table(table)
    if path.suffix.lower() in NETCDF_SUFFIXES:
        return _load_netcdf(path, variable, table)
    array, palette, own_table = _read_raster(path)
    table = table or own_table
    if array.ndim == 3:
        if array.shape[2] == 4:
            array = array[..., :3]
        labels, tab = labels_from_colors(
            array, table or default_qemscan_table(), background=background, compact=table is None, path=path
        )
        return QemscanMap(labels, tab, None, path)
    if palette is not None and table is not None and _palette_is_table(palette, table):
        return QemscanMap(check_label_values(array, table, path), table, None, path)
    if palette is not None:
        used = np.unique(array)
        if used.max() >= len(palette):
            raise ThinSegError("the QEMSCAN map uses palette entries its palette does not define", path)
        colours = np.zeros((int(used.max()) + 1, 3), dtype=np.uint8)
        colours[used] = palette[used]
        lut, tab = labels_from_colors(
            colours[used][None], table or default_qemscan_table(), background=background, compact=False, path=path
        )
        per_index = np.zeros(int(used.max()) + 1, dtype=np.uint8)
        per_index[used] = lut[0]
        labels = per_index[array]
        if table is None:
            labels, tab = _compact(labels, tab)
        return QemscanMap(labels, tab, None, path)
    if table is None:
        raise ThinSegError("a QEMSCAN map of label values needs a colour table naming its classes", path)
    return QemscanMap(check_label_values(array, table, path), table, None, path)


def _palette_is_table(palette: npt.NDArray[np.uint8], table: ClassTable) -> bool:
    """True when palette entries 1..N are the table's colours: indices are then label values
    (as in the maps this package writes), whatever colour entry 0 (outside) has."""
    n = len(table)
    return len(palette) > n and all(tuple(int(v) for v in palette[k]) == c.rgb for k, c in enumerate(table.classes, 1))


def _table_from_description(text: str | None) -> ClassTable | None:
    """The class table that `output` stores in a TIFF description (JSON {"classes": [...]})."""
    try:
        doc = loads(text or "")
        return ClassTable.from_geoslicer_labels([str(v) for v in doc["classes"]])
    except (ValueError, KeyError, TypeError):
        return None


def _read_raster(path: Path) -> tuple[npt.NDArray[np.integer], npt.NDArray[np.uint8] | None, ClassTable | None]:
    """(array, palette (n, 3) uint8 or None, embedded class table or None) of a TIFF/PNG."""
    suffix = path.suffix.lower()
    try:
        if suffix in (".tif", ".tiff"):
            import tifffile  # deferred: tifffile costs ~35 ms, paid only for TIFF maps

            with tifffile.TiffFile(path) as tif:
                page = tif.pages[0]
                check_tiff_page_size(page, path)
                array = page.asarray()
                palette = None
                if page.photometric == tifffile.PHOTOMETRIC.PALETTE and page.colormap is not None:
                    cmap = np.asarray(page.colormap)
                    palette = (cmap.T >> 8).astype(np.uint8) if cmap.max() > 255 else cmap.T.astype(np.uint8)
                own = _table_from_description(page.description)
            return np.asarray(array), palette, own
        with pillow_image(path, "QEMSCAN map") as image:
            if image.mode == "P":
                raw = image.getpalette() or []
                palette = np.array(raw, dtype=np.uint8).reshape(-1, 3)
                return np.asarray(image), palette, None
            if image.mode in ("RGB", "RGBA"):
                return np.asarray(image.convert("RGB")), None, None
            return np.asarray(image), None, None
    except ThinSegError:
        raise
    except Exception as error:  # unreadable or truncated file: a user problem, one line
        raise ThinSegError(f"cannot read the QEMSCAN map: {error}", path) from None


def _load_netcdf(path: Path, variable: str | None, table: ClassTable | None) -> QemscanMap:
    if variable is None:
        candidates = [v.name for v in list_variables(path) if v.kind in ("labelmap", "segmentation")]
        if len(candidates) != 1:
            listed = ", ".join(candidates) or "none"
            raise ThinSegError(f"name the QEMSCAN labelmap variable (labelmaps in the file: {listed})", path)
        variable = candidates[0]
    labels, own_table, spacing, _origin = read_labelmap(path, variable)
    table = table or own_table
    if len(table) == 0:
        raise ThinSegError(f"variable {variable!r} has no class table; give a colour table", path)
    return QemscanMap(check_label_values(labels, table, path), table, spacing, path)
