"""Augmentations that respect the optics of PP/XP pairs.

Geometry (flips, 90-degree turns, zoom, and optionally a free turn) is drawn once per patch and
applied to every image and the labels alike, because PP and XP show the same grains. Turning a
photograph turns the polarisers with the crystals, so every grain keeps its XP colour: a turned
patch is what a camera mounted at another angle records. (Turning the stage under fixed
polarisers would change the colours; no augmentation can make that from one photograph.) The
90-degree turns and flips are exact pixel shuffles; a free turn (`AugmentConfig.rotation`)
resamples, and shows grains, twin lamellae and cleavage at angles the few training sections may
not hold. Colour jitter is drawn per image: lamp, filters and camera vary between the two
acquisitions.

The patch reader applies the geometry (it is just indexing); colour jitter only travels with
the batch as 6 numbers per image and is applied to the whole batch at once in the training
step (`colour_jitter`), vectorised and on the GPU when there is one, which keeps the data path
cheap on small CPUs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from thinseg.errors import ThinSegError
from thinseg.training.config import AugmentConfig

#: Jitter parameters per image: gain r, g, b, contrast, brightness (0..255 units), saturation,
#: gamma, blur sigma (px).
JITTER_PARAMS = 8
IDENTITY_JITTER = np.array([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 1.0, 0.0], np.float32)
#: Gaussian blur kernels reach this many sigmas (and at least one pixel) either side.
_BLUR_REACH = 2.5


@dataclass
class PatchAugment:
    k90: int  # number of 90-degree rotations
    flip: bool  # left-right mirror after the rotation
    zoom: float  # read a window of zoom * patch pixels (>1: zoom out)
    jitter: np.ndarray  # (n_images, JITTER_PARAMS) float32
    angle: float = 0.0  # free turn in degrees (counter-clockwise), applied before the 90-degree turns


def draw_augment(rng: np.random.Generator, cfg: AugmentConfig, n_images: int) -> PatchAugment:
    """All random choices of one patch, drawn in a fixed order (reproducible streams)."""
    k90 = int(rng.integers(4)) if cfg.rot90 else 0
    flip = bool(rng.random() < 0.5) if cfg.flips else False
    zoom = float(np.exp(rng.uniform(np.log(1 - cfg.scale), np.log(1 + cfg.scale)))) if cfg.scale > 0 else 1.0
    jitter = np.tile(IDENTITY_JITTER, (n_images, 1))
    for i in range(n_images):
        jitter[i, :3] = 1.0 + rng.uniform(-cfg.channel_gain, cfg.channel_gain, 3)
        jitter[i, 3] = 1.0 + rng.uniform(-cfg.contrast, cfg.contrast)
        jitter[i, 4] = rng.uniform(-cfg.brightness, cfg.brightness) * 255.0
        jitter[i, 5] = 1.0 + rng.uniform(-cfg.saturation, cfg.saturation)
    # drawn only when asked for, so that runs without them keep their random streams
    for i in range(n_images):
        if cfg.gamma > 0:
            jitter[i, 6] = float(np.exp(rng.uniform(np.log(1 - cfg.gamma), np.log(1 + cfg.gamma))))
        if cfg.blur > 0 and rng.random() < 0.5:
            jitter[i, 7] = rng.uniform(0.0, cfg.blur)
    angle = float(rng.uniform(-cfg.rotation, cfg.rotation)) if cfg.rotation > 0 else 0.0
    return PatchAugment(k90, flip, zoom, jitter, angle)


def turned_window(size: int, angle: float) -> int:
    """Side of the square window that still covers a `size` square after turning it by `angle`
    degrees about its centre (so the turned patch holds no fill)."""
    radians = math.radians(angle)
    return int(math.ceil(size * (abs(math.cos(radians)) + abs(math.sin(radians))))) + 2


def turn(array: np.ndarray, angle: float, size: int, *, labels: bool) -> np.ndarray:
    """The central `size` square of a square uint8 window (h, w) or (h, w, 3) turned by `angle`
    degrees (counter-clockwise) about its centre: bilinear for images, nearest for labels. Only
    the output square is computed (one affine resampling); where the window does not reach, the
    output is 0 (ignored label, black image)."""
    h, w = array.shape[:2]
    radians = -math.radians(angle)
    cos, sin = math.cos(radians), math.sin(radians)
    half = size / 2.0
    # output (x, y) -> input: the turn about the output's centre, moved onto the window's centre
    matrix = (cos, sin, w / 2.0 - (cos + sin) * half, -sin, cos, h / 2.0 - (cos - sin) * half)
    resample = Image.Resampling.NEAREST if labels else Image.Resampling.BILINEAR
    image = Image.fromarray(np.ascontiguousarray(array))
    return np.array(image.transform((size, size), Image.Transform.AFFINE, matrix, resample, fillcolor=0))


def apply_geometry(array: np.ndarray, aug: PatchAugment) -> np.ndarray:
    """Rotate/flip the two leading (row, column) axes of an image or label patch (a view)."""
    out = np.rot90(array, aug.k90, axes=(0, 1)) if aug.k90 else array
    if aug.flip:
        out = out[:, ::-1]
    return out


def colour_jitter(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Apply per-image jitter to a float batch (B, 3n, H, W) in 0..255; params (B, n, 8) (or
    (B, n, 6): colour only). Colour first, then gamma, then blur.

    Every step is linear, so each image gets one affine colour map y = A x + c:
    gain G = diag(g); contrast k around the mean m of G x, plus brightness b:
    k G x + (1 - k) m + b; saturation s mixes with the channel mean, S = s I + (1 - s)/3
    (rows of S sum to 1, so it leaves the constant term alone). A = k S G, c = (1 - k) m + b.
    """
    b, channels, h, w = x.shape
    n = channels // 3
    params = params.to(device=x.device, dtype=torch.float32).reshape(b, n, -1)
    if params.shape[-1] < JITTER_PARAMS:  # the six colour parameters alone: no gamma, no blur
        rest = torch.as_tensor(IDENTITY_JITTER[params.shape[-1] :], device=x.device).expand(b, n, -1)
        params = torch.cat([params, rest], dim=-1)
    if bool(torch.all(params == torch.as_tensor(IDENTITY_JITTER, device=x.device))):
        return x
    x = _affine_colour(x, params)
    gamma = params[..., 6]
    if bool(torch.any(gamma != 1.0)):
        images = x.reshape(b, n, 3, h, w).div_(255.0).clamp_(min=1e-6)
        x = images.pow_(gamma[..., None, None, None]).mul_(255.0).reshape(b, channels, h, w)
    sigma = params[..., 7]
    if bool(torch.any(sigma > 0)):
        x = _gaussian_blur(x, sigma.reshape(b * n))
    return x


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Blur each RGB image of (B, 3n, H, W) with its own sigma (B * n of them; 0: unchanged),
    as one grouped separable convolution: out-of-focus patches, which microscopes produce."""
    b, channels, h, w = x.shape
    reach = max(1, int(math.ceil(_BLUR_REACH * float(sigma.max()))))
    offsets = torch.arange(-reach, reach + 1, device=x.device, dtype=torch.float32)
    safe = sigma.clamp(min=1e-3)[:, None]
    kernels = torch.exp(-0.5 * (offsets[None, :] / safe) ** 2)
    kernels = torch.where(sigma[:, None] > 0, kernels, (offsets[None, :] == 0).float())
    kernels = (kernels / kernels.sum(dim=1, keepdim=True)).repeat_interleave(3, dim=0)  # one per channel
    flat = x.reshape(1, b * channels, h, w)
    flat = torch.nn.functional.pad(flat, (reach, reach, reach, reach), mode="reflect")
    flat = torch.nn.functional.conv2d(flat, kernels[:, None, :, None], groups=b * channels)
    flat = torch.nn.functional.conv2d(flat, kernels[:, None, None, :], groups=b * channels)
    return flat.reshape(b, channels, h, w)


def _affine_colour(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Gain, contrast, brightness and saturation as one affine map per image (see colour_jitter)."""
    b, channels, h, w = x.shape
    n = channels // 3
    gain, k, bright, s = params[..., :3], params[..., 3], params[..., 4], params[..., 5]
    images = x.reshape(b, n, 3, h, w)
    means = images.mean(dim=(3, 4))  # (b, n, 3)
    m = (gain * means).mean(-1)
    eye = torch.eye(3, device=x.device)
    sat = s[..., None, None] * eye + ((1.0 - s) / 3.0)[..., None, None]
    a = k[..., None, None] * sat * gain[..., None, :]  # S @ diag(g): scale column j by g_j
    c = (1.0 - k) * m + bright
    out = torch.einsum("bnij,bnjp->bnip", a, images.reshape(b, n, 3, h * w))
    out += c[..., None, None]
    return out.clamp_(0.0, 255.0).reshape(b, channels, h, w)


def class_mix(
    images: torch.Tensor, target: torch.Tensor, share: float, rng: np.random.Generator, *, edge: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """ClassMix (Olsson et al. 2021) within a batch: each patch, with probability `share`, takes
    the pixels of a random half of the classes of another patch of the batch, PP, XP and labels
    alike. Grains then meet neighbours they never touch in the few training sections, and their
    pasted outlines are real grain outlines, not rectangles.

    images uint8 (B, C, H, W), target uint8 (B, H, W), 0 = ignored. Each class of the source is
    taken with probability 1/2, independently, and the receiving pixels covered are independent
    of their class, so a batch's expected class shares are unchanged: the class-prior correction
    still holds. With `edge` > 0 the source's ignored pixels within `edge` pixels of what is
    pasted (its void band) come along, still ignored. The inputs are left alone; random choices
    are drawn from `rng` in a fixed order, so a seed reproduces the batch.
    """
    if not 0.0 <= share <= 1.0:
        raise ThinSegError(f"the ClassMix share must be in [0, 1], got {share}")
    b = images.shape[0]
    receivers = rng.random(b) < share
    if b < 2 or not receivers.any():
        return images, target
    sources = (np.arange(b) + int(rng.integers(1, b))) % b
    mixed_images, mixed_target = images.clone(), target.clone()
    for i in np.flatnonzero(receivers):
        source = target[int(sources[i])]
        present = torch.unique(source)
        present = present[present > 0]
        chosen = present[torch.from_numpy(rng.random(len(present)) < 0.5)]
        if len(chosen) == 0:
            continue
        mask = torch.isin(source, chosen)
        if edge > 0:
            grown = torch.nn.functional.max_pool2d(mask[None, None].float(), 2 * edge + 1, stride=1, padding=edge)
            mask |= (grown[0, 0] > 0) & (source == 0)
        mixed_images[i][:, mask] = images[int(sources[i])][:, mask]
        mixed_target[i][mask] = source[mask]
    return mixed_images, mixed_target
