"""Tiled sliding-window inference with bounded memory (strip by strip over the section)."""

from thinseg.inference.device import select_device
from thinseg.inference.engine import Cancelled, InferenceOptions, SegmentationResult, Segmenter

__all__ = ["Cancelled", "InferenceOptions", "SegmentationResult", "Segmenter", "select_device"]
