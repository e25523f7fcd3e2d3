"""Two ways of computing the same LiteUNet training step, in one process, interleaved round by
round so that a shared machine's drift hits both alike:

- `--compare padding`: the EfficientNet-Lite package's own padding (an `F.pad` before every
  convolution) against padding inside the stride-1 convolutions (`pad_in_convolution`);
- `--compare norm-fold`: the encoder's frozen-statistics norms as the package applies them
  (a pass of their own) against folded into their convolutions (`conv_then_norm`).

Both networks of a comparison are built from the same seed and compute the same function; each
round runs a few real training steps (Dice + cross-entropy, AdamW, channels-last, the recipe's
8 x 256^2 PP+XP batch) on one, then on the other, alternating which goes first. The process
keeps freed memory for reuse, as `thinseg train` does.

    .venv/bin/python bench/lite_step.py --compare padding|norm-fold [--rounds 20] [--steps 2] [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "ThinSectionSegmentation"))

import torch  # noqa: E402

import thinseg.model.lite_unet as lite_unet  # noqa: E402
from thinseg.allocator import retain_freed_memory  # noqa: E402
from thinseg.model.networks import build_network  # noqa: E402
from thinseg.training.losses import dice_ce_loss  # noqa: E402

COMPARISONS = {
    "padding": ("package padding", "padding in the convolution"),
    "norm-fold": ("norms as the package applies them", "norms folded into the convolutions"),
}
FOLDING = (lite_unet.conv_then_norm, lite_unet.inverted_residual)


def fold_norms(fold: bool) -> None:
    """Make LiteUNet.encode fold its norms (`fold`) or apply them as the package does."""
    if fold:
        lite_unet.conv_then_norm, lite_unet.inverted_residual = FOLDING
    else:
        lite_unet.conv_then_norm = lambda conv, norm, x: norm(conv(x))
        lite_unet.inverted_residual = lambda block, x, rate: block(x, drop_connect_rate=rate)


def build(pad_inside: bool) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A LiteUNet (PP+XP, 6 classes) from seed 0 and its optimiser; `pad_inside` False keeps the
    package's padding by building the network with `pad_in_convolution` switched off."""
    real = lite_unet.pad_in_convolution
    if not pad_inside:
        lite_unet.pad_in_convolution = lambda encoder: 0
    try:
        torch.manual_seed(0)
        net = build_network("LiteUNet", {"in_images": 2, "out_channels": 6})
    finally:
        lite_unet.pad_in_convolution = real
    net = net.to(memory_format=torch.channels_last).train()  # type: ignore[call-overload]
    return net, torch.optim.AdamW(net.parameters(), 1e-3)


def recipe_batch(batch: int = 8, patch: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """A random PP+XP batch (channels-last) and 6-class labels of the recipe's shape, from seed 1."""
    torch.manual_seed(1)
    x = torch.rand(batch, 6, patch, patch).contiguous(memory_format=torch.channels_last)
    return x, torch.randint(0, 6, (batch, patch, patch))


def train_step(net: torch.nn.Module, optimiser: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> None:
    """One training step of the recipe's loss (Dice + cross-entropy)."""
    optimiser.zero_grad(set_to_none=True)
    dice_ce_loss(net(x), y).backward()  # type: ignore[no-untyped-call]
    optimiser.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--compare", choices=tuple(COMPARISONS), default="padding")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=2, help="training steps per variant and round")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--patch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    retain_freed_memory()
    torch.set_num_threads(args.threads)
    variants = COMPARISONS[args.compare]
    padding = args.compare == "padding"
    runs = {name: build(pad_inside=not padding or second) for name, second in zip(variants, (False, True))}
    folded = {name: padding or second for name, second in zip(variants, (False, True))}
    x, y = recipe_batch(args.batch, args.patch)

    def step(name: str) -> None:
        fold_norms(folded[name])
        train_step(*runs[name], x, y)

    for name in variants:  # warm-up: allocator and oneDNN caches
        step(name)
        step(name)
    rates: dict[str, list[float]] = {name: [] for name in variants}
    for r in range(args.rounds):
        for name in variants if r % 2 == 0 else variants[::-1]:
            start = time.perf_counter()
            for _ in range(args.steps):
                step(name)
            rates[name].append(args.batch * args.steps / (time.perf_counter() - start))
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} rounds of {args.steps} steps")
    for name, values in rates.items():
        print(f"{name:28s} median {statistics.median(values):.2f} samples/s  ({min(values):.2f}-{max(values):.2f})")
    ratios = [second / first for first, second in zip(*rates.values())]
    print(f"{variants[1]} / {variants[0]}: median per-round ratio {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
