"""Segmentation speed and memory, measured in ONE run on one machine with one model.

Reports, in image megapixels per second (MPix/s):
  (a) the whole `thinseg segment` command on a large tiled-TIFF PP/XP pair (subprocess, wall time);
  (b) the bare model forward on the same tiles (network calls only), for several precisions
      and memory layouts; the best one is the reference for (a);
  (c) the baseline design: the whole image as float in memory, MONAI sliding_window_inference,
      roi 512, overlap 0.25, sw_batch_size=1, fp32;
plus peak resident memory of (a) and (c) (bytes per pixel), and the share of labels that a
reduced precision changes against fp32 on the same image.

plus what bounds (a)/(b) from above on this machine: decoding the input alone and the fixed cost
of a run ("floor").

Usage:
  python bench/bench_segment.py                       # 4096^2 speed comparison (a, b, c)
  python bench/bench_segment.py --size 16384 --only a # peak memory of the command at 16k x 16k
  python bench/bench_segment.py --size 16384 --only a --full-outputs   # ... with confidence map and overlay
Results are printed as a table and written to bench/out/segment.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ThinSectionSegmentation"))

import numpy as np  # noqa: E402


def make_section_tiffs(folder: Path, size: int, seed: int = 0) -> tuple[Path, Path]:
    """A size x size PP/XP pair as tiled, deflate-compressed BigTIFFs, built from a generated
    section mirrored to size (generating gigapixel sections directly would dominate the run)."""
    import tifffile

    from thinseg.synth import generate_section

    if all((folder / f"bench_{size}_{r}.tif").exists() for r in ("PP", "XP")):
        return folder / f"bench_{size}_PP.tif", folder / f"bench_{size}_XP.tif"
    base = generate_section(min(size, 2048), min(size, 2048), seed=seed, misalignment=False)
    paths = []
    for role, image in (("PP", base.pp), ("XP", base.xp)):
        path = folder / f"bench_{size}_{role}.tif"
        h, w = image.shape[:2]
        reps = (-(-size // (2 * h)), -(-size // (2 * w)))
        # mirror-tile in the parent process (not measured); tifffile compresses tiles in threads
        big = np.pad(image, ((0, h), (0, w), (0, 0)), mode="symmetric")
        big = np.tile(big, (reps[0], reps[1], 1))[:size, :size]
        tifffile.imwrite(path, big, tile=(256, 256), compression="zlib", bigtiff=True, photometric="rgb", maxworkers=2)
        del big
        paths.append(path)
    return paths[0], paths[1]


def run_child(mode: str, args: argparse.Namespace, extra: list[str]) -> dict:
    """Run one measurement in a fresh process (clean peak-memory figures); returns its JSON."""
    cmd = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--size",
        str(args.size),
        "--repeats",
        str(args.repeats),
        "--seed-repeats",
        str(args.seed_repeats),
        "--workdir",
        str(args.workdir),
    ] + extra
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ----------------------------------------------------------------------------------- children


def child_command(args: argparse.Namespace) -> dict:
    """(a): the CLI as a user runs it, timed from outside, one process per repeat."""
    pp = Path(args.workdir) / f"bench_{args.size}_PP.tif"
    times, rss = [], []
    for i in range(args.repeats):
        out = Path(args.workdir) / f"out_{i}.nc"
        cmd = [
            sys.executable,
            "-m",
            "thinseg",
            "segment",
            str(pp),
            "--output",
            str(out),
            "--overwrite",
            "--quiet",
            "--precision",
            args.precision,
        ]
        if args.full_outputs:  # the confidence map and the overlay PNG hold two more full-size maps
            cmd += ["--probabilities", "--overlay"]
        env = dict(os.environ, PYTHONPATH=str(REPO / "ThinSectionSegmentation"))
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        times.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise SystemExit(proc.stderr)
        rss.append(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    labels_path = Path(args.workdir) / "out_0.nc"
    return {"seconds": times, "median_s": statistics.median(times), "peak_rss_mb": max(rss), "output": str(labels_path)}


def child_forward(args: argparse.Namespace) -> dict:
    """(b): network calls only, on exactly the tiles the engine cuts (same tile, overlap, batch)."""
    import torch

    from thinseg.inference.engine import InferenceOptions, Segmenter
    from thinseg.inference.rewrites import prepare_network
    from thinseg.io.images import open_image
    from thinseg.model.bundle import load_bundle
    from thinseg.resources import default_model_dir

    bundle = load_bundle(default_model_dir())
    engine = Segmenter(bundle, InferenceOptions(device="cpu"))  # the command's tile, overlap and batch
    pp = open_image(Path(args.workdir) / f"bench_{args.size}_PP.tif")
    xp = open_image(Path(args.workdir) / f"bench_{args.size}_XP.tif")
    h, w = pp.shape
    plan = engine.plan_for(h, w)  # the command's own tiles
    # a sample of tile rows, held in memory so that only the network is timed
    rows = plan.ys[: max(1, min(len(plan.ys), args.forward_rows))]
    batches = []
    for y in rows:
        bands = [torch.from_numpy(np.ascontiguousarray(s.read(y, y + plan.tile_h))).permute(2, 0, 1) for s in (pp, xp)]
        for xs in plan.batches(engine.batch_size):
            per_input = [torch.stack([b[:, :, x : x + plan.tile_w] for x in xs]) for b in bands]
            batches.append(bundle.prepare(per_input))
    tiles = sum(b.shape[0] for b in batches)
    image_pixels_per_tile = h * w / plan.n_tiles  # so (b) is comparable with (a) in image MPix/s
    variants = {
        "fp32_nchw": dict(channels_last=False, fold=False, dtype=None),
        "fp32_channels_last_folded": dict(channels_last=True, fold=True, dtype=None),
    }
    from thinseg.inference.device import cpu_has_native_bf16

    if cpu_has_native_bf16() or args.all_variants:  # emulated bf16 is ~15x slower: minutes for nothing
        variants["bf16_channels_last_folded"] = dict(channels_last=True, fold=True, dtype=torch.bfloat16)
    out = {
        "tiles_timed": tiles,
        "tile": list(engine.tile),
        "overlap": engine.overlap,
        "batch_size": engine.batch_size,
        "tiles_total": plan.n_tiles,
        "variants": {},
    }
    for name, v in variants.items():
        net = prepare_network(bundle.network, torch.device("cpu"), channels_last=v["channels_last"], fold_bn=v["fold"])
        inputs = [b.contiguous(memory_format=torch.channels_last) if v["channels_last"] else b for b in batches]
        runs = []
        for _ in range(args.repeats):
            with torch.inference_mode(), torch.autocast("cpu", dtype=v["dtype"], enabled=v["dtype"] is not None):
                net(inputs[0])  # warm-up
                start = time.perf_counter()
                for x in inputs:
                    net(x)
                runs.append(time.perf_counter() - start)
        med = statistics.median(runs)
        out["variants"][name] = {"median_s": med, "mpix_s": tiles * image_pixels_per_tile / med / 1e6}
    return out


def child_seed(args: argparse.Namespace) -> dict:
    """(c): the baseline design: whole image as float in memory, MONAI sliding_window_inference."""
    import torch
    from monai.inferers import sliding_window_inference

    from thinseg.io.images import open_image
    from thinseg.model.bundle import load_bundle
    from thinseg.resources import default_model_dir

    bundle = load_bundle(default_model_dir())
    net = bundle.network.eval()
    times = []
    for _ in range(args.seed_repeats):
        start = time.perf_counter()
        pp = open_image(Path(args.workdir) / f"bench_{args.size}_PP.tif")
        xp = open_image(Path(args.workdir) / f"bench_{args.size}_XP.tif")
        h, w = pp.shape
        image = np.concatenate([pp.read(0, h), xp.read(0, h)], axis=2)
        x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
        with torch.inference_mode():
            logits = sliding_window_inference(x, roi_size=(512, 512), sw_batch_size=1, predictor=net, overlap=0.25)
        labels = bundle.logits_to_labels(logits)[0].numpy()
        times.append(time.perf_counter() - start)
        del x, logits
    np.save(Path(args.workdir) / "seed_labels.npy", labels)
    med = statistics.median(times)
    return {"seconds": times, "median_s": med, "mpix_s": h * w / med / 1e6, "peak_rss_mb": peak_rss_mb()}


def child_agreement(args: argparse.Namespace) -> dict:
    """Share of labels a reduced precision changes against exact fp32, same image, same engine."""
    from thinseg.inference.engine import InferenceOptions, Segmenter
    from thinseg.io.images import open_image
    from thinseg.model.bundle import load_bundle
    from thinseg.resources import default_model_dir

    bundle = load_bundle(default_model_dir())
    side = args.size  # the same image as (a)
    pp = open_image(Path(args.workdir) / f"bench_{args.size}_PP.tif")
    xp = open_image(Path(args.workdir) / f"bench_{args.size}_XP.tif")

    class Crop:
        def __init__(self, s):
            self.s, self.shape = s, (side, side)

        def read(self, y0, y1, x0=0, x1=None):
            return self.s.read(y0, y1, x0, side if x1 is None else x1)

    srcs = [Crop(pp), Crop(xp)]
    ref = Segmenter(bundle, InferenceOptions(precision="fp32")).segment(srcs)
    out = {"pixels": side * side, "fp32_mpix_s": ref.mpix_per_s}
    for precision in ("bf16",):
        res = Segmenter(bundle, InferenceOptions(precision=precision)).segment(srcs)
        out[precision] = {"changed_percent": float((res.labels != ref.labels).mean() * 100), "mpix_s": res.mpix_per_s}
    return out


def child_floor(args: argparse.Namespace) -> dict:
    """What any whole command must spend besides the network: decoding the input TIFFs (band by
    band, as the engine reads them) and the fixed cost of a run (start Python, import, load the
    model, write a tiny section)."""
    from thinseg.inference.engine import InferenceOptions, Segmenter
    from thinseg.io.images import open_image
    from thinseg.model.bundle import load_bundle
    from thinseg.resources import default_model_dir

    engine = Segmenter(load_bundle(default_model_dir()), InferenceOptions(device="cpu"))
    paths = [Path(args.workdir) / f"bench_{args.size}_{r}.tif" for r in ("PP", "XP")]
    times = []
    for _ in range(args.repeats):
        sources = [open_image(p) for p in paths]
        h, w = sources[0].shape
        plan = engine.plan_for(h, w)  # the command's own tiles
        start = time.perf_counter()
        for y in plan.ys:
            for s in sources:
                s.read(y, min(h, y + plan.tile_h), 0, w)
        times.append(time.perf_counter() - start)
    import tifffile

    tiny = Path(args.workdir) / "tiny_PP.tif"
    for role in ("PP", "XP"):
        tifffile.imwrite(tiny.with_name(f"tiny_{role}.tif"), np.zeros((64, 64, 3), np.uint8), photometric="rgb")
    env = dict(os.environ, PYTHONPATH=str(REPO / "ThinSectionSegmentation"))
    fixed = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "thinseg",
                "segment",
                str(tiny),
                "--output",
                str(tiny.with_suffix(".nc")),
                "--overwrite",
                "--quiet",
            ],
            check=True,
            capture_output=True,
            env=env,
        )
        fixed.append(time.perf_counter() - start)
    return {"decode_s": statistics.median(times), "fixed_s": statistics.median(fixed)}


CHILDREN = {
    "floor": child_floor,
    "command": child_command,
    "forward": child_forward,
    "seed": child_seed,
    "agreement": child_agreement,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=4096, help="section side in px (default 4096)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats per measurement; medians are reported")
    parser.add_argument("--seed-repeats", type=int, default=1, help="repeats of (c), the slowest measurement")
    parser.add_argument("--only", default="a,b,c,agreement,floor", help="comma list of a,b,c,agreement,floor")
    parser.add_argument(
        "--precision", default="auto", help="precision of the command in (a) (default: the command's own, auto)"
    )
    parser.add_argument("--all-variants", action="store_true", help="(b) also times bf16 on CPUs without native bf16")
    parser.add_argument(
        "--full-outputs", action="store_true", help="(a) also writes the confidence map and the overlay"
    )
    parser.add_argument("--forward-rows", type=int, default=3, help="tile rows held in memory for (b)")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(CHILDREN[args.child](args)))
        return

    import torch

    only = set(args.only.split(","))
    with tempfile.TemporaryDirectory(prefix="thinseg-bench-") as tmp:
        args.workdir = args.workdir or Path(tmp)
        args.workdir.mkdir(parents=True, exist_ok=True)
        print(f"preparing {args.size}x{args.size} tiled TIFF PP/XP in {args.workdir} ...", file=sys.stderr)
        make_section_tiffs(args.workdir, args.size)
        report: dict = {
            "size": args.size,
            "megapixels": args.size * args.size / 1e6,
            "machine": {
                "cpu": _cpu_name(),
                "cores": os.cpu_count(),
                "torch": torch.__version__,
                "python": platform.python_version(),
            },
        }
        mpix = args.size * args.size / 1e6
        if "a" in only:
            a = run_child(
                "command", args, ["--precision", args.precision] + (["--full-outputs"] if args.full_outputs else [])
            )
            from thinseg.inference.device import auto_precision

            a["precision"] = auto_precision(torch.device("cpu")) if args.precision == "auto" else args.precision
            a["full_outputs"] = bool(args.full_outputs)
            a["mpix_s"] = mpix / a["median_s"]
            a["bytes_per_pixel"] = a["peak_rss_mb"] * 2**20 / (args.size**2)
            report["a_command"] = a
        if "b" in only:
            report["b_forward"] = run_child(
                "forward",
                args,
                ["--forward-rows", str(args.forward_rows)] + (["--all-variants"] if args.all_variants else []),
            )
        if "c" in only:
            c = run_child("seed", args, [])
            c["bytes_per_pixel"] = c["peak_rss_mb"] * 2**20 / (args.size**2)
            report["c_seed"] = c
        if "agreement" in only:
            report["agreement"] = run_child("agreement", args, [])
        if "floor" in only:
            report["floor"] = run_child("floor", args, [])
    _print_report(report)
    out_dir = REPO / "bench" / "out"
    out_dir.mkdir(exist_ok=True)
    name = f"segment_{args.size}{'_full' if args.full_outputs else ''}.json"
    (out_dir / name).write_text(json.dumps(report, indent=2))
    print(f"\nwritten: bench/out/{name}")


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _print_report(r: dict) -> None:
    print(
        f"\nsection {r['size']}x{r['size']} ({r['megapixels']:.1f} MPix); {r['machine']['cpu']}, "
        f"{r['machine']['cores']} cores, torch {r['machine']['torch']}"
    )
    best_b = None
    if "b_forward" in r:
        for name, v in r["b_forward"]["variants"].items():
            print(f"  (b) bare forward {name:<28} {v['mpix_s']:6.2f} MPix/s")
        best_b = max(v["mpix_s"] for v in r["b_forward"]["variants"].values())
    if "c_seed" in r:
        c = r["c_seed"]
        print(
            f"  (c) baseline design (MONAI sliding_window, roi 512, overlap 0.25, batch 1, fp32) "
            f"{c['mpix_s']:6.2f} MPix/s, "
            f"peak {c['peak_rss_mb']:.0f} MB = {c['bytes_per_pixel']:.1f} B/px"
        )
    if "a_command" in r:
        a = r["a_command"]
        extra = ", with --probabilities --overlay" if a.get("full_outputs") else ""
        print(
            f"  (a) thinseg segment command ({a.get('precision', '?')}{extra}) {a['mpix_s']:6.2f} MPix/s, "
            f"peak {a['peak_rss_mb']:.0f} MB = {a['bytes_per_pixel']:.1f} B/px"
        )
        if "c_seed" in r:
            print(f"      (a)/(c) = {a['mpix_s'] / r['c_seed']['mpix_s']:.2f}x   (target >= 2.5x)")
        if best_b:
            print(f"      (a)/best(b) = {100 * a['mpix_s'] / best_b:.0f}%   (target >= 85%)")
    if "floor" in r:
        f, mpix = r["floor"], r["megapixels"]
        print(
            f"  decoding the PP/XP TIFFs alone (one thread, as the engine reads them) {f['decode_s']:.2f} s "
            f"= {mpix / f['decode_s']:.1f} MPix/s;"
            f" fixed cost of a run (start, imports, model, a 64 px section) {f['fixed_s']:.2f} s"
        )
        if best_b:
            # on 2 cores the network keeps both busy, so decoding (one core) costs at least half its
            # time in wall clock even when it overlaps perfectly; the fixed cost adds in full
            network_s = mpix / best_b
            cores = r["machine"]["cores"] or 1
            bound = network_s / (network_s + f["decode_s"] / cores + f["fixed_s"])
            print(
                f"      upper bound on (a)/best(b) with this input on {cores} cores: {100 * bound:.0f}%"
                f"   (network {network_s:.2f} s + decode {f['decode_s']:.2f} s / {cores} cores "
                f"+ fixed {f['fixed_s']:.2f} s)"
            )
            r["floor"]["bound_a_over_b"] = bound
    if "agreement" in r:
        for k, v in r["agreement"].items():
            if isinstance(v, dict):
                print(
                    f"  {k}: {v['changed_percent']:.3f}% of labels differ from fp32 "
                    f"({v['mpix_s']:.2f} MPix/s vs fp32 {r['agreement']['fp32_mpix_s']:.2f})"
                )


if __name__ == "__main__":
    main()
