"""Markdown table of `thinseg evaluate` results, models side by side (for README sections).

python scripts/results_table.py results/real/evaluation/pp-xp results/real/evaluation/pp-only
python scripts/results_table.py "PP+XP=results/real/evaluation/pp-xp" ...   # column titles
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(folders: list[str]) -> None:
    titled = [f.split("=", 1) if "=" in f else [Path(f).name, f] for f in folders]
    names = [t for t, _f in titled]
    reports = [json.loads((Path(f) / "evaluation.json").read_text(encoding="utf-8")) for _t, f in titled]
    print("| | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for i, cls in enumerate(reports[0]["metrics"]["classes"]):
        print(
            f"| IoU {cls['name']} | " + " | ".join(f"{r['metrics']['classes'][i]['iou']:.3f}" for r in reports) + " |"
        )
    rows = [
        ("mean IoU", lambda r: f"{r['metrics']['mean_iou']:.3f}"),
        ("mean IoU, 2 px void borders excluded", lambda r: f"{r['metrics_void_excluded']['mean_iou']:.3f}"),
        ("pixel accuracy", lambda r: f"{100 * r['metrics']['pixel_accuracy']:.1f}%"),
        ("mineral fractions R^2 (3 fields)", lambda r: f"{r['fractions']['r2_overall']:.2f}"),
        ("mineral fractions RMSE", lambda r: f"{100 * r['fractions']['rmse_overall']:.1f} points"),
    ]
    for label, get in rows:
        print(f"| {label} | " + " | ".join(get(r) for r in reports) + " |")


if __name__ == "__main__":
    main(sys.argv[1:])
