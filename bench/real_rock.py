"""Real-rock experiments: train recipes and single levers on the real sandstone fields, score each
on fields it never saw, and write one JSON per experiment.

    python bench/real_rock.py --data ../shared/data/sandstone-ppl-xpl --out results/real-rock \
        --experiments small-data,old-unet [--parallel 2] [--threads 2] [--device auto]
    python bench/real_rock.py --data ... --out ... --lofo        # leave-one-field-out, ten folds
    python bench/real_rock.py --summarize OUT --tta none --lofo-figure docs/lofo.png   # tables, the folds' heatmap
    python bench/real_rock.py --experiments full-res,quarter-res --select 2a,8a   # choose on training fields
    python bench/real_rock.py --list                              # what each experiment changes
    python bench/real_rock.py --rescore OUT --min-region 256 --out OUT-sieved   # a run's models, scored again

Split: train on 2a, 3a, 5a, 6a, 7a, 8a, pick checkpoints on 4a (the field `thinseg train
--val-fraction 0.15 --seed 0` holds out), test on 9a, 10a, 11a, which nothing is trained, tuned or
picked on. Each experiment is one training of the `small-data` recipe (or the old U-Net recipe)
with ONE setting changed, so its effect is that lever's; the shipped recipe averages three such
trainings with different seeds (`small-data-seeds`; `--ensemble` averages trained runs). Scores
come from `thinseg.pipelines.evaluate` (what `thinseg evaluate` runs) without and with test-time
augmentation. Fields are read from the photographs and masks as `thinseg prepare` reads them (XP
aligned to PP, mask values mapped by the class file), held in memory, so no netCDF files are written.

The leave-one-field-out run trains the small-data recipe ten times: each field is the test once,
the next field (cyclically) picks checkpoints, the other eight train. It is a spread estimate
over fields, run after the recipe was fixed, not a way to choose it.

Choosing between experiments (`--select`) looks at the training fields 2a-8a only: each named
field validates once while the other six train, and `--summarize` ranks the experiments by their
mean validation IoU over those fields and 4a (the main split's validation field). One validation
field is a noisy judge; three are less so. `--select none --hold-out F` trains on every training
field but F with no validation field (the last epoch exported): what the validation field is
worth as training data.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ThinSectionSegmentation"))

FIELDS = ("2a", "3a", "4a", "5a", "6a", "7a", "8a", "9a", "10a", "11a")
TRAINING_FIELDS = ("2a", "3a", "4a", "5a", "6a", "7a", "8a")  # all a recipe may be chosen on
TRAIN = ("2a", "3a", "5a", "6a", "7a", "8a")
VAL = ("4a",)
#: `--select none`: every training field but the held-out ones trains, and none validates.
NO_VALIDATION = "none"
TEST = ("9a", "10a", "11a")
CLASSES = REPO / "Resources" / "ClassTables" / "sandstone_ppl_xpl.csv"
HALF_RES_MM = 0.00264  # the old recipe's model pixel size: half the fields' default 0.00132 mm/px


def _augment(**changes: Any) -> Any:
    from thinseg.training.recipes import recipe_settings

    base = recipe_settings("small-data")["augment"]
    return replace(base, **changes)


#: Colour jitter about 2.5x the recipe's (exposure and white balance vary from session to session).
WIDE_COLOUR_JITTER = _augment(brightness=0.2, contrast=0.3, saturation=0.25, channel_gain=0.1, gamma=0.3)

#: Bench-only experiment setting (not a TrainConfig field): `"colour_normalisation": "per-image"`
#: maps each photograph, channel by channel, to the reference fields' mean and spread before
#: anything trains or is scored (a lever measured on training fields; not in the recipe).
COLOUR_NORMALISATION = "colour_normalisation"

#: The previous recipe's settings (scripts/real_sandstone.sh before the small-data recipe).
PREVIOUS: dict[str, Any] = {
    "pixels_per_mm": 1 / HALF_RES_MM,
    "epochs": 10,
    "steps_per_epoch": 100,
    "balancing_strength": 0.25,
    "patience": 6,
}


def seed_variants(
    name: str, changes: dict[str, Any], description: str, seeds: tuple[int, ...]
) -> dict[str, tuple[str, dict[str, Any], str]]:
    """One small-data experiment per seed (`name`, `name-seedN`): paired levers retrain the recipe's seeds."""
    return {
        name + (f"-seed{seed}" if seed else ""): (
            "small-data",
            {**changes, "seed": seed},
            f"{description}, seed {seed}",
        )
        for seed in seeds
    }


#: experiment -> (recipe, TrainConfig changes, one-line description)
EXPERIMENTS: dict[str, tuple[str, dict[str, Any], str]] = {
    "small-data": (
        "small-data",
        {},
        "one training of the small-data recipe (seed 0: the shipped ensemble's first member)",
    ),
    "small-data-seeds": ("small-data", {"members": 3}, "the small-data recipe as shipped: seeds 0, 1, 2 averaged"),
    "small-data-pp": ("small-data", {"inputs": ("PP",)}, "small-data, PP only"),
    "old-unet": ("unet", PREVIOUS, "the previous recipe (MONAI U-Net from scratch, half resolution, 10 x 100 steps)"),
    "old-unet-pp": ("unet", {**PREVIOUS, "inputs": ("PP",)}, "the previous recipe, PP only"),
    "scratch-encoder": ("small-data", {"pretrained": False}, "encoder from random weights, not ImageNet"),
    "frozen-encoder": ("small-data", {"encoder_lr_scale": 0.0}, "ImageNet encoder frozen (decoder only learns)"),
    "encoder-full-lr": ("small-data", {"encoder_lr_scale": 1.0}, "encoder at the decoder's learning rate"),
    **seed_variants("encoder-full-lr", {"encoder_lr_scale": 1.0}, "encoder at the decoder's learning rate", (1, 2, 3)),
    "full-res": (
        "small-data",
        {"pixels_per_mm": None},
        "the fields' own resolution (0.00132 mm/px) instead of half (the recipe before 2026-12-05)",
    ),
    "quarter-res": (
        "small-data",
        {"pixels_per_mm": 0.5 / HALF_RES_MM},
        "quarter resolution (0.00528 mm/px) instead of half",
    ),
    "quarter-res-seed3": (
        "small-data",
        {"pixels_per_mm": 0.5 / HALF_RES_MM, "seed": 3},
        "quarter resolution with seed 3: a member that sees twice the rock beside half-resolution members",
    ),
    "quarter-res-balance-0.25": (
        "small-data",
        {"pixels_per_mm": 0.5 / HALF_RES_MM, "balancing_strength": 0.25},
        "quarter resolution and weaker class balancing (0.25)",
    ),
    "aug-colour-only": (
        "small-data",
        {"augment": _augment(gamma=0.0, blur=0.0, scale=0.1)},
        "no gamma/blur, scale 0.1 (old set)",
    ),
    "aug-strong-colour": (
        "small-data",
        {"augment": WIDE_COLOUR_JITTER},
        "colour jitter about 2.5x wider (exposure and white balance vary from session to session)",
    ),
    "aug-strong-colour-seed3": (
        "small-data",
        {"augment": WIDE_COLOUR_JITTER, "seed": 3},
        "aug-strong-colour with seed 3: a member that errs differently where exposure or white balance is off",
    ),
    "aug-none": ("small-data", {"augment": "none"}, "no augmentation at all"),
    "balance-0": ("small-data", {"balancing_strength": 0.0}, "uniform random patches (no class balancing)"),
    "balance-0.25": ("small-data", {"balancing_strength": 0.25}, "weaker class balancing (the old recipe's)"),
    **seed_variants(
        "balance-0.25",
        {"balancing_strength": 0.25},
        "weaker class balancing (0.25): the prior correction now undoes either balance's bias",
        (1, 2, 3),
    ),
    "balance-0.75": ("small-data", {"balancing_strength": 0.75}, "stronger class balancing (train's default)"),
    **seed_variants(
        "balance-0.75",
        {"balancing_strength": 0.75},
        "stronger class balancing (0.75): the prior correction undoes either balance's bias",
        (1, 2, 3),
    ),
    "ce-only": ("small-data", {"dice_weight": 0.0}, "cross-entropy only, no Dice term"),
    "constant-lr": ("small-data", {"schedule": "constant"}, "constant learning rate after warm-up (no cosine)"),
    "no-average": ("small-data", {"average_last": 0}, "best single epoch, no checkpoint averaging"),
    "lite1-encoder": (
        "small-data",
        {"encoder": "efficientnet-lite1"},
        "EfficientNet-Lite1 encoder (deeper) instead of Lite0",
    ),
    "lite1-encoder-pp": (
        "small-data",
        {"encoder": "efficientnet-lite1", "inputs": ("PP",)},
        "lite1-encoder, PP only",
    ),
    "lite2-encoder": (
        "small-data",
        {"encoder": "efficientnet-lite2"},
        "EfficientNet-Lite2 encoder (deeper, wider) instead of Lite0",
    ),
    "small-data-seed2": ("small-data", {"seed": 2}, "the small-data recipe with another seed (an ensemble member)"),
    "small-data-seed3": ("small-data", {"seed": 3}, "the small-data recipe with a third seed (an ensemble member)"),
    "small-data-seed4": (
        "small-data",
        {"seed": 4},
        "the small-data recipe with a fourth seed: other three-seed draws of the recipe, to see how far they move",
    ),
    "lite2-encoder-seed2": (
        "small-data",
        {"encoder": "efficientnet-lite2", "seed": 2},
        "lite2-encoder with another seed (a second ensemble member)",
    ),
    "patch-384": (
        "small-data",
        {"patch_size": 384, "batch_size": 4},
        "384 px patches (1 mm of rock at half resolution), 4 per step: more context, about the same pixels per step",
    ),
    "patch-384-seed3": (
        "small-data",
        {"patch_size": 384, "batch_size": 4, "steps_per_epoch": 88, "seed": 3},
        "384 px patches, 4 a step, 88 steps an epoch (the recipe's pixels per training), seed 3: an ensemble member",
    ),
    "long-schedule": ("small-data", {"epochs": 7}, "7 epochs of 100 steps instead of 4 (the recipe before 2026-12-05)"),
    **seed_variants(
        "freeze-2-stages",
        {"frozen_encoder_stages": 2},
        "the encoder's stem and 1/2 and 1/4 resolution stages kept at ImageNet weights",
        (0, 1, 2, 3),
    ),
    **seed_variants(
        "focal-loss",
        {"focal_gamma": 2.0},
        "focal cross-entropy (gamma 2) beside the Dice term instead of plain cross-entropy",
        (0, 1, 2, 3),
    ),
    **seed_variants(
        "decoder-lr-2e-3",
        {"lr": 2e-3, "encoder_lr_scale": 0.15},
        "the decoder at twice the learning rate (2e-3), the encoder's kept at 3e-4",
        (0, 1, 2, 3),
    ),
    **seed_variants(
        "colour-normalised",
        {COLOUR_NORMALISATION: "per-image"},
        "PP and XP each moved, channel by channel, to the mean and spread of fields 3a, 5a, 6a and 7a",
        (0, 1, 2, 3),
    ),
    **seed_variants(
        "separate-encoders",
        {"shared_encoder": False},
        "PP and XP each through an encoder of its own (both from ImageNet) instead of one shared encoder",
        (0, 1, 2, 3),
    ),
    **seed_variants(
        "void-band-8",
        {"void_border_px": 8.0},
        "a void band of 8 section pixels instead of 2 around class boundaries, left out of the loss and of validation",
        (0, 1, 2, 3),
    ),
    **seed_variants(
        "void-band-0",
        {"void_border_px": 0.0},
        "no void band: every labelled pixel in the loss and in validation, instead of a 2-pixel band left out",
        (0, 1, 2, 3),
    ),
    **seed_variants(
        "lovasz-loss",
        {"dice_weight": 0.0, "lovasz_weight": 1.0},
        "Lovasz-softmax (a surrogate of IoU) in place of the Dice term, cross-entropy kept",
        (0, 1, 2, 3),
    ),
    **seed_variants(
        "label-smoothing",
        {"label_smoothing": 0.1},
        "label smoothing 0.1 on the cross-entropy (spread over the real classes), Dice kept",
        (0, 1, 2, 3),
    ),
    **seed_variants(
        "class-mix",
        {"class_mix": 0.5},
        "ClassMix: half the patches of a batch take the grains of a random half of another patch's classes",
        (0, 1, 2, 3),
    ),
    **seed_variants(
        "export-candidates",
        {"average_last": 3},
        "the recipe with the last-3-epoch average offered too: with --score-candidates, each export candidate "
        "(best epoch, last-3 average, moving average) kept and scored",
        (0, 1, 2, 3),
    ),
    **seed_variants(
        "scale-jitter-0.3",
        {"augment": _augment(scale=0.30)},
        "patches zoomed by a factor in [0.7, 1.3] instead of [0.85, 1.15] (PP and XP together)",
        (0, 1, 2, 3),
    ),
    **seed_variants(
        "free-rotation",
        {"augment": _augment(rotation=45.0)},
        "patches also turned by an angle drawn in [-45, 45] degrees (PP, XP and labels together), on top of the "
        "90-degree turns and flips: every orientation of grains and twin lamellae",
        (0, 1, 2, 3),
    ),
    **seed_variants(
        "ema-decays",
        {"average_last": 3, "candidate_ema_decays": (0.95, 0.98, 0.995)},
        "export-candidates with moving averages of decay 0.95, 0.98 and 0.995 kept beside the recipe's 0.99 "
        "(with --score-candidates: `model-ema-<decay>`), to compare decays on the same trainings",
        (0, 1, 2, 3),
    ),
    **seed_variants(
        "three-epochs",
        {"epochs": 3},
        "3 epochs of 100 steps: a member of four, which together take the recipe's steps",
        (0, 2, 3, 4),
    ),
}


#: Fields that train in every arm of the nested checks (outer 2a or 8a, validation 4a).
COLOUR_REFERENCE_FIELDS = ("3a", "5a", "6a", "7a")


def channel_statistics(image: Any) -> tuple[Any, Any]:
    """Per-channel mean and standard deviation of an (H, W, 3) photograph."""
    import numpy as np

    flat = np.asarray(image, np.float64).reshape(-1, image.shape[-1])
    return flat.mean(0), flat.std(0)


def normalised_colours(image: Any, target: tuple[Any, Any]) -> Any:
    """`image` with each channel's mean and standard deviation moved to `target`'s (Reinhard et
    al. 2001, in RGB), rounded back to uint8."""
    import numpy as np

    mean, std = channel_statistics(image)
    out = (np.asarray(image, np.float32) - mean) / np.maximum(std, 1e-6) * target[1] + target[0]
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def _read_photographs(data: Path, name: str) -> tuple[Any, Any, Any]:
    """(PP, XP aligned to PP, mm per pixel) of one field, as `thinseg prepare` reads them."""
    from thinseg.data.section_images import read_ppxp
    from thinseg.registration.ppxp import estimate_xp_alignment

    images = read_ppxp(
        data / "ppl" / f"{name}_paralelos.jpg", data / "xpl" / f"{name}_cruzados.jpg", pp_pattern="paralelos"
    )
    return images.pp, estimate_xp_alignment(images.pp, images.xp).apply(images.xp), images.mm_per_pixel


def colour_targets(data: Path) -> tuple[tuple[Any, Any], tuple[Any, Any]]:
    """The PP and XP targets: per-channel means and standard deviations averaged over the reference fields."""
    import numpy as np

    stats = [[channel_statistics(img) for img in _read_photographs(data, n)[:2]] for n in COLOUR_REFERENCE_FIELDS]
    pp, xp = ((np.mean([s[r][0] for s in stats], 0), np.mean([s[r][1] for s in stats], 0)) for r in (0, 1))
    return pp, xp


def load_fields(data: Path, names: tuple[str, ...], colour_normalisation: str | None = None) -> dict[str, Any]:
    """The fields as in-memory sections, read as `thinseg prepare` reads them; with
    `colour_normalisation` "per-image", each photograph moved to the reference fields' colours."""
    from thinseg.classes.files import read_value_classes
    from thinseg.data.sections import ArraySection, read_label_image

    if colour_normalisation not in (None, "per-image"):
        raise ValueError(f"colour normalisation {colour_normalisation!r}: expected 'per-image' or None")
    targets = colour_targets(data) if colour_normalisation else None
    classes = read_value_classes(CLASSES)
    out = {}
    for name in names:
        pp, xp, mm_per_pixel = _read_photographs(data, name)
        if targets is not None:
            pp, xp = normalised_colours(pp, targets[0]), normalised_colours(xp, targets[1])
        mask = next((data / "masks").glob(f"{name}_mascara*.tiff"))
        labels = classes.apply(read_label_image(mask), mask)
        out[name] = ArraySection(
            name,
            pp,
            labels,
            xp,
            class_table=classes.table,
            mm_per_pixel=mm_per_pixel,
            origin=str(data / "ppl" / name),
        )
    return out


def train_config(
    recipe: str,
    changes: dict[str, Any],
    out: Path,
    sections: dict[str, Any],
    train: tuple[str, ...],
    val: tuple[str, ...],
    device: str,
) -> Any:
    from thinseg.classes.files import read_model_classes
    from thinseg.training.config import AugmentConfig, TrainConfig
    from thinseg.training.recipes import recipe_settings

    settings = {"seed": 0, **recipe_settings(recipe), "members": 1}  # one training unless an experiment asks
    settings.update(changes)
    if settings.get("augment") == "none":
        settings["augment"] = AugmentConfig.none()
    return TrainConfig(
        output_dir=out,
        train_sections=[sections[n] for n in train],
        val_sections=[sections[n] for n in val],
        class_table=read_model_classes(CLASSES),
        val_fraction=0.15,
        device=device,
        progress=False,
        overwrite=True,
        model_name="model",
        **settings,
    )


def score(
    model_dir: Path, sections: list[Any], tta: str, device: str, precision: str, min_region: int | str = "auto"
) -> dict[str, Any]:
    """The evaluation report of the model on `sections`; `min_region` "auto": the sieve the model recommends."""
    from thinseg.inference.engine import InferenceOptions
    from thinseg.model.bundle import load_bundle
    from thinseg.pipelines.evaluate import evaluate_model

    bundle = load_bundle(model_dir)
    start = time.perf_counter()
    options = InferenceOptions(device=device, tta=tta, precision=precision, min_region=min_region)  # type: ignore[arg-type]
    report = evaluate_model(bundle, sections, 2.0, options=options)
    record: dict[str, Any] = json.loads(report.to_json())
    record["seconds"] = time.perf_counter() - start
    return record


def score_ensemble(args: argparse.Namespace) -> int:
    """Score the average of trained models (--ensemble) on --ensemble-val and the test fields."""
    from thinseg.training.ensemble import combine_members

    dirs = [Path(d) for d in args.ensemble]
    val = tuple(args.ensemble_val.split(","))
    tests = TEST if args.ensemble_test else ()
    sections = load_fields(args.data, val + tests)
    name = "ensemble:" + "+".join(d.parent.name if d.name == "model" else d.name for d in dirs)
    stem = name.replace(":", "-").replace("+", "_")
    model = dirs[0]
    if len(dirs) > 1:
        model = (args.work or args.out / "runs") / stem
        shutil.rmtree(model, ignore_errors=True)
        combine_members(dirs, model, title=name, description="")

    def scored(model_dir: Path, fields: tuple[str, ...]) -> dict[str, Any]:
        return score(model_dir, [sections[f] for f in fields], "none", args.device, args.precision)

    val_report = scored(model, val)
    members_val = [scored(d, val)["metrics"]["mean_iou"] for d in dirs]  # the members alone, scored the same way
    test_report = scored(model, tests) if tests else None
    record = {
        "experiment": name,
        "description": f"probability average of {len(dirs)} models",
        "members": [str(d) for d in dirs],
        "train": [],
        "val": list(val),
        "test": list(tests),
        "val_mean_iou": val_report["metrics"]["mean_iou"],
        "members_val_mean_iou": members_val,
        "history": [],
        "model": str(model),
        "scores": {"none": test_report} if test_report else {},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"{stem}.json"
    path.write_text(json.dumps(record, default=str))
    shown = f"{test_report['metrics']['mean_iou']:.3f}" if test_report else "not scored"
    print(
        f"{name}: val {','.join(val)} mean IoU {record['val_mean_iou']:.3f} (members "
        f"{', '.join(f'{v:.3f}' for v in members_val)}); test mean IoU {shown} -> {path}"
    )
    return 0


def run_one(
    name: str,
    args: argparse.Namespace,
    train: tuple[str, ...],
    val: tuple[str, ...],
    test: tuple[str, ...],
    recipe: str,
    changes: dict[str, Any],
    result_name: str,
) -> dict[str, Any]:
    from thinseg.allocator import retain_freed_memory

    retain_freed_memory()  # as `thinseg train` does: this process trains once and exits
    import torch

    from thinseg.training import train as run_training

    torch.set_num_threads(args.threads)
    bench_settings = {COLOUR_NORMALISATION: changes.get(COLOUR_NORMALISATION)}
    changes = {k: v for k, v in changes.items() if k not in bench_settings}
    sections = load_fields(args.data, tuple(dict.fromkeys(train + val + test)), **bench_settings)
    run_dir = args.work / result_name
    if args.smoke:  # a few steps, to check the whole path
        changes = {**changes, "epochs": 2, "steps_per_epoch": 3, "warmup_steps": 1}
    changes = {**changes, "precision": args.precision, "keep_candidates": args.score_candidates}
    if args.no_prior_correction:
        changes["prior_correction"] = False
    config = train_config(recipe, changes, run_dir, sections, train, val, args.device)
    start = time.perf_counter()
    result = run_training(config, log=lambda m: print(f"[{result_name}] {m}", file=sys.stderr, flush=True))
    seconds = time.perf_counter() - start
    tests = [sections[n] for n in test]
    record = {
        "experiment": name,
        "description": EXPERIMENTS.get(name, ("", {}, "leave-one-field-out fold"))[2],
        "recipe": recipe,
        "changes": {
            **{k: (vars(v) if hasattr(v, "__dataclass_fields__") else v) for k, v in changes.items()},
            **{k: v for k, v in bench_settings.items() if v is not None},
        },
        "train": list(train),
        "val": list(val),
        "test": list(test),
        "training_seconds": seconds,
        "device": config.device,
        "torch": torch.__version__,
        "threads": args.threads,
        "best_epoch": result.best_epoch,
        "val_mean_iou": result.best_mean_iou,
        "history": result.history,
        "precision": args.precision,
        "scores": {tta: score(result.model_dir, tests, tta, args.device, args.precision) for tta in args.tta}
        if tests
        else {},
    }
    from thinseg.model.bundle import load_bundle

    if tests and load_bundle(result.model_dir).min_region_px > 0:  # the same model without its sieve
        record["unsieved_scores"] = {
            tta: score(result.model_dir, tests, tta, args.device, args.precision, 0) for tta in args.tta
        }
    # --score-candidates keeps every export candidate: what each kind of averaging gives or costs
    candidates = (
        ("model-best-epoch", "best_single_epoch_scores"),
        ("model-average", "averaged_scores"),
        ("model-ema", "moving_average_scores"),
    )
    for folder, key in candidates:
        if (run_dir / folder).is_dir() and tests:
            record[key] = {tta: score(run_dir / folder, tests, tta, args.device, args.precision) for tta in args.tta}
    text = json.dumps(record, default=str)
    (args.out / f"{result_name}.json").write_text(text)
    if args.jsonl is not None:  # one line per experiment, appended under a lock by parallel runs
        import fcntl

        with open(args.jsonl, "a") as stream:
            fcntl.flock(stream, fcntl.LOCK_EX)
            stream.write(text + "\n")
    return record


def draw_figure(model_dir: Path, field: str, data: Path, out: Path, title: str | None, panel_side: int = 640) -> None:
    """truth | prediction | errors of one field by one model (its own test-time augmentation),
    the README's picture."""
    from thinseg.inference.engine import InferenceOptions, Segmenter
    from thinseg.metrics.borders import void_border_mask
    from thinseg.model.bundle import load_bundle
    from thinseg.pipelines.evaluate import predict_section_result
    from thinseg.reports.errors import write_error_overlay

    bundle = load_bundle(model_dir)
    section = load_fields(data, (field,))[field]
    roles = ["PP", "XP"][: len(bundle.input_names)]
    segmenter = Segmenter(bundle, InferenceOptions(device="cpu"))
    images = {role: section.source(role) for role in roles}
    result, _ = predict_section_result(segmenter, section, images, roles)  # at the model's pixel size, as evaluate
    truth = section.read_labels()
    shown = write_error_overlay(
        out,
        truth,
        result.labels,
        bundle.class_table,
        pp=section.source("PP").read(0, truth.shape[0]),
        keep=void_border_mask(truth, 2.0),
        title=f"{field} (never trained on): {title or bundle.title}",
        max_panel_side=panel_side,
        overwrite=True,
    )
    print(f"{out}: {shown}")


def _interval(score: dict[str, Any], key: str, scale: float = 1.0, digits: int = 3) -> str:
    pair = (score.get("intervals") or {}).get(key)
    if not pair or pair[0] is None:
        return ""
    return f" [{pair[0] * scale:.{digits}f}, {pair[1] * scale:.{digits}f}]"


def summary_table(records: list[dict[str, Any]], tta: str) -> str:
    """A Markdown table of the test scores of `records` (one column each) with test-time
    augmentation `tta`: per-class IoU, mean IoU, accuracy, fraction R^2/RMSE with their 95%
    intervals over the test fields, calibration, training time."""
    columns = [r for r in records if tta in r["scores"]]
    if not columns:
        return ""
    first = columns[0]["scores"][tta]
    names = [c["name"] for c in first["metrics"]["classes"]]
    rows = [
        f"| test fields {', '.join(columns[0]['test'])}, TTA {tta} | "
        + " | ".join(c["experiment"] if c["experiment"] != "lofo" else f"LOFO {c['test'][0]}" for c in columns)
        + " |"
    ]
    rows.append("|---" * (len(columns) + 1) + "|")

    def row(label: str, cell: Any) -> None:
        rows.append(f"| {label} | " + " | ".join(cell(c["scores"][tta], c) for c in columns) + " |")

    for index, name in enumerate(names):
        row(f"IoU {name}", lambda s, _c, i=index: f"{s['metrics']['classes'][i]['iou']:.3f}")
    row("**mean IoU**", lambda s, _c: f"**{s['metrics']['mean_iou']:.3f}**{_interval(s, 'mean_iou')}")
    row(
        "**pixel accuracy**",
        lambda s, _c: f"**{100 * s['metrics']['pixel_accuracy']:.1f}%**{_interval(s, 'pixel_accuracy', 100, 1)}",
    )
    row("**fraction R^2**", lambda s, _c: f"**{s['fractions']['r2_overall']:.2f}**{_interval(s, 'fraction_r2', 1, 2)}")
    row(
        "fraction RMSE (points)",
        lambda s, _c: f"{100 * s['fractions']['rmse_overall']:.1f}{_interval(s, 'fraction_rmse', 100, 1)}",
    )
    row("calibration ECE", lambda s, _c: f"{s['calibration']['ece']:.3f}")
    row("training (min)", lambda _s, c: f"{c['training_seconds'] / 60:.1f}" if "training_seconds" in c else "-")
    return "\n".join(rows)


def selection_table(records: list[dict[str, Any]]) -> str:
    """A Markdown table of validation mean IoU (the exported model's, as training chose it) per
    experiment and validation field, and its mean over the fields: the choice of a recipe from
    the training fields alone. Every record validated on a training field counts, tested or not."""
    cells: dict[str, dict[str, float]] = {}
    for record in records:
        if record["experiment"] == "lofo" or record["val"][0] not in TRAINING_FIELDS:
            continue
        cells.setdefault(record["experiment"], {})[record["val"][0]] = record["val_mean_iou"]
    fields = sorted({f for row in cells.values() for f in row}, key=FIELDS.index)
    complete = {name: row for name, row in cells.items() if set(row) == set(fields)}
    if not complete or len(fields) < 2:
        return ""
    rows = ["| experiment | " + " | ".join(f"val {f}" for f in fields) + " | **mean** |"]
    rows.append("|---" * (len(fields) + 2) + "|")
    for name, row in sorted(complete.items(), key=lambda item: -sum(item[1].values())):
        values = [row[f] for f in fields]
        rows.append(
            f"| {name} | " + " | ".join(f"{v:.3f}" for v in values) + f" | **{sum(values) / len(values):.3f}** |"
        )
    return "\n".join(rows)


def _pooled_scores(scores: list[dict[str, Any]]) -> dict[str, float]:
    """The folds' scores as one evaluation over every held-out field: IoU and accuracy from the
    summed confusion matrices, fraction R^2 and RMSE over every (field, class) pair (one field's R^2
    over its five fractions says little), ECE weighted by the fields' pixels."""
    import numpy as np

    from thinseg.metrics.fractions import fraction_agreement
    from thinseg.metrics.scores import metrics_from_confusion

    names = [c["name"] for c in scores[0]["classes"]]
    metrics = metrics_from_confusion(sum(np.asarray(s["confusion"]) for s in scores), names)
    sections = [section for s in scores for section in s["sections"]]
    fractions = fraction_agreement(
        np.array([x["true_fractions"] for x in sections]), np.array([x["pred_fractions"] for x in sections]), names
    )
    pixels = np.array([s["metrics"]["evaluated_pixels"] for s in scores], float)
    return {
        "mean IoU": metrics.mean_iou,
        "accuracy (%)": 100 * metrics.pixel_accuracy,
        "fraction R^2": fractions.r2_overall,
        "fraction RMSE (points)": 100 * fractions.rmse_overall,
        "ECE": float(np.average([s["calibration"]["ece"] for s in scores], weights=pixels)),
    }


def lofo_folds(records: list[dict[str, Any]], tta: str) -> list[dict[str, Any]]:
    """The leave-one-field-out records scored with `tta`, in field order."""
    return sorted(
        (r for r in records if r["experiment"] == "lofo" and tta in r["scores"]),
        key=lambda r: FIELDS.index(r["test"][0]),
    )


def lofo_table(records: list[dict[str, Any]], tta: str) -> str:
    """A Markdown table of the leave-one-field-out folds (one row per held-out field, each scored
    alone) and their spread: mean, standard deviation and range over the folds."""
    folds = lofo_folds(records, tta)
    if not folds:
        return ""
    columns = {
        "mean IoU": lambda s: s["metrics"]["mean_iou"],
        "accuracy (%)": lambda s: 100 * s["metrics"]["pixel_accuracy"],
        "fraction R^2": lambda s: s["fractions"]["r2_overall"],
        "fraction RMSE (points)": lambda s: 100 * s["fractions"]["rmse_overall"],
        "ECE": lambda s: s["calibration"]["ece"],
    }
    digits = {"mean IoU": 3, "accuracy (%)": 1, "fraction R^2": 2, "fraction RMSE (points)": 1, "ECE": 3}
    values = {name: [get(r["scores"][tta]) for r in folds] for name, get in columns.items()}
    rows = ["| held-out field (validation) | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for index, record in enumerate(folds):
        cells = " | ".join(f"{values[name][index]:.{digits[name]}f}" for name in columns)
        rows.append(f"| {record['test'][0]} ({record['val'][0]}) | {cells} |")

    def spread(label: str, text: Any) -> None:
        rows.append(f"| {label} | " + " | ".join(text(values[name], digits[name]) for name in columns) + " |")

    spread(f"**mean of {len(folds)} folds**", lambda v, d: f"**{statistics.fmean(v):.{d}f}**")
    spread("standard deviation", lambda v, d: f"{statistics.stdev(v) if len(v) > 1 else 0.0:.{d}f}")
    spread("range", lambda v, d: f"{min(v):.{d}f} - {max(v):.{d}f}")
    pooled = _pooled_scores([r["scores"][tta] for r in folds])
    rows.append("| all folds pooled | " + " | ".join(f"{pooled[name]:.{digits[name]}f}" for name in columns) + " |")
    return "\n".join(rows)


def draw_lofo_figure(records: list[dict[str, Any]], tta: str, out: Path) -> None:
    """A heatmap of the leave-one-field-out folds: each held-out field's IoU per class and its mean
    IoU, so that which mineral fails on which field is seen at a glance."""
    import numpy as np
    from matplotlib.figure import Figure

    from thinseg.io.atomic import atomic_output

    folds = lofo_folds(records, tta)
    if not folds:
        raise SystemExit(f"{out}: no leave-one-field-out records (with --tta {tta}) to draw")
    classes = [c["name"] for c in folds[0]["scores"][tta]["metrics"]["classes"]]
    iou = np.array(
        [
            [c["iou"] if c["iou"] is not None else np.nan for c in r["scores"][tta]["metrics"]["classes"]]
            + [r["scores"][tta]["metrics"]["mean_iou"]]
            for r in folds
        ],
        float,
    )
    fig = Figure(figsize=(1.2 * len(classes) + 3.0, 0.42 * len(folds) + 1.6), dpi=150)
    ax = fig.add_subplot()
    shown = ax.imshow(np.ma.masked_invalid(iou), cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    absent = [
        [c["support"] == 0 for c in r["scores"][tta]["metrics"]["classes"]] + [False] for r in folds
    ]  # a class only predicted scores 0 and counts in the mean (see thinseg.metrics.scores)
    for (row, column), value in np.ndenumerate(iou):
        text = "not in field,\nnot predicted" if np.isnan(value) else f"{value:.2f}"
        text += "\n(not in field)" if absent[row][column] and not np.isnan(value) else ""
        weight = "bold" if column == len(classes) else "normal"
        colour = "black" if np.isnan(value) or value > 0.6 else "white"  # NaN cells are left white
        ax.text(column, row, text, ha="center", va="center", fontsize=8, color=colour, fontweight=weight)
    ax.set_xticks(range(len(classes) + 1), [*classes, "mean IoU"], rotation=20, ha="right", fontsize=8)
    ax.set_yticks(
        range(len(folds)),
        [f"{r['test'][0]}{'*' if r['test'][0] in TEST else ''} (val {r['val'][0]})" for r in folds],
        fontsize=8,
    )
    ax.axvline(len(classes) - 0.5, color="white", linewidth=2)
    ax.set_title(
        "Leave one field out: IoU on each held-out field (the next validates, the other eight train)\n"
        "* a test field of the main split (here a fold like the others); (not in field): only predicted, counted as 0",
        fontsize=9,
    )
    fig.colorbar(shown, ax=ax, fraction=0.04, pad=0.02, label="IoU")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(out) as tmp:
        fig.savefig(tmp, format="png")  # the temporary name has no ".png" to tell matplotlib
    print(f"{out}: {len(folds)} folds")


def rescore(source: Path, args: argparse.Namespace) -> int:
    """Score the models of a finished run again, on the same test fields, with `--min-region`:
    every record SOURCE/NAME.json whose model is SOURCE/runs/NAME/model gets OUT/NAME.json, the
    record with its scores replaced (what a sieve changes, without training again)."""
    import torch

    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    for file in sorted(source.glob("*.json")):
        record = json.loads(file.read_text())
        model = source / "runs" / file.stem / "model"
        if not record.get("test") or not model.is_dir():
            continue
        sections = load_fields(args.data, tuple(record["test"]))
        tests = [sections[f] for f in record["test"]]
        record["scores"] = {
            tta: score(model, tests, tta, args.device, args.precision, args.min_region) for tta in args.tta.split(",")
        }
        record["min_region_px"] = args.min_region
        record.pop("unsieved_scores", None)
        (args.out / file.name).write_text(json.dumps(record, default=str))
        mean = record["scores"][args.tta.split(",")[0]]["metrics"]["mean_iou"]
        print(f"{file.stem}: mean IoU {mean:.3f} with min region {args.min_region}", flush=True)
    return 0


def read_records(paths: list[Path]) -> list[dict[str, Any]]:
    records = []
    for path in paths:
        files = sorted(path.glob("*.json")) if path.is_dir() else [path]
        for file in files:
            text = file.read_text()
            records += (
                [json.loads(line) for line in text.splitlines() if line.strip()]
                if file.suffix == ".jsonl"
                else [json.loads(text)]
            )
    return records


def main() -> int:
    from thinseg.cli.options import min_region as min_region_option  # deferred, as the bench's other thinseg imports

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "sandstone-ppl-xpl")
    p.add_argument("--out", type=Path, default=REPO / "results" / "real-rock")
    p.add_argument("--work", type=Path, default=None, help="run folders (default OUT/runs)")
    p.add_argument("--experiments", default="small-data,old-unet", help="comma-separated (all: every experiment)")
    p.add_argument("--lofo", action="store_true", help="leave-one-field-out folds (of --lofo-experiment)")
    p.add_argument("--folds", default=",".join(FIELDS), help="LOFO: the held-out fields to run")
    p.add_argument(
        "--lofo-experiment", default="small-data", help="LOFO: the experiment whose settings each fold trains with"
    )
    p.add_argument(
        "--select",
        default=None,
        metavar="FIELDS",
        help="choose among --experiments on training fields only: each of these fields (of 2a-8a) validates "
        f"once, the other training fields train, nothing is tested ({NO_VALIDATION}: no field validates, the last "
        "epoch is exported; with --hold-out)",
    )
    p.add_argument(
        "--hold-out",
        default="",
        metavar="FIELDS",
        help="--select: training fields set aside entirely (an outer validation for choices such as ensembling)",
    )
    p.add_argument("--parallel", type=int, default=1, help="experiments at once (separate processes)")
    p.add_argument("--threads", type=int, default=2, help="torch threads per experiment")
    p.add_argument("--device", default="auto")
    p.add_argument("--tta", default="none,dihedral", help="test-time augmentation modes to score with")
    p.add_argument("--precision", default="fp32", help="training and scoring precision (fp32: as on CPUs)")
    p.add_argument("--jsonl", type=Path, default=None, help="also append each result as one line here")
    p.add_argument(
        "--score-candidates",
        "--score-best-epoch",
        dest="score_candidates",
        action="store_true",
        help="keep every export candidate (the best single epoch, the average of the last epochs, the moving "
        "average) under its own name, calibrated as the export, and score those on the test fields",
    )
    p.add_argument("--summarize", nargs="+", type=Path, default=None, metavar="JSON", help="print tables of results")
    p.add_argument(
        "--figure",
        nargs=3,
        default=None,
        metavar=("MODEL_DIR", "FIELD", "PNG"),
        help="draw truth | prediction | errors of one field",
    )
    p.add_argument("--figure-title", default=None, help="the model's name in the figure (default: its title)")
    p.add_argument(
        "--lofo-figure",
        type=Path,
        default=None,
        metavar="PNG",
        help="with --summarize: draw the leave-one-field-out folds' IoU per class (first --tta mode)",
    )
    p.add_argument(
        "--ensemble",
        nargs="+",
        default=None,
        metavar="MODEL_DIR",
        help="score the probability average of these trained models (on --ensemble-val and 9a-11a)",
    )
    p.add_argument("--ensemble-val", default="4a", help="--ensemble: the field(s) to validate the average on")
    p.add_argument(
        "--no-ensemble-test", dest="ensemble_test", action="store_false", help="--ensemble: do not score 9a-11a"
    )
    p.add_argument(
        "--no-prior-correction",
        action="store_true",
        help="train without the class-prior correction (as the recipe did before it; bench/prior_correct.py adds it)",
    )
    p.add_argument(
        "--rescore",
        type=Path,
        default=None,
        metavar="DIR",
        help="score the models of the run in DIR (its JSONs and runs/) again with --min-region, into --out",
    )
    p.add_argument(
        "--min-region",
        default="auto",
        type=min_region_option,
        help="--rescore: the sieve in model pixels (auto: what each model recommends)",
    )
    p.add_argument("--list", action="store_true")
    p.add_argument("--smoke", action="store_true", help="2 epochs of 3 steps: checks the path, measures nothing")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.figure:
        draw_figure(Path(args.figure[0]), args.figure[1], args.data, Path(args.figure[2]), args.figure_title)
        return 0
    if args.ensemble:
        return score_ensemble(args)
    if args.rescore:
        return rescore(args.rescore, args)
    if args.summarize:
        records = read_records(args.summarize)
        tested = [r for r in records if r["test"] and r["experiment"] != "lofo"]
        tested += [  # a model that recommends a sieve is also shown without it
            {**r, "experiment": f"{r['experiment']} (sieve off)", "scores": r["unsieved_scores"]}
            for r in tested
            if r.get("unsieved_scores")
        ]
        for tta in args.tta.split(","):
            print(summary_table(tested, tta) + "\n")
        print(selection_table(records) + "\n")
        for tta in args.tta.split(","):
            print(lofo_table(records, tta))
        if args.lofo_figure:
            draw_lofo_figure(records, args.tta.split(",")[0], args.lofo_figure)
        return 0
    if args.list:
        for name, (recipe, _changes, text) in EXPERIMENTS.items():
            print(f"{name:18s} {recipe:10s} {text}")
        return 0
    args.tta = args.tta.split(",")
    if args.experiments == "all":
        args.experiments = ",".join(EXPERIMENTS)
    args.work = args.work or args.out / "runs"
    args.out.mkdir(parents=True, exist_ok=True)
    if args.one:
        kind, _, name = args.one.rpartition(":")
        if kind.startswith("lofo"):
            index = FIELDS.index(name)
            val = (FIELDS[(index + 1) % len(FIELDS)],)
            train = tuple(f for f in FIELDS if f not in (name, val[0]))
            recipe, changes, _text = EXPERIMENTS[kind.partition(":")[2] or "small-data"]
            run_one("lofo", args, train, val, (name,), recipe, changes, f"lofo-{name}")
        elif kind.startswith("select:"):
            experiment = kind.partition(":")[2]
            recipe, changes, _text = EXPERIMENTS[experiment]
            held_out = tuple(f for f in args.hold_out.split(",") if f)
            train = tuple(f for f in TRAINING_FIELDS if f != name and f not in held_out)
            val = () if name == NO_VALIDATION else (name,)
            suffix = "".join(f"-without-{f}" for f in held_out)
            run_one(experiment, args, train, val, (), recipe, changes, f"select-{experiment}-{name}{suffix}")
        else:
            recipe, changes, _text = EXPERIMENTS[name]
            run_one(name, args, TRAIN, VAL, TEST, recipe, changes, name)
        return 0
    jobs = [name for name in args.experiments.split(",") if name]
    if args.select:  # the same experiments, each validated on other training fields
        fields = args.select.split(",")
        held_out = [f for f in args.hold_out.split(",") if f]
        named = (set(fields) - {NO_VALIDATION}) | set(held_out)
        if not named <= set(TRAINING_FIELDS) or set(fields) & set(held_out):
            p.error(f"--select and --hold-out take distinct training fields ({', '.join(TRAINING_FIELDS)})")
        if NO_VALIDATION in fields and not held_out:
            p.error(f"--select {NO_VALIDATION} trains on every training field: give --hold-out to score on")
        jobs = [f"select:{name}:{field}" for field in fields for name in jobs]
    if args.lofo:  # after the experiments: each fold is a separate training
        jobs += [f"lofo:{args.lofo_experiment}:{f}" for f in args.folds.split(",")]

    def launch(job: str) -> int:
        command = [
            sys.executable,
            __file__,
            "--one",
            job,
            "--data",
            str(args.data),
            "--out",
            str(args.out),
            "--work",
            str(args.work),
            "--threads",
            str(args.threads),
            "--device",
            args.device,
            "--tta",
            ",".join(args.tta),
            "--precision",
            args.precision,
            "--hold-out",
            args.hold_out,
        ]
        command += (["--smoke"] if args.smoke else []) + (["--jsonl", str(args.jsonl)] if args.jsonl else [])
        command += ["--score-candidates"] if args.score_candidates else []
        command += ["--no-prior-correction"] if args.no_prior_correction else []
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        done = subprocess.run(command, env=env)
        print(f"{job}: exit {done.returncode}", file=sys.stderr, flush=True)
        return done.returncode

    with ThreadPoolExecutor(args.parallel) as pool:
        codes = list(pool.map(launch, jobs))
    return max(codes) if codes else 0


if __name__ == "__main__":
    sys.exit(main())
