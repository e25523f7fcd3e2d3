"""Training presets: named sets of TrainConfig settings, chosen by measurement on real rock.

`unet` is TrainConfig's own defaults: a MONAI U-Net trained from scratch, the network GeoSlicer
runs. `small-data` is for a lab retraining on a handful of registered sections: a U-Net whose
encoder starts from ImageNet weights (LiteUNet), trained at 0.00264 mm per pixel so that a
256 px patch holds 0.68 mm of rock (several grains), optics-respecting augmentation, a moving
average of the weights exported, a confidence temperature fitted on the validation sections, and three such trainings
with different seeds averaged (one training's score moves by several points with its seed), sized
to train in under 30 minutes on a 2-core CPU.
Its bundles need thinseg (GeoSlicer 2.8 alone cannot build them). docs/BENCHMARKS.md and the
README's real-rock section give the measurements behind each value.

Explicit settings (command-line options, job fields) always win over the preset.
"""

from __future__ import annotations

from typing import Any

from thinseg.errors import ThinSegError
from thinseg.training.config import AugmentConfig

#: The small-data recipe's model pixel size, chosen on training fields only: it validated at mean
#: IoU 0.426 against 0.380 for the sections' own 0.00132 mm/px (one field), and at 0.462 against
#: 0.427 for 0.00528 mm/px (mean over three fields, each validating a training on the others).
SMALL_DATA_MM_PER_PIXEL = 0.00264

#: Epochs of 100 steps. Chosen on training fields only: 4 validated at mean IoU 0.466 against
#: 0.462 for 7 (three fields, each validating a training on the others): a tie within one
#: training's spread, at about half the training time.
SMALL_DATA_EPOCHS = 4

#: Trainings averaged, each with its own seed on the same sections. Chosen on training fields
#: only: with 2a and then 8a held out of everything, three seeds averaged scored 0.457 and 0.510
#: mean IoU against 0.464 and 0.482 for the single training (seed 0), a mean of 0.484 against 0.473;
#: the three trainings took 28.0 minutes on an idle 2-core CPU (seven 1600 x 1200 sections).
SMALL_DATA_MEMBERS = 3
#: Each member exports a moving average of its weights (about the last 100 of 400 steps) instead
#: of the epoch, or the last-3-epoch average, that validates best. Chosen on training fields only,
#: paired on the same trainings (2a and 8a held out of everything, seeds 2 and 3 averaged, the
#: prior correction applied): 0.458 mean IoU against 0.433 for the validated choice and 0.449 for
#: the last-3 average exported always.
SMALL_DATA_EMA_DECAY = 0.99
#: The minimum-region sieve the small-data recipe records for segment and evaluate
#: (thinseg.inference.regions), in pixels of the model's grid (0.00264 mm/px: 0.0018 mm^2, 1,024
#: px of the sandstone photographs): under half the smallest grain drawn on the training fields
#: 2a-8a (about 2,400 px of the photographs, drawing specks under 64 px aside), fixed before it
#: was measured. Measured on fields held out of training: +0.005 mean IoU on 2a and 8a (three
#: seeds each, every one up) and +0.018 over the seven leave-one-field-out folds of 2a-8a (5a,
#: which holds no plagioclase, +0.100: its stray specks of it are gone).
SMALL_DATA_MIN_REGION_PX = 256

RECIPES: dict[str, dict[str, Any]] = {
    "unet": {},
    "small-data": {
        "network": "LiteUNet",
        "pretrained": True,
        "pixels_per_mm": 1 / SMALL_DATA_MM_PER_PIXEL,
        "encoder_lr_scale": 0.3,
        "lr": 1e-3,
        "weight_decay": 1e-4,
        "warmup_steps": 50,
        "schedule": "cosine",
        "epochs": SMALL_DATA_EPOCHS,
        "steps_per_epoch": 100,
        "patch_size": 256,
        "batch_size": 8,
        "balancing_strength": 0.5,
        "patience": None,
        "ema_decay": SMALL_DATA_EMA_DECAY,
        "calibrate_temperature": True,
        "prior_correction": True,
        "members": SMALL_DATA_MEMBERS,
        "member_split": "seeds",
        "test_time_augmentation": "none",  # measured: +0.001 mean IoU for 8x the inference time
        "min_region_px": SMALL_DATA_MIN_REGION_PX,
        "augment": AugmentConfig(scale=0.15, gamma=0.15, blur=1.0),
    },
}

#: Recipe names, for command-line choices.
RECIPE_NAMES: tuple[str, ...] = tuple(RECIPES)


def recipe_settings(name: str) -> dict[str, Any]:
    """The TrainConfig fields of recipe `name` (a fresh copy; `recipe` included)."""
    if name not in RECIPES:
        raise ThinSegError(f"unknown training recipe {name!r} (known: {', '.join(RECIPE_NAMES)})")
    settings = {
        key: (AugmentConfig(**vars(value)) if isinstance(value, AugmentConfig) else value)
        for key, value in RECIPES[name].items()
    }
    settings["recipe"] = name
    return settings
