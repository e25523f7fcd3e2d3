"""Validation: the model runs tile-wise over WHOLE validation sections (as at inference, with
the same sliding-window engine) and one confusion matrix is accumulated over the whole set,
void bands excluded, so the score is the one users will see, not a patch-level proxy. The same
pass measures the model's confidence on these sections (`validate_with_confidence`): the
reference that later sections are compared with (thinseg.inference.confidence)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from thinseg.classes.table import ClassTable
from thinseg.data.sections import Section
from thinseg.errors import ThinSegError
from thinseg.inference.confidence import ConfidenceReference
from thinseg.inference.engine import InferenceOptions, Segmenter, Source
from thinseg.inference.resample import segment_at_model_resolution
from thinseg.metrics import ConfusionAccumulator, SegmentationMetrics, metrics_from_confusion, void_border_mask
from thinseg.model.transforms import MinMaxTransform
from thinseg.training.targets import PreparedSection


@dataclass
class ValSection:
    """A validation section with its truth and the mask of scored pixels (void band removed)."""

    prepared: PreparedSection
    mask: np.ndarray  # bool (H, W)

    @property
    def truth(self) -> np.ndarray:
        return self.prepared.target


def make_val_sections(prepared: Sequence[PreparedSection], void_px: float) -> list[ValSection]:
    """`prepared` targets must be mapped labels WITHOUT a void band (it is a mask here)."""
    return [ValSection(p, void_border_mask(np.asarray(p.target), void_px * p.scale)) for p in prepared]


#: The exported bundles' input scaling: uint8 0..255 -> 0..1.
_UNIT_RESCALE = MinMaxTransform(key="x")


@dataclass
class NetworkAsBundle:
    """The bundle interface the inference engine needs, around a network being trained."""

    network: torch.nn.Module
    input_names: list[str]
    class_table: ClassTable
    roi_shape: tuple[int, int]
    first_label: int = 0
    messages: list[str] = field(default_factory=list)

    def prepare(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """Same input scaling as the exported bundle (MinMax 0..255 -> 0..1 after concatenation)."""
        return _UNIT_RESCALE.apply(torch.cat([im.to(torch.float32) for im in images], dim=1))

    def fused_pre_processing(self) -> tuple[list[int], list[MinMaxTransform]]:
        """`prepare` as the engine's one-pass form: inputs in order, then the same rescale."""
        return list(range(len(self.input_names))), [_UNIT_RESCALE]


def validate(
    network: torch.nn.Module,
    sections: Sequence[ValSection],
    roles: Sequence[str],
    class_table: ClassTable,
    *,
    tile: int = 512,
    overlap: int = 32,
    batch_size: int = 4,
    device: str = "cpu",
    precision: str = "fp32",
    first_label: int = 0,
) -> SegmentationMetrics:
    """The scores of `network` over whole validation sections (see validate_with_confidence)."""
    return validate_with_confidence(
        network,
        sections,
        roles,
        class_table,
        tile=tile,
        overlap=overlap,
        batch_size=batch_size,
        device=device,
        precision=precision,
        first_label=first_label,
    )[0]


def validate_with_confidence(
    network: torch.nn.Module,
    sections: Sequence[ValSection],
    roles: Sequence[str],
    class_table: ClassTable,
    *,
    tile: int = 512,
    overlap: int = 32,
    batch_size: int = 4,
    device: str = "cpu",
    precision: str = "fp32",
    first_label: int = 0,
) -> tuple[SegmentationMetrics, ConfidenceReference | None]:
    """The scores of `network` over whole validation sections, and its confidence on them (the
    meta.json `confidence_reference` of a bundle exported from it; None without sections)."""
    was_training = network.training
    bundle = NetworkAsBundle(network, list(roles), class_table, (tile, tile), first_label)
    options = InferenceOptions(
        tile=tile,
        overlap=overlap,
        batch_size=batch_size,
        precision=precision,  # type: ignore[arg-type]
        device=device,
        prefetch=False,
    )
    segmenter = Segmenter(bundle, options)
    acc = ConfusionAccumulator(len(class_table))
    histograms = []
    try:
        for val in sections:
            section = val.prepared.section
            sources = [_source(section, r) for r in roles]
            factor = None if val.prepared.scale == 1.0 else 1.0 / val.prepared.scale
            result = segment_at_model_resolution(segmenter, sources, factor)
            acc.update(np.asarray(val.truth), result.labels, val.mask)
            if result.confidence_histogram is not None:
                histograms.append(result.confidence_histogram)
    finally:
        network.train(was_training)
    return metrics_from_confusion(acc.matrix, class_table), ConfidenceReference.from_histograms(histograms)


def _source(section: Section, role: str) -> Source:
    """The section's `role` image (sections are checked for the model's inputs before training)."""
    source = section.source(role)
    if source is None:
        raise ThinSegError(f"validation section {section.name!r} has no {role} image")
    return source
