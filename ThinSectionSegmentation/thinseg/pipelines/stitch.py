"""`thinseg stitch`: microscope tiles -> one PP and one XP panorama on the same pixels.

The output folder holds `<name>_PP.tif` and `<name>_XP.tif` (tiled, pyramidal BigTIFF that slide
viewers open, the pixel size in their OME metadata), `<name>.nc` (a GeoSlicer netCDF with both,
which `thinseg segment` takes as it is), `TileConfiguration.registered.txt` (the positions found,
in Fiji's format), `tiles.png` (the tile map) and `stitch.json` (positions, how sure, seam
visibility). The folder is made under a hidden temporary name and takes its name at the end:
whole or not at all, and an existing one is replaced only with `overwrite`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from thinseg import jsonio
from thinseg.data.section_images import DEFAULT_MM_PER_PIXEL
from thinseg.errors import ThinSegError, failures_named
from thinseg.io.atomic import atomic_directory, sweep_stale_temporaries
from thinseg.io.images import open_image
from thinseg.io.netcdf import NetcdfWriter, sanitize_name
from thinseg.io.pyramid_tiff import PyramidTiffWriter
from thinseg.limits import check_mm_per_pixel, check_section_size
from thinseg.reports.tile_map import tile_map_image
from thinseg.stitching.compose import Composition, RowSink, TileImages, compose
from thinseg.stitching.layout import tile_configuration_text
from thinseg.stitching.placement import PlacementOptions, TilePlan, plan_tiles, read_rgb
from thinseg.stitching.tiles import Tile, collect_tiles, common_name

#: Files of the output folder (PP/XP/netCDF names start with the panorama's name).
POSITIONS_TXT, TILE_MAP_PNG, STITCH_JSON = "TileConfiguration.registered.txt", "tiles.png", "stitch.json"
FORMATS = ("tiff", "netcdf")

ProgressFactory = Callable[[str, int], Callable[[int, int], None]]


@dataclass(frozen=True)
class StitchOptions:
    """What `thinseg stitch` was asked (paths as given). `mm_per_pixel` None: the tiles' own
    (OME-TIFF), else unknown (the netCDF then records the default pixel size, with a warning)."""

    inputs: Sequence[str | os.PathLike[str]]
    output: Path
    name: str | None = None
    pp_pattern: str = "PP"
    xp_pattern: str | None = "XP"
    placement: PlacementOptions = field(default_factory=PlacementOptions)
    mm_per_pixel: float | None = None
    formats: tuple[str, ...] = FORMATS
    overwrite: bool = False


@dataclass
class StitchResult:
    """The output folder, the files in it, where every tile went and how well the seams hide."""

    folder: Path
    name: str
    plan: TilePlan
    composition: Composition
    files: dict[str, Path]
    mm_per_pixel: float | None
    summary: dict[str, Any]

    @property
    def warnings(self) -> list[str]:
        return list(self.summary["warnings"])


def _pixel_size(tiles: Sequence[Tile], given: float | None) -> float | None:
    if given is not None:
        return check_mm_per_pixel(given, "--pixel-size")
    source = open_image(tiles[0].pp, role="PP tile")
    try:
        return source.mm_per_pixel
    finally:
        source.close()


def _reader(plan: TilePlan) -> Callable[[int], TileImages]:
    def read(k: int) -> TileImages:
        tile = plan.tiles[k]
        pp = read_rgb(tile.pp, "PP tile", plan.tile_shape)
        xp = read_rgb(tile.xp, "XP tile", plan.tile_shape) if tile.xp is not None else None
        return pp, xp

    return read


def _ramp(plan: TilePlan) -> tuple[int, int]:
    """Feather over the overlaps the positions give (the median neighbour overlap per axis)."""
    h, w = plan.tile_shape
    rows, cols = [], []
    for pair in plan.placement.used:
        dy, dx = np.abs(plan.positions[pair.j] - plan.positions[pair.i])
        if dy < h / 2 and dx < w:
            cols.append(w - dx)
        if dx < w / 2 and dy < h:
            rows.append(h - dy)
    default = (max(8, h // 10), max(8, w // 10))
    return (
        int(np.median(rows)) if rows else default[0],
        int(np.median(cols)) if cols else default[1],
    )


def stitch_tiles(
    options: StitchOptions,
    *,
    progress: ProgressFactory | None = None,
    cancel: Callable[[], bool] | None = None,
) -> StitchResult:
    """Find the tiles' positions, build the panoramas, write the output folder (module docstring)."""
    formats = tuple(options.formats)
    unknown = [f for f in formats if f not in FORMATS]
    if unknown or not formats:
        raise ThinSegError(f"--format {','.join(formats)}: choose from {', '.join(FORMATS)}")
    tiles = collect_tiles(options.inputs, options.pp_pattern, options.xp_pattern)
    name = sanitize_name(options.name or common_name(tiles))
    folder = Path(options.output)
    if folder.exists() and not options.overwrite:
        raise ThinSegError("the output folder exists: pass --overwrite to replace it", folder)
    mm_per_pixel = _pixel_size(tiles, options.mm_per_pixel)
    started = time.perf_counter()
    bar = progress(f"{name}: positions", 0) if progress else None
    plan = plan_tiles(tiles, options.placement, bar, cancel)
    placed = time.perf_counter()
    height, width = plan.panorama_shape
    check_section_size(height, width, folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temporaries(folder.parent)
    files: dict[str, Path] = {}
    warnings = list(plan.warnings)
    if mm_per_pixel is None and "netcdf" in formats:
        warnings.append(f"no pixel size given (--pixel-size): the netCDF records {DEFAULT_MM_PER_PIXEL} mm")
    with_xp = any(t.xp is not None for t in tiles)
    try:
        with atomic_directory(folder, overwrite=options.overwrite) as tmp, ExitStack() as stack:
            pp_sinks: list[RowSink] = []
            xp_sinks: list[RowSink] = []
            if "tiff" in formats:
                files["pp_tiff"] = folder / f"{name}_PP.tif"
                pp_sinks.append(
                    stack.enter_context(
                        PyramidTiffWriter(tmp / files["pp_tiff"].name, (height, width), mm_per_pixel=mm_per_pixel)
                    )
                )
                if with_xp:
                    files["xp_tiff"] = folder / f"{name}_XP.tif"
                    xp_sinks.append(
                        stack.enter_context(
                            PyramidTiffWriter(
                                tmp / files["xp_tiff"].name,
                                (height, width),
                                mm_per_pixel=mm_per_pixel,
                                shown_as=files["xp_tiff"],
                            )
                        )
                    )
            if "netcdf" in formats:
                files["netcdf"] = folder / f"{name}.nc"
                writer = stack.enter_context(
                    NetcdfWriter(
                        tmp / files["netcdf"].name, shown_as=files["netcdf"], attrs={"source": "thinseg stitch"}
                    )
                )
                spacing = mm_per_pixel or DEFAULT_MM_PER_PIXEL
                pp_sinks.append(writer.begin_rgb_image(f"{name}_PP", (height, width), spacing))
                if with_xp:
                    xp_sinks.append(writer.begin_rgb_image(f"{name}_XP", (height, width), spacing))
            used = np.flatnonzero(plan.used)
            read = _reader(plan)
            blend_bar = progress(f"{name}: blending", height * width) if progress else None
            composition = compose(
                plan.positions[used],
                plan.tile_shape,
                lambda k: read(int(used[k])),
                pp_sinks,
                xp_sinks,
                flat_pp=plan.flat_pp,
                flat_xp=plan.flat_xp,
                ramp=_ramp(plan),
                progress=blend_bar,
                cancel=cancel,
            )
            composed = time.perf_counter()
            labels = [str(k + 1) for k in range(len(tiles))]
            picture = tile_map_image(
                composition.overview,
                composition.overview_factor,
                plan.positions[used],
                plan.tile_shape,
                [bool(plan.placement.linked[k]) for k in used],
                [labels[k] for k in used],
            )
            _write_png(tmp / TILE_MAP_PNG, picture)
            files["tile_map"] = folder / TILE_MAP_PNG
            (tmp / POSITIONS_TXT).write_text(
                tile_configuration_text([tiles[k] for k in used], plan.positions[used]), encoding="utf-8"
            )
            files["positions"] = folder / POSITIONS_TXT
            files["summary"] = folder / STITCH_JSON
            summary = _summary(name, plan, composition, mm_per_pixel, files, warnings, labels)
            summary["seconds"] = {"positions": placed - started, "blending": composed - placed}
            jsonio.write_json(tmp / STITCH_JSON, summary)
    except FileExistsError:
        raise ThinSegError("the output folder exists: pass --overwrite to replace it", folder) from None
    return StitchResult(folder, name, plan, composition, files, mm_per_pixel, summary)


def _write_png(path: Path, image: npt.NDArray[np.uint8]) -> None:
    from PIL import Image  # deferred: Pillow is needed only when a picture is written

    Image.fromarray(image).save(path)


def _summary(
    name: str,
    plan: TilePlan,
    composition: Composition,
    mm_per_pixel: float | None,
    files: dict[str, Path],
    warnings: list[str],
    labels: Sequence[str],
) -> dict[str, Any]:
    residuals = plan.placement.residuals
    tiles = []
    for k, tile in enumerate(plan.tiles):
        entry: dict[str, Any] = {"number": labels[k], "name": tile.name, "pp": str(tile.pp)}
        entry["xp"] = str(tile.xp) if tile.xp is not None else None
        entry["used"] = bool(plan.used[k])
        entry["linked"] = bool(plan.placement.linked[k])
        entry["y"], entry["x"] = (int(v) for v in plan.positions[k]) if plan.used[k] else (None, None)
        tiles.append(entry)
    return {
        "name": name,
        "shape": list(plan.panorama_shape),
        "tile_shape": list(plan.tile_shape),
        "mm_per_pixel": mm_per_pixel,
        "layout": plan.layout,
        "tiles_used": int(plan.used.sum()),
        "tiles_linked": int(plan.placement.linked.sum()),
        "pairs": {
            "used": len(plan.placement.used),
            "set_aside": len(plan.placement.rejected),
            "residual_px_median": float(np.median(residuals)) if residuals.size else None,
            "residual_px_max": float(residuals.max()) if residuals.size else None,
        },
        "flat_field": {
            "pp_strength": plan.flat_pp.strength if plan.flat_pp else None,
            "xp_strength": plan.flat_xp.strength if plan.flat_xp else None,
        },
        "seams": {
            "ratio": composition.seams.ratio,
            "seam_energy": composition.seams.seam_energy,
            "inside_energy": composition.seams.inside_energy,
            "samples": composition.seams.seam_samples,
        },
        "covered_fraction": composition.covered_fraction,
        "warnings": warnings,
        "files": {key: path.name for key, path in files.items()},
        "tiles": tiles,
    }


def stitch_section(options: StitchOptions, **kwargs: Any) -> StitchResult:
    """`stitch_tiles` with any failure as one line naming the output folder."""
    with failures_named(options.output):
        return stitch_tiles(options, **kwargs)
