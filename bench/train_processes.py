"""Training throughput on 1 vs N processes (DistributedDataParallel), same data, one run.

Each configuration is a real `thinseg train` run (`--nproc N`), on the same GeoSlicer netCDF
sections written once; runs are interleaved (1, N, 1, N, ...) so that other work on a shared
machine weighs on both alike. The figure of a run is the median of the training samples per
second of its epochs after the first (the log's `train_samples_per_s`: all ranks' samples over
the training time, validation excluded). `--batch` is per process (the DDP convention), so N
processes learn from N times the patches per step; `--same-global-batch` adds N processes at
batch/N each, the same patches per step as one process.

    .venv/bin/python bench/train_processes.py [--nproc 2] [--repeats 3] [--epochs 3] [--steps 6]
        [--patch 128] [--batch 8] [--same-global-batch] [--one-thread-baseline]
"""

from __future__ import annotations

import argparse
import csv
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "ThinSectionSegmentation"))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from bench_training import write_netcdf_sections  # noqa: E402

from thinseg.training import synthetic_sections  # noqa: E402
from thinseg.training.distributed import cpu_count, threads_per_rank  # noqa: E402


def run_once(
    python: str,
    sections: list[Path],
    val: Path,
    out: Path,
    nproc: int,
    batch: int,
    args: argparse.Namespace,
    threads: str | None = None,
) -> tuple[float, str]:
    """One `thinseg train` run (OMP_NUM_THREADS=`threads` if given); (median samples/s of epochs
    2.., the threads per process)."""
    command = [python, "-m", "thinseg", "train", *map(str, sections), "--val", str(val), "-o", str(out)]
    command += ["--epochs", str(args.epochs), "--steps-per-epoch", str(args.steps), "--patch-size", str(args.patch)]
    command += ["--batch-size", str(batch), "--nproc", str(nproc), "--device", "cpu", "--precision", "fp32"]
    command += ["--val-tile", "256", "-q", "--overwrite"]
    env = dict(os.environ, PYTHONPATH=str(ROOT / "ThinSectionSegmentation"), CUDA_VISIBLE_DEVICES="")
    if threads is not None:
        env["OMP_NUM_THREADS"] = threads
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"run failed ({done.returncode}):\n{done.stderr}")
    with open(out / "training_log.csv", newline="", encoding="utf-8") as f:
        rates = [float(row["train_samples_per_s"]) for row in csv.DictReader(f)]
    note = re.search(r"(\d+) thread\(s\) each", done.stderr)
    used = note.group(1) if note else threads or str(torch.get_num_threads())  # one process: torch's default
    return statistics.median(rates[1:] or rates), used


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=6, help="steps per epoch")
    ap.add_argument("--patch", type=int, default=128)
    ap.add_argument("--batch", type=int, default=8, help="patches per process and step")
    ap.add_argument("--size", type=int, default=768, help="side of each generated training section (px)")
    ap.add_argument("--sections", type=int, default=3)
    ap.add_argument("--same-global-batch", action="store_true", help="also N processes at batch/N each")
    ap.add_argument(
        "--one-thread-baseline",
        action="store_true",
        help="also 1 process with 1 compute thread (as each rank has): tells the processes' gain from the threads'",
    )
    ap.add_argument("--python", default=sys.executable, help="the interpreter that runs thinseg")
    args = ap.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench_train_processes_"))
    generated = synthetic_sections(args.sections + 1, args.size, seed=0)
    paths = write_netcdf_sections(generated, work / "sections")
    train, val = paths[:-1], paths[-1]
    configs: list[tuple[str, int, int, str | None]] = [(f"1 process, batch {args.batch}", 1, args.batch, None)]
    if args.one_thread_baseline:
        configs.append((f"1 process, batch {args.batch}, 1 thread", 1, args.batch, "1"))
    configs.append((f"{args.nproc} processes, batch {args.batch} each", args.nproc, args.batch, None))
    if args.same_global_batch:
        per = max(1, args.batch // args.nproc)
        configs.append((f"{args.nproc} processes, batch {per} each", args.nproc, per, None))
    results: dict[str, list[float]] = {c[0]: [] for c in configs}
    threads: dict[str, str] = {}
    started = time.perf_counter()
    for repeat in range(args.repeats):
        for name, nproc, batch, omp in configs:
            rate, used = run_once(args.python, train, val, work / "run", nproc, batch, args, omp)
            results[name].append(rate)
            threads[name] = used
            print(f"repeat {repeat + 1}: {name}: {rate:.2f} samples/s ({used} thread(s) per process)", flush=True)

    print(
        f"\nmachine: {platform.node()} {platform.machine()}, {cpu_count()} CPU(s) usable, torch {torch.__version__}, "
        f"python {platform.python_version()}; OMP_NUM_THREADS {os.environ.get('OMP_NUM_THREADS', 'unset')}; "
        f"{args.nproc} processes get {threads_per_rank(args.nproc)} thread(s) each"
    )
    print(
        f"U-Net (unet recipe), patch {args.patch}, {args.steps} steps x {args.epochs} epochs per run, "
        f"{args.sections} sections of {args.size} px on disk; {time.perf_counter() - started:.0f} s in all"
    )
    base = statistics.median(results[configs[0][0]])
    print(f"\n{'configuration':<36} {'median samples/s':>16} {'ratio':>6}  runs")
    for name, *_settings in configs:
        median = statistics.median(results[name])
        runs = ", ".join(f"{r:.2f}" for r in results[name])
        print(f"{name:<36} {median:>16.2f} {median / base:>6.2f}  {runs} ({threads[name]} thread(s) per process)")


if __name__ == "__main__":
    main()
