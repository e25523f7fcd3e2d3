"""Throughput of `thinseg segment --cluster local:2` against the local path, on the same sections,
in ONE run on one machine with the bundled model.

  local:   segment_files in this process, torch on `--threads` threads (default 2)
  cluster: the same sections on a LocalCluster of 2 worker processes of 1 thread each; a cold
           batch (workers import torch and load the model on their first section) and a warm one

Reported per path: wall seconds, seconds per section, sections/s and MPix/s; for the cluster, the
compute time of each task from Dask's own task stream, and the overhead Dask adds per section:
(warm wall - the busiest worker's compute time) / sections per worker, i.e. what scheduling,
pickling the section and its result, and the idle gaps cost each section on top of segmenting it;
and the round trip of an empty task (Dask's floor per task).

One section shared by the workers (`--shared-size S`, with `--band-rows`): an S x S section
(a tiled zlib BigTIFF pair)
segmented locally and then shared by the 2 workers in parts of tile rows (warm: after one
shared run), with the tiles each path computed (a part also runs the tile row above it) and
whether the labels are identical.

Usage:
  python bench/cluster_segment.py                 # 8 sections of 1024 x 1024
  python bench/cluster_segment.py --sections 16 --size 512
  python bench/cluster_segment.py --shared-only --shared-size 8192            # parts: the default split
Writes bench/out/cluster_segment.json.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ThinSectionSegmentation"))


def make_sections(folder: Path, count: int, size: int) -> None:
    """`count` generated PP/XP pairs, size x size px, as PNG (not measured)."""
    from PIL import Image

    from thinseg.synth import generate_section

    for k in range(count):
        section = generate_section(size, size, seed=k, misalignment=False)
        Image.fromarray(section.pp).save(folder / f"B{k}_PP.png")
        Image.fromarray(section.xp).save(folder / f"B{k}_XP.png")


def timed_batch(inputs: Path, output: Path, cluster: str | None) -> tuple[float, list[float], int]:
    """(wall s, per-section seconds as each section measured itself, failures)."""
    from thinseg.pipelines.segment import SegmentOptions, segment_files

    start = time.perf_counter()
    run = segment_files([inputs], SegmentOptions(cluster=cluster, overwrite=True), output)
    return time.perf_counter() - start, [r.seconds for r in run.results], len(run.failed)


def shared_section(scratch: Path, size: int, band_rows: int | None, threads: int) -> dict[str, object]:
    """One size x size section: local wall, then shared over local:2 (cold, warm), tiles, equality."""
    import numpy as np
    import torch
    from bench_segment import make_section_tiffs  # the gigapixel input: a tiled zlib BigTIFF pair

    from thinseg.io.netcdf import read_labelmap
    from thinseg.pipelines.cluster import connect
    from thinseg.pipelines.segment import SegmentOptions, segment_files

    inputs = scratch / "shared_in"
    inputs.mkdir()
    make_section_tiffs(inputs, size)
    torch.set_num_threads(threads)
    start = time.perf_counter()
    local = segment_files([inputs], SegmentOptions(overwrite=True), scratch / "shared_local")
    local_wall = time.perf_counter() - start
    report: dict[str, object] = {"size": size, "band_rows": band_rows, "local_wall_s": local_wall}
    report["local_tiles"] = local.results[0].tiles
    with connect("local:2") as client:
        client.wait_for_workers(2)
        options = SegmentOptions(cluster=client.scheduler.address, band_rows=band_rows, overwrite=True)
        for name in ("cold", "warm"):
            start = time.perf_counter()
            shared = segment_files([inputs], options, scratch / f"shared_{name}")
            report[f"shared_{name}_wall_s"] = time.perf_counter() - start
        report["shared_tiles"] = shared.results[0].tiles
        report["parts"] = [m for m in shared.results[0].messages if "parts" in m]
    variable = f"bench_{size}_Segmentation"
    same = np.array_equal(
        read_labelmap(local.results[0].netcdf, variable)[0], read_labelmap(shared.results[0].netcdf, variable)[0]
    )
    report["labels_identical"] = bool(same)
    return report


def empty_task_round_trip(client, count: int = 200) -> float:
    """Seconds per task for `count` tasks that do nothing (submitted together, gathered)."""
    start = time.perf_counter()
    futures = [client.submit(int, k, pure=False) for k in range(count)]
    client.gather(futures)
    return (time.perf_counter() - start) / count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sections", type=int, default=8)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the local path")
    parser.add_argument("--shared-size", type=int, default=0, help="also one section of this side, shared")
    parser.add_argument("--band-rows", type=int, default=None, help="rows per part of the shared section")
    parser.add_argument("--shared-only", action="store_true", help="only the shared section")
    args = parser.parse_args()
    if args.shared_only:
        run_shared_only(args)
        return

    import torch
    from distributed import get_task_stream

    from thinseg.jsonio import write_json
    from thinseg.pipelines.cluster import connect

    n, mpix = args.sections, args.size * args.size / 1e6
    report: dict[str, object] = {
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads available",
        "sections": n,
        "size": args.size,
    }
    with tempfile.TemporaryDirectory(prefix="thinseg-cluster-bench-") as scratch:
        inputs = Path(scratch) / "in"
        inputs.mkdir()
        make_sections(inputs, n, args.size)

        torch.set_num_threads(args.threads)
        wall, per, failed = timed_batch(inputs, Path(scratch) / "local", None)
        report["local"] = {"wall_s": wall, "section_s": per, "failed": failed, "threads": args.threads}

        start = time.perf_counter()
        with connect("local:2") as client:
            client.wait_for_workers(2)
            report["cluster_start_s"] = time.perf_counter() - start
            address = client.scheduler.address
            wall, per, failed = timed_batch(inputs, Path(scratch) / "cold", address)
            report["cluster_cold"] = {"wall_s": wall, "section_s": per, "failed": failed}
            with get_task_stream(client) as stream:
                wall, per, failed = timed_batch(inputs, Path(scratch) / "warm", address)
            busy: dict[str, float] = defaultdict(float)
            computes = []
            for task in stream.data:
                if not str(task.get("key", "")).startswith("thinseg-segment"):
                    continue
                for part in task.get("startstops", ()):
                    if part["action"] == "compute":
                        busy[task["worker"]] += part["stop"] - part["start"]
                        computes.append(part["stop"] - part["start"])
            per_worker = n / 2
            report["cluster_warm"] = {
                "wall_s": wall,
                "section_s": per,
                "failed": failed,
                "task_compute_s": computes,
                "busiest_worker_compute_s": max(busy.values()) if busy else None,
                "overhead_per_section_s": (wall - max(busy.values())) / per_worker if busy else None,
            }
            report["empty_task_round_trip_s"] = empty_task_round_trip(client)

    def line(name: str, wall: float) -> str:
        rates = f"{n / wall:5.2f} sections/s  {n * mpix / wall:5.2f} MPix/s"
        return f"{name:<22} {wall:7.2f} s  {wall / n:6.2f} s/section  {rates}"

    print(f"{n} sections of {args.size} x {args.size} px, bundled model, {report['machine']}")
    local, cold, warm = report["local"], report["cluster_cold"], report["cluster_warm"]
    assert isinstance(local, dict) and isinstance(cold, dict) and isinstance(warm, dict)
    print(line(f"local ({args.threads} threads)", local["wall_s"]))
    print(line("local:2 cold", cold["wall_s"]))
    print(line("local:2 warm", warm["wall_s"]))
    print(f"cluster start (2 worker processes): {report['cluster_start_s']:.2f} s")
    print(f"per-section seconds, local:        {' '.join(f'{s:.2f}' for s in local['section_s'])}")
    print(f"per-section seconds, local:2 warm: {' '.join(f'{s:.2f}' for s in warm['section_s'])}")
    print(f"task compute (Dask task stream):   {' '.join(f'{s:.2f}' for s in warm['task_compute_s'])}")
    if warm["overhead_per_section_s"] is not None:
        print(
            f"Dask overhead per section (warm wall - busiest worker's compute) / sections per worker: "
            f"{warm['overhead_per_section_s'] * 1000:.0f} ms"
        )
    print(f"empty task round trip: {report['empty_task_round_trip_s'] * 1000:.2f} ms")
    if args.shared_size:
        with tempfile.TemporaryDirectory(prefix="thinseg-cluster-bench-") as scratch:
            report["shared"] = shared = shared_section(Path(scratch), args.shared_size, args.band_rows, args.threads)
        print(f"one {args.shared_size} x {args.shared_size} section shared in parts of {args.band_rows} rows:")
        print_shared(shared, args.threads)
    out = REPO / "bench" / "out" / "cluster_segment.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, report)
    print(f"-> {out}")


def run_shared_only(args: argparse.Namespace) -> None:
    """The shared-section measurement alone (printed and written to bench/out/cluster_shared.json)."""
    import torch

    from thinseg.jsonio import write_json

    with tempfile.TemporaryDirectory(prefix="thinseg-cluster-bench-") as scratch:
        report = shared_section(Path(scratch), args.shared_size or 4096, args.band_rows, args.threads)
    report["machine"] = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads"
    print_shared(report, args.threads)
    out = REPO / "bench" / "out" / "cluster_shared.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, report)
    print(f"-> {out}")


def print_shared(report: dict[str, object], threads: int) -> None:
    size = report["size"]
    assert isinstance(size, int)
    mpix = size * size / 1e6
    for key, name in (
        ("local_wall_s", f"local ({threads} threads)"),
        ("shared_cold_wall_s", "shared local:2 cold"),
        ("shared_warm_wall_s", "shared local:2 warm"),
    ):
        wall = report[key]
        assert isinstance(wall, float)
        print(f"{name:<24} {wall:7.2f} s  {mpix / wall:5.2f} MPix/s")
    print(f"tiles: local {report['local_tiles']}, shared {report['shared_tiles']}; {report['parts']}")
    print(f"labels identical: {report['labels_identical']}")


if __name__ == "__main__":
    main()
