"""How long PP/XP pairing takes for folders of many pairs (the time before the first section starts).

Pairing must be linear in the number of files: each folder is listed once and looked up by name.
Three layouts, each with empty files (pairing reads names only, never pixels):
  beside      one folder holding s00000_PP.png, s00000_XP.png, ...  (INPUT: the folder)
  collection  ppl/ with the PP images and xpl/ with the XP images   (INPUT: ppl/)
  mismatched  one folder of s00000_PP.png, s00000_PX.png, ... paired with the default XP affix:
              every file is refused with its hint ("found s00000_PX.png: use --xp-pattern PX")
For every size the median of --repeats runs of `pair_inputs` is reported: wall seconds,
microseconds per pair, and CPU seconds of this process (what a busy shared machine distorts
least).

Usage:
  python bench/bench_pairing.py                                  # 1,000 / 4,000 / 10,000 pairs
  python bench/bench_pairing.py --pairs 1000 4000 --repeats 1 --against /tmp/old_pairing.py
      # the same for another version of thinseg/io/pairing.py (e.g. from `git show REV:PATH`)
Results are printed as a table and written to bench/out/pairing.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ThinSectionSegmentation"))

LAYOUTS = ["beside", "collection", "mismatched"]


def pairing_module(against: Path | None) -> ModuleType:
    """thinseg.io.pairing, or the pairing.py file `against` (it imports the standard library only)."""
    if against is None:
        from thinseg.io import pairing

        return pairing
    spec = importlib.util.spec_from_file_location("pairing_under_test", against)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def make_layout(root: Path, pairs: int, layout: str) -> Path:
    """`pairs` empty PP/XP files in `layout`; returns the INPUT to pair."""
    if layout in ("beside", "mismatched"):
        folder = root / "sections"
        folder.mkdir()
        xp = "XP" if layout == "beside" else "PX"
        for i in range(pairs):
            (folder / f"s{i:05d}_PP.png").touch()
            (folder / f"s{i:05d}_{xp}.png").touch()
        return folder
    for sub, role in (("ppl", "PP"), ("xpl", "XP")):
        (root / sub).mkdir()
        for i in range(pairs):
            (root / sub / f"s{i:05d}_{role}.png").touch()
    return root / "ppl"


def time_pairing(
    module: ModuleType, folder: Path, pairs: int, layout: str, repeats: int
) -> tuple[list[float], list[float]]:
    """(wall seconds, CPU seconds) of each run."""
    expected = (0, 2 * pairs) if layout == "mismatched" else (pairs, 0)
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        sections, problems = module.pair_inputs([folder])
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
        assert (len(sections), len(problems)) == expected, (len(sections), problems[:3])
    return walls, cpus


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, nargs="+", default=[1000, 4000, 10000])
    parser.add_argument("--layouts", nargs="+", default=LAYOUTS, choices=LAYOUTS)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--against", type=Path, default=None, help="time this pairing.py instead of the checkout's")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "out" / "pairing.json")
    args = parser.parse_args()
    module = pairing_module(args.against)
    rows = []
    print(f"{'layout':<11} {'pairs':>7} {'median s':>10} {'us/pair':>9} {'CPU s':>8}  runs (wall s)")
    for layout in args.layouts:
        for pairs in args.pairs:
            with tempfile.TemporaryDirectory(prefix="bench_pairing_") as tmp:
                folder = make_layout(Path(tmp), pairs, layout)
                times, cpus = time_pairing(module, folder, pairs, layout, args.repeats)
            median, cpu = statistics.median(times), statistics.median(cpus)
            rows.append({"layout": layout, "pairs": pairs, "median_s": median, "median_cpu_s": cpu, "runs_s": times})
            runs = ", ".join(f"{t:.3f}" for t in times)
            print(
                f"{layout:<11} {pairs:>7} {median:>10.3f} {median / pairs * 1e6:>9.1f} {cpu:>8.3f}  [{runs}]",
                flush=True,
            )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "pairing": str(args.against or "thinseg.io.pairing"),
        "python": platform.python_version(),
        "machine": platform.platform(),
        "rows": rows,
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
