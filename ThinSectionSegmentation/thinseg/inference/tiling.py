"""Tile placement and blending weights for seam-free sliding-window inference."""

from __future__ import annotations

import math

import torch


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets covering [0, length) with tiles of `tile` px overlapping by at least `overlap`.

    The last tile is flush with the end, so no tile reaches past the image (no padding needed
    except when the whole image is smaller than a tile).
    """
    if length <= tile:
        return [0]
    stride = tile - overlap
    n = math.ceil((length - tile) / stride) + 1
    # Spread the tiles evenly: overlaps are equal and never below `overlap`.
    return [round(i * (length - tile) / (n - 1)) for i in range(n)]


def blend_weights(tile_h: int, tile_w: int, ramp: int) -> torch.Tensor:
    """Separable weights that fall smoothly to near zero at tile borders over `ramp` px.

    Conv-net predictions are worst at tile borders (zero padding); down-weighting them and
    normalising by the summed weights removes visible seams.
    """

    def profile(n: int) -> torch.Tensor:
        w = torch.ones(n)
        r = min(ramp, n // 2)
        if r > 0:
            t = (torch.arange(r, dtype=torch.float32) + 0.5) / r  # (0, 1)
            edge = 0.5 - 0.5 * torch.cos(math.pi * t)  # raised cosine
            w[:r] = edge
            w[n - r :] = edge.flip(0)
        return w.clamp_min(1e-3)

    return profile(tile_h)[:, None] * profile(tile_w)[None, :]


def padded_size(length: int, tile: int, multiple: int) -> int:
    """Tile extent along an axis: `tile`, or the image length rounded up to the network's multiple."""
    if length >= tile:
        return tile
    return int(math.ceil(length / multiple) * multiple)
