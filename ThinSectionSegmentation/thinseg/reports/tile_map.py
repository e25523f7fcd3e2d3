"""The tile map: the stitched PP panorama, reduced, with every tile's outline and number.

Green outlines are tiles placed by their overlaps, orange ones tiles placed by the layout alone
(featureless glass, no reliable overlap): where to look first when a panorama looks wrong.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

LINKED, LAYOUT_ONLY = (60, 220, 90), (255, 150, 30)


def tile_map_image(
    overview: npt.NDArray[np.uint8],
    factor: int,
    positions: npt.NDArray[np.int64],
    tile_shape: tuple[int, int],
    linked: Sequence[bool],
    labels: Sequence[str],
) -> npt.NDArray[np.uint8]:
    """`overview` (the panorama reduced `factor` times) with outlines at the tiles' `positions` (y, x)."""
    from PIL import Image, ImageDraw, ImageFont  # deferred: Pillow is needed only when a picture is drawn

    image = Image.fromarray(np.ascontiguousarray(overview))
    draw = ImageDraw.Draw(image)
    h, w = tile_shape
    width = max(1, round(max(overview.shape[:2]) / 700))
    size = int(np.clip(min(h, w) / factor / 8, 10, 48))
    try:
        font: Any = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one small bitmap font
        font = ImageFont.load_default()
    for (y, x), ok, label in zip(positions, linked, labels):
        colour = LINKED if ok else LAYOUT_ONLY
        box = (x / factor, y / factor, (x + w) / factor - 1, (y + h) / factor - 1)
        draw.rectangle(box, outline=colour, width=width)
        corner = (box[0] + 3 * width, box[1] + 2 * width)
        draw.rectangle(draw.textbbox(corner, label, font=font), fill=(0, 0, 0))
        draw.text(corner, label, fill=colour, font=font)
    return np.asarray(image)
