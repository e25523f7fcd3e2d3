"""`thinseg stitch`: overlapping microscope tiles -> one PP and one XP panorama on the same pixels."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from thinseg.cli import options as types
from thinseg.cli.progress import TileProgress


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "stitch",
        help="stitch overlapping microscope tiles into PP and XP panoramas (pyramidal BigTIFF, GeoSlicer netCDF)",
        description="Find where the tiles lie (phase correlation of neighbouring overlaps, then one least-squares "
        "fit of all positions), even out the vignetting, feather the overlaps and write OUTPUT/<name>_PP.tif, "
        "<name>_XP.tif (tiled pyramidal BigTIFF), <name>.nc (GeoSlicer netCDF with both, for thinseg segment), "
        "TileConfiguration.registered.txt, tiles.png and stitch.json. PP and XP are placed at the same positions, "
        "found on PP, so the two panoramas lie on each other pixel for pixel.",
    )
    p.add_argument(
        "inputs", nargs="+", metavar="TILES", help="tile images (PNG/JPEG/TIFF) or folders of them; PP and XP by affix"
    )
    p.add_argument("--output", "-o", type=Path, required=True, help="output folder (made whole at the end)")
    p.add_argument("--name", default=None, help="panorama name (default: what the tile names start with)")
    p.add_argument("--pp-pattern", default="PP", help="affix marking PP tiles (default PP, case-insensitive)")
    p.add_argument("--xp-pattern", default="XP", help="affix marking XP tiles, e.g. XP, PX or c2 (default XP)")
    p.add_argument(
        "--layout",
        default=None,
        metavar="grid|auto|FILE",
        help="grid: places from the names (r<row>_c<col>, x<col>_y<row>, or numbered with --columns); "
        "auto: from the images alone; FILE: a Fiji TileConfiguration.txt; default: grid when the names give one, "
        "else auto",
    )
    p.add_argument(
        "--overlap",
        type=types.tile_overlap,
        default=0.15,
        metavar="FRACTION",
        help="nominal overlap of grid neighbours as a share of a tile (default 0.15)",
    )
    p.add_argument(
        "--max-shift",
        type=types.stage_error,
        default=0.1,
        metavar="FRACTION",
        help="largest error of a nominal position searched, as a share of a tile (default 0.1)",
    )
    p.add_argument("--columns", type=types.columns, default=None, metavar="N", help="tiles per row of numbered tiles")
    p.add_argument("--serpentine", action="store_true", help="numbered tiles: every second row runs right to left")
    p.add_argument(
        "--flat-field",
        default="auto",
        metavar="auto|none|IMAGE",
        help="vignetting correction: auto (fitted to the overlaps, default), none, or a blank-field image",
    )
    p.add_argument("--pixel-size", type=types.mm_per_pixel, default=None, metavar="MM", help="pixel size in mm")
    p.add_argument(
        "--format",
        default="tiff,netcdf",
        metavar="tiff,netcdf",
        help="what to write: tiff (pyramidal BigTIFF per image), netcdf (one GeoSlicer file), or both (default)",
    )
    p.add_argument(
        "--drop-unlinked",
        action="store_true",
        help="without a layout: leave out tiles that overlap no other (default: refuse, naming them)",
    )
    p.add_argument("--workers", type=types.analysis_workers, default=None, metavar="N", help="threads reading tiles")
    p.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # deferred: stitching loads scipy, scikit-image, tifffile and netCDF4
    from thinseg.pipelines.stitch import StitchOptions, stitch_tiles
    from thinseg.stitching.placement import PlacementOptions

    placement = PlacementOptions(
        layout=args.layout,
        overlap=args.overlap,
        max_shift=args.max_shift,
        columns=args.columns,
        serpentine=args.serpentine,
        flat_field=args.flat_field,
        drop_unlinked=args.drop_unlinked,
        workers=args.workers if args.workers is not None else types.default_workers(),
    )
    options = StitchOptions(
        inputs=args.inputs,
        output=args.output,
        name=args.name,
        pp_pattern=args.pp_pattern,
        xp_pattern=args.xp_pattern or None,
        placement=placement,
        mm_per_pixel=args.pixel_size,
        formats=tuple(f.strip().lower() for f in args.format.split(",") if f.strip()),
        overwrite=args.overwrite,
    )
    progress = TileProgress(enabled=not args.quiet, unit="step")
    try:
        result = stitch_tiles(options, progress=progress)
    finally:
        progress.close()
    for warning in result.warnings:
        print(f"thinseg: warning: {warning}", file=sys.stderr)
    s = result.summary
    height, width = s["shape"]
    seams = s["seams"]["ratio"]
    print(
        f"{result.name}: {s['tiles_used']} tiles -> {width} x {height} px, {s['tiles_linked']} linked by overlaps, "
        f"seam visibility {seams:.3f} (1 = invisible) -> {result.folder}"
    )
    return 0
