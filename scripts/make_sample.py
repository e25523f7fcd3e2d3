"""Regenerate Resources/Sample: a small generated PP/XP pair, its QEMSCAN-like map and truth.

    .venv/bin/python scripts/make_sample.py

Files: sample_PP.jpg, sample_XP.jpg (RGB, 0.00132 mm/px), sample_QEMSCAN.tif (paletted labels,
0.01 mm/px, misaligned on purpose) with sample_QEMSCAN.csv (GeoSlicer's Mineral;R;G;B;English
colour table), sample_truth.png (exact labels, class order of the bundled model) and
sample_truth_transform.json (the true QEMSCAN-pixel -> image-pixel affine, for checking
registration).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "ThinSectionSegmentation"))

import numpy as np  # noqa: E402
import tifffile  # noqa: E402
from PIL import Image  # noqa: E402

from thinseg.classes.files import default_class_table  # noqa: E402
from thinseg.synth import generate_section  # noqa: E402

SEED = 4242  # outside every training/validation/test seed range of the bundled model
HEIGHT, WIDTH = 1536, 2048


def palette_bytes(colors: list[tuple[int, int, int]]) -> list[int]:
    flat = [0, 0, 0] * 256
    for k, rgb in enumerate(colors, start=1):
        flat[3 * k : 3 * k + 3] = list(rgb)
    return flat


def main() -> None:
    out = REPO / "Resources" / "Sample"
    out.mkdir(parents=True, exist_ok=True)
    s = generate_section(HEIGHT, WIDTH, seed=SEED)
    Image.fromarray(s.pp).save(out / "sample_PP.jpg", quality=92)
    Image.fromarray(s.xp).save(out / "sample_XP.jpg", quality=92)

    q_colors = [c.rgb for c in s.qemscan_table.classes]
    colormap = np.zeros((3, 256), np.uint16)
    for k, rgb in enumerate(q_colors, start=1):
        colormap[:, k] = [v * 257 for v in rgb]
    res = 10.0 / s.qemscan_mm_per_pixel  # pixels per cm
    tifffile.imwrite(
        out / "sample_QEMSCAN.tif",
        s.qemscan,
        photometric="palette",
        colormap=colormap,
        compression="zlib",
        resolution=(res, res),
        resolutionunit="CENTIMETER",
    )
    lines = ["Mineral;R;G;B;English"] + [
        f"{c.name};{r};{g};{b};{c.name}" for c, (r, g, b) in zip(s.qemscan_table.classes, q_colors)
    ]
    (out / "sample_QEMSCAN.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")

    truth = Image.fromarray(s.labels, mode="P")
    truth.putpalette(palette_bytes([c.rgb for c in default_class_table().classes]))
    truth.save(out / "sample_truth.png", optimize=True)
    (out / "sample_truth_transform.json").write_text(
        json.dumps(
            {
                "description": "true QEMSCAN pixel -> image pixel affine (pixel centres, x = column, y = row)",
                "qemscan_to_image": s.qemscan_to_image.tolist(),
                "image_mm_per_pixel": s.mm_per_pixel,
                "qemscan_mm_per_pixel": s.qemscan_mm_per_pixel,
                "seed": SEED,
            },
            indent=2,
        )
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
