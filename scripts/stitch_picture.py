"""Draw docs/stitch_example.jpg: a stitched section's tile map beside one corner of a smaller
section stitched without and with the flat field (vignetting left in, and taken out).

    python scripts/stitch_picture.py --map BIG_OUT/tiles.png --none SMALL_NONE --auto SMALL_AUTO \
        --out docs/stitch_example.jpg

BIG_OUT, SMALL_NONE and SMALL_AUTO are `thinseg stitch` output folders (the small ones with the
netCDF format); the tile sets come from bench/stitch.py (generated sections, known positions).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from thinseg.data.section_images import open_ppxp

HEIGHT = 760


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def corner_crop(folder: Path, side: int) -> Image.Image:
    """The PP panorama around the point where the first four tiles meet, `side` px square."""
    summary = json.loads((folder / "stitch.json").read_text())
    h, w = summary["tile_shape"]
    corner_y, corner_x = h, w  # about where tiles (0,0), (0,1), (1,0), (1,1) meet
    netcdf = next(folder.glob("*.nc"))
    with open_ppxp(netcdf) as images:
        y0 = max(0, corner_y - side // 2)
        x0 = max(0, corner_x - side // 2)
        region = images.pp.read(y0, y0 + side, x0, x0 + side)
    return Image.fromarray(np.ascontiguousarray(region))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--map", type=Path, required=True, help="tiles.png of the large stitched section")
    parser.add_argument("--none", type=Path, required=True, help="small section stitched with --flat-field none")
    parser.add_argument("--auto", type=Path, required=True, help="the same stitched with --flat-field auto")
    parser.add_argument("--side", type=int, default=1400, help="crop side in panorama pixels")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    tile_map = Image.open(args.map).convert("RGB")
    tile_map = tile_map.resize((round(tile_map.width * HEIGHT / tile_map.height), HEIGHT), Image.LANCZOS)
    half = (HEIGHT - 10) // 2
    crops = [corner_crop(folder, args.side).resize((half, half), Image.LANCZOS) for folder in (args.none, args.auto)]
    ratios = [json.loads((f / "stitch.json").read_text())["seams"]["ratio"] for f in (args.none, args.auto)]
    canvas = Image.new("RGB", (tile_map.width + 10 + half, HEIGHT), (255, 255, 255))
    canvas.paste(tile_map, (0, 0))
    canvas.paste(crops[0], (tile_map.width + 10, 0))
    canvas.paste(crops[1], (tile_map.width + 10, half + 10))
    draw = ImageDraw.Draw(canvas)
    font = _font(22)
    big = json.loads((args.map.parent / "stitch.json").read_text())
    captions = [
        ((8, HEIGHT - 34), f"{big['tiles_used']} tiles -> {big['shape'][1]} x {big['shape'][0]} px"),
        ((tile_map.width + 18, 8), f"--flat-field none: seams {ratios[0]:.2f}"),
        ((tile_map.width + 18, half + 18), f"--flat-field auto: seams {ratios[1]:.2f}"),
    ]
    for corner, text in captions:
        draw.rectangle(draw.textbbox(corner, text, font=font), fill=(0, 0, 0))
        draw.text(corner, text, fill=(255, 255, 255), font=font)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(args.out, quality=88, optimize=True)  # .jpg keeps the picture under 1 MB


if __name__ == "__main__":
    main()
