"""Tiled sliding-window inference with bounded memory (strip by strip over the section)."""

from thinseg.inference.engine import InferenceOptions, Segmenter, SegmentationResult, Cancelled
from thinseg.inference.device import select_device

__all__ = ["InferenceOptions", "Segmenter", "SegmentationResult", "Cancelled", "select_device"]
