"""`thinseg compare`: several models on the same labelled sections -> scores side by side, JSON,
per-class bars and comparison sheets (the same regions under each model), in PNG and HTML."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from thinseg.cli import options as types
from thinseg.cli.evaluate_cmd import add_scoring_options, log
from thinseg.cli.progress import TileProgress

if TYPE_CHECKING:
    from thinseg.data.sections import Section
    from thinseg.model.bundle import ModelBundle


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = commands.add_parser(
        "compare",
        help="score several models on the same labelled sections, side by side, with comparison sheets",
        description="Run every model over the same labelled sections (as `thinseg evaluate`) and show the scores "
        "side by side (best starred), write them as JSON, and draw comparison sheets: the regions where the "
        "models disagree most, under each model, with the differences marked; also as one HTML page.",
        epilog="Model folders (with meta.json) are listed after --models; the first argument that is not a "
        "model folder starts DATA (or separate them with --).",
    )
    p.add_argument("--models", nargs="+", required=True, type=Path, metavar="MODEL", help="two or more model folders")
    p.add_argument("data", nargs="*", metavar="DATA", help="labelled netCDF files or folders of them")
    p.add_argument(
        "--output",
        "-o",
        type=Path,
        default=Path("results/comparison"),
        help="folder for the comparison files (default results/comparison)",
    )
    add_scoring_options(p)
    p.add_argument(
        "--sheets",
        type=types.count,
        default=3,
        metavar="N",
        help=f"comparison sheets for the first N sections (default 3; 0: none; at most {types.MAX_COUNT:,})",
    )
    p.add_argument("--overwrite", action="store_true", help="replace comparison files that exist (default: refuse)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def is_model_folder(path: Path) -> bool:
    return path.is_dir() and ((path / "meta.json").is_file() or (path / "model.pth").is_file())


def split_models_and_data(models: list[Path], data: list[str]) -> tuple[list[Path], list[Path]]:
    """`--models A B S1.nc data/` puts the data into --models (argparse is greedy): the leading
    model folders are the models, the rest is data."""
    models, data_paths = list(models), [Path(d) for d in data]
    first_data = next((i for i, m in enumerate(models) if not is_model_folder(m)), len(models))
    if first_data == 0:  # the very first item must be a model: let loading it explain the problem
        first_data = 1
    return models[:first_data], models[first_data:] + data_paths


def run(args: argparse.Namespace) -> int:
    # deferred: the pipeline loads torch (1-2 s), scipy and matplotlib
    from thinseg.pipelines.compare import CompareOptions, compare_files

    model_dirs, data = split_models_and_data(args.models, args.data)
    options = CompareOptions(
        models=model_dirs,
        data=data,
        output=args.output,
        void_border_px=args.void_border_px,
        mapping=args.mapping,
        device=args.device,
        precision=args.precision,
        sheets=args.sheets,
        overwrite=args.overwrite,
    )

    def on_start(bundles: Mapping[str, ModelBundle], sections: list[Section]) -> None:
        for name, bundle in bundles.items():
            print(f"model {name}: {bundle.title} ({bundle.path})", file=sys.stderr)
        print(f"{len(sections)} section(s): {', '.join(s.name for s in sections)}", file=sys.stderr)

    progress = TileProgress(enabled=not args.quiet)
    try:
        compared = compare_files(options, progress=progress, log=log, on_start=on_start)
    finally:
        progress.close()
    print(compared.text)
    print()
    for path in compared.written:
        print(f"  -> {path}")
    return 0
