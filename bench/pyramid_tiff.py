"""Speed and peak memory of the streamed pyramidal BigTIFF writer (`thinseg.io.pyramid_tiff`).

A panorama of the given size is written band by band from a generator, as stitching does: its
pixels are a synthetic 1024 x 1024 thin-section field (thinseg.synth) repeated with mirroring,
so deflate gets what it gets from a photograph (about 1.3x at level 1; a real PPL field about
1.2x), not what it gets from noise or from flat colour. Each size runs in a fresh child
process, which reports:
  MB/s       uncompressed RGB bytes written per second of writer time (band generation excluded),
             level 0 and the reduced levels together; `wall` the same over the whole run, band
             generation included (what a caller sees); also the time of close() alone
  peak RSS   the process's peak resident memory (ru_maxrss) during the write, and its increase
             over the resident memory just before the writer was created: what the writer costs
             (the generated band itself, --band rows x W x 3 bytes, is part of it; tifffile and
             its codecs are imported by a tiny write before)

Usage:
  python bench/pyramid_tiff.py                                     # 8192x8192 and 16384x12288, zlib
  python bench/pyramid_tiff.py --shape 20000 30000 --compression zstd --tile 512 --band 256
  python bench/pyramid_tiff.py --tile-rows-held 2     # the writer holding two tile-rows (more overlap)
Results are printed as a table and written to bench/out/pyramid_tiff.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ThinSectionSegmentation"))

DEFAULT_SHAPES = [(8192, 8192), (16384, 12288)]  # (height, width)


def resident_mb() -> float:
    """Current resident memory (Linux /proc; elsewhere the peak so far, a conservative stand-in)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return peak_mb()


def peak_mb() -> float:
    """ru_maxrss. On Linux a child inherits its parent's peak at fork, so the parent keeps its own
    small (the sample field is made in a process of its own)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def high_water_mb() -> float | None:
    """VmHWM: the peak resident memory of this process image alone (Linux), None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def child(args: argparse.Namespace) -> None:
    """Write one panorama and print one JSON line (runs in its own process, so peaks are its own)."""
    from thinseg.io import pyramid_tiff
    from thinseg.io.pyramid_tiff import PyramidTiffWriter

    if args.tile_rows_held:
        pyramid_tiff.TILE_ROWS_HELD = args.tile_rows_held
    height, width = args.child
    field = np.load(args.field)
    fh, fw = field.shape[:2]
    # mirrored repetition: column/row k of the panorama shows field column/row `fold(k)`
    fold_x = np.abs((np.arange(width) + fw) % (2 * fw) - fw)
    fold_x = np.minimum(fold_x, fw - 1)
    # a tiny write first: tifffile and its codecs are imported before memory is measured
    with PyramidTiffWriter(args.output, (64, 64), tile=16, compression=args.compression, smallest_level=16) as w:
        w.write_rows(0, np.zeros((64, 64, 3), np.uint8))
    before = resident_mb()
    generating = 0.0
    start = time.perf_counter()
    with PyramidTiffWriter(
        args.output, (height, width), mm_per_pixel=0.00132, tile=args.tile, compression=args.compression
    ) as writer:
        for y0 in range(0, height, args.band):
            t = time.perf_counter()
            ys = np.minimum(np.abs((np.arange(y0, min(height, y0 + args.band)) + fh) % (2 * fh) - fh), fh - 1)
            band = field[ys[:, None], fold_x[None, :]]
            generating += time.perf_counter() - t
            writer.write_rows(y0, band)
            del band
        closing = time.perf_counter()
    end = time.perf_counter()
    seconds = end - start - generating
    print(
        json.dumps(
            {
                "shape": [height, width],
                "tile": args.tile,
                "compression": args.compression,
                "band_rows": args.band,
                "tile_rows_held": pyramid_tiff.TILE_ROWS_HELD,
                "levels": len(writer.levels),
                "seconds": round(seconds, 2),
                "close_seconds": round(end - closing, 2),
                "generate_seconds": round(generating, 2),
                "mb_per_s": round(height * width * 3 / 1e6 / seconds, 1),
                "wall_mb_per_s": round(height * width * 3 / 1e6 / (end - start), 1),
                "file_mb": round(os.path.getsize(args.output) / 1e6, 1),
                "rss_before_mb": round(before, 1),
                "peak_rss_mb": round(peak_mb(), 1),
                "peak_increase_mb": round(peak_mb() - before, 1),
                "vm_hwm_mb": high_water_mb(),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", nargs=2, type=int, action="append", metavar=("H", "W"), help="repeatable")
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--compression", default="zlib")
    parser.add_argument("--band", type=int, default=256, help="rows per write_rows call (default 256)")
    parser.add_argument(
        "--tile-rows-held", type=int, default=None, help="full-resolution tile-rows the writer holds (default: its own)"
    )
    parser.add_argument("--keep", type=Path, default=None, help="folder to keep the written files in")
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    parser.add_argument("--field", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--output", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--make-field", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    if args.make_field:
        from thinseg.synth import generate_section  # a process of its own: its peak stays out of the children's

        np.save(args.make_field, generate_section(1024, 1024, seed=3).pp)
        return

    shapes = [tuple(s) for s in args.shape] if args.shape else DEFAULT_SHAPES
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-pyramid-") as tmp:
        field_path = Path(tmp) / "field.npy"
        subprocess.run([sys.executable, __file__, "--make-field", str(field_path)], check=True)
        folder = args.keep or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for height, width in shapes:
            output = folder / f"panorama_{height}x{width}.tif"
            command = [sys.executable, __file__, "--child", str(height), str(width), "--field", str(field_path)]
            command += ["--output", str(output), "--tile", str(args.tile), "--compression", args.compression]
            command += ["--band", str(args.band)]
            if args.tile_rows_held:
                command += ["--tile-rows-held", str(args.tile_rows_held)]
            run = subprocess.run(command, capture_output=True, text=True, check=True)
            results.append(json.loads(run.stdout.strip().splitlines()[-1]))
            if args.keep is None:
                output.unlink()
    print(
        f"{'H x W':>13} {'held':>4} {'levels':>6} {'MB/s':>7} {'wall':>7} {'s':>7} {'close s':>7} {'file MB':>8}"
        f" {'peak MB':>8} {'+MB':>6}"
    )
    for r in results:
        print(
            f"{r['shape'][0]:>6}x{r['shape'][1]:<6} {r['tile_rows_held']:>4} {r['levels']:>6} {r['mb_per_s']:>7}"
            f" {r['wall_mb_per_s']:>7} {r['seconds']:>7} {r['close_seconds']:>7} {r['file_mb']:>8}"
            f" {r['peak_rss_mb']:>8} {r['peak_increase_mb']:>6}"
        )
    out = REPO / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    machine = {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform()}
    (out / "pyramid_tiff.json").write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
