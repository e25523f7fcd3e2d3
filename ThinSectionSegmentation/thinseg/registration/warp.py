"""The QEMSCAN map on the PP grid: nearest-neighbour resampling at full image resolution.

Done in bands of rows so that the peak memory is the output plus one band, whatever the size of
the section; pixels whose QEMSCAN position falls off the map get 0 (not classified).
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from thinseg.registration.metric import qemscan_image
from thinseg.registration.sitk_transforms import SectionTransform

BAND_ROWS = 2048


def resample_labels(
    labels: np.ndarray,
    transform: SectionTransform,
    shape: tuple[int, int] | None = None,
    step: int = 1,
    band_rows: int = BAND_ROWS,
) -> np.ndarray:
    """(H, W) uint8 QEMSCAN values at each image pixel (or every `step`-th pixel, for previews)."""
    g = transform.geometry
    h, w = shape or g.image_shape
    oh, ow = -(-h // step), -(-w // step)
    moving = qemscan_image(labels, g.qemscan_mm_per_pixel)
    out = np.zeros((oh, ow), dtype=np.uint8)
    sp = g.image_mm_per_pixel * step
    for r0 in range(0, oh, band_rows):
        r1 = min(oh, r0 + band_rows)
        band = sitk.Resample(
            moving,
            [ow, r1 - r0],
            transform.itk,
            sitk.sitkNearestNeighbor,
            (0.0, r0 * sp),
            (sp, sp),
            (1.0, 0.0, 0.0, 1.0),
            0,
            sitk.sitkUInt8,
        )
        out[r0:r1] = sitk.GetArrayViewFromImage(band)
    return out
