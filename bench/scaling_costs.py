"""What one section costs a worker, part by part, and what 10,000 sections of 20k x 30k would take.

Measured on this machine for one worker (`--threads`, default 1, as a Dask worker of one thread)
and one device (`--device cpu|cuda`), on a size x size tiled zlib TIFF PP/XP pair:

  command  the whole `thinseg segment` (a subprocess: start, model, decode, network, write)
  engine   Segmenter.stream over the decoded images held in memory (network, blend, argmax)
  decode   reading both TIFFs in tile-high bands (what the engine's reader does)
  write    the output netCDF: PP and XP copied in, the labelmap written (NetcdfWriter)

Each is reported in seconds per megapixel of section; the command's fixed cost (start Python,
import torch, load the model) is the command's time on a 64 x 64 section. The projection to
N sections of H x W multiplies the per-megapixel command cost (less the fixed cost, which a
cluster worker pays once) by the pixels, adds the engine's cost of the extra tiles a section
wider than one column stripe (8192 px) runs, and divides by the workers. On a GPU the engine part
shrinks and decode/write (CPU threads) remain: the projection says which part bounds it.

Usage:
  python bench/scaling_costs.py --size 4096                  # CPU, one thread
  python bench/scaling_costs.py --size 8192 --device cuda --threads 8
Writes bench/out/scaling_costs.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ThinSectionSegmentation"))
sys.path.insert(0, str(REPO / "bench"))

import numpy as np  # noqa: E402
from bench_segment import make_section_tiffs  # noqa: E402


def command_seconds(pp: Path, out: Path, threads: int, device: str) -> float:
    """Wall seconds of the whole command in a fresh process."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(REPO / "ThinSectionSegmentation"))
    start = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "thinseg", "segment", str(pp), "-o", str(out), "-q", "--overwrite", "--device", device],
        check=True,
        env=env,
        capture_output=True,
    )
    return time.perf_counter() - start


def decode_seconds(pp: Path, xp: Path, band: int) -> tuple[float, list[np.ndarray]]:
    """Seconds to decode both images in bands; the images (kept for the other parts)."""
    from thinseg.io.images import open_image

    start = time.perf_counter()
    images = []
    for path in (pp, xp):
        source = open_image(path)
        h, _w = source.shape
        images.append(np.concatenate([source.read(y, min(h, y + band)) for y in range(0, h, band)]))
    return time.perf_counter() - start, images


def engine_seconds(images: list[np.ndarray], device: str) -> tuple[float, np.ndarray]:
    """Seconds of Segmenter.stream over in-memory images; the labels."""
    from thinseg.inference.engine import ArraySink, InferenceOptions, Segmenter
    from thinseg.io.images import ArraySource
    from thinseg.model.bundle import load_bundle
    from thinseg.resources import default_model_dir

    segmenter = Segmenter(load_bundle(default_model_dir()), InferenceOptions(device=device))
    sources = [ArraySource(image) for image in images]
    h, w = images[0].shape[:2]
    segmenter.segment([ArraySource(image[:256, :256]) for image in images])  # warm-up
    sink = ArraySink(h, w, with_confidence=False)
    start = time.perf_counter()
    segmenter.stream(sources, sink)
    return time.perf_counter() - start, sink.labels


def stripe_overhead(shape: tuple[int, int]) -> float:
    """The share of extra tiles a section of `shape` costs for being run in column stripes
    (each stripe also runs the tile column over its edge): 0 up to 8192 px wide."""
    from thinseg.inference.engine import STRIPE_ALIGN, STRIPE_WIDTH, InferenceOptions, Segmenter, column_stripes
    from thinseg.model.bundle import load_bundle
    from thinseg.resources import default_model_dir

    plan = Segmenter(load_bundle(default_model_dir()), InferenceOptions(device="cpu")).plan_for(*shape)
    stripes = column_stripes(plan, STRIPE_WIDTH, STRIPE_ALIGN)
    return sum(s.end - s.first for s in stripes) / len(plan.xs) - 1


def write_seconds(images: list[np.ndarray], labels: np.ndarray, out: Path) -> float:
    """Seconds to write PP, XP and the labelmap into a netCDF as the command does (row bands)."""
    from thinseg.classes.files import default_class_table
    from thinseg.io.netcdf import Geometry, NetcdfWriter

    geometry = Geometry.thin_section(0.00132)
    h, w = labels.shape
    start = time.perf_counter()
    with NetcdfWriter(out) as writer:
        rgb = [writer.begin_rgb_image(name, (h, w), geometry=geometry) for name in ("S_PP", "S_XP")]
        lab = writer.begin_labelmap("S_Segmentation", (h, w), default_class_table(), geometry=geometry)
        for y in range(0, h, 512):
            y1 = min(h, y + 512)
            for sink, image in zip(rgb, images):
                sink.write_rows(y, image[y:y1])
            lab.write_rows(y, labels[y:y1])
        lab.finish()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=4096)
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the worker")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--sections", type=int, default=10_000, help="sections of the projection")
    parser.add_argument("--section-shape", type=int, nargs=2, default=(20_000, 30_000), metavar=("H", "W"))
    parser.add_argument("--workdir", type=Path, default=None, help="keep the generated TIFFs here")
    args = parser.parse_args()

    import torch

    from thinseg.jsonio import write_json

    torch.set_num_threads(args.threads)
    mpix = args.size * args.size / 1e6
    with tempfile.TemporaryDirectory(prefix="thinseg-scaling-") as scratch:
        work = args.workdir or Path(scratch)
        work.mkdir(parents=True, exist_ok=True)
        pp, xp = make_section_tiffs(work, args.size)
        small_pp, _ = make_section_tiffs(work, 64)
        fixed = min(command_seconds(small_pp, Path(scratch) / "small", args.threads, args.device) for _ in range(2))
        command = command_seconds(pp, Path(scratch) / "cmd", args.threads, args.device)
        decode, images = decode_seconds(pp, xp, 1024)
        engine, labels = engine_seconds(images, args.device)
        write = write_seconds(images, labels, Path(scratch) / "write.nc")
    per_mpix = {
        "command": (command - fixed) / mpix,
        "engine": engine / mpix,
        "decode": decode / mpix,
        "write": write / mpix,
    }
    section_mpix = args.section_shape[0] * args.section_shape[1] / 1e6
    # the measured size is one stripe wide; a wider section runs a few more tiles
    extra_tiles = stripe_overhead((args.section_shape[0], args.section_shape[1]))
    section_s = (per_mpix["command"] + per_mpix["engine"] * extra_tiles) * section_mpix + fixed / max(1, args.sections)
    total_worker_hours = section_s * args.sections / 3600
    report = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "device": args.device,
        "threads": args.threads,
        "size": args.size,
        "fixed_s": fixed,
        "command_s": command,
        "seconds_per_mpix": per_mpix,
        "section_mpix": section_mpix,
        "stripe_extra_tiles": extra_tiles,
        "section_s": section_s,
        "sections": args.sections,
        "worker_hours": total_worker_hours,
    }
    print(f"{args.size} x {args.size} px on {args.device}, {args.threads} thread(s), {report['machine']}")
    print(f"fixed cost of a run (64 px section): {fixed:.2f} s")
    for part, value in per_mpix.items():
        print(f"{part:<8} {value * 1000:8.1f} ms/MPix  {1 / value:6.2f} MPix/s")
    print(
        f"one {args.section_shape[0]} x {args.section_shape[1]} section: {section_s / 60:.1f} min on one worker "
        f"(column stripes: {extra_tiles:.1%} more tiles than one pass)"
    )
    print(f"{args.sections} sections: {total_worker_hours:,.0f} worker-hours")
    for workers in (16, 64, 256, 1024):
        print(f"  {workers:5d} workers: {total_worker_hours / workers:8.1f} h")
    out = REPO / "bench" / "out" / "scaling_costs.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, report)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
