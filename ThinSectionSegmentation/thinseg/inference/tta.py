"""Test-time augmentation: the network run on flipped/rotated copies of each tile batch, each
answer mapped back onto the tile and the class probabilities averaged.

Why these transforms and no others: a thin section has no "up", and the 8 symmetries of the
pixel grid (the dihedral group: 4 flips x optional transpose, which includes the 90/180/270-
degree rotations) are exact permutations of the pixels, so nothing is interpolated. They are
also pictures the microscope could have taken: with crossed polarisers a grain's brightness
and interference colour repeat every 90 degrees of stage rotation (extinction every 90), so
a turned XP image shows the colours the turned grain would show. In plane light the flips and
the 180-degree turn are exact too; a 90-degree turn is exact for grains without pleochroism
(quartz, feldspars, carbonates), while a pleochroic grain (biotite, hornblende) keeps the
plane-light colour of its old orientation (a colour it has, at the wrong angle). Arbitrary
angles are NOT used: they resample the image, and under crossed polarisers a turn by another
angle changes the interference colours, so the rotated XP image is not a photograph the stage
could have taken.

Why probabilities: the average is taken over softmax probabilities, not logits, so a pass
that is very sure of a wrong class cannot outvote the others by its logit scale, and the
confidence (max averaged probability) is the agreement of the passes as well as their
certainty. The engine works in logits (argmax, max softmax, overlap blending); it is handed
`log_probabilities(average)`, whose softmax is the average itself, so its labels and
confidence map are the argmax and the max of the averaged probabilities (where tiles overlap,
their log-probabilities are blended as logits are without augmentation).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from thinseg.errors import ThinSegError

#: The modes, as a bundle's meta.json `test_time_augmentation` names them.
MODES = ("none", "flips", "dihedral")
#: What a user may ask for: a mode, or "auto" (the model bundle's recommendation).
CHOICES = ("auto",) + MODES
#: Smallest probability kept before taking the log: softmax in float32 can underflow to 0,
#: and log(0) = -inf would turn the overlap blending (weights x log-probabilities) into NaN.
MIN_PROBABILITY = 1e-30

#: One network run: a (B, C_in, H, W) float batch -> (B, classes, H, W) logits.
RunFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Augmentation:
    """One symmetry of the pixel grid: flip the `flip_dims` axes of a (B, C, H, W) batch after
    swapping H and W when `transpose` (so that a 90-degree rotation is transpose + flip)."""

    name: str
    flip_dims: tuple[int, ...]
    transpose: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The augmented batch the network sees."""
        if self.transpose:
            x = x.transpose(-2, -1)
        return torch.flip(x, self.flip_dims) if self.flip_dims else x

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        """The network's answer `y` to `forward(x)` mapped back onto x's pixels."""
        if self.flip_dims:
            y = torch.flip(y, self.flip_dims)
        return y.transpose(-2, -1) if self.transpose else y


_FLIPS = (
    Augmentation("identity", ()),
    Augmentation("flip left-right", (-1,)),
    Augmentation("flip up-down", (-2,)),
    Augmentation("rotate 180", (-2, -1)),
)
_TRANSPOSED = (
    Augmentation("transpose", (), transpose=True),
    Augmentation("rotate 90 clockwise", (-1,), transpose=True),
    Augmentation("rotate 90 anticlockwise", (-2,), transpose=True),
    Augmentation("anti-transpose", (-2, -1), transpose=True),
)


def augmentations(mode: str) -> Sequence[Augmentation]:
    """The transforms averaged in `mode` ("none": the identity alone)."""
    if mode == "none":
        return _FLIPS[:1]
    if mode == "flips":
        return _FLIPS
    if mode == "dihedral":
        return _FLIPS + _TRANSPOSED
    raise ThinSegError(f"unknown test-time augmentation {mode!r} (one of {', '.join(CHOICES)})")


def resolve_mode(requested: str, recommended: str = "none") -> str:
    """The mode to run: `requested`, or for "auto" the model's `recommended` one."""
    if requested not in CHOICES:
        raise ThinSegError(f"unknown test-time augmentation {requested!r} (one of {', '.join(CHOICES)})")
    if requested != "auto":
        return requested
    if recommended not in MODES:
        raise ThinSegError(f"the model recommends an unknown test-time augmentation {recommended!r}")
    return recommended


def describe(mode: str) -> str:
    """A line for the user: what `mode` averages and what it costs."""
    n = len(augmentations(mode))
    what = {"flips": "identity and 3 flips", "dihedral": "4 flips x 90-degree rotations"}.get(mode, "")
    return f"test-time augmentation {mode}: {n} network passes per tile ({what}), probabilities averaged"


def average_probabilities(run: RunFn, x: torch.Tensor, mode: str, multiple: int = 1) -> torch.Tensor:
    """Mean softmax probabilities (B, classes, H, W), float32, of `run` over the augmented copies
    of `x` (B, C, H, W), each mapped back onto x's pixels.

    One accumulator: memory is one pass's plus one (B, classes, H, W) float32 sum, whatever the
    number of passes. Transposing swaps H and W, which a fully convolutional network takes when
    both are multiples of its total stride `multiple` (the engine's tiles always are; a square
    tile is unchanged in shape).
    """
    chosen = augmentations(mode)
    height, width = x.shape[-2], x.shape[-1]
    turned = any(a.transpose for a in chosen) and height != width
    if turned and multiple > 1 and (height % multiple or width % multiple):
        raise ThinSegError(
            f"{mode} test-time augmentation turns {height} x {width} px tiles, which this model cannot take: "
            f"both sides must be multiples of {multiple} px (use --tta flips)"
        )
    total: torch.Tensor | None = None
    for augmentation in chosen:
        logits = run(augmentation.forward(x))
        probabilities = augmentation.inverse(torch.softmax(logits.float(), dim=1))
        if total is None:
            total = probabilities.contiguous()
        else:
            total.add_(probabilities)
        del logits, probabilities
    assert total is not None  # every mode has at least the identity
    return total.div_(len(chosen))


def log_probabilities(probabilities: torch.Tensor) -> torch.Tensor:
    """log(p), with p kept above MIN_PROBABILITY: logits whose softmax is `probabilities`."""
    return probabilities.clamp_min(MIN_PROBABILITY).log_()
