"""What the minimum-region sieve (thinseg.inference.regions) costs, measured in one run.

Reports, in megapixels per second and as medians of `--repeats`:
  (a) the sieve alone on a speckled label stream: bands of 1024 rows of one 8192-column stripe
      (what the engine hands on for a wide section), with runner-up classes and confidence;
  (b) with `--model`: the engine on a `--size` square section of random PP/XP, sieve off and at
      `--min-region` px, interleaved, so the ratio is the sieve's share of a real run.

    python bench/bench_sieve.py
    python bench/bench_sieve.py --model RUN/model --size 2048 --min-region 256
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ThinSectionSegmentation"))


def speckled_stream(rows: int, width: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Labels of five classes in grains of ~50 px with specks, their runner-up classes and confidence."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(seed)
    noise = ndi.gaussian_filter(rng.random((5, rows // 4, width // 4)), sigma=(0, 3, 3))
    order = np.argsort(-noise, axis=0)  # the first and second class of every pixel, as a network ranks them
    labels = np.repeat(np.repeat(order[0] + 1, 4, 0), 4, 1).astype(np.uint8)
    runner = np.repeat(np.repeat(order[1] + 1, 4, 0), 4, 1).astype(np.uint8)
    specks = rng.random(labels.shape) < 0.002  # single-pixel specks, whose runner-up is the class around
    runner[specks] = labels[specks]
    labels[specks] = rng.integers(1, 6, specks.sum())
    p1 = rng.integers(128, 256, labels.shape).astype(np.uint8)
    p2 = (255 - p1) // 2
    return labels, runner, p1, p2


class Discard:
    def write_rows(self, y0: int, labels: np.ndarray, confidence: np.ndarray | None, x0: int = 0) -> None:
        pass


def time_sieve(arrays: tuple[np.ndarray, ...], min_pixels: int, band: int = 1024) -> float:
    from thinseg.inference.regions import RegionSieve

    labels, runner, p1, p2 = arrays
    start = time.perf_counter()
    stream = RegionSieve(Discard(), min_pixels)
    for y0 in range(0, labels.shape[0], band):
        y1 = min(labels.shape[0], y0 + band)
        stream.write_band(y0, labels[y0:y1], runner[y0:y1], p1[y0:y1], p2[y0:y1])
    stream.finish()
    return time.perf_counter() - start


def time_engine(model: Path, size: int, min_regions: list[int], repeats: int) -> dict[int, list[float]]:
    from thinseg.inference import InferenceOptions, Segmenter
    from thinseg.io.images import ArraySource
    from thinseg.model.bundle import load_bundle

    bundle = load_bundle(model)
    rng = np.random.default_rng(1)
    sources = [ArraySource(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)) for _ in bundle.input_names]
    segmenters = {m: Segmenter(bundle, InferenceOptions(min_region=m, with_confidence=True)) for m in min_regions}
    times: dict[int, list[float]] = {m: [] for m in min_regions}
    for _ in range(repeats):
        for m, segmenter in segmenters.items():  # interleaved: drift on a shared machine hits both
            start = time.perf_counter()
            segmenter.segment(sources)
            times[m].append(time.perf_counter() - start)
    return times


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=8192, help="(a): rows of the stripe")
    p.add_argument("--min-region", type=int, default=256)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--model", type=Path, default=None, help="(b): a model bundle to run")
    p.add_argument("--size", type=int, default=2048, help="(b): section side in px")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    arrays = speckled_stream(args.rows, 8192)
    mpix = arrays[0].size / 1e6
    seconds = [time_sieve(arrays, args.min_region) for _ in range(args.repeats)]
    print(
        f"(a) sieve alone, {args.rows} x 8192 in 1024-row bands, min region {args.min_region} px: "
        f"{mpix / statistics.median(seconds):.1f} MPix/s (median of {args.repeats}: {statistics.median(seconds):.2f} s)"
    )
    if args.model is not None:
        times = time_engine(args.model, args.size, [0, args.min_region], args.repeats)
        off, on = statistics.median(times[0]), statistics.median(times[args.min_region])
        size_mpix = args.size * args.size / 1e6
        print(
            f"(b) engine, {args.size} px square, torch threads {torch.get_num_threads()}: sieve off "
            f"{size_mpix / off:.2f} MPix/s, at {args.min_region} px {size_mpix / on:.2f} MPix/s "
            f"(time x{on / off:.3f}; medians of {args.repeats}, interleaved)"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
