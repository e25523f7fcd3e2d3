"""Is a section within what the model has seen? Its confidence compared with the model's own
validation sections.

A network trained on one kind of rock still labels every pixel of another, but less surely:
its maximum softmax probability (the confidence) drops. The engine keeps a histogram of the
confidence of every section it segments (`SegmentationResult.confidence_histogram`, sampled
on a fixed grid); training records the same statistics over the validation sections in
meta.json (`confidence_reference`). A section is *out of the model's depth* when

* its share of low-confidence pixels (confidence below LOW_CONFIDENCE) is more than
  LOW_SHARE_FACTOR times the validation's share and at least LOW_SHARE_MIN_EXCESS above it, or
* its mean confidence is more than MEAN_MARGIN below the lowest mean of any validation section.

The validation sections of a model vary far less than that among themselves (the bundled
model's four: low-confidence share 1.8% overall and at most 2.2% in one section, i.e. 1.2 times
the overall share; mean 0.94 overall and at least 0.93), so a section past either bound is unlike
all of them, not merely at their edge. A model without
a reference (older bundles, GeoSlicer's own) is never judged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

#: A pixel is low-confidence when the winning class has less than even odds.
LOW_CONFIDENCE = 0.5
#: Out of depth: a low-confidence share more than this many times the validation's ...
LOW_SHARE_FACTOR = 2.0
#: ... and at least this much above it (so a near-zero validation share does not make a few
#: uncertain pixels alarming) ...
LOW_SHARE_MIN_EXCESS = 0.01
#: ... or a mean confidence this far below the lowest validation section's mean.
MEAN_MARGIN = 0.05
#: The quantiles of pixel confidence the reference records (for people, not for the rule).
QUANTILES = (0.05, 0.25, 0.5, 0.75, 0.95)


@dataclass(frozen=True)
class ConfidenceStats:
    """Mean confidence and low-confidence share of the sampled pixels of one or more sections."""

    pixels: int
    mean: float
    low_share: float

    @classmethod
    def from_histogram(cls, histogram: npt.ArrayLike, low_threshold: float = LOW_CONFIDENCE) -> ConfidenceStats | None:
        """Stats of a confidence histogram (bin k = confidence k / (bins - 1)); None when empty."""
        counts = np.asarray(histogram, dtype=np.int64)
        total = int(counts.sum())
        if total == 0:
            return None
        values = np.arange(counts.size) / (counts.size - 1)
        return cls(
            pixels=total,
            mean=float((counts * values).sum() / total),
            low_share=float(counts[values < low_threshold].sum() / total),
        )


@dataclass(frozen=True)
class ConfidenceReference:
    """What the model showed on its validation sections (meta.json `confidence_reference`)."""

    low_threshold: float
    mean: float
    low_share: float
    sections: int
    pixels: int
    section_mean_min: float
    section_low_share_max: float
    quantiles: dict[str, float]

    @classmethod
    def from_histograms(
        cls, histograms: Sequence[npt.ArrayLike], low_threshold: float = LOW_CONFIDENCE
    ) -> ConfidenceReference | None:
        """The reference of validation sections given one confidence histogram each (None: no pixels)."""
        per_section = [s for s in (ConfidenceStats.from_histogram(h, low_threshold) for h in histograms) if s]
        if not per_section:
            return None
        pooled_counts = np.sum([np.asarray(h, dtype=np.int64) for h in histograms], axis=0)
        pooled = ConfidenceStats.from_histogram(pooled_counts, low_threshold)
        assert pooled is not None  # some section has pixels
        cumulative = np.cumsum(pooled_counts) / pooled.pixels
        values = np.arange(pooled_counts.size) / (pooled_counts.size - 1)
        return cls(
            low_threshold=low_threshold,
            mean=pooled.mean,
            low_share=pooled.low_share,
            sections=len(per_section),
            pixels=pooled.pixels,
            section_mean_min=min(s.mean for s in per_section),
            section_low_share_max=max(s.low_share for s in per_section),
            quantiles={
                f"p{round(100 * q):02d}": float(values[min(int(np.searchsorted(cumulative, q)), values.size - 1)])
                for q in QUANTILES
            },
        )

    def to_meta(self) -> dict[str, Any]:
        """The meta.json field (rounded: these are statistics, not exact values)."""
        return {
            "low_threshold": self.low_threshold,
            "mean": round(self.mean, 4),
            "low_share": round(self.low_share, 4),
            "sections": self.sections,
            "pixels": self.pixels,
            "section_mean_min": round(self.section_mean_min, 4),
            "section_low_share_max": round(self.section_low_share_max, 4),
            "quantiles": {k: round(v, 4) for k, v in self.quantiles.items()},
        }

    @classmethod
    def from_meta(cls, meta: Mapping[str, Any]) -> ConfidenceReference | None:
        """The reference in a (schema-checked) meta.json object, or None when it has none."""
        field = meta.get("confidence_reference")
        if not isinstance(field, Mapping):
            return None
        return cls(
            low_threshold=float(field["low_threshold"]),
            mean=float(field["mean"]),
            low_share=float(field["low_share"]),
            sections=int(field["sections"]),
            pixels=int(field.get("pixels", 0)),
            section_mean_min=float(field.get("section_mean_min", field["mean"])),
            section_low_share_max=float(field.get("section_low_share_max", field["low_share"])),
            quantiles={str(k): float(v) for k, v in dict(field.get("quantiles") or {}).items()},
        )

    def out_of_depth(self, stats: ConfidenceStats) -> bool:
        """Whether `stats` (taken at this reference's low_threshold) is far outside the validation's."""
        share_bound = max(LOW_SHARE_FACTOR * self.low_share, self.low_share + LOW_SHARE_MIN_EXCESS)
        return stats.low_share > share_bound or stats.mean < self.section_mean_min - MEAN_MARGIN


def out_of_depth_warning(
    name: str, histogram: npt.ArrayLike | None, reference: ConfidenceReference | None
) -> str | None:
    """One line telling the user that the map of section `name` is unreliable, or None."""
    if histogram is None or reference is None:
        return None
    stats = ConfidenceStats.from_histogram(histogram, reference.low_threshold)
    if stats is None or not reference.out_of_depth(stats):
        return None
    return (
        f"warning: {name}: the map is unreliable for this rock, retrain the model on labelled sections of it "
        f"(thinseg train): mean confidence {stats.mean:.2f} and {100 * stats.low_share:.1f}% of pixels below "
        f"{reference.low_threshold:g}, against {reference.mean:.2f} and {100 * reference.low_share:.1f}% on the "
        f"model's {reference.sections} validation section(s)"
    )
