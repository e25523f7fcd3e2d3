"""Registration accuracy and speed on generated sections, whose true transform is known.

Reports, in QEMSCAN pixels (TRE = mean distance between true and recovered QEMSCAN positions
over an image-wide lattice):
  (a) over N trials (random sections, random misalignment +-8 deg, +-10 % scale, +-5 % of the
      width shift): TRE from four landmarks (one per quadrant) clicked with Gaussian noise of
      sigma = --click-noise pixels, landmarks only and after automatic refinement; and the
      success rate (TRE < 1) of the automatic registration WITHOUT landmarks;
  (b) the wall time of `register_section` on one --timing-size section (default 4096 x 4096),
      with and without landmarks, and of writing all its output files.
Click noise is in IMAGE pixels on the PP clicks and, by default, also in image pixels on the
QEMSCAN clicks (--qemscan-noise-units qemscan makes it QEMSCAN pixels there: a much clumsier
hand); every trial also reports the TREs with 2-QEMSCAN-px clicks for comparison (`_q`).

Usage:
  python bench/bench_registration.py                          # 60 trials at 1024^2 + 4096^2 timing
  python bench/bench_registration.py --trials 5 --timing-size 0
Results are printed as a table and written to bench/out/registration.json.
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

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ThinSectionSegmentation"))

import numpy as np  # noqa: E402
import tifffile  # noqa: E402

import thinseg  # noqa: E402
from thinseg.errors import ThinSegError  # noqa: E402
from thinseg.registration import register_section, target_registration_error, write_outputs  # noqa: E402
from thinseg.synth import generate_section  # noqa: E402


def clicks(s, rng: np.random.Generator, noise: float, qemscan_units: bool) -> tuple[np.ndarray, np.ndarray]:
    """Four landmark pairs, one at a random place in each quadrant, with click noise."""
    h, w = s.pp.shape[:2]
    image = []
    for fy in (0, 1):
        for fx in (0, 1):
            image.append([w * (0.08 + 0.5 * fx + 0.34 * rng.random()), h * (0.08 + 0.5 * fy + 0.34 * rng.random())])
    image = np.array(image)
    inv = np.linalg.inv(s.qemscan_to_image)
    qemscan = image @ inv[:2, :2].T + inv[:2, 2]
    ratio = s.qemscan_mm_per_pixel / s.mm_per_pixel
    q_sigma = noise if qemscan_units else noise / ratio
    return qemscan + rng.normal(0, q_sigma, qemscan.shape), image + rng.normal(0, noise, image.shape)


def register(s, **kwargs):
    return register_section(
        s.pp,
        s.xp,
        s.qemscan,
        s.qemscan_table,
        image_mm_per_pixel=s.mm_per_pixel,
        qemscan_mm_per_pixel=s.qemscan_mm_per_pixel,
        **kwargs,
    )


def misalignment(s) -> dict:
    a = s.qemscan_to_image[:2, :2] / (s.qemscan_mm_per_pixel / s.mm_per_pixel)
    return {"rotation_deg": float(np.degrees(np.arctan2(a[1, 0], a[0, 0]))), "scale": float(np.sqrt(np.linalg.det(a)))}


def trial(seed: int, size: int, noise: float, qemscan_units: bool) -> dict:
    s = generate_section(size, size, seed=seed)
    rng = np.random.default_rng(seed)
    landmarks = clicks(s, rng, noise, qemscan_units)
    out = {"seed": seed, "size": size, **misalignment(s)}
    try:
        t = time.perf_counter()
        only = register(s, landmarks=landmarks, refine=False)
        out["landmarks_s"] = time.perf_counter() - t
        out["tre_landmarks"] = target_registration_error(only.transform, s.qemscan_to_image)
        t = time.perf_counter()
        refined = register(s, landmarks=landmarks)
        out["refined_s"] = time.perf_counter() - t
        out["tre_refined"] = target_registration_error(refined.transform, s.qemscan_to_image)
        # the clumsier reading of "2 px click noise": 2 QEMSCAN px on the QEMSCAN clicks
        q_landmarks = clicks(s, np.random.default_rng(seed), noise, True)
        out["tre_landmarks_q"] = target_registration_error(
            register(s, landmarks=q_landmarks, refine=False).transform, s.qemscan_to_image
        )
        out["tre_refined_q"] = target_registration_error(
            register(s, landmarks=q_landmarks).transform, s.qemscan_to_image
        )
    except ThinSegError as error:
        out["landmark_error"] = str(error)
    try:
        t = time.perf_counter()
        auto = register(s)
        out["auto_s"] = time.perf_counter() - t
        out["tre_auto_coarse"] = target_registration_error(auto.initial, s.qemscan_to_image)
        out["tre_auto"] = target_registration_error(auto.transform, s.qemscan_to_image)
        out["contrast"] = auto.contrast
    except ThinSegError as error:
        out["auto_error"] = str(error)
    return out


def timing(size: int, seed: int, noise: float, write: bool) -> dict:
    t = time.perf_counter()
    s = generate_section(size, size, seed=seed)
    out = {"size": size, "seed": seed, "generate_s": time.perf_counter() - t, **misalignment(s)}
    auto = None
    for name, kwargs in (
        ("auto", {}),
        ("landmarks+refine", {"landmarks": clicks(s, np.random.default_rng(seed), noise, False)}),
    ):
        t = time.perf_counter()
        result = register(s, **kwargs)
        out[f"{name}_s"] = time.perf_counter() - t
        out[f"{name}_tre"] = target_registration_error(result.transform, s.qemscan_to_image)
        out[f"{name}_stages_s"] = {k: round(v, 2) for k, v in result.seconds.items()}
        auto = auto or result
    if write:
        with tempfile.TemporaryDirectory() as folder:
            t = time.perf_counter()
            write_outputs(auto, folder, "bench", s.pp, s.qemscan)
            out["write_outputs_s"] = time.perf_counter() - t
            out["output_bytes"] = sum(p.stat().st_size for p in Path(folder).iterdir())
        out["command_s"] = time_command(s)
    return out


def time_command(s) -> float:
    """Wall time of the whole `thinseg register` command (read, register, write) as a user runs it."""
    with tempfile.TemporaryDirectory() as folder:
        f = Path(folder)
        tifffile.imwrite(f / "bench_PP.tif", s.pp, photometric="rgb", tile=(512, 512), compression="zlib")
        tifffile.imwrite(f / "bench_XP.tif", s.xp, photometric="rgb", tile=(512, 512), compression="zlib")
        tifffile.imwrite(f / "bench_QEMSCAN.tif", s.qemscan)
        (f / "colors.csv").write_text(
            "".join(f"{n},{c}\n" for n, c in zip(s.qemscan_table.names, s.qemscan_table.colors))
        )
        cmd = [
            sys.executable,
            "-m",
            "thinseg",
            "register",
            str(f / "bench_PP.tif"),
            str(f / "bench_QEMSCAN.tif"),
            "--colors",
            str(f / "colors.csv"),
            "--mm-per-pixel",
            str(s.mm_per_pixel),
            "--qemscan-mm-per-pixel",
            str(s.qemscan_mm_per_pixel),
            "--output",
            str(f / "out"),
            "--quiet",
        ]
        env = dict(os.environ, PYTHONPATH=str(REPO / "ThinSectionSegmentation"))
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        seconds = time.perf_counter() - t
        if proc.returncode != 0:
            raise SystemExit(f"thinseg register failed: {proc.stderr[-2000:]}")
    return seconds


def summarise(rows: list[dict]) -> dict:
    def stats(key):
        vals = [r[key] for r in rows if key in r]
        if not vals:
            return None
        return {
            "n": len(vals),
            "mean": statistics.fmean(vals),
            "median": statistics.median(vals),
            "max": max(vals),
            "p95": float(np.percentile(vals, 95)),
        }

    auto_ok = sum(1 for r in rows if r.get("tre_auto", np.inf) < 1.0)
    return {
        "tre_landmarks": stats("tre_landmarks"),
        "tre_refined": stats("tre_refined"),
        "tre_landmarks_q": stats("tre_landmarks_q"),
        "tre_refined_q": stats("tre_refined_q"),
        "tre_auto": stats("tre_auto"),
        "tre_auto_coarse": stats("tre_auto_coarse"),
        "landmarks_below_1": sum(1 for r in rows if r.get("tre_landmarks", np.inf) < 1.0),
        "refined_below_0.5": sum(1 for r in rows if r.get("tre_refined", np.inf) < 0.5),
        "landmarks_q_below_1": sum(1 for r in rows if r.get("tre_landmarks_q", np.inf) < 1.0),
        "refined_q_below_0.5": sum(1 for r in rows if r.get("tre_refined_q", np.inf) < 0.5),
        "auto_success": auto_ok,
        "auto_success_rate": auto_ok / max(1, len(rows)),
        "trials": len(rows),
        "seconds_refined": stats("refined_s"),
        "seconds_auto": stats("auto_s"),
    }


def print_table(summary: dict, timing_row: dict | None) -> None:
    print(f"\n{'measure':44s} {'mean':>8s} {'median':>8s} {'p95':>8s} {'max':>8s}")
    for key, label in (
        ("tre_landmarks", "TRE, 4 noisy landmarks (QEMSCAN px)"),
        ("tre_refined", "TRE, landmarks + refinement"),
        ("tre_landmarks_q", "  same, QEMSCAN clicks 2 QEMSCAN px off"),
        ("tre_refined_q", "  same + refinement"),
        ("tre_auto_coarse", "TRE, no landmarks, coarse search only"),
        ("tre_auto", "TRE, no landmarks, refined"),
        ("seconds_refined", "time, landmarks + refinement (s)"),
        ("seconds_auto", "time, no landmarks (s)"),
    ):
        st = summary[key]
        if st:
            print(f"{label:44s} {st['mean']:8.3f} {st['median']:8.3f} {st['p95']:8.3f} {st['max']:8.3f}")
    n = summary["trials"]
    print(
        f"landmarks TRE < 1: {summary['landmarks_below_1']}/{n}   "
        f"refined TRE < 0.5: {summary['refined_below_0.5']}/{n}   "
        f"no-landmark success (TRE < 1): {summary['auto_success']}/{n} = {100 * summary['auto_success_rate']:.0f}%"
    )
    print(
        f"with QEMSCAN clicks 2 QEMSCAN px off: landmarks TRE < 1: {summary['landmarks_q_below_1']}/{n}   "
        f"refined TRE < 0.5: {summary['refined_q_below_0.5']}/{n}"
    )
    if timing_row:
        size = timing_row["size"]
        print(
            f"\n{size} x {size}: no landmarks {timing_row['auto_s']:.1f} s (TRE {timing_row['auto_tre']:.3f}), "
            f"landmarks + refinement {timing_row['landmarks+refine_s']:.1f} s "
            f"(TRE {timing_row['landmarks+refine_tre']:.3f})"
            + (
                f", writing all outputs {timing_row['write_outputs_s']:.1f} s"
                if "write_outputs_s" in timing_row
                else ""
            )
        )
        if "command_s" in timing_row:
            print(
                "  whole `thinseg register` command (no landmarks; read, register, write): "
                f"{timing_row['command_s']:.1f} s"
            )
        print(f"  stages (no landmarks): {timing_row['auto_stages_s']}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--trials", type=int, default=60, help="random sections for the accuracy part (0: skip)")
    parser.add_argument("--size", type=int, default=1024, help="side of the trial sections (px)")
    parser.add_argument("--first-seed", type=int, default=1000)
    parser.add_argument("--click-noise", type=float, default=2.0, help="landmark click noise sigma (px)")
    parser.add_argument(
        "--qemscan-noise-units",
        choices=("image", "qemscan"),
        default="image",
        help="unit of the click noise on the QEMSCAN map (default: image pixels)",
    )
    parser.add_argument("--timing-size", type=int, default=4096, help="side of the timed section (0: skip)")
    parser.add_argument("--no-write", action="store_true", help="do not time writing the output files")
    parser.add_argument("--out", default=str(REPO / "bench" / "out" / "registration.json"))
    args = parser.parse_args(argv)
    print(f"thinseg imported from {Path(thinseg.__file__).parent}", flush=True)

    rows = []
    for k in range(args.trials):
        row = trial(args.first_seed + k, args.size, args.click_noise, args.qemscan_noise_units == "qemscan")
        rows.append(row)
        print(json.dumps({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    summary = summarise(rows) if rows else None
    timing_row = (
        timing(args.timing_size, args.first_seed + 999, args.click_noise, not args.no_write)
        if args.timing_size
        else None
    )
    if summary:
        print_table(summary, timing_row)
    elif timing_row:
        print(json.dumps(timing_row, indent=1))
    report = {
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "load_average_at_end": os.getloadavg(),
        },
        "settings": vars(args),
        "summary": summary,
        "trials": rows,
        "timing": timing_row,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"\nwritten {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
