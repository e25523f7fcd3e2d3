"""`thinseg evaluate`: one model against labelled sections -> table, JSON and PNG figures."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from thinseg.cli import options as types
from thinseg.cli.progress import TileProgress

if TYPE_CHECKING:
    from thinseg.data.sections import Section
    from thinseg.model.bundle import ModelBundle


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "evaluate",
        help="score a model on labelled sections (confusion matrix, IoU/F1, fractions, figures)",
        description="Run a model over labelled sections (GeoSlicer netCDF files with PP, XP and a labelmap on "
        "the PP grid, e.g. from `thinseg register`) and score it against their labels. One confusion matrix "
        "is summed over the WHOLE dataset; the table is printed and written with JSON and PNG figures.",
    )
    p.add_argument("data", nargs="+", metavar="DATA", help="labelled netCDF files or folders of them")
    p.add_argument(
        "--model", type=Path, default=None, help="model folder (meta.json + model.pth); default: the bundled model"
    )
    p.add_argument(
        "--output",
        "-o",
        type=Path,
        default=Path("results/evaluation"),
        help="folder for the report files (default results/evaluation)",
    )
    add_scoring_options(p)
    types.add_tta(p)
    types.add_min_region(p)
    p.add_argument(
        "--overlays",
        type=types.count,
        default=3,
        metavar="N",
        help="per-section pictures truth | prediction | errors for the first N sections (default 3; 0: none; "
        f"at most {types.MAX_COUNT:,})",
    )
    p.add_argument("--overwrite", action="store_true", help="replace report files that exist (default: refuse)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def add_scoring_options(p: argparse.ArgumentParser) -> None:
    """Options `evaluate` and `compare` share (device and precision as for `thinseg segment`)."""
    p.add_argument(
        "--void-border-px",
        type=types.void_border_px,
        default=2.0,
        metavar="PX",
        help="also score without a band of PX model pixels around truth class boundaries, where QEMSCAN "
        f"truth is unreliable (default 2; 0: no such scores; at most {types.MAX_VOID_BORDER_PX:g})",
    )
    types.add_max_pixels(p)
    p.add_argument(
        "--mapping",
        type=Path,
        default=None,
        metavar="CSV",
        help="mineral,class rows mapping the labelmap's mineral names to the model's classes "
        "('ignore' leaves a mineral unscored); default: QEMSCAN names by name, other minerals -> Others",
    )
    p.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="where the network runs (default auto: the GPU if there is one, else the CPU; cuda: a GPU or an error)",
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16", "fp16"],
        help="auto (default): bf16 on GPUs and on CPUs with AVX512-BF16/AMX (under 0.5%% of labels "
        "change), else fp32; fp32: exact; fp16: GPU only",
    )


def log(message: str) -> None:
    print(f"thinseg: {message}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    # deferred: the pipeline loads torch (1-2 s), scipy and matplotlib
    from thinseg.pipelines.evaluate import EvaluateOptions, evaluate_files

    options = EvaluateOptions(
        data=args.data,
        model=args.model,
        output=args.output,
        void_border_px=args.void_border_px,
        mapping=args.mapping,
        device=args.device,
        precision=args.precision,
        overlays=args.overlays,
        overwrite=args.overwrite,
        tta=args.tta,
        min_region=args.min_region,
    )

    def on_start(bundle: ModelBundle, model_dir: Path, sections: list[Section]) -> None:
        print(f"model: {bundle.title} ({model_dir})", file=sys.stderr)
        print(f"{len(sections)} section(s): {', '.join(s.name for s in sections)}", file=sys.stderr)

    progress = TileProgress(enabled=not args.quiet)
    try:
        evaluated = evaluate_files(options, progress=progress, log=log, on_start=on_start)
    finally:
        progress.close()
    print(evaluated.text)
    print()
    for path in evaluated.written:
        print(f"  -> {path}")
    return 0
