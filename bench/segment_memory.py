"""Peak resident memory of `thinseg segment` against the section's size.

Makes a tiled (512 px), deflate-compressed BigTIFF PP/XP pair per size, written tile by tile
from a mirrored generated section (so building a gigapixel input needs only the 4k x 4k base),
then runs `python -m thinseg segment PP.tif -o OUT.nc` as a subprocess and samples the resident
memory of its process tree (bench/process_tree.py), with and without `--probabilities --overlay`.

Usage:
  python bench/segment_memory.py --sizes 8192 16384 --workdir /tmp/segmem
  python bench/segment_memory.py --sizes 8192 --plain-only      # without the --probabilities --overlay runs
Results are printed and written (atomically) to bench/out/segment_memory.json, with the ratio of
the largest size's peak to the smallest's (flat memory: close to 1).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ThinSectionSegmentation"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from process_tree import run_measured  # noqa: E402

TILE = 512
BASE = 2048  # side of the generated section; mirrored to 2 x BASE, then repeated


def _mirrored_base(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """PP and XP of a generated BASE x BASE section, mirrored to 2 BASE x 2 BASE (seamless repeat)."""
    from thinseg.synth import generate_section

    base = generate_section(BASE, BASE, seed=seed, misalignment=False)
    return tuple(  # type: ignore[return-value]
        np.ascontiguousarray(np.pad(image, ((0, BASE), (0, BASE), (0, 0)), mode="symmetric"))
        for image in (base.pp, base.xp)
    )


def _tiles(image: np.ndarray, size: int) -> Iterator[np.ndarray]:
    """The size x size repeat of `image` as TILE x TILE tiles in row-major order."""
    period = image.shape[0]
    for y in range(0, size, TILE):
        for x in range(0, size, TILE):
            yield image[y % period : y % period + TILE, x % period : x % period + TILE]


def make_pair(folder: Path, size: int, seed: int = 0) -> Path:
    """bench_SIZE_PP.tif and bench_SIZE_XP.tif in `folder` (kept between runs); returns the PP path."""
    import tifffile

    paths = [folder / f"bench_{size}_{role}.tif" for role in ("PP", "XP")]
    if all(p.exists() for p in paths):
        return paths[0]
    assert size % TILE == 0 and (2 * BASE) % TILE == 0
    images = _mirrored_base(seed)
    for path, image in zip(paths, images):
        tmp = path.with_name(path.name + ".part")
        tifffile.imwrite(
            tmp,
            _tiles(image, size),
            shape=(size, size, 3),
            dtype=np.uint8,
            tile=(TILE, TILE),
            compression="zlib",
            bigtiff=True,
            photometric="rgb",
        )
        os.replace(tmp, path)
    return paths[0]


def measure(pp: Path, out: Path, full: bool, package: Path) -> dict[str, object]:
    """One `thinseg segment` run (thinseg imported from `package`): wall seconds and peak tree RSS."""
    cmd = [sys.executable, "-m", "thinseg", "segment", str(pp), "--output", str(out), "--overwrite", "--quiet"]
    if full:
        cmd += ["--probabilities", "--overlay"]
    env = dict(os.environ, PYTHONPATH=str(package))
    m = run_measured(cmd, env=env, interval=0.05)
    if m.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {m.stderr.strip()[-2000:]}")
    return {"seconds": round(m.seconds, 1), "peak_mb": round(m.peak_mb, 1), "full_outputs": full}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "thinseg_segment_memory")
    parser.add_argument("--plain-only", action="store_true", help="skip the --probabilities --overlay runs")
    parser.add_argument("--keep-outputs", action="store_true", help="keep the netCDF/PNG outputs (large)")
    parser.add_argument(
        "--package", type=Path, default=REPO / "ThinSectionSegmentation", help="folder holding the thinseg to measure"
    )
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "out" / "segment_memory.json")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for size in args.sizes:
        pp = make_pair(args.workdir, size)
        for full in (False,) if args.plain_only else (False, True):
            out = args.workdir / f"out_{size}_{'full' if full else 'plain'}.nc"
            row = {"size": size, "megapixels": size * size / 1e6, **measure(pp, out, full, args.package)}
            row["bytes_per_pixel"] = round(float(str(row["peak_mb"])) * 2**20 / (size * size), 3)
            print(json.dumps(row), flush=True)
            rows.append(row)
            if not args.keep_outputs:
                for f in (out, out.with_name(out.stem + "_overlay.png")):
                    f.unlink(missing_ok=True)
    for full in (False, True):  # flat memory: the largest section's peak against the smallest's
        runs = sorted((r for r in rows if r["full_outputs"] == full), key=lambda r: int(str(r["size"])))
        if len(runs) > 1:
            ratio = float(str(runs[-1]["peak_mb"])) / float(str(runs[0]["peak_mb"]))
            kind = "--probabilities --overlay" if full else "plain"
            print(f"{kind}: {runs[-1]['size']} px peak / {runs[0]['size']} px peak = {ratio:.3f}", flush=True)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.json.with_name(args.json.name + ".part")
    tmp.write_text(json.dumps({"runs": rows}, indent=2) + "\n")
    os.replace(tmp, args.json)


if __name__ == "__main__":
    main()
