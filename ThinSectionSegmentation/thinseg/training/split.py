"""Train/validation/test split BY SECTION, saved with the run.

Tiles of one section share grains, lighting and registration errors; splitting by tile would
leak them into validation and flatter the scores. The split is a seeded shuffle of section
names, written to split.json so that a run (or a later comparison) can reproduce it exactly.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from thinseg.errors import ThinSegError
from thinseg.jsonio import loads, write_json

if TYPE_CHECKING:
    from thinseg.training.config import TrainConfig

PARTS = ("train", "val", "test")
#: The split's file in a run folder.
SPLIT_FILE = "split.json"

SectionT = TypeVar("SectionT")


def split_names(
    names: Sequence[str], val_fraction: float, test_fraction: float = 0.0, seed: int = 0
) -> dict[str, list[str]]:
    """Seeded split; with >= 2 sections a positive fraction gets at least one section."""
    names = list(names)
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        raise ThinSegError(f"section names must be unique to split by section: {', '.join(dupes)}")
    for what, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            raise ThinSegError(f"{what} must be in [0, 1), got {f}")
    order = sorted(names)
    np.random.default_rng(seed).shuffle(order)
    n = len(order)

    def count(f: float) -> int:
        return 0 if f <= 0 or n < 2 else max(1, int(round(f * n)))

    n_val, n_test = count(val_fraction), count(test_fraction)
    if n_val + n_test >= n:
        raise ThinSegError(
            f"{n} sections are too few to hold out {n_val} for validation (--val-fraction {val_fraction:g}) "
            f"and {n_test} for testing (--test-fraction {test_fraction:g}): at least one must stay for training"
        )
    return {
        "val": sorted(order[:n_val]),
        "test": sorted(order[n_val : n_val + n_test]),
        "train": sorted(order[n_val + n_test :]),
    }


def run_split(names: Sequence[str], config: TrainConfig, saved: Path) -> dict[str, list[str]]:
    """The split a run of `config` uses: its split file, else (resuming) the split it saved at
    `saved`, else a new seeded split of `names`."""
    if config.split_file is not None:
        return load_split(config.split_file)
    if config.resume and saved.exists():
        return load_split(saved)
    return split_names(names, config.val_fraction, config.test_fraction, config.seed)


def save_split(path: str | os.PathLike[str], split: dict[str, list[str]], **info: object) -> Path:
    """Write split.json (the three name lists, then `info` such as the seed), all or nothing."""
    record: dict[str, object] = {part: list(split.get(part, [])) for part in PARTS}
    record.update(info)
    return write_json(path, record)


def load_split(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    path = Path(path)
    try:
        record = loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ThinSegError(f"cannot read the split file: {exc}", path) from None
    if not isinstance(record, dict) or not all(isinstance(record.get(p, []), list) for p in PARTS):
        raise ThinSegError("split file must hold lists 'train', 'val' and 'test'", path)
    return {p: [str(n) for n in record.get(p, [])] for p in PARTS}


def apply_split(sections: Sequence[SectionT], split: dict[str, list[str]]) -> dict[str, list[SectionT]]:
    """Sections grouped by a saved split (matched by name); every name must be found."""
    by_name = {getattr(s, "name", str(s)): s for s in sections}
    missing = [n for p in PARTS for n in split[p] if n not in by_name]
    if missing:
        raise ThinSegError(f"split names sections that were not given: {', '.join(missing[:5])}")
    return {p: [by_name[n] for n in split[p]] for p in PARTS}
