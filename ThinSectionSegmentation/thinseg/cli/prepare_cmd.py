"""`thinseg prepare`: a PP image, its XP image and a label image already on the PP grid (a
hand-drawn mask, a label export) -> one GeoSlicer netCDF training section (see
`thinseg.pipelines.prepare`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from thinseg.classes.table import ClassTable
from thinseg.cli import options as types
from thinseg.data.section_images import DEFAULT_MM_PER_PIXEL, PpXpImages
from thinseg.metrics.fractions import class_pixel_counts

if TYPE_CHECKING:
    from thinseg.registration.ppxp import XpAlignment


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "prepare",
        help="turn PP/XP images and a label image on the PP grid (a mask) into a training section",
        description="Build a GeoSlicer netCDF training section from a PP image, its XP image and a label image "
        "on the PP grid (a hand-drawn mask or any map of label codes). --classes names the codes. XP is aligned "
        "to PP when the two are offset or turned. Writes OUTPUT/<name>.nc (PP, XP, labelmap) and "
        "OUTPUT/<name>_prepared.png (label outlines over PP and over the aligned XP). For QEMSCAN maps, which "
        "are not on the PP grid, use `thinseg register` instead.",
    )
    p.add_argument(
        "pp", type=Path, metavar="PP_IMAGE", help="PP image (PNG/JPEG/TIFF) or a GeoSlicer netCDF holding it"
    )
    p.add_argument(
        "labels", type=Path, metavar="LABEL_IMAGE", help="single-channel label image (PNG/TIFF), the size of PP"
    )
    p.add_argument(
        "--classes",
        type=Path,
        required=True,
        metavar="CSV",
        help="class file: value,name,color rows naming each code of the label image ('ignore' leaves it out)",
    )
    xp = p.add_mutually_exclusive_group()
    xp.add_argument(
        "--xp",
        type=Path,
        default=None,
        metavar="XP_IMAGE",
        help="the XP image (default: found by its affix beside PP, else in the folders beside PP's folder)",
    )
    xp.add_argument(
        "--xp-pattern", default="XP", metavar="XP", help="affix of the XP counterpart, e.g. XP, PX or c2 (default XP)"
    )
    p.add_argument("--pp-pattern", default="PP", metavar="PP", help="affix marking the PP image (default PP)")
    p.add_argument("--pp-only", action="store_true", help="no XP image (for PP-only models)")
    p.add_argument("--no-align", dest="align", action="store_false", help="keep XP as it is (no PP/XP check)")
    p.add_argument("--name", default=None, help="section name (default: the PP file name without its affix)")
    p.add_argument(
        "--mm-per-pixel",
        type=types.mm_per_pixel,
        default=None,
        help=f"pixel size in mm, 0.0001 to 1 (default: from a netCDF file or an OME-TIFF, else {DEFAULT_MM_PER_PIXEL})",
    )
    types.add_max_pixels(p)
    p.add_argument(
        "--output", "-o", type=Path, default=Path("results"), help="folder for the section (default results/)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a section file that exists (default: refuse)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # deferred: the pipeline loads SimpleITK and scipy (about 0.6 s) for the XP alignment
    from thinseg.pipelines.prepare import PrepareOptions, prepare_files

    options = PrepareOptions(
        pp=args.pp,
        labels=args.labels,
        classes=args.classes,
        output=args.output,
        xp=args.xp,
        pp_pattern=args.pp_pattern,
        xp_pattern=args.xp_pattern,
        pp_only=args.pp_only,
        align=args.align,
        name=args.name,
        mm_per_pixel=args.mm_per_pixel,
        overwrite=args.overwrite,
    )

    def show_inputs(images: PpXpImages, has_xp: bool) -> None:
        pp = images.pp
        print(f"PP: {args.pp} ({pp.shape[1]}x{pp.shape[0]} px, {images.mm_per_pixel:g} mm/px)", file=sys.stderr)
        if has_xp and images.xp_note:
            print(images.xp_note, file=sys.stderr)

    prepared = prepare_files(options, on_inputs=show_inputs)
    for note in prepared.notes:
        print(f"thinseg: {note}", file=sys.stderr)
    print(format_summary(prepared.name, prepared.labels, prepared.table, prepared.alignment, prepared.has_xp))
    print()
    for path in prepared.written:
        print(f"  -> {path}")
    return 0


def format_summary(
    name: str, labels: npt.NDArray[np.uint8], table: ClassTable, alignment: XpAlignment | None, has_xp: bool
) -> str:
    """The section's size, how XP was checked, and the area of each class."""
    counts = class_pixel_counts(labels, len(table))
    total = labels.size
    lines = [f"section {name}: {labels.shape[1]}x{labels.shape[0]} px"]
    if not has_xp:
        lines.append("XP: none (PP-only section)")
    elif alignment is None:
        lines.append("XP: not checked (--no-align)")
    else:
        lines.append(alignment.describe())
    width = max(len(n) for n in table.names)
    lines.append(f"  {'class':<{width}}  {'label':>5}  {'area %':>7}")
    for k, cls_name in enumerate(table.names, 1):
        lines.append(f"  {cls_name:<{width}}  {k:>5}  {100 * counts[k] / total:>7.2f}")
    if counts[0]:
        lines.append(f"  {'(unlabelled)':<{width}}  {0:>5}  {100 * counts[0] / total:>7.2f}")
    return "\n".join(lines)
