"""`thinseg evaluate`: one model against labelled sections -> table, JSON and PNG figures."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

#: Longest side of the per-section overlay panels.
OVERLAY_SIDE = 1000


def register(commands: argparse._SubParsersAction) -> None:
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
    p.add_argument(
        "--overlays",
        type=_count,
        default=3,
        metavar="N",
        help="per-section pictures truth | prediction | errors for the first N sections (default 3; 0: none)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace report files that exist (default: refuse)")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bars")
    p.set_defaults(run=run)


def add_scoring_options(p: argparse.ArgumentParser) -> None:
    """Options `evaluate` and `compare` share."""
    p.add_argument(
        "--void-border-px",
        type=_non_negative_float,
        default=2.0,
        metavar="PX",
        help="also score without a band of PX model pixels around truth class boundaries, where QEMSCAN "
        "truth is unreliable (default 2; 0: no such scores)",
    )
    p.add_argument(
        "--mapping",
        type=Path,
        default=None,
        metavar="CSV",
        help="mineral,class rows mapping the labelmap's mineral names to the model's classes "
        "('ignore' leaves a mineral unscored); default: QEMSCAN names by name, other minerals -> Others",
    )
    p.add_argument(
        "--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the network runs (default auto)"
    )


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError("must be >= 0")
    return value


def log(message: str) -> None:
    print(f"thinseg: {message}", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from thinseg.cli.progress import TileProgress
    from thinseg.data.inputs import OutputSet, open_data, unique_names
    from thinseg.inference.engine import InferenceOptions
    from thinseg.reports import plots
    from thinseg.model.bundle import load_bundle
    from thinseg.pipelines.evaluate import check_models, check_sections, evaluate_model, read_preview, section_path
    from thinseg.resources import default_model_dir

    model_dir = args.model or default_model_dir()
    bundle = load_bundle(model_dir)
    name = bundle.title
    check_models({name: bundle})
    check_mapping(args.mapping, bundle.class_table)
    sections = open_data(args.data)
    check_sections(sections, {name: bundle})

    outputs = OutputSet(args.output, args.overwrite)
    void = args.void_border_px > 0
    files = {
        key: outputs.add(file)
        for key, file in (
            ("json", "evaluation.json"),
            ("table", "evaluation.txt"),
            ("confusion", "confusion_matrix.png"),
            ("bars", "per_class_scores.png"),
            ("fractions", "fractions.png"),
        )
    }
    if void:
        files["confusion_all"] = outputs.add("confusion_matrix_all_pixels.png")
    overlay_names = [f"overlay_{n}.png" for n in unique_names([s.name for s in sections])][: args.overlays]
    overlay_tmps = [outputs.add(n) for n in overlay_names]
    outputs.check()

    print(f"model: {bundle.title} ({model_dir})", file=sys.stderr)
    print(f"{len(sections)} section(s): {', '.join(s.name for s in sections)}", file=sys.stderr)
    progress = TileProgress(enabled=not args.quiet)
    done = [0]

    def on_section(sp) -> None:
        progress.close()
        index = done[0]
        done[0] += 1
        if index < len(overlay_tmps):
            pp = read_preview(sp.images["PP"], OVERLAY_SIDE)
            plots.plot_section_overlay(
                pp,
                sp.truth,
                sp.preds[name],
                bundle.class_table,
                overlay_tmps[index],
                keep=sp.keep,
                title=f"{sp.name}: {name}",
                max_side=OVERLAY_SIDE,
            )

    try:
        report = evaluate_model(
            bundle,
            sections,
            args.void_border_px,
            name=name,
            mapping_csv=args.mapping,
            options=InferenceOptions(device=args.device),
            progress=progress,
            on_section=on_section,
            log=log,
        )
        progress.close()
        table = report.format_table()
        doc = report.to_dict()
        doc["model_folder"] = str(model_dir)
        doc["mapping_csv"] = str(args.mapping) if args.mapping else None
        doc["section_files"] = [str(section_path(s) or s.name) for s in sections]
        files["json"].write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        files["table"].write_text(table + "\n" + section_lines(report) + "\n", encoding="utf-8")
        n = len(report.sections)
        if void:
            plots.plot_confusion(
                report.confusion_void_excluded,
                bundle.class_table,
                files["confusion"],
                title=f"{name} on {n} section(s), void borders of {args.void_border_px:g} px excluded",
            )
            plots.plot_confusion(
                report.confusion,
                bundle.class_table,
                files["confusion_all"],
                title=f"{name} on {n} section(s), all labelled pixels",
            )
        else:
            plots.plot_confusion(
                report.confusion,
                bundle.class_table,
                files["confusion"],
                title=f"{name} on {n} section(s), all labelled pixels",
            )
        plots.plot_per_class_bars({name: report}, files["bars"], void_excluded=void, title=name)
        plots.plot_fractions_scatter(
            report.true_fractions,
            report.pred_fractions,
            bundle.class_table,
            files["fractions"],
            report.fraction_stats,
            title=f"{name}: mineral fractions per section",
        )
        written = outputs.commit()
    except BaseException:
        progress.close()
        outputs.discard()
        raise
    print(table)
    print(section_lines(report))
    print()
    for path in written:
        print(f"  -> {path}")
    return 0


def section_lines(report) -> str:
    """Per-section headline scores (all labelled pixels)."""
    width = max(12, *(len(s.name) for s in report.sections))
    lines = [f"{'section':<{width}} {'pixels':>12} {'accuracy%':>10} {'mean IoU':>9}"]
    for s in report.sections:
        lines.append(f"{s.name:<{width}} {s.evaluated_pixels:>12,} {100 * s.pixel_accuracy:>10.2f} {s.mean_iou:>9.3f}")
    return "\n".join(lines)


def check_mapping(path: Path | None, class_table) -> None:
    """Read the mapping table up front and resolve every row against the model's classes, so a
    bad table fails before any model runs (not at the first section that uses the bad row)."""
    if path is None:
        return
    from thinseg.classes.table import ClassTable
    from thinseg.data.mapping import build_mapping, load_mapping_csv
    from thinseg.errors import ThinSegError

    rows = load_mapping_csv(path)
    names = list(rows)[:255]
    try:
        build_mapping(ClassTable.from_names_colors(names, ["#000000"] * len(names)), class_table, rows)
    except ThinSegError as error:
        raise ThinSegError(error.problem, path) from None
