"""MRML logic of the Thin Section Segmentation module: scene nodes <-> the `thinseg` core.

Imports no Qt, and nothing heavy at import time (torch, MONAI, netCDF4, SimpleITK are imported
when first used), so the module loads before its dependencies are installed. The one Qt part,
the panel (panel.py), is imported by the module file only.

    from ThinSectionSegmentationLib import ThinSectionSegmentationLogic
"""

from .logic import (
    BatchOutput,
    Job,
    RegistrationOutput,
    SegmentationOutput,
    ThinSectionSegmentationLogic,
    TrainingOutput,
    base_name,
)

__all__ = [
    "BatchOutput",
    "Job",
    "RegistrationOutput",
    "SegmentationOutput",
    "ThinSectionSegmentationLogic",
    "TrainingOutput",
    "base_name",
]
