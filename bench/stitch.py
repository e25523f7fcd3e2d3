"""Stitching speed, memory and accuracy (`thinseg stitch`) against m2stitch, on one tile set whose
true positions are known.

The tile set: a rows x cols grid of PP and XP tiles (JPEG by default) cut at jittered integer
positions from a generated section, with vignetting (the same gain on PP and XP) and sensor
noise. The section is rendered block by block (the synthetic generator, one seed per block) into
a file-backed array on disk, so a 30k x 20k source never sits in this process's memory.

(a) `thinseg stitch` on the PP + XP tiles, as a user runs it (a fresh process): wall time, tiles
    per second, the peak resident memory of its process tree (sampled every 20 ms), and the
    accuracy of TileConfiguration.registered.txt against the truth.
(b) m2stitch (MIST's algorithm; Python >= 3.11, so in its own virtualenv, `--m2stitch-python`)
    on the same PP tiles as 8-bit grey, given the grid rows and columns: the same measures.
    m2stitch only finds positions: it writes no panorama, blends nothing and leaves XP alone.
    Its pair filter (`ncc_threshold`, default 0.5) compares a correlation divided by the norms
    of the raw overlaps, which stays far below 0.5 on bright tiles; `--m2stitch-ncc` sets it
    (default 0.02, its best on the small set).
Accuracy: the found positions less the true ones, after removing the common offset (the per-axis
median); the share of tiles within 1 px and the largest error.

    python bench/stitch.py                                        # 255 tiles, 17 x 15 of 2048 x 1536
    python bench/stitch.py --rows 4 --cols 5 --tile 1024 768      # a small set, a minute
    python bench/stitch.py --keep --work /tmp/stitch-bench        # keep the tiles for the next run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ThinSectionSegmentation"))
sys.path.insert(0, str(REPO / "Testing" / "Python"))

from process_tree import Measured, run_measured  # noqa: E402
from tile_sets import (  # noqa: E402
    TileSetTruth,
    accuracy,
    cut_tiles,
    found_positions,
    read_tile_configuration,
    source_shape_for,
    synthetic_source,
)

from thinseg.jsonio import write_json  # noqa: E402

DEFAULT_M2STITCH_PYTHON = Path("/work/m2stitch-venv/bin/python")
#: Source blocks rendered one at a time (rows, cols): ~5 MPix, a few hundred MB while rendering.
BLOCK = (2048, 2560)


def machine() -> str:
    lines = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if "model name" in line), platform.processor())
    return f"{cpu}, {os.cpu_count()} CPUs, python {platform.python_version()}"


def build_source(folder: Path, shape: tuple[int, int], seed: int) -> tuple[np.memmap, np.memmap]:
    """PP and XP sources of `shape` as (H, W, 3) uint8 memory maps in `folder`, rendered block by
    block (each block its own generated section, with its own exposure and light fall-off:
    blocks meet at straight seams, which a stitcher sees as ordinary image content)."""
    pp = np.lib.format.open_memmap(folder / "source_pp.npy", "w+", np.uint8, (*shape, 3))
    xp = np.lib.format.open_memmap(folder / "source_xp.npy", "w+", np.uint8, (*shape, 3))
    k = 0
    for y in range(0, shape[0], BLOCK[0]):
        for x in range(0, shape[1], BLOCK[1]):
            h, w = min(BLOCK[0], shape[0] - y), min(BLOCK[1], shape[1] - x)
            block_pp, block_xp = synthetic_source((max(h, 8), max(w, 8)), seed=seed * 100_003 + k)
            pp[y : y + h, x : x + w] = block_pp[:h, :w]
            xp[y : y + h, x : x + w] = block_xp[:h, :w]
            k += 1
        pp.flush()
        xp.flush()
    return pp, xp


def tile_set(args: argparse.Namespace) -> tuple[TileSetTruth, float]:
    """The tile set in args.work/tiles (reused when its truth file matches the options); seconds spent."""
    tiles = args.work / "tiles"
    truth_path = tiles / "truth.json"
    tile_shape = (args.tile[1], args.tile[0])
    wanted = {
        "rows": args.rows,
        "cols": args.cols,
        "tile_shape": list(tile_shape),
        "overlap": args.overlap,
        "jitter": args.jitter,
        "vignetting": args.vignetting,
        "noise": args.noise,
        "seed": args.seed,
        "fmt": args.fmt,
        "quality": args.quality,
    }
    if truth_path.exists():
        truth = TileSetTruth.load(truth_path)
        if truth.settings.get("bench") == wanted and all(p.exists() for p in truth.pp_paths + truth.xp_paths):
            print(f"tile set: reusing {tiles}")
            return truth, 0.0
    shutil.rmtree(tiles, ignore_errors=True)
    tiles.mkdir(parents=True)
    start = time.perf_counter()
    shape = source_shape_for(args.rows, args.cols, tile_shape, args.overlap, args.jitter)
    pp, xp = build_source(args.work, shape, args.seed)
    rendered = time.perf_counter() - start
    truth = cut_tiles(
        pp,
        xp,
        tiles,
        rows=args.rows,
        cols=args.cols,
        tile_shape=tile_shape,
        overlap=args.overlap,
        jitter=args.jitter,
        vignetting=args.vignetting,
        noise=args.noise,
        seed=args.seed,
        fmt=args.fmt,
        quality=args.quality,
        workers=args.gen_workers,
    )
    del pp, xp
    for name in ("source_pp.npy", "source_xp.npy"):
        (args.work / name).unlink()
    truth.settings["bench"] = wanted
    truth.save(truth_path)
    seconds = time.perf_counter() - start
    print(
        f"tile set: {len(truth.pp_paths)} PP + {len(truth.xp_paths)} XP tiles of {args.tile[0]} x {args.tile[1]} "
        f"({args.fmt}) from a {shape[1]} x {shape[0]} source in {seconds:.0f} s (rendering {rendered:.0f} s)"
    )
    return truth, seconds


def score(truth: TileSetTruth, found: np.ndarray, run: Measured) -> dict[str, object]:
    n = len(truth.pp_paths)
    return {
        "seconds": run.seconds,
        "tiles_per_s": n / run.seconds,
        "peak_mb": run.peak_mb,
        **accuracy(truth, found, within=(1.0, 2.0)),
    }


def run_thinseg(args: argparse.Namespace, truth: TileSetTruth) -> dict[str, object]:
    out = args.work / "thinseg-out"
    shutil.rmtree(out, ignore_errors=True)
    argv = [str(args.python), "-m", "thinseg", "stitch", str(truth.pp_paths[0].parent), "--output", str(out)]
    argv += ["--name", "bench", "--quiet"]
    if args.workers is not None:
        argv += ["--workers", str(args.workers)]
    argv += args.stitch_args.split()
    env = dict(os.environ, PYTHONPATH=str(REPO / "ThinSectionSegmentation"))
    run = run_measured(argv, env=env, cwd=REPO)
    if run.returncode != 0:
        raise SystemExit(f"thinseg stitch failed ({run.returncode}): {' '.join(argv)}\n{run.stderr[-3000:]}")
    found = found_positions(truth, read_tile_configuration(out / "TileConfiguration.registered.txt"))
    result = {"tool": "thinseg stitch", "command": " ".join(argv), **score(truth, found, run)}
    report = json.loads((out / "stitch.json").read_text())
    result["panorama_shape"] = report.get("shape")
    result["linked"] = sum(1 for t in report.get("tiles", []) if t.get("linked"))
    result["phase_seconds"] = report.get("seconds")  # finding positions vs blending and writing
    result["flat_field"] = report.get("flat_field")  # estimated vignetting strength (truth: --vignetting)
    result["seam_ratio"] = (report.get("seams") or {}).get("ratio")  # edge energy on seams / inside tiles
    result["outputs_mb"] = sum(p.stat().st_size for p in out.iterdir() if p.is_file()) / 2**20
    return result


def run_m2stitch(args: argparse.Namespace, truth: TileSetTruth) -> dict[str, object]:
    job = args.work / "m2stitch-job.json"
    answer = args.work / "m2stitch-result.json"
    job.write_text(
        json.dumps(
            {
                "tiles": [str(p) for p in truth.pp_paths],
                "rows": truth.grid[:, 0].tolist(),
                "cols": truth.grid[:, 1].tolist(),
                "ncc_thresholds": [float(t) for t in args.m2stitch_ncc.split(",")],
            }
        )
    )
    argv = [str(args.m2stitch_python), str(Path(__file__).with_name("m2stitch_runner.py")), str(job), str(answer)]
    run = run_measured(argv)
    if run.returncode != 0:
        return {"tool": "m2stitch", "failed": run.stderr.strip().splitlines()[-1][-300:], "seconds": run.seconds}
    result = json.loads(answer.read_text())
    found = np.asarray(result["positions"], np.float64)
    return {
        "tool": "m2stitch",
        "note": "positions only (no panorama, no blending, PP only)",
        "read_seconds": result["read_seconds"],
        "attempts": result["attempts"],
        "ncc_threshold": result["attempts"][-1]["ncc_threshold"],
        **score(truth, found, run),
    }


def thinseg_has_stitch(python: Path) -> bool:
    env = dict(os.environ, PYTHONPATH=str(REPO / "ThinSectionSegmentation"))
    return run_measured([str(python), "-m", "thinseg", "stitch", "--help"], env=env, cwd=REPO).returncode == 0


def _phases(seconds: object) -> str:
    if not isinstance(seconds, dict):
        return "no phase times"
    return ", ".join(f"{name} {value:.0f} s" for name, value in seconds.items())


def table(rows: list[dict[str, Any]]) -> str:
    head = f"{'tool':<16}{'tiles':>6}{'seconds':>9}{'tiles/s':>9}{'peak MB':>9}{'<=1 px':>8}{'<=2 px':>8}"
    head += f"{'max err':>9}{'missing':>8}"
    lines = [head]
    for r in rows:
        if "failed" in r:
            lines.append(f"{r['tool']:<16} failed after {r['seconds']:.0f} s: {r['failed']}")
            continue
        lines.append(
            f"{r['tool']:<16}{r['tiles']:>6}{r['seconds']:>9.1f}{r['tiles_per_s']:>9.2f}{r['peak_mb']:>9.0f}"
            f"{100 * float(r['share_within_1px']):>7.1f}%{100 * float(r['share_within_2px']):>7.1f}%"
            f"{r['max_error_px']:>9.2f}{r['missing']:>8}"
        )
    lines += [
        f"{r['tool']}: {_phases(r.get('phase_seconds'))}; flat field {r['flat_field']}; seam ratio {r['seam_ratio']}"
        for r in rows
        if r["tool"] == "thinseg stitch"
    ]
    lines += [
        f"{r['tool']}: ncc_threshold {r['ncc_threshold']} ({len(r['attempts'])} attempt(s)), "
        "positions only: no panorama written, nothing blended, XP not read"
        for r in rows
        if r["tool"] == "m2stitch" and "failed" not in r
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--cols", type=int, default=17)
    parser.add_argument("--tile", type=int, nargs=2, default=[2048, 1536], metavar=("W", "H"))
    parser.add_argument("--overlap", type=float, default=0.15)
    parser.add_argument("--jitter", type=float, default=0.03, help="fraction of the tile size, per axis")
    parser.add_argument("--vignetting", type=float, default=0.3, help="corners this much darker")
    parser.add_argument("--noise", type=float, default=2.0, help="sigma, grey levels")
    parser.add_argument("--fmt", default=".jpg", choices=[".jpg", ".png", ".tif"])
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "thinseg-stitch-bench")
    parser.add_argument("--keep", action="store_true", help="keep the tile set (reused by the next run)")
    parser.add_argument("--gen-workers", type=int, default=2, help="threads writing tiles")
    parser.add_argument("--workers", type=int, default=None, help="passed to thinseg stitch --workers")
    parser.add_argument("--stitch-args", default="", help="more options for thinseg stitch, one string")
    parser.add_argument("--python", type=Path, default=REPO / ".venv" / "bin" / "python")
    parser.add_argument("--m2stitch-python", type=Path, default=DEFAULT_M2STITCH_PYTHON)
    parser.add_argument(
        "--m2stitch-ncc",
        default="0.02",
        help="m2stitch ncc_threshold values to try in turn, comma-separated (its default 0.5 finds no pair on "
        "these tiles; on the 4 x 5 set 0.1 and 0.05 misplace every tile, 0.02 is its best, lower no better)",
    )
    parser.add_argument("--only", choices=["thinseg", "m2stitch"], default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args()
    if not args.python.exists():
        args.python = Path(sys.executable)
    args.work.mkdir(parents=True, exist_ok=True)

    print(f"machine: {machine()}")
    truth, generate_seconds = tile_set(args)
    h, w = truth.panorama_shape()
    print(f"panorama: {w} x {h} px ({w * h / 1e6:.0f} MPix), {len(truth.pp_paths)} tiles")
    results: list[dict[str, object]] = []
    if args.only in (None, "thinseg"):
        if thinseg_has_stitch(args.python):
            results.append(run_thinseg(args, truth))
        else:
            print(f"thinseg stitch: not available in {args.python}, skipped")
    if args.only in (None, "m2stitch"):
        if args.m2stitch_python.exists():
            results.append(run_m2stitch(args, truth))
        else:
            print(f"m2stitch: no interpreter at {args.m2stitch_python} (--m2stitch-python), skipped")
    print(table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {
            "machine": machine(),
            "tile_set": {
                "rows": args.rows,
                "cols": args.cols,
                "tile_wh": args.tile,
                "panorama_wh": [w, h],
                "overlap": args.overlap,
                "jitter": args.jitter,
                "vignetting": args.vignetting,
                "noise": args.noise,
                "fmt": args.fmt,
                "quality": args.quality,
                "generate_seconds": generate_seconds,
            },
            "results": results,
        }
        write_json(args.json, record)
    if not args.keep:
        shutil.rmtree(args.work / "tiles", ignore_errors=True)
        shutil.rmtree(args.work / "thinseg-out", ignore_errors=True)


if __name__ == "__main__":
    main()
