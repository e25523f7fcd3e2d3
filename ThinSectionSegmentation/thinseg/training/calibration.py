"""Temperature scaling: make the confidence map mean what it says.

A network trained with Dice + cross-entropy on a few sections is over-confident: pixels it gives
90% are right far less often. Dividing its logits by one temperature T, fitted on the validation
sections by minimising the negative log-likelihood (Guo et al., 2017), fixes most of that and
changes no label (the argmax is the same). T is folded into the network's last convolution, so
the exported bundle needs nothing new to apply it, in thinseg or GeoSlicer.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import minimize_scalar

from thinseg.errors import ThinSegError
from thinseg.training.validate import ValSection

#: Temperatures searched: anything outside means the logits are broken, not mis-scaled.
MIN_TEMPERATURE, MAX_TEMPERATURE = 0.05, 20.0


def fit_temperature(logits: torch.Tensor, target: torch.Tensor) -> float:
    """The T > 0 minimising the mean NLL of softmax(logits / T); logits (N, C), target (N,) in 0..C-1."""
    logits, target = logits.double(), target.long()

    def nll(log_t: float) -> float:
        return float(F.cross_entropy(logits / float(np.exp(log_t)), target))

    found = minimize_scalar(nll, bounds=(np.log(MIN_TEMPERATURE), np.log(MAX_TEMPERATURE)), method="bounded")
    return float(np.exp(found.x))


def sample_logits(
    network: torch.nn.Module,
    sections: Sequence[ValSection],
    roles: Sequence[str],
    *,
    first_label: int = 0,
    crops_per_section: int = 6,
    side: int = 512,
    multiple: int = 32,
    max_pixels: int = 400_000,
    device: torch.device | str = "cpu",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (N, C) and true output channels (N,) of labelled pixels in random crops of the
    validation sections, run at the model's resolution (crops resampled when the section's differs)."""
    rng = np.random.default_rng(seed)
    logits_all: list[torch.Tensor] = []
    target_all: list[torch.Tensor] = []
    was_training = network.training
    network.eval()
    try:
        for val in sections:
            section, truth = val.prepared.section, np.asarray(val.truth)
            height, width = truth.shape
            scale = float(val.prepared.scale)  # section pixels per model pixel
            model_side = max(multiple, int(min(side, height / scale, width / scale)) // multiple * multiple)
            read = min(height, width, int(round(model_side * scale)))
            for _ in range(crops_per_section):
                y0, x0 = int(rng.integers(0, height - read + 1)), int(rng.integers(0, width - read + 1))
                images = [_read(section, role, y0, read, x0) for role in roles]
                x = torch.from_numpy(np.concatenate(images, axis=2)).permute(2, 0, 1)[None].float().div_(255.0)
                if read != model_side:
                    x = F.interpolate(x, size=(model_side, model_side), mode="bilinear", align_corners=False)
                with torch.no_grad():
                    out = network(x.to(device)).float().cpu()[0]  # (C, m, m)
                index = np.minimum(((np.arange(model_side) + 0.5) * read / model_side).astype(int), read - 1)
                labels = truth[y0 : y0 + read, x0 : x0 + read][np.ix_(index, index)]
                keep = torch.from_numpy(labels > 0)
                logits_all.append(out.permute(1, 2, 0)[keep])
                target_all.append(torch.from_numpy(labels.astype(np.int64))[keep] - first_label)
    finally:
        network.train(was_training)
    if not logits_all or sum(len(t) for t in target_all) == 0:
        raise ThinSegError("no labelled validation pixels to calibrate the confidence on")
    logits, target = torch.cat(logits_all), torch.cat(target_all)
    if len(target) > max_pixels:
        pick = torch.from_numpy(rng.choice(len(target), max_pixels, replace=False))
        logits, target = logits[pick], target[pick]
    return logits, target


def _read(section: object, role: str, y0: int, side: int, x0: int) -> np.ndarray:
    source = section.source(role)  # type: ignore[attr-defined]  # a Section: checked for its roles before training
    return np.asarray(source.read(y0, y0 + side, x0, x0 + side))


def fold_temperature(network: torch.nn.Module, temperature: float) -> None:
    """Divide the network's logits by `temperature` by scaling its last convolution (`head`)."""
    head = getattr(network, "head", None)
    if not isinstance(head, torch.nn.Conv2d):
        raise ThinSegError(f"cannot fold a temperature into a {type(network).__name__} (no final convolution 'head')")
    with torch.no_grad():
        head.weight.div_(temperature)
        if head.bias is not None:
            head.bias.div_(temperature)
