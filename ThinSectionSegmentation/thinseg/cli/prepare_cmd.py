"""`thinseg prepare`: a PP image, its XP image and a label image already on the PP grid (a
hand-drawn mask, a label export) -> one GeoSlicer netCDF training section.

The label image holds codes; a class file (`value,name,color`, see thinseg.classes.files) names
them. XP is checked against PP and aligned when the two photographs are offset (a stage shift,
or a small stage rotation), so that the six input channels show the same grain at each pixel.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from thinseg.pipelines.segment import DEFAULT_MM_PER_PIXEL

PREVIEW_SIDE = 800


def register(commands: argparse._SubParsersAction) -> None:
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
        "--xp", type=Path, default=None, metavar="XP_IMAGE", help="the XP image (default: found beside PP by its affix)"
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
        type=float,
        default=None,
        help=f"pixel size in mm (default: from a netCDF file, else {DEFAULT_MM_PER_PIXEL})",
    )
    p.add_argument(
        "--output", "-o", type=Path, default=Path("results"), help="folder for the section (default results/)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a section file that exists (default: refuse)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from thinseg.classes.files import read_value_classes
    from thinseg.cli.register_cmd import output_stem, read_images
    from thinseg.data.inputs import OutputSet, safe_file_name
    from thinseg.data.sections import read_label_image
    from thinseg.errors import ThinSegError

    if args.mm_per_pixel is not None and not args.mm_per_pixel > 0:
        raise ThinSegError(f"--mm-per-pixel must be > 0, got {args.mm_per_pixel}")
    classes = read_value_classes(args.classes)
    name = args.name or output_stem(args.pp, args.pp_pattern)
    stem = safe_file_name(name)
    outputs = OutputSet(args.output, args.overwrite)
    nc_tmp, png_tmp = outputs.add(f"{stem}.nc"), outputs.add(f"{stem}_prepared.png")
    outputs.check()

    if args.pp_only and args.xp is not None:
        raise ThinSegError("--pp-only builds a section without XP: leave out --xp")
    images = read_images(args)
    codes = read_label_image(args.labels)
    if codes.shape != images.pp.shape[:2]:
        raise ThinSegError(
            f"label image is {codes.shape[1]}x{codes.shape[0]} px but PP is "
            f"{images.pp.shape[1]}x{images.pp.shape[0]} px: it must be on the PP grid "
            "(for a QEMSCAN map use `thinseg register`)",
            args.labels,
        )
    labels = classes.apply(codes, args.labels)
    pp, xp = images.pp, (None if args.pp_only else images.xp)
    if xp is None and not args.pp_only:
        raise ThinSegError(
            f"no XP image found ({images.xp_note}); give --xp, or --pp-only for a PP-only section", args.pp
        )

    alignment = None
    print(f"PP: {args.pp} ({pp.shape[1]}x{pp.shape[0]} px, {images.mm_per_pixel:g} mm/px)", file=sys.stderr)
    if xp is not None and images.xp_note:
        print(images.xp_note, file=sys.stderr)
        if args.align:
            from thinseg.registration.ppxp import estimate_xp_alignment

            alignment = estimate_xp_alignment(pp, xp)
            xp = alignment.apply(xp)
    try:
        _write_section(nc_tmp, name, pp, xp, labels, classes.table, images.mm_per_pixel, alignment, args)
        _write_preview(png_tmp, pp, xp, labels, classes.table)
        written = outputs.commit()
    except BaseException:
        outputs.discard()
        raise
    print(format_summary(name, labels, classes.table, alignment, xp is not None))
    print()
    for path in written:
        print(f"  -> {path}")
    return 0


def _write_section(
    path: Path,
    name: str,
    pp: np.ndarray,
    xp: np.ndarray | None,
    labels: np.ndarray,
    table,
    mm_per_pixel: float,
    alignment,
    args: argparse.Namespace,
) -> None:
    import thinseg
    from thinseg.io.netcdf import NetcdfWriter

    record = {
        "pp": str(args.pp),
        "xp": str(args.xp) if args.xp else None,
        "labels": str(args.labels),
        "classes": str(args.classes),
        "xp_alignment": alignment.as_dict() if alignment else None,
    }
    attrs = {"thinseg_version": thinseg.__version__, "thinseg_prepare": json.dumps(record)}
    with NetcdfWriter(path, attrs=attrs) as writer:
        pp_var = writer.add_rgb_image(f"{name}_PP", pp, mm_per_pixel)
        if xp is not None:
            writer.add_rgb_image(f"{name}_XP", xp, mm_per_pixel)
        writer.add_labelmap(f"{name}_labels", labels, table, mm_per_pixel, reference=pp_var)


def _write_preview(path: Path, pp: np.ndarray, xp: np.ndarray | None, labels: np.ndarray, table) -> None:
    """Label outlines over PP and over the aligned XP, side by side: misalignment shows at a glance."""
    from PIL import Image

    from thinseg.registration.output import boundary_overlay

    step = max(1, int(np.ceil(max(pp.shape[:2]) / PREVIEW_SIDE)))
    small = labels[::step, ::step]
    panels = [boundary_overlay(np.ascontiguousarray(pp[::step, ::step]), small, table)]
    if xp is not None:
        panels.append(boundary_overlay(np.ascontiguousarray(xp[::step, ::step]), small, table))
    gap = np.full((small.shape[0], 8, 3), 255, np.uint8)
    row = panels[0] if len(panels) == 1 else np.concatenate([panels[0], gap, panels[1]], axis=1)
    Image.fromarray(row).save(path, format="PNG")


def format_summary(name: str, labels: np.ndarray, table, alignment, has_xp: bool) -> str:
    from thinseg.reports.mineralogy import class_pixel_counts

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
