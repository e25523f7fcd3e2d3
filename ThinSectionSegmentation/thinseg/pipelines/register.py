"""Register a QEMSCAN mineral map onto a thin section's PP image, from files to files.

The work behind `thinseg register`: check the request, read PP/XP, the QEMSCAN map and the
landmark pairs, register (`thinseg.registration.register_section`) and write the transform,
the resampled labels, a GeoSlicer netCDF training section and overlay pictures
(`thinseg.registration.output.write_outputs`). Existing outputs are refused before any work
unless overwrite is asked for.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from thinseg.data.section_images import PpXpImages, is_netcdf, output_stem, read_ppxp
from thinseg.errors import ThinSegError, failures_named
from thinseg.io.atomic import ensure_writable_dir
from thinseg.io.netcdf import list_variables
from thinseg.limits import check_mm_per_pixel

if TYPE_CHECKING:
    from thinseg.registration import LandmarkPairs, QemscanMap, RegistrationResult
    from thinseg.registration.output import OutputPaths

#: Nominal QEMSCAN pixel size (mm) when neither the file nor the caller gives one (GeoSlicer's).
DEFAULT_QEMSCAN_MM_PER_PIXEL = 0.01
#: Landmark fits `thinseg.registration` offers (its `sitk_transforms.KINDS`, named here so that
#: the command line can list them without loading SimpleITK).
TRANSFORM_KINDS = ("similarity", "affine", "tps")
#: Suffixes of the files one registration writes after the section stem.
OUTPUT_SUFFIXES = (
    "_registration.tfm",
    "_registration.json",
    "_qemscan_on_pp.tif",
    "_registered.nc",
    "_overlay_before.png",
    "_overlay_after.png",
    "_overlay.png",
)


@dataclass
class RegisterOptions:
    """What to register and how; the defaults are those of `thinseg register`.

    `xp` None: the XP image is found beside PP by `xp_pattern` (or as a netCDF variable).
    `mm_per_pixel`/`qemscan_mm_per_pixel` None: from the files, else the defaults.
    """

    pp: Path
    qemscan: Path
    output: Path = Path("results")
    xp: Path | None = None
    pp_pattern: str = "PP"
    xp_pattern: str = "XP"
    colors: Path | None = None
    background: str | None = None
    qemscan_variable: str | None = None
    landmarks: Path | None = None
    qemscan_landmarks: Path | None = None
    transform: str = "similarity"
    refine: bool = True
    bspline: bool = False
    mm_per_pixel: float | None = None
    qemscan_mm_per_pixel: float | None = None
    overwrite: bool = False


@dataclass
class RegisterInputs:
    """Everything read before registering: the output stem, PP/XP, the QEMSCAN map, its pixel
    size and the landmark pairs (None: automatic search)."""

    stem: str
    images: PpXpImages
    qemscan: QemscanMap
    qemscan_mm_per_pixel: float
    landmarks: LandmarkPairs | None


@dataclass
class RegisterOutcome:
    """A finished registration: its inputs, the result and the files written."""

    inputs: RegisterInputs
    result: RegistrationResult
    paths: OutputPaths


def check_options(options: RegisterOptions) -> None:
    """Refuse contradictory requests before anything is read."""
    if options.qemscan_landmarks is not None and options.landmarks is None:
        raise ThinSegError("--qemscan-landmarks holds the QEMSCAN points of --landmarks: give --landmarks too")
    if options.transform == "tps" and options.landmarks is None:
        raise ThinSegError("a tps transform needs landmarks (--landmarks); without them use similarity or affine")
    if options.landmarks is None and not options.refine:
        raise ThinSegError(
            "--no-refine needs landmarks (--landmarks): without them the automatic registration is the only fit"
        )


def check_outputs(folder: Path, stem: str, overwrite: bool) -> None:
    """Refuse existing outputs BEFORE registering (writing the outputs checks again at the end)."""
    ensure_writable_dir(folder)
    if overwrite:
        return
    taken = [stem + suffix for suffix in OUTPUT_SUFFIXES if (folder / (stem + suffix)).exists()]
    if taken:
        raise ThinSegError(f"output exists already ({', '.join(taken)}); use --overwrite or another --output", folder)


def lps_origin(ras_origin: tuple[float, ...] | None) -> tuple[float, float]:
    """GeoSlicer images: RAS = (-s*col + ox, -s*row + oy), so LPS = s*(col, row) - (ox, oy)."""
    if ras_origin is None:
        return 0.0, 0.0
    return -float(ras_origin[0]), -float(ras_origin[1])


def qemscan_origin(path: Path, variable: str | None) -> tuple[float, float]:
    """LPS origin of a netCDF QEMSCAN labelmap (only markups landmarks need it)."""
    labelmaps = [v for v in list_variables(path) if v.kind in ("labelmap", "segmentation")]
    chosen = (
        next((v for v in labelmaps if v.name == variable), None)
        if variable
        else (labelmaps[0] if len(labelmaps) == 1 else None)
    )
    return lps_origin(chosen.origin_mm if chosen is not None else None)


def register_files(
    options: RegisterOptions,
    *,
    on_inputs: Callable[[RegisterInputs], None] | None = None,
    progress: Callable[[str], None] | None = None,
) -> RegisterOutcome:
    """Check, read, register and write (see the module doc). `on_inputs` sees what was read
    before the registration starts; `progress` gets a word per registration step. Any failure
    is a ThinSegError (naming the PP image when nothing more precise is known)."""
    with failures_named(options.pp):
        return _register_files(options, on_inputs, progress)


def _register_files(
    options: RegisterOptions,
    on_inputs: Callable[[RegisterInputs], None] | None,
    progress: Callable[[str], None] | None,
) -> RegisterOutcome:
    # deferred: SimpleITK and scipy cost about 0.6 s, and `thinseg --help` imports this module
    from thinseg.registration import load_qemscan, read_landmarks, register_section
    from thinseg.registration.output import write_outputs

    check_options(options)
    stem = output_stem(options.pp, options.pp_pattern)
    check_outputs(options.output, stem, options.overwrite)

    images = read_ppxp(
        options.pp,
        options.xp,
        pp_pattern=options.pp_pattern,
        xp_pattern=options.xp_pattern,
        mm_per_pixel=options.mm_per_pixel,
    )
    qemscan = load_qemscan(
        options.qemscan, options.colors, variable=options.qemscan_variable, background=options.background
    )
    q_mm = options.qemscan_mm_per_pixel or qemscan.mm_per_pixel or DEFAULT_QEMSCAN_MM_PER_PIXEL
    check_mm_per_pixel(q_mm, "QEMSCAN pixel size", options.qemscan)
    landmarks = None
    if options.landmarks is not None:
        q_origin = (
            qemscan_origin(options.qemscan, options.qemscan_variable) if is_netcdf(options.qemscan) else (0.0, 0.0)
        )
        landmarks = read_landmarks(
            options.landmarks,
            options.qemscan_landmarks,
            image_mm_per_pixel=images.mm_per_pixel,
            qemscan_mm_per_pixel=q_mm,
            image_origin_mm=lps_origin(images.origin_mm),
            qemscan_origin_mm=q_origin,
        )
    inputs = RegisterInputs(stem, images, qemscan, q_mm, landmarks)
    if on_inputs is not None:
        on_inputs(inputs)

    result = register_section(
        images.pp,
        images.xp,
        qemscan.labels,
        qemscan.table,
        image_mm_per_pixel=images.mm_per_pixel,
        qemscan_mm_per_pixel=q_mm,
        landmarks=landmarks,
        kind=options.transform,
        refine=options.refine,
        bspline=options.bspline,
        progress=progress,
    )
    with failures_named(options.output, "cannot write the output"):  # not the inputs: they were read
        paths = write_outputs(result, options.output, stem, images.pp, qemscan.labels, overwrite=options.overwrite)
    return RegisterOutcome(inputs, result, paths)
