"""Fold the class-prior correction into LiteUNet models trained without it, as `thinseg train`'s
small-data recipe now does at export: the natural / sampled class shares of the model's own
training fields (the real sandstone fields named in its meta.json), through the same functions.

It lets one training be scored with and without the correction: the models stay as they are and
each corrected copy goes to OUT/<run name>/model.

    python bench/prior_correct.py RUN/model ... --out DIR
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import real_rock  # the fields, read as the real-rock bench reads them


def class_shares(bundle: Any, sections: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """(natural, sampled) class shares of the model's training fields (named in its meta.json,
    taken from `sections`): as they are, and as the balanced sampler fed them, replayed with the
    training's own seed and settings by the function `thinseg train` uses."""
    from thinseg.training.loop import class_pixel_totals
    from thinseg.training.priors import sampled_class_shares
    from thinseg.training.targets import prepare_sections

    training = bundle.meta["training"]
    names = training["data"]["train_sections"]
    prepared = prepare_sections(
        [sections[n] for n in names],
        bundle.class_table,
        patch_size=int(training["patch_size"]),
        model_mm_per_pixel=1.0 / float(training["pixels_per_mm"]),
        void_px=float(training["data"]["void_border_px"]),
    )
    patched = [p for p in prepared if p.index is not None]  # sections large enough for a patch
    sampled = sampled_class_shares(
        [p.index for p in patched],
        [p.target for p in patched],
        len(bundle.class_table),
        balancing_strength=float(training["balancing_strength"]),
        patches_per_epoch=int(training["steps_per_epoch"]) * int(training["batch_size"]),
        epochs=int(training["epochs_planned"]),
        seed=int(training["seed"]),
    )
    natural = class_pixel_totals(prepared, len(bundle.class_table)).astype(np.float64)
    return natural / natural.sum(), sampled


def corrected_copy(model: Path, out: Path, data: Path) -> Path:
    """OUT/<run>/model: `model` with the correction folded into its last convolution's bias."""
    from thinseg.model.bundle import load_bundle
    from thinseg.training.priors import prior_weights

    bundle = load_bundle(model)
    training = bundle.meta["training"]
    if training.get("prior_correction"):
        raise SystemExit(f"{model}: already corrected ({training['prior_correction']})")
    names = tuple(training["data"]["train_sections"])
    weights = prior_weights(*class_shares(bundle, real_rock.load_fields(data, names)))
    target = out / model.parent.name / "model"
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    saved = torch.load(model / "model.pth", map_location="cpu", weights_only=True)
    bias = saved["model_state_dict"]["head.bias"]
    bias[len(bias) - len(weights) :] += torch.log(torch.as_tensor(weights, dtype=bias.dtype))
    torch.save(saved, target / "model.pth")
    meta = json.loads((model / "meta.json").read_text())
    meta["training"]["prior_correction"] = {n: round(float(w), 4) for n, w in zip(bundle.class_table.names, weights)}
    (target / "meta.json").write_text(json.dumps(meta, indent=2))
    print(f"{model} -> {target}: {meta['training']['prior_correction']}", flush=True)
    return target


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("models", nargs="+", type=Path)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data", type=Path, default=real_rock.REPO.parent / "shared" / "data" / "sandstone-ppl-xpl")
    args = p.parse_args()
    for model in args.models:
        corrected_copy(model, args.out, args.data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
