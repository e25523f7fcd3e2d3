"""`thinseg register`: a QEMSCAN mineral map onto a PP image (XP rides along) -> transform,
resampled labels and a GeoSlicer netCDF training section."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from thinseg.cli import options as types
from thinseg.data.section_images import DEFAULT_MM_PER_PIXEL
from thinseg.pipelines.register import (
    DEFAULT_QEMSCAN_MM_PER_PIXEL,
    TRANSFORM_KINDS,
    RegisterInputs,
    RegisterOptions,
    register_files,
)

if TYPE_CHECKING:
    from thinseg.registration import RegistrationResult


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "register",
        help="register a QEMSCAN mineral map onto a PP image (landmarks and/or automatic)",
        description="Register a QEMSCAN mineral map onto a thin section's PP image (the fixed image); the XP "
        "image rides along (aligned to PP if the two are offset). Landmark pairs give the start (and with "
        "--no-refine the result); without landmarks a coarse search finds it. Mutual information between "
        "PP/XP colours and QEMSCAN minerals then refines the fit. Writes the transform (.tfm + JSON), the "
        "QEMSCAN map resampled onto the PP grid (TIFF), a GeoSlicer netCDF with PP, XP and the registered "
        "labelmap (a training section for `thinseg train`), and overlay PNGs before/after.",
    )
    p.add_argument(
        "pp", type=Path, metavar="PP_IMAGE", help="PP image (PNG/JPEG/TIFF) or a GeoSlicer netCDF holding it"
    )
    p.add_argument(
        "qemscan",
        type=Path,
        metavar="QEMSCAN_MAP",
        help="QEMSCAN map: RGB or paletted TIFF/PNG (colours name the minerals), a TIFF/PNG of label "
        "values with --colors, or a labelmap variable of a GeoSlicer netCDF file",
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
        "--xp-pattern",
        default="XP",
        metavar="XP",
        help="affix of the XP counterpart / netCDF variable, e.g. XP, PX or c2 (default XP)",
    )
    p.add_argument(
        "--pp-pattern", default="PP", metavar="PP", help="affix marking the PP image / netCDF variable (default PP)"
    )
    p.add_argument(
        "--colors",
        type=Path,
        default=None,
        metavar="CSV",
        help="mineral colour table: GeoSlicer's Mineral;R;G;B;English CSV or name,#rrggbb rows "
        "(default: GeoSlicer's QEMSCAN colours)",
    )
    p.add_argument(
        "--background",
        type=types.colour,
        default=None,
        metavar="#RRGGBB",
        help="colour meaning 'outside the sample' in an RGB/paletted map",
    )
    p.add_argument(
        "--qemscan-variable",
        default=None,
        metavar="NAME",
        help="labelmap variable of a netCDF QEMSCAN map with several",
    )
    p.add_argument(
        "--landmarks",
        type=Path,
        default=None,
        metavar="FILE",
        help="landmark pairs: CSV (qemscan_x,qemscan_y,image_x,image_y[,name] in pixels) or Slicer "
        ".mrk.json (image points, then QEMSCAN points)",
    )
    p.add_argument(
        "--qemscan-landmarks",
        type=Path,
        default=None,
        metavar="MRK_JSON",
        help="the QEMSCAN points in a second .mrk.json (then --landmarks holds the image points)",
    )
    p.add_argument(
        "--transform",
        default="similarity",
        choices=TRANSFORM_KINDS,
        help="landmark fit: similarity (default), affine, or tps (thin-plate spline; needs landmarks)",
    )
    p.add_argument(
        "--no-refine",
        dest="refine",
        action="store_false",
        help="keep the landmark fit as it is (no automatic refinement)",
    )
    p.add_argument("--bspline", action="store_true", help="add a free-form (B-spline) stage for local distortion")
    p.add_argument(
        "--mm-per-pixel",
        type=types.mm_per_pixel,
        default=None,
        help="PP pixel size in mm, 0.0001 to 1 "
        f"(default: from a netCDF file or an OME-TIFF, else {DEFAULT_MM_PER_PIXEL})",
    )
    p.add_argument(
        "--qemscan-mm-per-pixel",
        type=types.mm_per_pixel,
        default=None,
        help="nominal QEMSCAN pixel size in mm, 0.0001 to 1 (default: from a netCDF file, else "
        f"{DEFAULT_QEMSCAN_MM_PER_PIXEL})",
    )
    types.add_max_pixels(p)
    p.add_argument(
        "--output", "-o", type=Path, default=Path("results"), help="folder for the outputs (default results/)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace outputs that exist (default: refuse)")
    p.add_argument("--quiet", "-q", action="store_true", help="no step messages")
    p.set_defaults(run=run)


def options_from(args: argparse.Namespace) -> RegisterOptions:
    """The pipeline's options from the parsed command line."""
    return RegisterOptions(
        pp=args.pp,
        qemscan=args.qemscan,
        output=args.output,
        xp=args.xp,
        pp_pattern=args.pp_pattern,
        xp_pattern=args.xp_pattern,
        colors=args.colors,
        background=args.background,
        qemscan_variable=args.qemscan_variable,
        landmarks=args.landmarks,
        qemscan_landmarks=args.qemscan_landmarks,
        transform=args.transform,
        refine=args.refine,
        bspline=args.bspline,
        mm_per_pixel=args.mm_per_pixel,
        qemscan_mm_per_pixel=args.qemscan_mm_per_pixel,
        overwrite=args.overwrite,
    )


def run(args: argparse.Namespace) -> int:
    def show_inputs(inputs: RegisterInputs) -> None:
        images, qemscan = inputs.images, inputs.qemscan
        h, w = images.pp.shape[:2]
        hq, wq = qemscan.labels.shape
        print(f"PP: {args.pp} ({w}x{h} px, {images.mm_per_pixel:g} mm/px)", file=sys.stderr)
        if images.xp_note:
            print(images.xp_note, file=sys.stderr)
        print(
            f"QEMSCAN: {args.qemscan} ({wq}x{hq} px, {inputs.qemscan_mm_per_pixel:g} mm/px, "
            f"{len(qemscan.table)} minerals)",
            file=sys.stderr,
        )

    def say(message: str) -> None:
        if not args.quiet:
            print(f"  {message} ...", file=sys.stderr)

    outcome = register_files(options_from(args), on_inputs=show_inputs, progress=say)
    paths = outcome.paths
    print(format_result(outcome.result, xp_given=outcome.inputs.images.xp is not None))
    print()
    for path in (paths.tfm, paths.json, paths.labels_tif, paths.netcdf, paths.overlay_before, paths.overlay_after):
        if path is not None:
            print(f"  -> {path}")
    return 0


def _bits(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else "-"


def format_result(result: RegistrationResult, xp_given: bool) -> str:
    """What a person checks after a registration: landmark residuals (outliers flagged), the
    metric before/after, how far refinement moved the map, the XP offset, the overlap.
    (The true registration error is unknown for real data and is not shown.)"""
    # deferred: SimpleITK and scipy cost about 0.6 s at start-up
    from thinseg.registration.output import landmark_residuals
    from thinseg.registration.sitk_transforms import describe_linear  # deferred as above

    lines = []
    fit = result.landmark_fit
    rows = landmark_residuals(result)
    if fit is not None and rows is not None:
        width = max(8, *(len(r["name"]) for r in rows))
        final = "refined" if result.refinement is not None else "final"
        lines.append(
            f"landmarks: {len(rows)} pairs, {fit.transform.kind} fit; residuals in PP pixels and um, of the "
            f"landmark fit and of the {final} transform "
            f"(leave-one-out: against a fit without that pair; tolerance {fit.tolerance_px:.1f} px)"
        )
        lines.append(
            f"  {'landmark':<{width}} {'fit px':>8} {'fit um':>8} {final + ' px':>11} {final + ' um':>11} "
            f"{'leave-one-out':>14}"
        )
        for r in rows:
            loo = "-" if r["leave_one_out_px"] is None else f"{r['leave_one_out_px']:.2f}"
            flag = "   <- OUTLIER: disagrees with the other clicks, check it" if r["outlier"] else ""
            lines.append(
                f"  {r['name']:<{width}} {r['residual_fit_px']:>8.2f} {r['residual_fit_um']:>8.2f} "
                f"{r['residual_final_px']:>11.2f} {r['residual_final_um']:>11.2f} {loo:>14}{flag}"
            )
        if fit.outliers:
            lines.append(f"  {len(fit.outliers)} outlier(s): correct or remove the flagged click(s) and register again")
        if result.refinement is not None:
            # more than half a QEMSCAN pixel further from a click than the landmark fit was
            step = 0.5 * result.geometry.ratio
            moved = [r["name"] for r in rows if r["residual_final_px"] - r["residual_fit_px"] > step]
            if moved:
                lines.append(
                    f"  the refinement moved away from click(s) {', '.join(moved)} (by more than half a QEMSCAN "
                    "pixel): check them on the overlays"
                )
    if result.coarse is not None:
        c = result.coarse
        lines.append(
            f"automatic start (no landmarks): rotation {c.rotation_deg:+.2f} deg, scale {c.scale:.3f} x nominal, "
            f"significance {c.significance:.1f}"
        )
    linear = describe_linear(result.transform.linear_px())
    lines.append(
        f"transform: {result.transform.kind}; rotation {linear['rotation_deg']:+.3f} deg, "
        f"{linear['scale']:.5f} QEMSCAN px per PP px"
        + (f", anisotropy {linear['anisotropy']:.4f}" if result.transform.kind != "similarity" else "")
    )
    metric = "mutual information of PP/XP colour clusters and QEMSCAN minerals"
    if result.refinement is not None:
        change = result.metric_final - result.metric_initial
        lines.append(f"{metric}: {_bits(result.metric_initial)} -> {_bits(result.metric_final)} bits ({change:+.3f})")
        ch = result.refinement.change
        lines.append(
            f"refinement moved the map by {ch['mean_displacement_qemscan_px']:.2f} QEMSCAN px on average "
            f"(max {ch['max_displacement_qemscan_px']:.2f}; centre {ch['centre_shift_qemscan_px']:.2f}), "
            f"rotation {ch['rotation_change_deg']:+.3f} deg, scale x{ch['scale_change_ratio']:.4f}"
        )
        lines.append(f"match contrast {result.contrast:.2f} (about 1 = no match)")
    else:
        lines.append(f"{metric}: {_bits(result.metric_final)} bits (no refinement: --no-refine)")
    lines.append(f"overlap: {100 * result.overlap:.1f}% of the PP image lies on labelled QEMSCAN pixels")
    if xp_given:
        a = result.xp_alignment
        if a is None:
            lines.append("XP offset: not checked")
        elif not a.reliable:
            lines.append(f"XP offset: unknown ({a.describe()})")
        elif a.is_identity:
            lines.append(f"XP offset: none (dy, dx = 0, 0 px; match score {a.score:.1f})")
        else:
            turn = f", rotation {a.angle_deg:+.2f} deg" if a.angle_deg else ""
            lines.append(f"XP offset: dy {a.dy:+g}, dx {a.dx:+g} px{turn}, aligned to PP (match score {a.score:.1f})")
    else:
        lines.append("XP offset: no XP image")
    for warning in result.warnings:
        lines.append(f"warning: {warning}")
    lines.append(f"time: {result.seconds.get('total', float('nan')):.1f} s")
    return "\n".join(lines)
