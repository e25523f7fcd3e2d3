"""Tile positions by m2stitch (MIST's algorithm), the yardstick for `thinseg stitch`.

Runs in its own interpreter (m2stitch needs Python >= 3.11 and numpy >= 2.3, which the project
cannot require): reads a JSON job {"tiles": [paths], "rows": [...], "cols": [...], "ncc_thresholds": [...]},
loads every tile as 8-bit grey (m2stitch takes one array of all tiles), calls
`m2stitch.stitch_images(images, rows, cols, row_col_transpose=False, ncc_threshold=t)` for each
threshold in turn until one succeeds, as its error message advises ("try lowering the
ncc_threshold"; its NCC divides by the norms of the raw, not mean-free, overlaps, so bright
low-contrast tiles score far below its default 0.5), and writes {"positions": [[y, x], ...],
"read_seconds", "attempts": [{"ncc_threshold", "seconds"[, "error"]}], "properties"}.
m2stitch finds positions only: it writes no panorama and blends nothing.

    python m2stitch_runner.py JOB.json RESULT.json
"""

from __future__ import annotations

import json
import sys
import time
import warnings
from pathlib import Path

import m2stitch
import numpy as np
from PIL import Image


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    start = time.perf_counter()
    images = []
    for path in job["tiles"]:
        with Image.open(path) as image:
            images.append(np.asarray(image.convert("L")))
    stack = np.stack(images)
    del images
    read_seconds = time.perf_counter() - start
    attempts = []
    for threshold in job.get("ncc_thresholds", [0.5]):
        start = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result, properties = m2stitch.stitch_images(
                    stack, job["rows"], job["cols"], row_col_transpose=False, ncc_threshold=threshold
                )
        except AssertionError as error:  # "there is no good top pair, (try lowering the ncc_threshold)"
            attempts.append({"ncc_threshold": threshold, "seconds": time.perf_counter() - start, "error": str(error)})
            continue
        attempts.append({"ncc_threshold": threshold, "seconds": time.perf_counter() - start})
        positions = result.sort_index()[["y_pos", "x_pos"]].to_numpy(dtype=float)
        Path(sys.argv[2]).write_text(
            json.dumps(
                {
                    "positions": positions.tolist(),
                    "read_seconds": read_seconds,
                    "attempts": attempts,
                    "properties": {k: float(v) for k, v in properties.items()},
                }
            )
        )
        return
    raise SystemExit(f"m2stitch found no positions: {attempts}")


if __name__ == "__main__":
    main()
