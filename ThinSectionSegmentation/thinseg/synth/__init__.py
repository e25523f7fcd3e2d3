"""Procedural thin sections (PP + XP) with exact labels and a misaligned QEMSCAN-like map.

Training data for the bundled model, fixtures for tests and the demo, and ground truth for
registration error, none of which real sections can supply.
"""

from thinseg.synth.section import DEFAULT_CLASS_WEIGHTS, SyntheticSection, generate_section, render_labels_rgb

__all__ = ["DEFAULT_CLASS_WEIGHTS", "SyntheticSection", "generate_section", "render_labels_rgb"]
