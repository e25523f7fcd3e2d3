"""Export the best network as a GeoSlicer model bundle with a record of how it was made."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from thinseg.classes.table import ClassTable
from thinseg.model.bundle import save_bundle

#: GeoSlicer calls the cross-polarised input "PX".
BUNDLE_INPUT_NAMES = {"PP": "PP", "XP": "PX"}


def bundle_input_names(roles: Sequence[str]) -> tuple[str, ...]:
    return tuple(BUNDLE_INPUT_NAMES[r] for r in roles)


def export_bundle(
    model_dir: Path,
    network: torch.nn.Module,
    *,
    network_name: str,
    network_params: dict[str, Any],
    class_table: ClassTable,
    roles: Sequence[str],
    pixels_per_mm: float,
    roi_shape: tuple[int, int],
    title: str,
    description: str,
    training: dict[str, Any],
    metrics: dict[str, Any] | None,
    confidence_reference: dict[str, Any] | None = None,
    test_time_augmentation: str = "none",
    min_region_px: int = 0,
) -> Path:
    """Write (atomically, replacing an older export of the same run) meta.json + model.pth.

    meta.json gets `training` (data, split, settings, epochs) and `metrics` (validation scores
    of the exported epoch) next to GeoSlicer's own keys, which already carry the classes,
    colours, inputs/channels and pixels_per_mm; and `confidence_reference` (the model's confidence
    on the validation sections of that epoch, `ConfidenceReference.to_meta()`) when there is one;
    and `test_time_augmentation` and `min_region_px`, what segment and evaluate then use unless
    told otherwise.
    """
    extra: dict[str, Any] = {"training": training, "metrics": metrics}
    if confidence_reference is not None:
        extra["confidence_reference"] = confidence_reference
    if test_time_augmentation != "none":  # the inference default the recipe was measured with
        extra["test_time_augmentation"] = test_time_augmentation
    if min_region_px > 0:  # likewise: the sieve the recipe was measured with
        extra["min_region_px"] = min_region_px
    was_training = network.training
    network.eval()
    try:
        return save_bundle(
            model_dir,
            network,
            network_name=network_name,
            network_params=network_params,
            class_table=class_table,
            input_names=bundle_input_names(roles),
            pixels_per_mm=pixels_per_mm,
            roi_shape=roi_shape,
            title=title,
            description=description,
            extra_meta=extra,
            overwrite=True,
        )
    finally:
        network.train(was_training)
