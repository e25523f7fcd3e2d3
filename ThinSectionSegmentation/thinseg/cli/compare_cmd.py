"""`thinseg compare`: several models on the same labelled sections -> scores side by side, JSON,
per-class bars and comparison sheets (the same regions under each model), in PNG and HTML."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from thinseg.cli.evaluate_cmd import _count, add_scoring_options, check_mapping, log

#: Side of the regions shown on a comparison sheet, in section pixels.
REGION_SIDE = 256


def register(commands: argparse._SubParsersAction) -> None:
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
        "--sheets", type=_count, default=3, metavar="N", help="comparison sheets for the first N sections (default 3)"
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


def model_names(bundles: list) -> list[str]:
    """Short distinct names: folder names, else parent/folder (run1/model vs run2/model), else
    titles, else numbered."""
    for key in (lambda b: b.path.name, lambda b: f"{b.path.parent.name}/{b.path.name}", lambda b: b.title):
        names = [key(b) for b in bundles]
        if len(set(names)) == len(names):
            return names
    return [f"{b.path.name} ({i})" for i, b in enumerate(bundles, 1)]


def run(args: argparse.Namespace) -> int:
    from thinseg.cli.progress import TileProgress
    from thinseg.data.inputs import OutputSet, open_data, unique_names
    from thinseg.errors import ThinSegError
    from thinseg.inference.engine import InferenceOptions
    from thinseg.metrics import comparison_dict, format_comparison_table
    from thinseg.reports import plots
    from thinseg.model.bundle import load_bundle
    from thinseg.pipelines.evaluate import RegionImage, check_models, check_sections, evaluate_models
    from thinseg.reports.comparison import compare_sheet, write_comparison_html

    model_dirs, data = split_models_and_data(args.models, args.data)
    if not data:
        raise ThinSegError("no DATA given: list the labelled netCDF files or folders after the model folders")
    if len(model_dirs) < 2:
        raise ThinSegError("give at least two model folders to compare (one model: thinseg evaluate)")
    loaded = [load_bundle(d) for d in model_dirs]
    bundles = dict(zip(model_names(loaded), loaded))
    check_models(bundles)
    table = loaded[0].class_table
    check_mapping(args.mapping, table)
    sections = open_data(data)
    check_sections(sections, bundles)

    outputs = OutputSet(args.output, args.overwrite)
    files = {
        key: outputs.add(file)
        for key, file in (
            ("json", "comparison.json"),
            ("table", "comparison.txt"),
            ("bars", "per_class_scores.png"),
            ("html", "comparison.html"),
        )
    }
    sheet_names = [f"compare_{n}.png" for n in unique_names([s.name for s in sections])][: args.sheets]
    sheet_tmps = [outputs.add(n) for n in sheet_names]
    outputs.check()

    for name, bundle in bundles.items():
        print(f"model {name}: {bundle.title} ({bundle.path})", file=sys.stderr)
    print(f"{len(sections)} section(s): {', '.join(s.name for s in sections)}", file=sys.stderr)
    progress = TileProgress(enabled=not args.quiet)
    sheets: list[tuple[str, Path, list]] = []

    def on_section(sp) -> None:
        progress.close()
        if len(sheets) < len(sheet_tmps):
            path = sheet_tmps[len(sheets)]
            regions = compare_sheet(
                RegionImage(sp.images["PP"]),
                sp.truth,
                sp.preds,
                table,
                path,
                size=REGION_SIDE,
                title=f"{sp.name}: {' vs '.join(sp.preds)}",
            )
            sheets.append((sp.name, path, regions))

    try:
        reports = evaluate_models(
            bundles,
            sections,
            args.void_border_px,
            mapping_csv=args.mapping,
            options=InferenceOptions(device=args.device),
            progress=progress,
            on_section=on_section,
            log=log,
        )
        progress.close()
        text = format_comparison_table(reports)
        doc = comparison_dict(reports)
        doc["model_folders"] = {name: str(b.path) for name, b in bundles.items()}
        doc["sections"] = [s.name for s in sections]
        doc["sheets"] = [
            {"section": name, "file": final, "regions_yx": [[r.y0, r.x0, r.height, r.width] for r in regions]}
            for (name, _tmp, regions), final in zip(sheets, sheet_names)
        ]
        files["json"].write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        files["table"].write_text(text + "\n", encoding="utf-8")
        void = args.void_border_px > 0
        plots.plot_per_class_bars(reports, files["bars"], void_excluded=void, title=" vs ".join(reports))
        images = [
            (
                "per-class scores" + (f", void borders of {args.void_border_px:g} px excluded" if void else ""),
                files["bars"],
            )
        ]
        images += [(f"{name}: regions {', '.join(str(r) for r in regions)}", tmp) for name, tmp, regions in sheets]
        write_comparison_html(files["html"], reports, images, title=f"thinseg compare: {' vs '.join(reports)}")
        written = outputs.commit()
    except BaseException:
        progress.close()
        outputs.discard()
        raise
    print(text)
    print()
    for path in written:
        print(f"  -> {path}")
    return 0
