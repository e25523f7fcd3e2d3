"""`thinseg analyze`: grains, sizes, shapes and contacts of labelmaps -> CSV, JSON and an HTML report."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from thinseg.cli import options as types
from thinseg.cli.progress import TileProgress


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "analyze",
        help="grain analysis of labelmaps (grain table, size/shape statistics, contacts, HTML report)",
        description="Cut each labelmap into grains (touching grains of one mineral split by a distance-transform "
        "watershed), measure them (area, equivalent diameter, Feret, perimeter, circularity, orientation, "
        "neighbours) and summarise each class and the section: size distributions in mm and phi with Wentworth "
        "classes and Folk & Ward measures, the contact matrix, porosity and pore sizes, the modal mineralogy "
        "with 95%% intervals. Writes OUTPUT/<labelmap>/grains.csv, summary.json, overview.png and report.html.",
    )
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="LABELMAP",
        help="netCDF files (ours or GeoSlicer's: their labelmap variable), or label images (PNG/TIFF) with --classes",
    )
    p.add_argument("--output", "-o", type=Path, required=True, help="folder for the result folders")
    p.add_argument(
        "--classes",
        type=Path,
        default=None,
        metavar="CSV",
        help="class file of label images: value,name,color rows (or name,color rows numbered 1..N)",
    )
    p.add_argument(
        "--pixel-size",
        type=types.mm_per_pixel,
        default=None,
        metavar="MM",
        help="pixel size in mm (needed for label images; overrides a netCDF's spacing)",
    )
    p.add_argument("--variable", default=None, help="the labelmap variable of a netCDF file holding several")
    p.add_argument("--pp", type=Path, default=None, help="PP image on the label image's grid (outlines drawn on it)")
    p.add_argument(
        "--neck-ratio",
        type=types.neck_ratio,
        default=0.7,
        metavar="R",
        help="split touching grains of one mineral where the neck is narrower than R times the smaller grain "
        "(distance at the saddle / at the peak; default 0.7; 0.05..0.99)",
    )
    p.add_argument("--no-split", action="store_true", help="keep touching grains of one mineral as one grain")
    p.add_argument(
        "--min-pixels",
        type=types.min_grain_pixels,
        default=12,
        metavar="N",
        help="grains of fewer pixels count in the areas, not in the grain table (default 12)",
    )
    p.add_argument(
        "--matrix",
        nargs="+",
        default=None,
        metavar="CLASS",
        help="classes that are a continuous matrix, not grains ('none': every class is grains); "
        "default: classes named like matrix/background/cement",
    )
    p.add_argument(
        "--pores",
        nargs="+",
        default=None,
        metavar="CLASS",
        help="pore classes (porosity, pore sizes); default: classes named like pore/porosity/void",
    )
    p.add_argument(
        "--workers",
        type=types.analysis_workers,
        default=None,
        metavar="N",
        help="processes analysing bands at once (default: up to 2, the CPUs available)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace result folders that exist (default: refuse)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def log(message: str) -> None:
    print(f"thinseg: {message}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    # deferred: the analysis loads scipy, scikit-image, SimpleITK and matplotlib
    from thinseg.analysis import GrainOptions
    from thinseg.pipelines.analyze import AnalyzeOptions, analyze_files

    grains = GrainOptions(
        split=not args.no_split,
        neck_ratio=args.neck_ratio,
        min_pixels=args.min_pixels,
        matrix_classes=tuple(args.matrix) if args.matrix is not None else None,
        pore_classes=tuple(args.pores) if args.pores is not None else None,
        workers=args.workers if args.workers is not None else types.default_workers(),
    )
    options = AnalyzeOptions(
        inputs=args.inputs,
        output=args.output,
        classes=args.classes,
        mm_per_pixel=args.pixel_size,
        variable=args.variable,
        pp=args.pp,
        grains=grains,
        overwrite=args.overwrite,
    )
    progress = TileProgress(enabled=not args.quiet, unit="row")
    try:
        run_result = analyze_files(options, progress=progress, log=log)
    finally:
        progress.close()
    for analysis, folder in run_result.written:
        s = analysis.summary
        print(f"{analysis.source.name}: {s['grains']['count']} grains ({s['grains']['measured']} measured) -> {folder}")
    if run_result.failed:
        print(f"\n{len(run_result.written)} labelmap(s) analysed, {len(run_result.failed)} failed", file=sys.stderr)
        for path, why in run_result.failed:
            print(f"  failed: {path}: {why}", file=sys.stderr)
        return 2 if not run_result.written else 1
    return 0
