"""Training of thin-section segmentation U-Nets: labelled sections in, a GeoSlicer model bundle out.

    from thinseg.training import TrainConfig, train, synthetic_sections
    result = train(TrainConfig(output_dir=..., train_sections=..., val_sections=...))

Modules: config (settings and results), prepare/cache (targets and patch maps), sampler (class
balance), priors (its class shares taken back at export), augment, dataset (patch streams), losses,
model, validate, calibration, export, checkpoint, curves, split, loop (the run). Sections and the
QEMSCAN-name-to-class mapping come from `thinseg.data` and are re-exported here for convenience.
"""

from thinseg.data.mapping import build_mapping, default_mapping, load_mapping_csv
from thinseg.data.sections import (
    ArraySection,
    FileSection,
    NetcdfSection,
    Section,
    open_section,
    open_sections,
    synthetic_sections,
)
from thinseg.training.config import AugmentConfig, TrainConfig, TrainResult
from thinseg.training.loop import train
from thinseg.training.split import load_split, save_split, split_names

__all__ = [
    "ArraySection",
    "AugmentConfig",
    "FileSection",
    "NetcdfSection",
    "Section",
    "TrainConfig",
    "TrainResult",
    "build_mapping",
    "default_mapping",
    "load_mapping_csv",
    "load_split",
    "open_section",
    "open_sections",
    "save_split",
    "split_names",
    "synthetic_sections",
    "train",
]
