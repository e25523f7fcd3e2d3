"""LiteUNet training step with the EfficientNet-Lite package's own padding (an `F.pad` before every
convolution) against padding inside the stride-1 convolutions (`pad_in_convolution`), in one
process, interleaved round by round so that a shared machine's drift hits both alike.

Both networks are built from the same seed and compute the same function; each round runs a few
real training steps (Dice + cross-entropy, AdamW, channels-last, the recipe's 8 x 256^2 PP+XP
batch) on one, then on the other, alternating which goes first.

    .venv/bin/python bench/lite_padding.py [--rounds 20] [--steps 2] [--threads 2]
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
from thinseg.model.networks import build_network  # noqa: E402
from thinseg.training.losses import dice_ce_loss  # noqa: E402

VARIANTS = ("package padding", "padding in the convolution")


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--steps", type=int, default=2, help="training steps per variant and round")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--patch", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    runs = {name: build(pad_inside) for name, pad_inside in zip(VARIANTS, (False, True))}
    torch.manual_seed(1)
    x = torch.rand(args.batch, 6, args.patch, args.patch).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 6, (args.batch, args.patch, args.patch))

    def step(name: str) -> None:
        net, optimiser = runs[name]
        optimiser.zero_grad(set_to_none=True)
        dice_ce_loss(net(x), y).backward()  # type: ignore[no-untyped-call]
        optimiser.step()

    for name in VARIANTS:  # warm-up: allocator and oneDNN caches
        step(name)
        step(name)
    rates: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for r in range(args.rounds):
        for name in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            start = time.perf_counter()
            for _ in range(args.steps):
                step(name)
            rates[name].append(args.batch * args.steps / (time.perf_counter() - start))
    print(f"torch {torch.__version__}, {args.threads} threads, {args.rounds} rounds of {args.steps} steps")
    for name, values in rates.items():
        print(f"{name:28s} median {statistics.median(values):.2f} samples/s  ({min(values):.2f}-{max(values):.2f})")
    ratios = [inside / package for package, inside in zip(*rates.values())]
    print(f"padding in the convolution / package: median per-round ratio {statistics.median(ratios):.3f}")


if __name__ == "__main__":
    main()
