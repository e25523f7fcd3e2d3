"""`thinseg segment`: PP/XP images or GeoSlicer netCDF files -> labelmaps in netCDF."""

from __future__ import annotations

import argparse
import sys
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from thinseg import limits
from thinseg.cli import options as types
from thinseg.cli.progress import TileProgress
from thinseg.data.section_images import DEFAULT_MM_PER_PIXEL
from thinseg.errors import ThinSegError, debugging
from thinseg.io.pairing import SectionInput
from thinseg.reports.mineralogy import format_table

if TYPE_CHECKING:
    from thinseg.pipelines.segment import SectionResult, SegmentRun

#: Overlap of neighbouring tiles when none is given, as the engine's DEFAULT_OVERLAP (which
#: imports torch: a usage error must not wait for it); a test keeps the two equal.
DEFAULT_OVERLAP_PX = 64


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "segment",
        help="segment thin sections (PP/XP images or netCDF) into mineral labelmaps",
        description="Segment thin sections. Each section becomes a GeoSlicer netCDF file with the PP/XP "
        "images and the labelmap; the modal mineralogy of every section is printed and written as CSV.",
    )
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="PNG/JPEG/TIFF/netCDF files or folders of them")
    p.add_argument(
        "--model", type=Path, default=None, help="model folder (meta.json + model.pth); default: the bundled model"
    )
    p.add_argument(
        "--output", "-o", type=Path, default=Path("results"), help="folder (default results/) or one .nc file"
    )
    p.add_argument(
        "--pp-pattern",
        default="PP",
        metavar="PP",
        help="affix marking PP images/variables (default PP, case-insensitive)",
    )
    p.add_argument(
        "--xp-pattern",
        default="XP",
        metavar="XP",
        help="affix marking XP images/variables, e.g. XP, PX or c2 (default XP)",
    )
    p.add_argument(
        "--xp",
        type=Path,
        default=None,
        metavar="XP_IMAGE",
        help="the XP image of the one PP image given as INPUT, whatever the two are named",
    )
    p.add_argument(
        "--xp-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help="folder holding the XP images (default: the XP image is looked for beside its PP image, "
        "then in the folders beside the PP image's folder, e.g. ppl/ and xpl/)",
    )
    p.add_argument(
        "--section",
        action="append",
        default=[],
        metavar="NAME",
        help="in netCDF files holding several sections, segment only this one (its name, e.g. S2 for S2_PP, "
        "or its PP variable); repeat for more. Default: every section, each into its own output",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace existing outputs (default: write a new numbered file)"
    )
    p.add_argument(
        "--mm-per-pixel",
        type=types.mm_per_pixel,
        default=None,
        help="pixel size of PNG/JPEG/TIFF inputs in mm, 0.0001 to 1 (default: the one an OME-TIFF records, "
        f"else {DEFAULT_MM_PER_PIXEL})",
    )
    types.add_max_pixels(p)
    p.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the network runs (default auto)"
    )
    p.add_argument(
        "--probabilities",
        action="store_true",
        help="also store a confidence map (max softmax probability, uint8 0-255)",
    )
    p.add_argument("--overlay", action="store_true", help="also write a PNG of the labels over PP with a legend")
    p.add_argument(
        "--no-align",
        dest="align_xp",
        action="store_false",
        help="segment XP as it is: skip the PP/XP check (by default an XP image offset or turned by the stage is "
        "moved onto the PP grid, and kept so in the output, and an XP image that does not match PP is refused)",
    )
    tuning = p.add_argument_group("inference tuning")
    tuning.add_argument(
        "--tile",
        type=types.tile,
        default=None,
        help="tile size in px, 16 to 4096 and a multiple of the network's total stride (16 for 5-level U-Nets); "
        "default: 1024 for BatchNorm networks, else the model's input_roi_shape",
    )
    tuning.add_argument(
        "--overlap",
        type=types.overlap,
        default=None,
        help=f"overlap of neighbouring tiles in px, 0 to {limits.MAX_TILE // 2} (default "
        f"{DEFAULT_OVERLAP_PX}, at most a quarter of the tile)",
    )
    tuning.add_argument(
        "--batch-size",
        type=types.batch_size,
        default=None,
        help="tiles per forward pass, at most 16 MPix of tiles (default: about 1 MPix of tiles)",
    )
    tuning.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="auto (default): bf16 on GPUs and on CPUs with AVX512-BF16/AMX (under 0.5%% of labels "
        "change), else fp32; fp32: exact; fp16: GPU only",
    )
    types.add_tta(tuning)
    types.add_min_region(tuning)
    p.add_argument(
        "--cluster",
        default=None,
        metavar="SPEC",
        help="run each section as one task on a Dask cluster: local:N (N worker processes here), "
        "tcp://HOST:PORT (a running scheduler) or a scheduler file (.json); needs pip install thinseg[cluster]",
    )
    p.add_argument(
        "--band-rows",
        type=types.int_range(0, 1_000_000),
        default=None,
        metavar="N",
        help="with --cluster: share each section among the workers in parts of about N rows, written "
        "into its one file in order (default: when there are fewer sections than worker threads, each "
        "section split evenly over them in parts of at least 2048 rows, else one task per section; "
        "0: never share)",
    )
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # deferred: the engine and the pipeline import torch (1-2 s); option errors are reported before
    from thinseg.inference.engine import InferenceOptions
    from thinseg.pipelines.segment import SegmentOptions, segment_files  # deferred as above

    output: Path = args.output
    options = SegmentOptions(
        pp_pattern=args.pp_pattern,
        xp_pattern=args.xp_pattern,
        xp=args.xp,
        xp_dir=args.xp_dir,
        mm_per_pixel=args.mm_per_pixel,
        overwrite=args.overwrite,
        probabilities=args.probabilities,
        overlay=args.overlay,
        sections=tuple(args.section),
        align_xp=args.align_xp,
        cluster=args.cluster,
        band_rows=args.band_rows,
        inference=InferenceOptions(
            tile=args.tile,
            overlap=args.overlap,
            batch_size=args.batch_size,
            precision=args.precision,
            device=args.device,
            with_confidence=args.probabilities,
            tta=args.tta,
            min_region=args.min_region,
        ),
    )
    # on a cluster one bar counts the sections done; results are printed above it
    progress = TileProgress(enabled=not args.quiet, unit="section" if args.cluster else "tile")
    startup_messages: list[str] = []

    def say(text: str, file: TextIO = sys.stdout) -> None:
        if args.cluster is None:
            progress.close()
        progress.write(text, file)

    def on_start(run: SegmentRun) -> None:
        report_refused(run)
        if run.segmenter is not None:  # a cluster's workers build theirs; their messages come with results
            startup_messages.extend(run.segmenter.messages)
            for message in run.segmenter.messages:
                print(f"thinseg: {message}", file=sys.stderr)
        print(f"model: {run.bundle.title} ({run.model_dir})", file=sys.stderr)
        if run.segmenter is not None:
            print(f"test-time augmentation: {run.segmenter.tta}", file=sys.stderr)
            print(f"minimum region: {run.segmenter.min_region or 'off'}", file=sys.stderr)
        else:
            print(f"cluster: {args.cluster}", file=sys.stderr)

    def on_result(result: SectionResult) -> None:
        for message in result.messages[len(startup_messages) :]:
            say(f"thinseg: {message}", sys.stderr)
        say(
            f"\n{result.section.name}: {result.megapixels:.1f} MPix in {result.seconds:.1f} s "
            f"({result.megapixels / max(result.seconds, 1e-9):.2f} MPix/s)"
        )
        say(format_table(result.mineralogy))
        say(f"  -> {result.netcdf}")
        if result.overlay is not None:
            say(f"  -> {result.overlay}")

    def on_failure(section: SectionInput, error: ThinSegError) -> None:
        if args.cluster is None:
            progress.close()
        if debugging():  # THINSEG_DEBUG=1: where it went wrong, before the line
            cause = error.__cause__ or error
            traceback.print_exception(type(cause), cause, cause.__traceback__, file=sys.stderr)
        where = error.path if error.path is not None else section.primary  # always name a file
        say(f"thinseg: error: {where}: {error.problem}", sys.stderr)

    try:
        run = segment_files(
            args.inputs,
            options,
            output,
            args.model,
            on_start=on_start,
            progress=progress,
            on_result=on_result,
            on_failure=on_failure,
        )
    finally:
        progress.close()

    if not run.sections:
        report_refused(run)
        print("thinseg: nothing to segment", file=sys.stderr)
        return 2
    if run.mineralogy_csv is not None:
        print(f"\nmodal mineralogy (% of each section, not classified included): {run.mineralogy_csv}")
    failed = run.failed
    print(f"\n{len(run.results)} section(s) segmented, {len(failed)} failed", file=sys.stderr)
    for path, why in failed:
        print(f"  failed: {path}: {why}", file=sys.stderr)
    if not run.results:
        return 2
    return 1 if failed else 0


def report_refused(run: SegmentRun) -> None:
    """One line per input that pairing refused (the batch goes on without it)."""
    for problem in run.problems:
        print(f"thinseg: error: {problem.path}: {problem.problem}", file=sys.stderr)
