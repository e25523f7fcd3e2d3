"""LiteUNet ensembles: K trainings whose probabilities are averaged.

Why: with a handful of sections one training's score moves by several points with its seed
alone (three seeds of the small-data recipe validated at 0.377-0.464 mean IoU on one held-out
sandstone field), and an average of trainings varies less. Two ways to make the members:
- "seeds": every member trains and validates on the same sections, member k with seed + k - 1.
  The members are about equally good by construction; the average removes seed noise. On two
  held-out sandstone fields three seeds averaged scored 0.484 mean IoU against 0.473 for seed 0
  alone (0.428 for the members on average). This is the small-data recipe's.
- "cross-fitted": member k validates on the k-th group of sections and trains on the others, so
  the members together have learnt from every section; on the same fields two such members did
  not beat one (the second validates on another field and came out weaker).
Member 1 is exactly the single training the same settings would run.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from thinseg import limits
from thinseg.data.sections import Section, open_sections
from thinseg.errors import ThinSegError
from thinseg.model.bundle import load_bundle, save_bundle
from thinseg.training.config import TrainConfig, TrainResult
from thinseg.training.split import SPLIT_FILE, apply_split, run_split, save_split

Log = Callable[[str], None]
#: Member k's run folder, inside the ensemble's run folder.
MEMBERS_FOLDER = "members"


def member_folds(
    pool: Sequence[str], first_val: Sequence[str], members: int, seed: int = 0
) -> list[tuple[list[str], list[str]]]:
    """(train, val) section names of each member: member 1 validates on `first_val`, the others
    on as many sections again, taken in a seeded order from the rest; no section validates twice."""
    names = sorted(pool)
    group = max(1, len(first_val))
    rest = [n for n in names if n not in set(first_val)]
    np.random.default_rng(seed).shuffle(rest)
    if members < 2 or group * members > len(names) - 1:
        raise ThinSegError(
            f"{len(names)} sections are too few for {members} ensemble members that each validate on "
            f"{group} section(s) and train on the others (at least {group * members + 1} are needed)"
        )
    groups = [sorted(first_val)] + [sorted(rest[k * group : (k + 1) * group]) for k in range(members - 1)]
    return [([n for n in names if n not in set(val)], val) for val in groups]


def combine_members(
    member_dirs: Sequence[Path], target: Path, *, title: str, description: str, overwrite: bool = False
) -> Path:
    """Write the ensemble bundle of trained LiteUNet bundles (same classes, inputs, pixel size
    and architecture); meta.json `ensemble` lists each member's validation sections and score."""
    from thinseg.model.lite_unet import (  # deferred: imports MONAI's decoder (about 3 s)
        LiteUNet,
        LiteUNetEnsemble,
        lite_unet_ensemble_params,
    )

    bundles = [load_bundle(d) for d in member_dirs]
    first = bundles[0]
    for bundle in bundles:
        if not isinstance(bundle.network, LiteUNet):
            raise ThinSegError("only LiteUNet models (the small-data recipe) can be ensembled", bundle.path)
        same = (bundle.class_table, bundle.input_names, bundle.pixels_per_mm)
        if same != (first.class_table, first.input_names, first.pixels_per_mm):
            raise ThinSegError(f"its classes, inputs or pixel size differ from {first.path}'s", bundle.path)
    members = [b.network for b in bundles]
    params = lite_unet_ensemble_params(members)  # type: ignore[arg-type]  # LiteUNets, checked above
    ensemble = LiteUNetEnsemble(**params)
    for slot, bundle in zip(ensemble.members, bundles):
        slot.load_state_dict(bundle.network.state_dict())
    record = [
        {
            "model": str(b.path),
            "val_sections": b.meta.get("training", {}).get("data", {}).get("val_sections", []),
            "seed": b.meta.get("training", {}).get("seed"),
            "val_mean_iou": (b.meta.get("metrics") or {}).get("mean_iou"),
            "temperature": b.meta.get("training", {}).get("temperature"),
        }
        for b in bundles
    ]
    extra: dict[str, Any] = {"ensemble": record, "training": first.meta.get("training", {})}
    if first.test_time_augmentation != "none":
        extra["test_time_augmentation"] = first.test_time_augmentation
    if first.min_region_px > 0:
        extra["min_region_px"] = first.min_region_px
    return save_bundle(
        target,
        ensemble.eval(),
        network_name="LiteUNetEnsemble",
        network_params=params,
        class_table=first.class_table,
        input_names=first.input_names,
        pixels_per_mm=first.pixels_per_mm,  # type: ignore[arg-type]  # trained bundles record theirs
        roi_shape=first.roi_shape,
        title=title,
        description=description,
        extra_meta=extra,
        overwrite=overwrite,
    )


def _parts(config: TrainConfig) -> dict[str, list[Section]]:
    """The sections of the single training these settings describe: train, val and test (a
    pooled list is split by section; the split is saved in the run folder and reused on resume)."""
    if config.sections:
        pooled = open_sections(config.sections)
        saved = Path(config.output_dir) / SPLIT_FILE
        split = run_split([s.name for s in pooled], config, saved)
        save_split(saved, split, seed=config.seed, val_fraction=config.val_fraction, test_fraction=config.test_fraction)
        return apply_split(pooled, split)
    return {
        "train": open_sections(config.train_sections),
        "val": open_sections(config.val_sections),
        "test": open_sections(config.test_sections),
    }


def train_ensemble(config: TrainConfig, members: int, log: Log, train: Callable[..., TrainResult]) -> TrainResult:
    """Train `members` LiteUNets (`config.member_split`) into RUN_DIR/members/member-K, one after another
    (`train(config, log, index)` runs each: the same resumable training as a single model), and write their
    ensemble as RUN_DIR/<model_name>. A `max_minutes` budget is shared among the members."""
    if not 2 <= members <= limits.MAX_ENSEMBLE_MEMBERS:
        raise ThinSegError(f"an ensemble has 2 to {limits.MAX_ENSEMBLE_MEMBERS} members, not {members}")
    if config.network != "LiteUNet" or config.init_from is not None:
        raise ThinSegError("ensembles are of new LiteUNets: use them with the small-data recipe")
    out = Path(config.output_dir)
    if (out / config.model_name).exists() and not (config.overwrite or config.resume):
        raise ThinSegError("a model is already there (pass --overwrite to replace it)", out / config.model_name)
    out.mkdir(parents=True, exist_ok=True)  # the split of pooled sections is saved in it
    parts = _parts(config)
    if not parts["val"]:
        raise ThinSegError("an ensemble needs validation sections (each member picks its checkpoint on them)")
    by_name = {s.name: s for p in ("train", "val") for s in parts[p]}
    if config.member_split == "seeds":
        folds = [([s.name for s in parts["train"]], [s.name for s in parts["val"]])] * members
    else:
        folds = member_folds(list(by_name), [s.name for s in parts["val"]], members, config.seed)
    start = time.monotonic()
    results = []
    for k, (train_names, val_names) in enumerate(folds, start=1):
        budget = None
        if config.max_minutes is not None:
            budget = (config.max_minutes - (time.monotonic() - start) / 60) / (members - k + 1)
        member = dataclasses.replace(
            config,
            output_dir=out / MEMBERS_FOLDER / f"member-{k}",
            sections=(),
            split_file=None,
            train_sections=[by_name[n] for n in train_names],
            val_sections=[by_name[n] for n in val_names],
            test_sections=list(parts["test"]),
            max_minutes=budget,
            members=1,
            seed=config.seed + (k - 1 if config.member_split == "seeds" else 0),
            title=f"{config.title} (member {k} of {members})",
        )
        log(f"ensemble member {k} of {members}: seed {member.seed}, validates on {', '.join(val_names)}")
        result = train(member, lambda m, k=k: log(f"member {k}/{members}: {m}"), k - 1)
        if result.model_dir is None:
            raise ThinSegError(f"ensemble member {k} exported no model", member.output_dir)
        results.append(result)
    how = "trained with their own seeds" if config.member_split == "seeds" else "each validated on other sections"
    description = config.description or f"{members} LiteUNets {how} with thinseg, probabilities averaged"
    target = combine_members(
        [r.model_dir for r in results if r.model_dir is not None],
        out / config.model_name,
        title=config.title,
        description=description,
        overwrite=True,  # the run folder is this run's: its members were just (re)trained
    )
    scores = [r.best_mean_iou for r in results if r.best_mean_iou is not None]
    log(f"ensemble of {members} written to {target} (members' val mean IoU {', '.join(f'{s:.3f}' for s in scores)})")
    if parts["test"]:
        names = " ".join(s.name for s in parts["test"])
        log(f"score it on the test sections: thinseg evaluate --model {target} {names}")
    return dataclasses.replace(
        results[0],
        output_dir=out,
        model_dir=target,
        best_mean_iou=float(np.mean(scores)) if scores else None,
        history=[row for r in results for row in r.history],
        split_file=out / SPLIT_FILE if (out / SPLIT_FILE).exists() else results[0].split_file,
        test_metrics=None,  # each member scored the test sections alone; the ensemble: thinseg evaluate
        member_scores=scores,
        members_dir=out / MEMBERS_FOLDER,
    )
