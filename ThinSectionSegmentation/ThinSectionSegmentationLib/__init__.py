"""MRML logic of the Thin Section Segmentation module: scene nodes <-> the `thinseg` core.

Imports no Qt, and nothing heavy at import time (torch, MONAI, netCDF4, SimpleITK are imported
when first used), so the module loads before its dependencies are installed.

    from ThinSectionSegmentationLib import ThinSectionSegmentationLogic
"""

from .logic import Job, RegistrationOutput, SegmentationOutput, ThinSectionSegmentationLogic, base_name

__all__ = ["Job", "RegistrationOutput", "SegmentationOutput", "ThinSectionSegmentationLogic", "base_name"]
