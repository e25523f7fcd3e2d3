"""Evaluation against labelled sections: confusion, scores, fractions, plots (`thinseg evaluate`).

Truth label 0 = no truth: such pixels are never scored. Prediction 0 = left unclassified: an
error. Counts are summed over the whole dataset before scores are taken.
"""

from thinseg.metrics.borders import void_border_mask
from thinseg.metrics.confusion import ConfusionAccumulator
from thinseg.metrics.evaluator import (
    EvaluationReport,
    Evaluator,
    SectionResult,
    comparison_dict,
    format_comparison_table,
    format_table,
)
from thinseg.metrics.fractions import (
    FractionStats,
    area_fractions,
    class_pixel_counts,
    fraction_agreement,
    fractions_from_confusion,
    r_squared,
)
from thinseg.metrics.scores import SegmentationMetrics, metrics_from_confusion

__all__ = [
    "ConfusionAccumulator",
    "EvaluationReport",
    "Evaluator",
    "FractionStats",
    "SectionResult",
    "SegmentationMetrics",
    "area_fractions",
    "class_pixel_counts",
    "comparison_dict",
    "format_comparison_table",
    "format_table",
    "fraction_agreement",
    "fractions_from_confusion",
    "metrics_from_confusion",
    "r_squared",
    "void_border_mask",
]
