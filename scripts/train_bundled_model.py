"""Train the bundled default model on generated sections and write its model card.

The shipped model under Resources/Models/ThinSectionEnv/Multiphase/thinseg-synthetic-unet is exactly what
this script produces (same seeds, same settings), so anyone can reproduce or improve it:

    .venv/bin/python scripts/train_bundled_model.py                    # about 50 minutes on a 2-core CPU
    .venv/bin/python scripts/train_bundled_model.py --epochs 9 --max-minutes 20 --output /tmp/m20   # a 20-minute budget
    .venv/bin/python scripts/train_bundled_model.py --epochs 2 --steps 10 --output /tmp/m   # smoke run

Held-out sections (seeds disjoint from training and validation) give the IoU in the card.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ThinSectionSegmentation"))

from thinseg.classes.files import default_class_table  # noqa: E402
from thinseg.classes.table import ClassTable  # noqa: E402
from thinseg.data.section_images import DEFAULT_MM_PER_PIXEL  # noqa: E402
from thinseg.inference import InferenceOptions, Segmenter  # noqa: E402
from thinseg.io.images import ArraySource  # noqa: E402
from thinseg.metrics import EvaluationReport, Evaluator  # noqa: E402
from thinseg.model.bundle import load_bundle  # noqa: E402
from thinseg.resources import default_model_dir  # noqa: E402
from thinseg.synth import generate_section  # noqa: E402
from thinseg.training import TrainConfig, synthetic_sections, train  # noqa: E402

TRAIN_SEEDS, VAL_SEEDS, TEST_SEEDS = 0, 1000, 2000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--steps", type=int, default=100, help="steps per epoch")
    parser.add_argument("--train-sections", type=int, default=24)
    parser.add_argument("--val-sections", type=int, default=4)
    parser.add_argument("--test-sections", type=int, default=6)
    parser.add_argument("--size", type=int, default=1024, help="generated section side in px")
    parser.add_argument("--run-dir", type=Path, default=Path("/tmp/thinseg-bundled-run"))
    parser.add_argument("--output", type=Path, default=default_model_dir(), help="where the bundle goes")
    parser.add_argument(
        "--max-minutes", type=float, default=None, help="training time budget (no epoch starts that would end past it)"
    )
    parser.add_argument(
        "--skip-training",
        action="store_true",
        help="package the best model already exported in --run-dir (e.g. after stopping a run)",
    )
    args = parser.parse_args()

    table = default_class_table()
    if not args.skip_training:
        run_training(args, table)
    summary = run_summary(args.run_dir)

    # Held-out evaluation through the same engine the CLI uses (tiled, whole sections).
    bundle = load_bundle(args.run_dir / "model")
    segmenter = Segmenter(bundle, InferenceOptions(device="cpu"))
    evaluator = Evaluator(table, void_border_px=2)
    for seed in range(TEST_SEEDS, TEST_SEEDS + args.test_sections):
        section = generate_section(args.size, args.size, seed=seed)
        pred = segmenter.segment([ArraySource(section.pp), ArraySource(section.xp)]).labels
        evaluator.add_section(f"test-{seed}", section.labels, pred)
    report = evaluator.report(bundle.title)

    if args.output.exists():
        shutil.rmtree(args.output)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(args.run_dir / "model", args.output)
    for extra in ("training_curves.png", "training_log.csv", "split.json"):
        src = args.run_dir / extra
        if src.exists():
            shutil.copy(src, args.output / extra)
    (args.output / "heldout_evaluation.json").write_text(report.to_json())
    write_model_card(args, report, summary)
    print(report.format_table())
    print(f"bundle written to {args.output}")


def run_summary(run_dir: Path) -> dict[str, Any]:
    """Epochs run, best epoch and its validation mean IoU, from the run's own files."""
    meta = json.loads((run_dir / "model" / "meta.json").read_text())
    with open(run_dir / "training_log.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    seconds = sum(float(r["train_seconds"]) + float(r.get("val_seconds") or 0) for r in rows)
    return {
        "epochs_run": len(rows),
        "best_epoch": meta["training"]["epoch"],
        "best_mean_iou": meta["metrics"]["mean_iou"],
        "train_minutes": seconds / 60,
    }


def run_training(args: argparse.Namespace, table: ClassTable) -> None:
    """Train the run in `args.run_dir` on generated sections (seeds fixed, so it is reproducible)."""
    train_set = synthetic_sections(args.train_sections, args.size, seed=TRAIN_SEEDS, name="train")
    val_set = synthetic_sections(args.val_sections, args.size, seed=VAL_SEEDS, name="val")
    config = TrainConfig(
        output_dir=args.run_dir,
        train_sections=train_set,
        val_sections=val_set,
        class_table=table,
        pixels_per_mm=1.0 / DEFAULT_MM_PER_PIXEL,
        epochs=args.epochs,
        steps_per_epoch=args.steps,
        patch_size=256,
        batch_size=8,
        patience=max(4, args.epochs // 3),
        max_minutes=args.max_minutes,
        seed=0,
        title="Thin-section U-Net (synthetic training)",
        description=(
            "MONAI residual UNet 16-32-64-128-256, PP+XP (6 channels) -> Calcite, Dolomite, Mg-Clay minerals, "
            "Pores, Quartz, Others. Trained on procedurally generated thin sections only: real rock needs "
            "retraining on registered QEMSCAN data."
        ),
        overwrite=True,
    )
    train(config)


def write_model_card(args: argparse.Namespace, report: EvaluationReport, summary: dict[str, Any]) -> None:
    """MODEL_CARD.md next to the bundle: data, settings, held-out scores and how to reproduce."""
    m = report.metrics
    rows = "\n".join(
        f"| {name} | {m.iou[i]:.3f} | {m.f1[i]:.3f} | {m.precision[i]:.3f} | {m.recall[i]:.3f} |"
        for i, name in enumerate(m.class_names)
    )
    mv = report.metrics_void_excluded
    if mv is None:
        raise ValueError("the held-out evaluation must exclude void borders (Evaluator(void_border_px=2))")
    budget = f" (time budget `--max-minutes {args.max_minutes:g}`)" if args.max_minutes else ""
    reproduce = f" --max-minutes {args.max_minutes:g}" if args.max_minutes else ""
    test_seeds = f"{TEST_SEEDS}..{TEST_SEEDS + args.test_sections - 1}"
    card = f"""# Model card: thinseg-synthetic-unet

**Trained on synthetic thin sections only.** It demonstrates the pipeline end to end; on real
rock it needs retraining on registered QEMSCAN data (`thinseg train`, see the README).

- Network: MONAI `UNet` (residual, channels 16-32-64-128-256, strides 2, 2 residual units,
  batch norm), 6 input channels (PP RGB then XP RGB, scaled 0-255 -> 0-1), 7 outputs
  (output 0 = not classified, then the 6 classes; label k = k-th class).
- Classes and colours (GeoSlicer QEMSCAN palette): Calcite #00ffff, Dolomite #0070c0,
  Mg-Clay minerals #daa520, Pores #000000, Quartz #ffff00, Others #ffffff.
- Resolution: {1 / DEFAULT_MM_PER_PIXEL:.1f} px/mm ({DEFAULT_MM_PER_PIXEL} mm/px); other spacings are
  resampled to it. Tile (input_roi_shape) 512 x 512.
- Training data: {args.train_sections} generated sections of {args.size} x {args.size} px (seeds
  {TRAIN_SEEDS}..{TRAIN_SEEDS + args.train_sections - 1}); validation {args.val_sections} sections (seeds
  {VAL_SEEDS}..); `thinseg.synth.generate_section` defaults.
- Training: {summary["epochs_run"]} epochs x {args.steps} steps of 8 patches 256 x 256, class-balanced
  sampling, Dice + cross-entropy, AdamW; best epoch {summary["best_epoch"]} (validation mean IoU
  {summary["best_mean_iou"]:.3f}); {summary["train_minutes"]:.0f} min of training on a 2-core CPU{budget}.
  Reproduce: `python scripts/train_bundled_model.py --epochs {args.epochs} --steps {args.steps}{reproduce}`.

## Held-out evaluation

{args.test_sections} generated sections (seeds {test_seeds}, never seen in training),
segmented whole with the same tiled engine as `thinseg segment`; confusion counts accumulated
over all sections.

| class | IoU | F1 | precision | recall |
|---|---|---|---|---|
{rows}

Mean IoU **{m.mean_iou:.3f}**, pixel accuracy {m.pixel_accuracy:.3f}; excluding a 2 px band around
class boundaries: mean IoU {mv.mean_iou:.3f}, accuracy {mv.pixel_accuracy:.3f}. Area-fraction
agreement over the {args.test_sections} sections: R^2 {report.fraction_stats.r2_overall:.3f},
RMSE {100 * report.fraction_stats.rmse_overall:.2f} percentage points.

Full figures: `heldout_evaluation.json`; curves: `training_curves.png`.
"""
    (args.output / "MODEL_CARD.md").write_text(card)


if __name__ == "__main__":
    main()
