"""Inference-time levers for LiteUNet models, scored on held-out real sandstone fields with and
without them, on the same code path (one forward pass over the whole field at the model's
resolution, bf16 on CPUs):

- `adabn`: the decoder's batch-norm statistics re-estimated on each field's own images (AdaBN),
  the encoder keeping its ImageNet statistics;
- `superpixels`: class probabilities averaged over SLIC superpixels of the field's PP+XP
  (scikit-image), each superpixel taking the class of its average;
- `average`: the probabilities of several models averaged on the section's grid, each model
  run at its own pixel size (members of different resolutions, which an ensemble bundle cannot
  hold); models trained without validation, which have no fitted temperature, are run at
  `--fixed-temperature`;
- `draws`: every K-model subset of the models (the recipe's K seeds averaged, drawn several
  ways) scored with and without three steps on the averaged probabilities: `multiscale` (each
  model also run at 1/1.15 and 1.15 times its pixel size, inside the scale jitter it trained
  with), `prior` (probabilities times the training fields' natural class shares over the shares
  the class-balanced sampler fed the network, simulated from the model's own training fields and
  settings) and `em` (after `prior`, each field's own class prior re-estimated from the
  posteriors, Saerens et al. 2002), and their combinations. Paired on the same models, a step's
  effect is read free of the draw-to-draw spread of the trainings themselves.

Only `prior` is in the product (`thinseg train --recipe small-data` folds it into each member at
export): the others lost on training fields held out of training (README, "Results on real thin
sections"). The draws lever refuses models that already carry the correction.

    python bench/inference_levers.py --lever adabn --field 2a --models RUN/model ...
    python bench/inference_levers.py --lever superpixels --side 32 --compactness 0.3 --field 4a --models ...
    python bench/inference_levers.py --lever average --field 2a --models HALF/model QUARTER/model ...
    python bench/inference_levers.py --lever draws --draw-size 3 --field 2a --models SEED0/model ... --out 2a.json
    python bench/inference_levers.py --summarize 2a.json 8a.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_rock  # the fields, read as the real-rock bench reads them
from prior_correct import class_shares  # the shares `thinseg train` folds in


def model_grid_images(bundle: Any, section: Any, scale: float = 1.0) -> list[np.ndarray]:
    """The section's images for the model's inputs, resampled to `scale` times the model's pixel size."""
    from thinseg.inference.resample import ResampledSource, resampling_factor
    from thinseg.pipelines.evaluate import model_roles, open_images
    from thinseg.pipelines.segment import model_mm_per_pixel

    roles = model_roles(bundle)
    factor = (resampling_factor(section.mm_per_pixel, model_mm_per_pixel(bundle)) or 1.0) / scale
    with open_images(section, roles) as images:
        sources = [images[r] if abs(factor - 1) < 1e-6 else ResampledSource(images[r], factor) for r in roles]
        return [np.asarray(s.read(0, s.shape[0])) for s in sources]


def probabilities(
    bundle: Any, images: list[np.ndarray], adapt_decoder_bn: bool, temperature: float = 1.0
) -> torch.Tensor:
    """(C, H, W) class probabilities of the whole field in one forward pass (padded to the
    network's size multiple by reflection), the logits divided by `temperature`; with
    `adapt_decoder_bn`, the decoder's batch norms first take this field's own statistics."""
    from thinseg.inference.engine import size_multiple

    network = bundle.network.eval()
    x = bundle.prepare([torch.from_numpy(img).permute(2, 0, 1)[None] for img in images])
    h, w = x.shape[-2:]
    m = size_multiple(network)
    x = torch.nn.functional.pad(x, (0, -w % m, 0, -h % m), mode="reflect")
    if adapt_decoder_bn:
        norms = [
            module
            for name, module in network.named_modules()
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and ".encoder." not in f".{name}."
        ]
        for norm in norms:
            norm.reset_running_stats()
            norm.momentum = None  # a cumulative average: one batch gives its own statistics exactly
            norm.train()
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            network(x)
        network.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        logits = network(x).float()[0, :, :h, :w]
    return torch.softmax(logits / temperature, dim=0)


def uncalibrated_temperature(bundle: Any, fixed: float | None) -> float:
    """`fixed` for a model trained without validation (no fitted temperature in meta.json), else 1
    (a fitted temperature is already folded into the network)."""
    fitted = (bundle.meta.get("training") or {}).get("temperature")
    return 1.0 if fixed is None or fitted is not None else fixed


def superpixel_vote(probs: torch.Tensor, images: list[np.ndarray], side: int, compactness: float) -> torch.Tensor:
    """Each SLIC superpixel of the stacked images (about side x side px) takes its mean probabilities."""
    from skimage.segmentation import slic

    stacked = np.concatenate(images, axis=-1).astype(np.float32) / 255.0
    h, w = stacked.shape[:2]
    regions = slic(
        stacked,
        n_segments=max(1, h * w // (side * side)),
        compactness=compactness,
        channel_axis=-1,
        start_label=0,
        convert2lab=False,
    ).ravel()
    flat = probs.reshape(probs.shape[0], -1).numpy()
    sums = np.stack([np.bincount(regions, weights=c, minlength=regions.max() + 1) for c in flat])
    mean = sums / np.maximum(sums.sum(0, keepdims=True), 1e-12)
    return torch.from_numpy(mean[:, regions].reshape(probs.shape).astype(np.float32))


def add_average(evaluator: Any, section: Any, bundle: Any, model_probs: list[torch.Tensor]) -> None:
    """Score on `section` the average of (C, h, w) probability maps, each mapped from its model's
    own grid onto the section's (nearest neighbour); `bundle` gives the classes and pixel size."""
    from thinseg.inference.resample import nearest_index
    from thinseg.pipelines.evaluate import section_keep, section_scale, section_truth

    truth = section_truth(section, bundle.class_table)
    total = np.zeros((model_probs[0].shape[0], *truth.shape), np.float32)
    for probs in model_probs:
        rows, cols = nearest_index(truth.shape[0], probs.shape[1]), nearest_index(truth.shape[1], probs.shape[2])
        total += probs.numpy()[:, rows][:, :, cols]
    best, labels = total.max(axis=0) / len(model_probs), total.argmax(axis=0)
    pred = (labels + bundle.first_label).astype(np.uint8)
    confidence = (best * 255 + 0.5).clip(0, 255).astype(np.uint8)
    keep = section_keep(truth, 2.0, section_scale(section, bundle))
    evaluator.add_section(section.name, truth, pred, keep, confidence=confidence)


def score(bundle: Any, sections: list[Any], lever: str, args: argparse.Namespace) -> dict[str, Any]:
    """The report of `bundle` on `sections` with `lever` ("none", "adabn", "superpixels")."""
    from thinseg.metrics.evaluator import Evaluator

    evaluator = Evaluator(bundle.class_table, 2.0)
    for section in sections:
        images = model_grid_images(bundle, section)
        if lever == "adabn":  # adaptation is per field: the trained statistics come back afterwards
            saved = {k: v.clone() for k, v in bundle.network.state_dict().items()}
            probs = probabilities(bundle, images, adapt_decoder_bn=True)
            bundle.network.load_state_dict(saved)
        else:
            probs = probabilities(bundle, images, adapt_decoder_bn=False)
        if lever == "superpixels":
            probs = superpixel_vote(probs, images, args.side, args.compactness)
        add_average(evaluator, section, bundle, [probs])
    report: dict[str, Any] = json.loads(evaluator.report(model=bundle.title).to_json())
    return report


def score_average(bundles: list[Any], sections: list[Any], fixed_temperature: float | None = None) -> dict[str, Any]:
    """The report of the models' probabilities averaged on each section's grid, each model run at
    its own pixel size (and, if it was trained without validation, at `fixed_temperature`)."""
    from thinseg.metrics.evaluator import Evaluator

    evaluator = Evaluator(bundles[0].class_table, 2.0)
    for section in sections:
        probs = [
            probabilities(
                b,
                model_grid_images(b, section),
                adapt_decoder_bn=False,
                temperature=uncalibrated_temperature(b, fixed_temperature),
            )
            for b in bundles
        ]
        add_average(evaluator, section, bundles[0], probs)
    report: dict[str, Any] = json.loads(evaluator.report(model="average").to_json())
    return report


#: Multi-scale inference: the model's pixel size times these (the recipe trains with a scale
#: jitter of +-15%, log-uniform).
SCALES = (1 / 1.15, 1.0, 1.15)

#: The steps `draws` scores on each draw's averaged probabilities, in this order of columns.
VARIANTS = ("none", "multiscale", "prior", "em", "multiscale+prior", "multiscale+em")


def scaled_probabilities(bundle: Any, section: Any, scale: float, grid: tuple[int, int] | None) -> torch.Tensor:
    """(C, h, w) probabilities with the section resampled to `scale` times the model's pixel
    size, resized (bilinear) onto `grid`, the model's own grid of the section, when given."""
    probs = probabilities(bundle, model_grid_images(bundle, section, scale), adapt_decoder_bn=False)
    if grid is not None and tuple(probs.shape[1:]) != grid:
        probs = torch.nn.functional.interpolate(probs[None], size=grid, mode="bilinear", align_corners=False)[0]
        probs = probs / probs.sum(0, keepdim=True)
    return probs


def prior_corrected(probs: torch.Tensor, weights: np.ndarray) -> torch.Tensor:
    """(C, h, w) probabilities, the last len(`weights`) channels (the named classes; a leading
    channel for label 0 stays as it is) times `weights`, renormalised per pixel."""
    full = np.ones(probs.shape[0], np.float32)
    full[probs.shape[0] - len(weights) :] = weights
    out = probs * torch.from_numpy(full)[:, None, None]
    return out / out.sum(0, keepdim=True)


def em_adapted(probs: torch.Tensor, prior: np.ndarray, iterations: int = 100, tol: float = 1e-6) -> torch.Tensor:
    """Posteriors under the field's own class prior, re-estimated by EM from `probs`, whose named
    classes (the last len(`prior`) channels) assume `prior` (Saerens, Latinne and Decaestecker
    2002)."""
    reference = prior.astype(np.float64)
    field_prior = reference.copy()
    named = probs.shape[0] - len(prior)
    adapted = probs
    for _ in range(iterations):
        adapted = prior_corrected(probs, field_prior / reference)
        new = adapted[named:].double().mean(dim=(1, 2)).numpy()
        new = new / new.sum()
        if float(np.abs(new - field_prior).max()) < tol:
            break
        field_prior = new
    return adapted


def score_probabilities(bundle: Any, section: Any, probs: torch.Tensor) -> dict[str, Any]:
    """Mean IoU, accuracy, ECE and per-class IoU of one probability map on one section."""
    from thinseg.metrics.evaluator import Evaluator

    evaluator = Evaluator(bundle.class_table, 2.0)
    add_average(evaluator, section, bundle, [probs])
    report = json.loads(evaluator.report(model="draw").to_json())
    m = report["metrics"]
    return {
        "mean_iou": m["mean_iou"],
        "accuracy": m["pixel_accuracy"],
        "ece": (report.get("calibration") or {}).get("ece"),
        "iou": {c["name"]: c["iou"] for c in m["classes"]},
    }


def score_draws(
    bundles: list[Any], seeds: list[int], section: Any, all_sections: dict[str, Any], k: int
) -> list[dict[str, Any]]:
    """Every k-subset of the models (and all of them), each averaged with every variant."""
    per_model = [{1.0: scaled_probabilities(b, section, 1.0, None)} for b in bundles]
    grid = (int(per_model[0][1.0].shape[1]), int(per_model[0][1.0].shape[2]))  # the model's grid of the field
    for b, by_scale in zip(bundles, per_model):
        by_scale.update({s: scaled_probabilities(b, section, s, grid) for s in SCALES if s != 1.0})
    shares = [class_shares(b, all_sections) for b in bundles]
    records = []
    subsets = list(itertools.combinations(range(len(bundles)), k))
    if len(bundles) > k:
        subsets.append(tuple(range(len(bundles))))
    for subset in subsets:
        natural = np.mean([shares[i][0] for i in subset], axis=0)
        sampled = np.mean([shares[i][1] for i in subset], axis=0)
        single = torch.stack([per_model[i][1.0] for i in subset]).mean(0)
        multi = torch.stack([per_model[i][s] for i in subset for s in SCALES]).mean(0)
        maps = {
            "none": single,
            "multiscale": multi,
            "prior": prior_corrected(single, natural / sampled),
            "multiscale+prior": prior_corrected(multi, natural / sampled),
        }
        maps["em"] = em_adapted(maps["prior"], natural)
        maps["multiscale+em"] = em_adapted(maps["multiscale+prior"], natural)
        for variant in VARIANTS:
            row = {"field": section.name, "seeds": [seeds[i] for i in subset], "variant": variant}
            row.update(score_probabilities(bundles[0], section, maps[variant]))
            records.append(row)
        print(
            f"{section.name} seeds {[seeds[i] for i in subset]}: "
            + ", ".join(f"{r['variant']} {r['mean_iou']:.3f}" for r in records[-len(VARIANTS) :]),
            flush=True,
        )
    return records


def summarize(paths: list[Path]) -> None:
    """Per variant: each draw's mean IoU over the fields, its change against `none`, and the
    fields' means over the draws (the draws lever's JSON files, one per field)."""
    rows = [r for p in paths for r in json.loads(p.read_text())]
    fields = sorted({r["field"] for r in rows})
    draws = sorted({tuple(r["seeds"]) for r in rows}, key=lambda d: (len(d), d))
    table = {(r["field"], tuple(r["seeds"]), r["variant"]): r for r in rows}
    for size in sorted({len(d) for d in draws}):
        group = [d for d in draws if len(d) == size]
        print(f"\n{size}-seed averages over {', '.join(fields)}: mean IoU per draw (change against none)")
        print(
            "| variant | "
            + " | ".join("seeds " + ",".join(map(str, d)) for d in group)
            + " | mean | "
            + " | ".join(fields)
            + " | accuracy | ECE |"
        )
        for variant in VARIANTS:
            means = [statistics.mean(table[(f, d, variant)]["mean_iou"] for f in fields) for d in group]
            base = [statistics.mean(table[(f, d, "none")]["mean_iou"] for f in fields) for d in group]
            cells = [f"{m:.3f}" if variant == "none" else f"{m:.3f} ({m - b:+.3f})" for m, b in zip(means, base)]
            per_field = [statistics.mean(table[(f, d, variant)]["mean_iou"] for d in group) for f in fields]
            acc = statistics.mean(table[(f, d, variant)]["accuracy"] for f in fields for d in group)
            ece = statistics.mean(table[(f, d, variant)]["ece"] for f in fields for d in group)
            print(
                f"| {variant} | "
                + " | ".join(cells)
                + f" | {statistics.mean(means):.3f} | "
                + " | ".join(f"{v:.3f}" for v in per_field)
                + f" | {100 * acc:.1f}% | {ece:.3f} |"
            )


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", type=Path, default=real_rock.REPO.parent / "shared" / "data" / "sandstone-ppl-xpl")
    p.add_argument("--lever", choices=("adabn", "superpixels", "average", "draws"))
    p.add_argument("--field", help="comma-separated fields to score on (scored together; draws: one field)")
    p.add_argument("--models", nargs="+", type=Path)
    p.add_argument("--draw-size", type=int, default=3, help="draws: models averaged per draw")
    p.add_argument("--summarize", nargs="+", type=Path, help="print the draws lever's tables from its JSON files")
    p.add_argument("--side", type=int, default=32, help="superpixels: mean side in model pixels")
    p.add_argument("--compactness", type=float, default=0.3, help="superpixels: SLIC compactness")
    p.add_argument(
        "--fixed-temperature",
        type=float,
        default=None,
        help="average: the temperature of models trained without validation (none fitted)",
    )
    p.add_argument(
        "--colour-normalisation",
        choices=("per-image",),
        default=None,
        help="read the fields as the models trained on them (real_rock.py's colour-normalised experiments)",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="write the scores here (JSON)")
    args = p.parse_args()
    if args.summarize:
        summarize(args.summarize)
        return 0
    if not (args.lever and args.field and args.models):
        p.error("--lever, --field and --models are required (or --summarize)")
    from thinseg.model.bundle import load_bundle

    torch.set_num_threads(args.threads)
    fields = tuple(args.field.split(","))
    sections = real_rock.load_fields(args.data, fields, args.colour_normalisation)
    records = []
    if args.lever == "draws":
        bundles = [load_bundle(m) for m in args.models]
        seeds = [int(b.meta["training"]["seed"]) for b in bundles]
        corrected = [str(m) for m, b in zip(args.models, bundles) if b.meta["training"].get("prior_correction")]
        if corrected:
            p.error(f"{', '.join(corrected)}: trained with the class-prior correction; the draws lever adds it itself")
        training = set(itertools.chain.from_iterable(b.meta["training"]["data"]["train_sections"] for b in bundles))
        if set(fields) & training:
            p.error(f"field(s) {sorted(set(fields) & training)} trained these models: score held-out fields only")
        every = real_rock.load_fields(args.data, tuple(sorted(training | set(fields))), args.colour_normalisation)
        for f in fields:
            records += score_draws(bundles, seeds, every[f], every, args.draw_size)
    elif args.lever == "average":
        report = score_average(
            [load_bundle(m) for m in args.models], [sections[f] for f in fields], args.fixed_temperature
        )
        m = report["metrics"]
        records.append(
            {
                "models": [str(x) for x in args.models],
                "fields": list(fields),
                "lever": "average",
                "mean_iou": m["mean_iou"],
                "accuracy": m["pixel_accuracy"],
                "ece": (report.get("calibration") or {}).get("ece"),
                "fixed_temperature": args.fixed_temperature,
            }
        )
        print(
            f"{','.join(fields)} average of {len(args.models)}: mean IoU {m['mean_iou']:.3f}, "
            f"accuracy {m['pixel_accuracy']:.3f}"
        )
    for model in args.models if args.lever not in ("average", "draws") else []:
        bundle = load_bundle(model)
        row: dict[str, Any] = {"model": str(model), "fields": list(fields), "lever": args.lever}
        if args.lever == "superpixels":
            row.update(side=args.side, compactness=args.compactness)
        for lever in ("none", args.lever):
            report = score(bundle, [sections[f] for f in fields], lever, args)
            row[lever] = {
                "mean_iou": report["metrics"]["mean_iou"],
                "accuracy": report["metrics"]["pixel_accuracy"],
                "ece": (report.get("calibration") or {}).get("ece"),
            }
        records.append(row)
        print(
            f"{','.join(fields)} {model}: mean IoU {row['none']['mean_iou']:.3f} -> {row[args.lever]['mean_iou']:.3f}, "
            f"accuracy {row['none']['accuracy']:.3f} -> {row[args.lever]['accuracy']:.3f}",
            flush=True,
        )
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(records, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
