"""Turn sections into what the sampler and validation read: target label maps in the model's
classes (0 = ignored: unlabelled, unknown mineral, or inside the void band around class
boundaries) and, for training, the patch index. Both are cached on disk under a key of every
parameter; cached targets are memory-mapped, so many large sections do not fill the RAM.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from thinseg.classes.table import ClassTable
from thinseg.data.mapping import ClassMapping, mapping_for
from thinseg.data.sections import Section
from thinseg.errors import ThinSegError
from thinseg.inference.resample import needs_resampling
from thinseg.limits import check_resampling
from thinseg.metrics import class_pixel_counts, void_border_mask
from thinseg.training.cache import ArrayCache, cache_key
from thinseg.training.sampler import PatchIndex, build_patch_index, index_cache_params


@dataclass
class PreparedSection:
    """A section ready for training or validation."""

    section: Section
    target: np.ndarray  # (H, W) uint8, 0 = ignored (void band included)
    target_key: str
    scale: float  # section pixels per model pixel (1.0 at the model's resolution)
    mapping: ClassMapping
    class_pixels: np.ndarray  # (n_classes,) int64 pixels of each class in `target`
    index: PatchIndex | None = None

    @property
    def name(self) -> str:
        return self.section.name


def section_scale(section: Section, model_mm_per_pixel: float | None) -> float:
    """Section pixels per model pixel; 1.0 when within the resampling tolerance or unknown. A
    ratio beyond the resampling bound is refused (the section's spacing is most likely wrong)."""
    mm = section.mm_per_pixel
    if mm is None or model_mm_per_pixel is None or not needs_resampling(mm, model_mm_per_pixel):
        return 1.0
    what = f"section {section.name!r} ({mm:g} mm/px; the model's {model_mm_per_pixel:g} mm/px)"
    check_resampling(mm / model_mm_per_pixel, getattr(section, "path", None), what)
    return float(model_mm_per_pixel / mm)


def _file_digest(path: str | os.PathLike[str] | None) -> str | None:
    if path is None:
        return None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def target_cache_params(
    section: Section, class_table: ClassTable, mapping_csv: Any, void_px: float, scale: float
) -> dict[str, Any]:
    """Everything a target label map depends on."""
    return {
        "section": section.fingerprint(),
        "classes": class_table.names,
        "mapping_csv": _file_digest(mapping_csv),
        "void_px": float(void_px),
        "scale": round(float(scale), 6),
    }


def prepare_target(
    section: Section,
    class_table: ClassTable,
    *,
    mapping_csv: Any = None,
    void_px: float = 0.0,
    scale: float = 1.0,
    cache: ArrayCache | None = None,
) -> tuple[np.ndarray, str, ClassMapping]:
    """(target, its cache key, mapping): section labels in the model's classes, void band -> 0."""
    key = cache_key("target", target_cache_params(section, class_table, mapping_csv, void_px, scale))
    mapping = mapping_for(section.class_table, class_table, mapping_csv)
    cached = cache.load_array(key) if cache is not None else None
    if cached is not None:
        return cached, key, mapping
    labels = section.read_labels()
    if labels.shape != tuple(section.shape):
        raise ThinSegError(f"section {section.name!r}: labels {labels.shape} are not on the image grid {section.shape}")
    target = mapping.apply(labels)
    del labels
    if void_px > 0:
        target[~void_border_mask(target, void_px * scale)] = 0
    if cache is not None and cache.folder is not None:
        cache.save_array(key, target)
        stored = cache.load_array(key)  # memory-mapped: a big map leaves the RAM
        if stored is not None:
            return stored, key, mapping
    return target, key, mapping


def prepare_section(
    section: Section,
    class_table: ClassTable,
    *,
    patch_size: int | None,
    model_mm_per_pixel: float | None,
    mapping_csv: Any = None,
    void_px: float = 0.0,
    cell: int | None = None,
    cache: ArrayCache | None = None,
) -> PreparedSection:
    """Target (+ patch index when `patch_size` is given, i.e. for training sections)."""
    scale = section_scale(section, model_mm_per_pixel)
    target, key, mapping = prepare_target(
        section, class_table, mapping_csv=mapping_csv, void_px=void_px, scale=scale, cache=cache
    )
    n = len(class_table)
    prepared = PreparedSection(section, target, key, scale, mapping, class_pixel_counts(target, n)[1:])
    if patch_size is not None:
        footprint = int(round(patch_size * scale))
        cell_px = max(1, int(round((cell or max(1, patch_size // 8)) * scale)))
        ikey = cache_key("patch-index", index_cache_params(key, n, footprint, cell_px))
        arrays = cache.load_arrays(ikey) if cache is not None else None
        try:
            prepared.index = PatchIndex.from_arrays(arrays) if arrays is not None else None
        except (KeyError, ValueError):
            prepared.index = None  # written by another version: rebuild
        if prepared.index is None:
            try:
                prepared.index = build_patch_index(target, n, footprint, cell_px)
            except ThinSegError as exc:
                raise ThinSegError(f"training section {section.name!r}: {exc.problem}") from None
            if cache is not None:
                cache.save_arrays(ikey, prepared.index.to_arrays())
    return prepared


def prepare_sections(sections: Sequence[Section], class_table: ClassTable, **kwargs: Any) -> list[PreparedSection]:
    return [prepare_section(s, class_table, **kwargs) for s in sections]
