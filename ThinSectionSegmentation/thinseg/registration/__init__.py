"""Registration of QEMSCAN mineral maps onto PP/XP thin-section images.

Public API (conventions in `grids`; the transform maps image mm -> QEMSCAN mm):
    register_section(pp, xp, qemscan, table, image_mm_per_pixel=..., qemscan_mm_per_pixel=...,
                     landmarks=None, kind="similarity", refine=True, bspline=False) -> RegistrationResult
    write_outputs(result, folder, stem, pp, qemscan) -> OutputPaths      (.tfm, .json, .tif, .nc, .png)
    load_transform(json_path) -> SectionTransform                          (read back what write_outputs wrote)
    fit_landmarks(qemscan_px, image_px, geometry, kind) -> LandmarkFit   (residuals, outliers)
    read_landmarks(path[, qemscan_path]) -> LandmarkPairs                 (CSV or Slicer .mrk.json)
    load_qemscan(path[, table]) -> QemscanMap                             (RGB/paletted/labels TIFF/PNG, netCDF)
    align_xp_to_pp(pp, xp) -> (dy, dx, xp_aligned)
    prepare_scene / coarse_search / refine                                (the automatic stages)
    target_registration_error(transform, qemscan_to_image)                (against a known truth)
"""

from thinseg.classes.files import read_color_table
from thinseg.registration.coarse import CoarseResult, SearchRange, coarse_search
from thinseg.registration.features import Scene, prepare_scene
from thinseg.registration.grids import Geometry
from thinseg.registration.landmark_io import LandmarkPairs, read_landmarks
from thinseg.registration.landmarks import LandmarkFit, fit_landmarks
from thinseg.registration.output import OutputPaths, load_transform, write_outputs
from thinseg.registration.ppxp import align_xp_to_pp, estimate_xp_offset
from thinseg.registration.qemscan_maps import QemscanMap, load_qemscan
from thinseg.registration.refinement import RefineResult, refine
from thinseg.registration.sitk_transforms import SectionTransform, target_registration_error
from thinseg.registration.stages import RegistrationResult, register_section
from thinseg.registration.warp import resample_labels

__all__ = [
    "CoarseResult",
    "Geometry",
    "LandmarkFit",
    "LandmarkPairs",
    "OutputPaths",
    "QemscanMap",
    "RefineResult",
    "RegistrationResult",
    "Scene",
    "SearchRange",
    "SectionTransform",
    "align_xp_to_pp",
    "coarse_search",
    "estimate_xp_offset",
    "fit_landmarks",
    "load_qemscan",
    "load_transform",
    "prepare_scene",
    "read_color_table",
    "read_landmarks",
    "refine",
    "register_section",
    "resample_labels",
    "target_registration_error",
    "write_outputs",
]
