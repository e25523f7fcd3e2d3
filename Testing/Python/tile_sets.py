"""Microscope tile sets whose positions are known exactly: PP (and XP) tiles cut from one source
image on a jittered grid, with vignetting and sensor noise, written as image files.

Every tile's top-left corner lies at an integer (y, x) position in the source: a stitcher that
finds the positions up to one common offset is exact. PP and XP tiles of one grid cell are cut
at the same position and darkened by the same gain (one microscope, one camera), but carry
independent noise. The source is any (H, W[, 3]) uint8 array, an `np.memmap` included: tiles are
read one at a time, so a source larger than memory works.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from pathlib import Path

import numpy as np

#: Default tile file name: "S1_r02_c03_PP.png" (grid tokens as `thinseg stitch` reads them).
NAMING = "{prefix}_r{row:02d}_c{col:02d}_{role}{ext}"
#: Fiji's Grid/Collection naming, for the x<col>_y<row> token form.
FIJI_NAMING = "{prefix}_x{col:03d}_y{row:03d}_{role}{ext}"
FORMATS = (".png", ".jpg", ".tif")


@dataclass
class TileSetTruth:
    """What a stitcher should find: tile k (file pp_paths[k], xp_paths[k]) in grid cell grid[k]
    = (row, col) has its top-left corner at positions[k] = (y, x) in the source image."""

    positions: np.ndarray  # (N, 2) int64, (y, x)
    grid: np.ndarray  # (N, 2) int64, (row, col)
    pp_paths: list[Path]
    xp_paths: list[Path]  # empty when no XP source was given
    tile_shape: tuple[int, int]  # (h, w)
    step: tuple[int, int]  # nominal (dy, dx) between grid neighbours
    gain: np.ndarray  # (h, w) float32, the multiplicative vignetting of every PP and XP tile
    source_shape: tuple[int, int]
    settings: dict[str, object] = dataclass_field(default_factory=dict)

    @property
    def rows(self) -> int:
        return int(self.grid[:, 0].max()) + 1

    @property
    def cols(self) -> int:
        return int(self.grid[:, 1].max()) + 1

    def panorama_shape(self) -> tuple[int, int]:
        """(h, w) of the union of the tiles, placed at their true positions."""
        lo = self.positions.min(axis=0)
        hi = self.positions.max(axis=0) + np.asarray(self.tile_shape)
        return int(hi[0] - lo[0]), int(hi[1] - lo[1])

    def save(self, path: Path) -> Path:
        """Everything but the gain image (it follows from `settings`) as JSON, paths relative to
        the file's folder."""
        folder = Path(path).parent
        record = {
            "positions": self.positions.tolist(),
            "grid": self.grid.tolist(),
            "pp": [str(p.relative_to(folder)) for p in self.pp_paths],
            "xp": [str(p.relative_to(folder)) for p in self.xp_paths],
            "tile_shape": list(self.tile_shape),
            "step": list(self.step),
            "source_shape": list(self.source_shape),
            "settings": self.settings,
        }
        Path(path).write_text(json.dumps(record, indent=1))
        return Path(path)

    @classmethod
    def load(cls, path: Path) -> TileSetTruth:
        folder = Path(path).parent
        record = json.loads(Path(path).read_text())
        shape = (int(record["tile_shape"][0]), int(record["tile_shape"][1]))
        return cls(
            positions=np.asarray(record["positions"], np.int64).reshape(-1, 2),
            grid=np.asarray(record["grid"], np.int64).reshape(-1, 2),
            pp_paths=[folder / p for p in record["pp"]],
            xp_paths=[folder / p for p in record["xp"]],
            tile_shape=shape,
            step=(int(record["step"][0]), int(record["step"][1])),
            gain=vignetting_gain(shape, float(record["settings"].get("vignetting", 0.0))),
            source_shape=(int(record["source_shape"][0]), int(record["source_shape"][1])),
            settings=record["settings"],
        )


def nominal_step(tile_shape: tuple[int, int], overlap: float) -> tuple[int, int]:
    """(dy, dx) between grid neighbours: the tile size less the overlap, rounded."""
    return int(round(tile_shape[0] * (1 - overlap))), int(round(tile_shape[1] * (1 - overlap)))


def jitter_reach(tile_shape: tuple[int, int], jitter: float) -> tuple[int, int]:
    """The largest offset (pixels, per axis) the jitter can move a tile from its grid position."""
    return int(math.floor(jitter * tile_shape[0])), int(math.floor(jitter * tile_shape[1]))


def source_shape_for(
    rows: int, cols: int, tile_shape: tuple[int, int], overlap: float, jitter: float
) -> tuple[int, int]:
    """(H, W) of the smallest source that holds a rows x cols grid jittered as far as it can go."""
    (dy, dx), (ry, rx) = nominal_step(tile_shape, overlap), jitter_reach(tile_shape, jitter)
    return 2 * ry + (rows - 1) * dy + tile_shape[0], 2 * rx + (cols - 1) * dx + tile_shape[1]


def vignetting_gain(tile_shape: tuple[int, int], vignetting: float) -> np.ndarray:
    """(h, w) float32 gain 1 - vignetting * r^2, r the distance from the tile's centre over the
    half diagonal: 1 at the centre, 1 - vignetting in the corners."""
    h, w = tile_shape
    cy, cx = (h - 1) / 2, (w - 1) / 2
    yy = ((np.arange(h, dtype=np.float64) - cy) ** 2)[:, None]
    xx = ((np.arange(w, dtype=np.float64) - cx) ** 2)[None, :]
    return (1.0 - vignetting * (yy + xx) / max(cy * cy + cx * cx, 1e-12)).astype(np.float32)


def cut_tiles(
    pp: np.ndarray,
    xp: np.ndarray | None,
    folder: Path,
    *,
    rows: int,
    cols: int,
    tile_shape: tuple[int, int],
    overlap: float = 0.15,
    jitter: float = 0.0,
    vignetting: float = 0.0,
    noise: float = 0.0,
    seed: int = 0,
    naming: str = NAMING,
    prefix: str = "S1",
    roles: tuple[str, str] = ("PP", "XP"),
    fmt: str = ".png",
    quality: int = 95,
    workers: int = 1,
) -> TileSetTruth:
    """Cut a rows x cols grid of (h, w) = `tile_shape` tiles from `pp` (and `xp`, same shape)
    into `folder`, named by `naming` (keys prefix, row, col, role, ext).

    Tile (r, c) lies at (r dy + ry + jy, c dx + rx + jx): the nominal step (dy, dx) =
    tile size x (1 - overlap), the jitter reach (ry, rx) = floor(jitter x tile size), and
    (jy, jx) integers drawn uniformly in [-ry, ry] x [-rx, rx] per tile. The source must be at
    least `source_shape_for(...)`; a larger one leaves its extra rows and columns unused.
    Each tile is multiplied by `vignetting_gain` and gets Gaussian noise of sigma `noise` grey
    levels, then is rounded and clipped to uint8; with vignetting 0 and noise 0 a tile file
    decodes (PNG, TIFF) to exactly the source crop at its position.
    """
    h, w = tile_shape
    if not (rows >= 1 and cols >= 1 and h >= 8 and w >= 8):
        raise ValueError(
            f"need at least one row and column of tiles of 8 x 8 px or more, got {rows} x {cols} of {w} x {h}"
        )
    if not 0 < overlap < 0.5:
        raise ValueError(f"overlap must lie in (0, 0.5), got {overlap}")
    if not 0 <= jitter <= 0.05 or 2 * jitter >= overlap:
        raise ValueError(f"jitter must lie in [0, 0.05] and stay under half the overlap ({overlap}), got {jitter}")
    if not 0 <= vignetting < 1 or noise < 0:
        raise ValueError(f"vignetting must lie in [0, 1) and noise be >= 0, got {vignetting}, {noise}")
    if fmt not in FORMATS:
        raise ValueError(f"fmt must be one of {FORMATS}, got {fmt!r}")
    if xp is not None and xp.shape != pp.shape:
        raise ValueError(f"PP and XP sources differ in shape: {pp.shape} and {xp.shape}")
    need = source_shape_for(rows, cols, tile_shape, overlap, jitter)
    if pp.shape[0] < need[0] or pp.shape[1] < need[1]:
        raise ValueError(
            f"source {pp.shape[1]} x {pp.shape[0]} is smaller than the {need[1]} x {need[0]} the grid needs"
        )

    step, reach = nominal_step(tile_shape, overlap), jitter_reach(tile_shape, jitter)
    rng = np.random.default_rng(seed)
    grid = np.array([(r, c) for r in range(rows) for c in range(cols)], np.int64).reshape(-1, 2)
    offsets = np.stack([rng.integers(-reach[a], reach[a] + 1, len(grid)) for a in (0, 1)], axis=1)
    positions = grid * np.asarray(step) + np.asarray(reach) + offsets
    positions = np.clip(positions, 0, np.asarray(pp.shape[:2]) - np.asarray(tile_shape))
    gain = vignetting_gain(tile_shape, vignetting)
    noise_seeds = np.random.SeedSequence(seed).spawn(len(grid))

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def name(k: int, role: str) -> Path:
        return folder / naming.format(prefix=prefix, row=int(grid[k, 0]), col=int(grid[k, 1]), role=role, ext=fmt)

    pp_paths = [name(k, roles[0]) for k in range(len(grid))]
    xp_paths = [name(k, roles[1]) for k in range(len(grid))] if xp is not None else []

    def one(k: int) -> None:
        y, x = (int(v) for v in positions[k])
        tile_rng = np.random.default_rng(noise_seeds[k])
        sources = [(pp, pp_paths[k])] + ([(xp, xp_paths[k])] if xp is not None else [])
        for source, path in sources:
            crop = np.asarray(source[y : y + h, x : x + w])
            write_tile(path, degrade(crop, gain, noise, tile_rng, vignetting > 0), quality)

    if workers > 1:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, range(len(grid))))
    else:
        for k in range(len(grid)):
            one(k)
    settings: dict[str, object] = {
        "overlap": overlap,
        "jitter": jitter,
        "vignetting": vignetting,
        "noise": noise,
        "seed": seed,
        "fmt": fmt,
        "quality": quality,
        "naming": naming,
        "prefix": prefix,
        "roles": list(roles),
    }
    return TileSetTruth(
        positions=positions.astype(np.int64),
        grid=grid,
        pp_paths=pp_paths,
        xp_paths=xp_paths,
        tile_shape=(h, w),
        step=step,
        gain=gain,
        source_shape=(int(pp.shape[0]), int(pp.shape[1])),
        settings=settings,
    )


def degrade(crop: np.ndarray, gain: np.ndarray, noise: float, rng: np.random.Generator, vignette: bool) -> np.ndarray:
    """crop x gain + N(0, noise), rounded and clipped to uint8 (the crop itself, untouched, when
    there is neither vignetting nor noise)."""
    if not vignette and noise == 0:
        return np.ascontiguousarray(crop, dtype=np.uint8)
    out = crop.astype(np.float32)
    if vignette:
        out *= gain if out.ndim == 2 else gain[:, :, None]
    if noise > 0:
        out += rng.standard_normal(out.shape, dtype=np.float32) * np.float32(noise)
    np.rint(out, out=out)
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8)


def write_tile(path: Path, tile: np.ndarray, quality: int = 95) -> None:
    if path.suffix == ".tif":
        import tifffile  # deferred: only TIFF tiles need it

        tifffile.imwrite(path, tile, photometric="rgb" if tile.ndim == 3 else "minisblack")
        return
    from PIL import Image  # deferred: Pillow is imported by the readers anyway

    if path.suffix == ".jpg":
        Image.fromarray(tile).save(path, quality=quality)
    else:
        Image.fromarray(tile).save(path, compress_level=1)


def read_tile(path: Path) -> np.ndarray:
    """A tile file's decoded pixels ((h, w, 3) for colour, (h, w) for grey)."""
    if Path(path).suffix == ".tif":
        import tifffile  # deferred: only TIFF tiles need it

        return np.asarray(tifffile.imread(path))
    from PIL import Image  # deferred: Pillow is imported by the readers anyway

    with Image.open(path) as image:
        return np.asarray(image)


def real_field_source(field: str = "2a") -> tuple[np.ndarray, np.ndarray]:
    """(PP, XP) of one real sandstone field, 1200 x 1600 x 3 uint8 each (skips the calling test
    when the data is absent). The two photographs are not registered to each other (XP sits a
    few pixels off PP), which a stitcher never sees: PP and XP tiles are cut at one position."""
    from helpers import read_rgb, real_field  # deferred: helpers pulls in pytest for the skip

    paths = real_field(field)
    return read_rgb(paths["pp"]), read_rgb(paths["xp"])


def synthetic_source(shape: tuple[int, int], seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(PP, XP) uint8 (H, W, 3) of a generated section (the grain geometry and rendering of
    `thinseg.synth.generate_section`, without its QEMSCAN map): ~3 s for 3000 x 4000."""
    from thinseg.synth.grains import build_geometry  # deferred: thinseg only where a source is made
    from thinseg.synth.render import render  # deferred: as above
    from thinseg.synth.section import DEFAULT_CLASS_WEIGHTS, REFERENCE_MM_PER_PIXEL  # deferred: as above

    geometry_rng, render_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(2))
    cell = max(12, int(round(0.15 / REFERENCE_MM_PER_PIXEL)))
    geometry = build_geometry(geometry_rng, shape, cell, np.asarray(DEFAULT_CLASS_WEIGHTS, np.float64))
    return render(render_rng, geometry, 1.0)


_FIJI_LINE = re.compile(r"^\s*([^;#][^;]*?)\s*;\s*[^;]*;\s*\(\s*([-+0-9.eE]+)\s*,\s*([-+0-9.eE]+)\s*(?:,[^)]*)?\)")


def read_tile_configuration(path: Path) -> dict[str, tuple[float, float]]:
    """Fiji TileConfiguration lines `name; ; (x, y)` -> {file name: (y, x)} (comments and the
    `dim = 2` line skipped; names as written, usually without a folder)."""
    found: dict[str, tuple[float, float]] = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        match = _FIJI_LINE.match(line)
        if match:
            found[match.group(1)] = (float(match.group(3)), float(match.group(2)))
    return found


def position_errors(truth: np.ndarray, found: np.ndarray) -> np.ndarray:
    """Per-tile distance (px) between found and true (y, x) positions after removing the common
    offset (the per-axis median of found - truth, so that a few lost tiles do not move it)."""
    truth, found = np.asarray(truth, np.float64), np.asarray(found, np.float64)
    residual = found - truth
    residual -= np.median(residual, axis=0)
    return np.asarray(np.hypot(residual[:, 0], residual[:, 1]))


def found_positions(truth: TileSetTruth, found: dict[str, tuple[float, float]]) -> np.ndarray:
    """The found (y, x) of every truth tile, in truth order, matched by PP file name (NaN where a
    tile is missing from `found`; names in `found` may carry a folder)."""
    by_name = {Path(key.replace("\\", "/")).name: value for key, value in found.items()}
    out = np.full((len(truth.pp_paths), 2), np.nan)
    for k, path in enumerate(truth.pp_paths):
        if path.name in by_name:
            out[k] = by_name[path.name]
    return out


def accuracy(truth: TileSetTruth, found: np.ndarray, within: Sequence[float] = (1.0,)) -> dict[str, object]:
    """Summary of `position_errors` over the tiles that were found: share within each distance,
    max and median error, missing tiles."""
    present = ~np.isnan(found).any(axis=1)
    errors = position_errors(truth.positions[present], found[present]) if present.any() else np.zeros(0)
    summary: dict[str, object] = {
        "tiles": len(truth.pp_paths),
        "missing": int((~present).sum()),
        "max_error_px": float(errors.max()) if errors.size else math.nan,
        "median_error_px": float(np.median(errors)) if errors.size else math.nan,
    }
    for d in within:
        summary[f"share_within_{d:g}px"] = float((errors <= d).sum() / len(truth.pp_paths))
    return summary
