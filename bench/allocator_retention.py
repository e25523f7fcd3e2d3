"""LiteUNet training steps with glibc's default allocator against one told to keep freed memory
(`thinseg.allocator.retain_freed_memory`, what the command line does), interleaved.

An allocator setting holds for a whole process, so each round starts one fresh process per
variant (alternating which goes first, so that a shared machine's drift hits both alike). Each
process builds the recipe's network (PP+XP LiteUNet, channels-last, AdamW), runs warm-up
steps of Dice + cross-entropy on an 8 x 256^2 batch and times the next few; it reports samples/s,
the page faults and kernel time of the timed steps, and its peak resident memory.

    .venv/bin/python bench/allocator_retention.py [--rounds 6] [--steps 6] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "ThinSectionSegmentation"))
sys.path.insert(0, str(ROOT / "bench"))

VARIANTS = ("default", "retain")


def child(variant: str, steps: int, warm_up: int, threads: int) -> dict[str, float]:
    """One process's measurement of `steps` timed training steps under `variant`, after `warm_up`
    untimed ones (glibc adapts its threshold for mmap to the sizes freed in the first steps)."""
    from thinseg.allocator import retain_freed_memory

    retained = retain_freed_memory() if variant == "retain" else False
    import torch
    from lite_step import build, recipe_batch, train_step  # the same network, batch and step

    torch.set_num_threads(threads)
    net, optimizer = build(pad_inside=True)
    x, y = recipe_batch()

    def step() -> None:
        train_step(net, optimizer, x, y)

    for _ in range(warm_up):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "retained": float(retained),
        "samples_per_s": 8 * steps / seconds,
        "page_faults_per_step": (after.ru_minflt - before.ru_minflt) / steps,
        "kernel_s_per_step": (after.ru_stime - before.ru_stime) / steps,
        "peak_rss_gib": after.ru_maxrss / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=6, help="timed training steps per process")
    parser.add_argument("--warm-up", type=int, default=8, help="untimed training steps first")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.steps, args.warm_up, args.threads)))
        return

    runs: dict[str, list[dict[str, float]]] = {v: [] for v in VARIANTS}
    for round_ in range(args.rounds):
        for variant in VARIANTS if round_ % 2 == 0 else VARIANTS[::-1]:
            command = [sys.executable, __file__, "--child", variant, "--steps", str(args.steps)]
            command += ["--warm-up", str(args.warm_up), "--threads", str(args.threads)]
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            runs[variant].append(json.loads(out.strip().splitlines()[-1]))
            r = runs[variant][-1]
            print(
                f"round {round_ + 1}: {variant:8s} {r['samples_per_s']:.2f} samples/s, "
                f"{r['page_faults_per_step']:,.0f} page faults and {r['kernel_s_per_step']:.2f} s in the kernel "
                f"per step, peak RSS {r['peak_rss_gib']:.2f} GiB",
                flush=True,
            )
    if not runs["retain"][0]["retained"]:
        print("the C library is not glibc: nothing was retained")
    print()
    for variant, rs in runs.items():
        print(
            f"{variant:8s} median {statistics.median(r['samples_per_s'] for r in rs):.2f} samples/s, "
            f"{statistics.median(r['page_faults_per_step'] for r in rs):,.0f} page faults/step, "
            f"{statistics.median(r['kernel_s_per_step'] for r in rs):.2f} s kernel/step, "
            f"peak RSS {statistics.median(r['peak_rss_gib'] for r in rs):.2f} GiB"
        )
    ratios = [a["samples_per_s"] / b["samples_per_s"] for a, b in zip(runs["retain"], runs["default"])]
    print(f"retain/default: median of per-round ratios {statistics.median(ratios):.3f} ({args.rounds} rounds)")


if __name__ == "__main__":
    main()
