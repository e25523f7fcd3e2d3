"""Grain analysis speed and memory (`thinseg analyze`), measured in one run on one machine.

For each size, a square labelmap is written once as a netCDF file (as `thinseg segment` writes
them): tiles of the real sandstone masks, turned and mirrored, when the shared data is there
(real grain shapes), else packed generated discs. Then a fresh process analyses it, grains and
statistics as `thinseg analyze` computes them (no report files), while this script samples the
resident memory of that process AND its workers every 20 ms: the peak is the sum over the
process tree, what the machine has to hold. MPix/s is labelmap pixels over the analysis's wall
time (the interpreter's start and the file's opening excluded); MPix per CPU second is over the
CPU time of the process and its workers (their start included), which other programs on a
shared machine disturb less than the wall time; the load average at the end of each setting is
printed with it.

`--baseline` also times the library way on the smallest size: scikit-image's `label` and
`regionprops_table` with the same measures (area, centroid, Crofton perimeter, Feret max,
moments), whole image in memory, one process; it has no watershed split, no minimum Feret, no
contacts, so it does less work than the analysis.

    python bench/grain_analysis.py                       # 8k and 32k, 1 and 2 workers
    python bench/grain_analysis.py --sizes 8192 --workers 2 --baseline
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ThinSectionSegmentation"))

from process_tree import tree_rss  # noqa: E402

from thinseg.classes.files import read_value_classes  # noqa: E402
from thinseg.io.netcdf import NetcdfWriter  # noqa: E402

MASKS = Path(os.environ.get("THINSEG_REAL_DATA", REPO.parent / "shared" / "data" / "sandstone-ppl-xpl")) / "masks"
CLASSES = REPO / "Resources" / "ClassTables" / "sandstone_ppl_xpl.csv"
MM_PER_PIXEL = 0.001

CHILD = """
import json, resource, sys, time
sys.path.insert(0, {module!r})
from thinseg.analysis import GrainOptions, analyze, open_labelmap
def cpu():
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)
source = open_labelmap({path!r})
start, start_cpu = time.perf_counter(), cpu()
result = analyze(source, GrainOptions(workers={workers}))
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "cpu_seconds": cpu() - start_cpu, "grains": len(result.table),
                  "split_regions": result.scan.split_regions, "halo_growths": result.scan.halo_growths,
                  "cut_bands": result.scan.cut_bands}}))
"""

BASELINE = """
import json, sys, time
import numpy as np
sys.path.insert(0, {module!r})
from skimage.measure import label, regionprops_table
from thinseg.analysis import open_labelmap
source = open_labelmap({path!r})
labels = source.read_rows(0, source.shape[0])
start = time.perf_counter()
regions = label(labels, background=0, connectivity=1)
table = regionprops_table(regions, properties=("area", "centroid", "perimeter_crofton", "feret_diameter_max",
                                                 "orientation", "axis_major_length", "axis_minor_length"))
seconds = time.perf_counter() - start
print(json.dumps({{"seconds": seconds, "grains": int(len(table["area"]))}}))
"""


def real_mask_tiles() -> list[np.ndarray]:
    """The real masks as class labels 1..5, each in its eight turned/mirrored versions."""
    import tifffile

    lut = read_value_classes(CLASSES).lut
    tiles = []
    for path in sorted(MASKS.glob("*_mascara*.tif*")):
        mask = lut[tifffile.imread(path)]
        for k in range(4):
            turned = np.rot90(mask, k)
            tiles += [turned, turned[:, ::-1]]
    return tiles


def disc_rows(rows: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Generated stand-in when the real masks are absent: packed discs of four classes in a matrix."""
    out = np.ones((rows, width), np.uint8)
    for _ in range(rows * width // 20000):
        r = int(rng.integers(8, 60))
        y, x = int(rng.integers(0, rows)), int(rng.integers(0, width))
        y0, y1, x0, x1 = max(0, y - r), min(rows, y + r + 1), max(0, x - r), min(width, x + r + 1)
        yy, xx = np.ogrid[y0:y1, x0:x1]
        out[y0:y1, x0:x1][(yy - y) ** 2 + (xx - x) ** 2 <= r * r] = rng.integers(2, 6)
    return out


def write_labelmap(path: Path, side: int) -> str:
    """A side x side labelmap netCDF (the array is built in this process, 1 byte per pixel, and
    written by bands); returns what it is made of."""
    table = read_value_classes(CLASSES).table
    rng = np.random.default_rng(0)
    tiles = real_mask_tiles() if MASKS.is_dir() else []
    labels = np.empty((side, side), np.uint8)
    for y in range(0, side, 1200):
        rows = min(1200, side - y)
        labels[y : y + rows] = _fit(rows, side, tiles, rng) if tiles else disc_rows(rows, side, rng)
    tmp = path.with_name(path.stem + ".partial.nc")
    with NetcdfWriter(tmp) as writer:
        writer.add_labelmap("labels", labels, table, mm_per_pixel=MM_PER_PIXEL)
    tmp.rename(path)
    return "real sandstone masks, tiled" if tiles else "generated discs"


def _fit(rows: int, side: int, tiles: list[np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """A row of randomly drawn tiles, rows x side (taller tiles cropped, shorter ones padded with matrix)."""
    out = np.ones((rows, side), np.uint8)
    x = 0
    while x < side:
        tile = tiles[int(rng.integers(len(tiles)))]
        h, w = min(rows, tile.shape[0]), min(tile.shape[1], side - x)
        out[:h, x : x + w] = tile[:h, :w]
        x += w
    return out


def measure(code: str) -> dict[str, float]:
    """Run `code` in a fresh interpreter; its JSON line plus the peak resident memory of its tree."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.02)
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"measurement failed:\n{err.decode()[-3000:]}")
    result = json.loads(out.decode().strip().splitlines()[-1])
    result["peak_mb"] = peak / 2**20
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=1, help="runs per setting (the median is reported)")
    parser.add_argument("--baseline", action="store_true", help="also scikit-image label + regionprops_table")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "thinseg-grain-bench")
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    module = str(REPO / "ThinSectionSegmentation")
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor(),
    )
    print(f"machine: {cpu}, {os.cpu_count()} CPUs; python {platform.python_version()}")
    results = []
    for side in args.sizes:
        path = args.work / f"labels_{side}.nc"
        if not path.exists():
            start = time.perf_counter()
            made = write_labelmap(path, side)
            print(f"{side} x {side}: wrote {path} ({made}) in {time.perf_counter() - start:.0f} s")
        mpix = side * side / 1e6
        for workers in args.workers:
            runs = [measure(CHILD.format(module=module, path=str(path), workers=workers)) for _ in range(args.repeats)]
            seconds = statistics.median(r["seconds"] for r in runs)
            cpu_s = statistics.median(r["cpu_seconds"] for r in runs)
            row = {
                "side": side,
                "workers": workers,
                "seconds": seconds,
                "mpix_per_s": mpix / seconds,
                "seconds_each": [r["seconds"] for r in runs],
                "cpu_seconds": cpu_s,
                "mpix_per_cpu_s": mpix / cpu_s,
                "load_average": os.getloadavg()[0],
                "peak_mb": max(r["peak_mb"] for r in runs),
                "grains": runs[0]["grains"],
                "split_regions": runs[0]["split_regions"],
                "halo_growths": runs[0]["halo_growths"],
                "cut_bands": runs[0]["cut_bands"],
            }
            results.append(row)
            print(
                f"{side:>6} x {side:<6} workers {workers}: {seconds:7.1f} s  {row['mpix_per_s']:6.1f} MPix/s  "
                f"{cpu_s:7.1f} CPU s ({row['mpix_per_cpu_s']:.1f} MPix per CPU s)  peak {row['peak_mb']:6.0f} MB  "
                f"{row['grains']} grains ({row['split_regions']} regions split, {row['cut_bands']} bands cut)  "
                f"load {row['load_average']:.1f}"
            )
        if args.baseline and side == min(args.sizes):
            base = measure(BASELINE.format(module=module, path=str(path)))
            results.append({"side": side, "baseline": "skimage label + regionprops_table", **base})
            print(
                f"{side:>6} x {side:<6} scikit-image label + regionprops_table: {base['seconds']:7.1f} s  "
                f"{mpix / base['seconds']:6.1f} MPix/s  peak {base['peak_mb']:6.0f} MB  {base['grains']} regions"
            )
    if args.json:
        args.json.write_text(json.dumps({"machine": cpu, "results": results}, indent=2))


if __name__ == "__main__":
    main()
