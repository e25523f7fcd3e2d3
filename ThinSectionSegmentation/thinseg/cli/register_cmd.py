"""`thinseg register`: a QEMSCAN mineral map onto a PP image (XP rides along) -> transform,
resampled labels and a GeoSlicer netCDF training section."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from thinseg.pipelines.segment import DEFAULT_MM_PER_PIXEL

#: Nominal QEMSCAN pixel size when neither the file nor the command line gives one.
DEFAULT_QEMSCAN_MM_PER_PIXEL = 0.01
KINDS = ("similarity", "affine", "tps")


def register(commands: argparse._SubParsersAction) -> None:
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
        "--xp", type=Path, default=None, metavar="XP_IMAGE", help="the XP image (default: found beside PP by its affix)"
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
        choices=KINDS,
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
        type=_positive_float,
        default=None,
        help=f"PP pixel size in mm (default: from a netCDF file, else {DEFAULT_MM_PER_PIXEL})",
    )
    p.add_argument(
        "--qemscan-mm-per-pixel",
        type=_positive_float,
        default=None,
        help=f"nominal QEMSCAN pixel size in mm (default: from a netCDF file, else {DEFAULT_QEMSCAN_MM_PER_PIXEL})",
    )
    p.add_argument(
        "--output", "-o", type=Path, default=Path("results"), help="folder for the outputs (default results/)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace outputs that exist (default: refuse)")
    p.add_argument("--quiet", "-q", action="store_true", help="no step messages")
    p.set_defaults(run=run)


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return value


class _Images:
    """PP, optional XP (full arrays: registration works on whole images), their spacing and LPS origin."""

    def __init__(self, pp, xp, mm_per_pixel, lps_origin, xp_note) -> None:
        self.pp, self.xp, self.mm_per_pixel, self.lps_origin, self.xp_note = pp, xp, mm_per_pixel, lps_origin, xp_note


def _read_whole(source):
    try:
        return source.read(0, source.shape[0], 0, source.shape[1])
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()


def _lps_origin(ras_origin) -> tuple[float, float]:
    """GeoSlicer images: RAS = (-s*col + ox, -s*row + oy), so LPS = s*(col, row) - (ox, oy)."""
    if ras_origin is None:
        return 0.0, 0.0
    return -float(ras_origin[0]), -float(ras_origin[1])


def read_images(args: argparse.Namespace) -> _Images:
    from thinseg.errors import ThinSegError
    from thinseg.io.images import open_image
    from thinseg.io.netcdf import find_image_variable, open_netcdf_image
    from thinseg.io.pairing import NETCDF_SUFFIXES, pair_inputs

    path: Path = args.pp
    if not path.exists():
        raise ThinSegError("PP image file not found", path)
    xp, xp_path, note = None, args.xp, None
    if path.suffix.lower() in NETCDF_SUFFIXES:
        pp_var = find_image_variable(path, args.pp_pattern)
        if pp_var is None:
            raise ThinSegError(f"no PP image: no RGB variable whose name contains '{args.pp_pattern}'", path)
        source = open_netcdf_image(path, pp_var)
        mm, lps = source.mm_per_pixel, _lps_origin(source.origin_mm)
        pp = _read_whole(source)
        if xp_path is None:
            xp_var = find_image_variable(path, args.xp_pattern)
            if xp_var is not None and xp_var != pp_var:
                xp, note = _read_whole(open_netcdf_image(path, xp_var)), f"XP: variable {xp_var} of {path.name}"
            else:
                note = (
                    f"XP: none (no RGB variable of {path.name} contains '{args.xp_pattern}'); registering with PP alone"
                )
    else:
        pp = _read_whole(open_image(path, role="PP image"))
        mm, lps = None, (0.0, 0.0)
        if xp_path is None:
            sections, problems = pair_inputs(
                [path], pp_pattern=args.pp_pattern, xp_pattern=args.xp_pattern, needs_xp=True
            )
            if sections and sections[0].pp is not None and sections[0].pp.resolve() == path.resolve():
                xp_path = sections[0].xp
            if xp_path is None:
                why = problems[0].problem if problems else f"{path.name} is not named as a PP image"
                note = f"XP: none found ({why}); registering with PP alone"
    if xp_path is not None:
        xp = _read_whole(open_image(xp_path, role="XP image"))
        note = f"XP: {xp_path}"
    if xp is not None and xp.shape != pp.shape:
        raise ThinSegError(
            f"PP is {pp.shape[1]}x{pp.shape[0]} px but XP is {xp.shape[1]}x{xp.shape[0]} px; "
            "they must be the same size",
            xp_path or path,
        )
    mm_per_pixel = args.mm_per_pixel or mm or DEFAULT_MM_PER_PIXEL
    return _Images(pp, xp, float(mm_per_pixel), lps, note)


def _qemscan_origin(path: Path, variable: str | None) -> tuple[float, float]:
    """LPS origin of a netCDF QEMSCAN labelmap (only markups landmarks need it)."""
    from thinseg.io.netcdf import list_variables

    labelmaps = [v for v in list_variables(path) if v.kind in ("labelmap", "segmentation")]
    chosen = (
        next((v for v in labelmaps if v.name == variable), None)
        if variable
        else (labelmaps[0] if len(labelmaps) == 1 else None)
    )
    return _lps_origin(chosen.origin_mm if chosen is not None else None)


def output_stem(pp_path: Path, pp_pattern: str) -> str:
    """'ABC_3200.5_PP.tif' -> 'ABC_3200.5' (the stem of every output file)."""
    from thinseg.io.pairing import SectionInput, section_base_name

    return section_base_name(SectionInput(name=pp_path.stem, pp=pp_path), pp_pattern)


def check_outputs(folder: Path, stem: str, overwrite: bool) -> None:
    """Refuse existing outputs BEFORE registering (write_outputs checks again at the end)."""
    from thinseg.errors import ThinSegError
    from thinseg.io.atomic import ensure_writable_dir

    ensure_writable_dir(folder)
    if overwrite:
        return
    names = [
        f"{stem}_registration.tfm",
        f"{stem}_registration.json",
        f"{stem}_qemscan_on_pp.tif",
        f"{stem}_registered.nc",
        f"{stem}_overlay_before.png",
        f"{stem}_overlay_after.png",
        f"{stem}_overlay.png",
    ]
    taken = [n for n in names if (folder / n).exists()]
    if taken:
        raise ThinSegError(f"output exists already ({', '.join(taken)}); use --overwrite or another --output", folder)


def run(args: argparse.Namespace) -> int:
    from thinseg.errors import ThinSegError
    from thinseg.io.pairing import NETCDF_SUFFIXES
    from thinseg.registration import load_qemscan, read_landmarks, register_section, write_outputs

    if args.qemscan_landmarks is not None and args.landmarks is None:
        raise ThinSegError("--qemscan-landmarks holds the QEMSCAN points of --landmarks: give --landmarks too")
    if args.transform == "tps" and args.landmarks is None:
        raise ThinSegError("a tps transform needs landmarks (--landmarks); without them use similarity or affine")
    if args.landmarks is None and not args.refine:
        raise ThinSegError(
            "--no-refine needs landmarks (--landmarks): without them the automatic registration is the only fit"
        )
    stem = output_stem(args.pp, args.pp_pattern)
    check_outputs(args.output, stem, args.overwrite)

    images = read_images(args)
    qemscan = load_qemscan(args.qemscan, args.colors, variable=args.qemscan_variable, background=args.background)
    q_mm = args.qemscan_mm_per_pixel or qemscan.mm_per_pixel or DEFAULT_QEMSCAN_MM_PER_PIXEL
    landmarks = None
    if args.landmarks is not None:
        q_origin = (
            _qemscan_origin(args.qemscan, args.qemscan_variable)
            if args.qemscan.suffix.lower() in NETCDF_SUFFIXES
            else (0.0, 0.0)
        )
        landmarks = read_landmarks(
            args.landmarks,
            args.qemscan_landmarks,
            image_mm_per_pixel=images.mm_per_pixel,
            qemscan_mm_per_pixel=q_mm,
            image_origin_mm=images.lps_origin,
            qemscan_origin_mm=q_origin,
        )

    h, w = images.pp.shape[:2]
    hq, wq = qemscan.labels.shape
    print(f"PP: {args.pp} ({w}x{h} px, {images.mm_per_pixel:g} mm/px)", file=sys.stderr)
    if images.xp_note:
        print(images.xp_note, file=sys.stderr)
    print(f"QEMSCAN: {args.qemscan} ({wq}x{hq} px, {q_mm:g} mm/px, {len(qemscan.table)} minerals)", file=sys.stderr)

    def say(message: str) -> None:
        if not args.quiet:
            print(f"  {message} ...", file=sys.stderr)

    result = register_section(
        images.pp,
        images.xp,
        qemscan.labels,
        qemscan.table,
        image_mm_per_pixel=images.mm_per_pixel,
        qemscan_mm_per_pixel=q_mm,
        landmarks=landmarks,
        kind=args.transform,
        refine=args.refine,
        bspline=args.bspline,
        progress=say,
    )
    paths = write_outputs(result, args.output, stem, images.pp, qemscan.labels, overwrite=args.overwrite)
    print(format_result(result, xp_given=images.xp is not None))
    print()
    for path in (paths.tfm, paths.json, paths.labels_tif, paths.netcdf, paths.overlay_before, paths.overlay_after):
        if path is not None:
            print(f"  -> {path}")
    return 0


def _bits(value: float) -> str:
    return f"{value:.3f}" if math.isfinite(value) else "-"


def format_result(result, xp_given: bool) -> str:
    """What a person checks after a registration: landmark residuals (outliers flagged), the
    metric before/after, how far refinement moved the map, the XP offset, the overlap.
    (The true registration error is unknown for real data and is not shown.)"""
    from thinseg.registration.sitk_transforms import describe_linear

    lines = []
    fit = result.landmark_fit
    if fit is not None:
        rows = fit.report()
        width = max(8, *(len(r["name"]) for r in rows))
        lines.append(
            f"landmarks: {len(rows)} pairs, {fit.transform.kind} fit; residuals in PP pixels "
            f"(leave-one-out: against a fit without that pair; tolerance {fit.tolerance_px:.1f} px)"
        )
        lines.append(f"  {'landmark':<{width}} {'residual':>9} {'leave-one-out':>14}")
        for r in rows:
            loo = "-" if r["leave_one_out_px"] is None else f"{r['leave_one_out_px']:.2f}"
            flag = "   <- OUTLIER: disagrees with the other clicks, check it" if r["outlier"] else ""
            lines.append(f"  {r['name']:<{width}} {r['residual_px']:>9.2f} {loo:>14}{flag}")
        if fit.outliers:
            lines.append(f"  {len(fit.outliers)} outlier(s): correct or remove the flagged click(s) and register again")
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
