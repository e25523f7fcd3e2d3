"""`thinseg stitch` from the command line on tile sets with known positions: every way of giving
the layout finds the true positions, the output folder holds readable pyramidal BigTIFFs and a
netCDF that `thinseg segment` takes, and bad input is one error line naming the file, with
nothing written."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from helpers import MODULE_DIR, error_lines, open_nc, run_main
from PIL import Image
from tile_sets import FIJI_NAMING, TileSetTruth, cut_tiles, found_positions, read_tile_configuration, synthetic_source

from thinseg.data.section_images import open_ppxp
from thinseg.io.images import open_image

SMALL_TILE = (200, 240)
OUTPUT_FILES = {"S1_PP.tif", "S1_XP.tif", "S1.nc", "TileConfiguration.registered.txt", "tiles.png", "stitch.json"}


@pytest.fixture(scope="module")
def source():
    """PP and XP of a generated 800 x 600 px section."""
    return synthetic_source((600, 800), 11)


def cut(source, folder: Path, **options) -> TileSetTruth:
    """3 x 3 tiles of 240 x 200 px, 15% overlap, 5% stage jitter, 0.3 vignetting, noise 2.5."""
    settings = dict(rows=3, cols=3, tile_shape=SMALL_TILE, overlap=0.15, jitter=0.05, vignetting=0.3, noise=2.5, seed=3)
    settings.update(options)
    return cut_tiles(source[0], source[1], folder, **settings)


def stitch(capsys, *args) -> tuple[int, str, str]:
    return run_main(capsys, "stitch", *args, "--quiet")


def summary_of(folder: Path) -> dict:
    return json.loads((folder / "stitch.json").read_text(encoding="utf-8"))


def found_in(folder: Path, truth: TileSetTruth) -> np.ndarray:
    """stitch.json's (y, x) of the truth's tiles, in truth order (matched by PP file name)."""
    by_name = {Path(t["pp"]).name: (t["y"], t["x"]) for t in summary_of(folder)["tiles"]}
    return np.array([by_name[p.name] for p in truth.pp_paths], np.float64)


def assert_at_true_positions(found: np.ndarray, truth: TileSetTruth, tiles=slice(None)) -> None:
    """`found` (tiles in truth order) equals the truth up to the common top-left."""
    found, true = found[tiles], truth.positions[tiles].astype(np.float64)
    np.testing.assert_array_equal(found - found.min(axis=0), true - true.min(axis=0))


@pytest.fixture(scope="module")
def small_tiles(source, tmp_path_factory):
    """One 3 x 3 tile set (r<row>_c<col> names), cut once; tests that spoil it work on a copy."""
    return cut(source, tmp_path_factory.mktemp("small") / "tiles")


@pytest.fixture
def spoilable(small_tiles, tmp_path) -> tuple[TileSetTruth, Path]:
    folder = tmp_path / "tiles"
    shutil.copytree(small_tiles.pp_paths[0].parent, folder)
    return small_tiles, folder


# ---------------------------------------------------------------------------------------------
# layouts


def test_grid_from_row_column_names_finds_the_true_positions(small_tiles, tmp_path, capsys):
    code, stdout, stderr = stitch(capsys, small_tiles.pp_paths[0].parent, "-o", tmp_path / "out")
    assert code == 0, stderr
    assert "S1: 9 tiles -> " in stdout and "9 linked by overlaps" in stdout
    summary = summary_of(tmp_path / "out")
    assert summary["layout"] == "grid from the tile names"
    assert_at_true_positions(found_in(tmp_path / "out", small_tiles), small_tiles)


def test_grid_from_fiji_x_y_names_finds_the_true_positions(source, tmp_path, capsys):
    truth = cut(source, tmp_path / "tiles", naming=FIJI_NAMING, seed=4)
    assert truth.pp_paths[1].name == "S1_x001_y000_PP.png"
    code, _, stderr = stitch(capsys, tmp_path / "tiles", "-o", tmp_path / "out")
    assert code == 0, stderr
    assert summary_of(tmp_path / "out")["layout"] == "grid from the tile names"
    assert_at_true_positions(found_in(tmp_path / "out", truth), truth)


def numbered(truth: TileSetTruth, folder: Path, serpentine: bool) -> list[int]:
    """Rename the tiles `S1_<number>_PP.png` in acquisition order; the numbers, in truth order."""
    numbers = []
    for k, (row, col) in enumerate(truth.grid):
        col = truth.cols - 1 - col if serpentine and row % 2 else col
        number = int(row * truth.cols + col + 1)
        numbers.append(number)
        for path in (truth.pp_paths[k], truth.xp_paths[k]):
            role = path.stem.rsplit("_", 1)[1]
            path.rename(folder / f"S1_{number:03d}_{role}.png")
    return numbers


@pytest.mark.parametrize("serpentine", [False, True], ids=["raster", "serpentine"])
def test_numbered_tiles_with_columns_find_the_true_positions(source, tmp_path, capsys, serpentine):
    truth = cut(source, tmp_path / "tiles", seed=5)
    numbers = numbered(truth, tmp_path / "tiles", serpentine)
    args = ["--columns", "3"] + (["--serpentine"] if serpentine else [])
    code, _, stderr = stitch(capsys, tmp_path / "tiles", "-o", tmp_path / "out", *args)
    assert code == 0, stderr
    summary = summary_of(tmp_path / "out")
    assert summary["layout"] == f"grid of 3 columns, {'serpentine' if serpentine else 'row by row'}"
    by_number = {int(t["name"].split("_")[1]): (t["y"], t["x"]) for t in summary["tiles"]}
    assert summary["tiles_linked"] == 9
    assert_at_true_positions(np.array([by_number[n] for n in numbers], np.float64), truth)


def write_nominal_configuration(truth: TileSetTruth, path: Path, names: list[str], skip: int | None = None) -> Path:
    """A Fiji TileConfiguration.txt with the grid (nominal) positions, not the true ones."""
    lines = ["# Define the number of dimensions we are working on", "dim = 2", "", "# Define the image coordinates"]
    for k, (row, col) in enumerate(truth.grid):
        if k != skip:
            lines.append(f"{names[k]}; ; ({col * truth.step[1]:.1f}, {row * truth.step[0]:.1f})")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_fiji_tile_configuration_file_finds_the_true_positions(source, tmp_path, capsys):
    truth = cut(source, tmp_path / "tiles", seed=6)
    numbers = numbered(truth, tmp_path / "tiles", serpentine=False)  # names alone give no grid
    names = [f"S1_{n:03d}_PP.png" for n in numbers]
    config = write_nominal_configuration(truth, tmp_path / "TileConfiguration.txt", names)
    code, _, stderr = stitch(capsys, tmp_path / "tiles", "-o", tmp_path / "out", "--layout", config)
    assert code == 0, stderr
    summary = summary_of(tmp_path / "out")
    assert summary["layout"] == "tile positions from TileConfiguration.txt"
    registered = read_tile_configuration(tmp_path / "out" / "TileConfiguration.registered.txt")
    assert_at_true_positions(np.array([registered[name] for name in names]), truth)


def test_auto_layout_finds_the_true_positions(tmp_path, capsys):
    big = synthetic_source((1200, 1600), 12)
    truth = cut(big, tmp_path / "tiles", tile_shape=(400, 480), seed=7)
    code, _, stderr = stitch(capsys, tmp_path / "tiles", "-o", tmp_path / "out", "--layout", "auto")
    assert code == 0, stderr
    summary = summary_of(tmp_path / "out")
    assert summary["layout"] == "positions from the images alone"
    assert summary["tiles_linked"] == 9
    assert_at_true_positions(found_in(tmp_path / "out", truth), truth)


def test_auto_layout_links_small_vignetted_tiles(small_tiles, tmp_path, capsys):
    code, _, stderr = stitch(capsys, small_tiles.pp_paths[0].parent, "-o", tmp_path / "out", "--layout", "auto")
    assert code == 0, stderr
    assert_at_true_positions(found_in(tmp_path / "out", small_tiles), small_tiles)


# ---------------------------------------------------------------------------------------------
# outputs


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """Two rows of four 320 x 160 px tiles -> a panorama over 1024 px wide (so it has a pyramid),
    stitched with a pixel size."""
    root = tmp_path_factory.mktemp("wide")
    source = synthetic_source((400, 1200), 13)
    truth = cut(source, root / "tiles", rows=2, cols=4, tile_shape=(160, 320), seed=8)
    from thinseg.cli.main import main

    code = main(["stitch", str(root / "tiles"), "-o", str(root / "out"), "--pixel-size", "0.002", "--quiet"])
    assert code == 0
    return truth, root / "out"


def test_one_row_of_tiles_is_named_after_the_common_prefix(source, tmp_path, capsys):
    cut(source, tmp_path / "tiles", rows=1, cols=3)
    code, _, stderr = stitch(capsys, tmp_path / "tiles", "-o", tmp_path / "out")
    assert code == 0, stderr
    assert {p.name for p in (tmp_path / "out").iterdir()} == OUTPUT_FILES


def test_output_folder_holds_the_panoramas_positions_map_and_summary(wide):
    truth, out = wide
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES
    summary = summary_of(out)
    assert summary["files"] == {
        "pp_tiff": "S1_PP.tif",
        "xp_tiff": "S1_XP.tif",
        "netcdf": "S1.nc",
        "tile_map": "tiles.png",
        "positions": "TileConfiguration.registered.txt",
        "summary": "stitch.json",
    }
    assert summary["mm_per_pixel"] == 0.002
    assert_at_true_positions(found_in(out, truth), truth)
    height, width = summary["shape"]
    assert width > 1024
    with Image.open(out / "tiles.png") as picture:
        assert picture.mode == "RGB" and picture.size[0] > 100


def test_panorama_tiffs_are_tiled_pyramidal_bigtiff_equal_to_the_netcdf(wide):
    _, out = wide
    height, width = summary_of(out)["shape"]
    ppxp = open_ppxp(out / "S1.nc")
    try:
        assert (ppxp.pp_variable, ppxp.xp_variable) == ("S1_PP", "S1_XP")
        from_nc = {"PP": ppxp.pp.read(0, height), "XP": ppxp.xp.read(0, height)}
    finally:
        ppxp.close()
    for role in ("PP", "XP"):
        path = out / f"S1_{role}.tif"
        with tifffile.TiffFile(path) as tif:
            assert tif.is_bigtiff
            assert tif.pages[0].is_tiled
            assert len(tif.series[0].levels) > 1
            assert tif.series[0].levels[1].shape[:2] == (-(-height // 2), -(-width // 2))
        image = open_image(path)
        try:
            assert image.shape == (height, width)
            np.testing.assert_array_equal(image.read(0, height), from_nc[role])
        finally:
            image.close()
        assert from_nc[role].shape == (height, width, 3) and from_nc[role].std() > 10


def test_pixel_size_lands_in_the_netcdf_and_the_tiff_metadata(wide):
    _, out = wide
    with open_nc(out / "S1.nc") as ds:
        for name in ("S1_PP", "S1_XP"):
            transform = np.asarray(ds.variables[name].getncattr("transform"), np.float64).reshape(4, 4)
            np.testing.assert_allclose(np.abs(np.diag(transform)[:3]), [0.002, 0.002, 0.002])
    ppxp = open_ppxp(out / "S1.nc")
    try:
        assert ppxp.mm_per_pixel == pytest.approx(0.002)
    finally:
        ppxp.close()
    for role in ("PP", "XP"):
        with tifffile.TiffFile(out / f"S1_{role}.tif") as tif:
            assert 'PhysicalSizeX="2.0" PhysicalSizeXUnit="µm"' in tif.ome_metadata
            assert 'PhysicalSizeY="2.0" PhysicalSizeYUnit="µm"' in tif.ome_metadata
        image = open_image(out / f"S1_{role}.tif")
        try:
            assert image.mm_per_pixel == pytest.approx(0.002)
        finally:
            image.close()


def test_segment_takes_the_stitched_netcdf_as_it_is(wide, tmp_path):
    _, out = wide
    height, width = summary_of(out)["shape"]
    env = dict(os.environ, PYTHONPATH=str(MODULE_DIR))
    run = subprocess.run(
        [sys.executable, "-m", "thinseg", "segment", str(out / "S1.nc"), "-o", str(tmp_path / "seg"), "-q"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    written = sorted((tmp_path / "seg").glob("*.nc"))
    assert len(written) == 1, sorted(p.name for p in (tmp_path / "seg").iterdir())
    with open_nc(written[0]) as ds:
        assert "S1_Segmentation" in ds.variables, list(ds.variables)
        labels = ds.variables["S1_Segmentation"]
        assert labels.shape == (1, height, width)
        np.testing.assert_allclose(
            np.asarray(labels.getncattr("transform"), np.float64),
            np.asarray(ds.variables["S1_PP"].getncattr("transform"), np.float64),
        )
        assert np.asarray(labels[:]).max() > 0


# ---------------------------------------------------------------------------------------------
# bad input: one line naming the file, nothing written


def assert_refused(code: int, stderr: str, named: Path, problem: str, out: Path) -> None:
    lines = error_lines(stderr)
    assert code != 0
    assert len(lines) == 1 and len([ln for ln in stderr.splitlines() if ln.strip()]) == 1, stderr
    assert lines[0].startswith(f"thinseg: error: {named}: "), lines[0]
    assert problem in lines[0], lines[0]
    assert not out.exists()
    if out.parent.exists():
        assert [p.name for p in out.parent.iterdir() if p.name.startswith(".")] == []


def test_pp_tile_without_its_xp_is_refused(spoilable, tmp_path, capsys):
    _, folder = spoilable
    (folder / "S1_r01_c02_XP.png").unlink()
    out = tmp_path / "results" / "pano"
    code, _, stderr = stitch(capsys, folder, "-o", out)
    assert_refused(code, stderr, folder / "S1_r01_c02_PP.png", "PP tile without its XP tile", out)


def test_tile_of_another_size_is_refused(spoilable, tmp_path, capsys):
    _, folder = spoilable
    path = folder / "S1_r01_c01_PP.png"
    with Image.open(path) as image:
        image.crop((0, 0, 240, 190)).save(path)
    out = tmp_path / "results" / "pano"
    code, _, stderr = stitch(capsys, folder, "-o", out)
    assert_refused(code, stderr, path, "all tiles must have one size", out)


def test_truncated_tile_is_refused(spoilable, tmp_path, capsys):
    _, folder = spoilable
    path = folder / "S1_r01_c02_PP.png"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    out = tmp_path / "results" / "pano"
    code, _, stderr = stitch(capsys, folder, "-o", out)
    assert_refused(code, stderr, path, "PP tile is truncated or corrupt", out)


def test_unknown_format_is_refused(small_tiles, tmp_path, capsys):
    out = tmp_path / "results" / "pano"
    code, _, stderr = stitch(capsys, small_tiles.pp_paths[0].parent, "-o", out, "--format", "bogus")
    lines = error_lines(stderr)
    assert code != 0 and len(lines) == 1, stderr
    assert "--format bogus" in lines[0] and "tiff, netcdf" in lines[0]
    assert not out.exists() and not out.parent.exists()


def test_tiff_format_alone_writes_no_netcdf(small_tiles, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, stderr = stitch(capsys, small_tiles.pp_paths[0].parent, "-o", out, "--format", "tiff")
    assert code == 0, stderr
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES - {"S1.nc"}
    assert "pixel size" not in stderr  # the netCDF's default pixel size is not at stake
    assert "netcdf" not in summary_of(out)["files"]


def test_tile_configuration_without_a_tile_is_refused(spoilable, tmp_path, capsys):
    truth, folder = spoilable
    names = [p.name for p in truth.pp_paths]
    config = write_nominal_configuration(truth, tmp_path / "TileConfiguration.txt", names, skip=4)
    out = tmp_path / "results" / "pano"
    code, _, stderr = stitch(capsys, folder, "-o", out, "--layout", config)
    assert_refused(code, stderr, config, f"does not list tile {names[4]}", out)


def test_existing_output_is_kept_without_overwrite_and_replaced_with_it(small_tiles, tmp_path, capsys):
    out = tmp_path / "results" / "pano"
    out.mkdir(parents=True)
    (out / "old.txt").write_text("an earlier result", encoding="utf-8")
    code, _, stderr = stitch(capsys, small_tiles.pp_paths[0].parent, "-o", out)
    lines = error_lines(stderr)
    assert code != 0 and len(lines) == 1, stderr
    assert lines[0] == f"thinseg: error: {out}: the output folder exists: pass --overwrite to replace it"
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    assert [p.name for p in out.parent.iterdir()] == ["pano"]
    code, _, stderr = stitch(capsys, small_tiles.pp_paths[0].parent, "-o", out, "--overwrite")
    assert code == 0, stderr
    assert {p.name for p in out.iterdir()} == OUTPUT_FILES
    assert [p.name for p in out.parent.iterdir()] == ["pano"]


def add_stray(folder: Path, pp: np.ndarray, xp: np.ndarray) -> None:
    Image.fromarray(pp).save(folder / "S1_stray_PP.png")
    Image.fromarray(xp).save(folder / "S1_stray_XP.png")


@pytest.fixture(scope="module")
def linkable(source, tmp_path_factory) -> TileSetTruth:
    """A small set that the auto layout links whole (vignetting 0.1), plus a stray tile pair cut
    from another generated section: it overlaps none of the set."""
    folder = tmp_path_factory.mktemp("stray") / "tiles"
    truth = cut(source, folder, vignetting=0.1)
    other_pp, other_xp = synthetic_source((600, 800), 99)
    add_stray(folder, other_pp[200:400, 280:520], other_xp[200:400, 280:520])
    return truth


def test_tile_overlapping_nothing_is_refused_with_auto_layout(linkable, tmp_path, capsys):
    folder = linkable.pp_paths[0].parent
    out = tmp_path / "results" / "pano"
    code, _, stderr = stitch(capsys, folder, "-o", out, "--layout", "auto")
    assert_refused(code, stderr, folder / "S1_stray_PP.png", "overlap no other tile", out)


def test_drop_unlinked_leaves_the_stray_tile_out(linkable, tmp_path, capsys):
    folder = linkable.pp_paths[0].parent
    out = tmp_path / "out"
    code, _, stderr = stitch(capsys, folder, "-o", out, "--layout", "auto", "--drop-unlinked")
    assert code == 0, stderr
    warnings = [ln for ln in stderr.splitlines() if ln.startswith("thinseg: warning:")]
    assert any("S1_stray_PP.png" in ln and "left out" in ln for ln in warnings), stderr
    tiles = {t["name"]: t for t in summary_of(out)["tiles"]}
    assert tiles["S1_stray"]["used"] is False and tiles["S1_stray"]["y"] is None
    kept = [tiles[p.name[: -len("_PP.png")]] for p in linkable.pp_paths]
    assert all(t["used"] and t["linked"] for t in kept)
    assert_at_true_positions(np.array([[t["y"], t["x"]] for t in kept], np.float64), linkable)
    registered = read_tile_configuration(out / "TileConfiguration.registered.txt")
    assert "S1_stray_PP.png" not in registered
    assert not np.isnan(found_positions(linkable, registered)).any()


@pytest.mark.filterwarnings("ignore:Could not determine RMS error:UserWarning")  # scikit-image on blank strips
def test_blank_tile_is_placed_by_the_grid_and_the_others_exactly(spoilable, tmp_path, capsys):
    truth, folder = spoilable
    blank = np.full((*SMALL_TILE, 3), 128, np.uint8)
    for role in ("PP", "XP"):
        Image.fromarray(blank).save(folder / f"S1_r01_c01_{role}.png")
    out = tmp_path / "out"
    code, _, stderr = stitch(capsys, folder, "-o", out)
    assert code == 0, stderr
    warnings = [ln for ln in stderr.splitlines() if ln.startswith("thinseg: warning:")]
    assert any("S1_r01_c01_PP.png" in ln and "placed by the layout only" in ln for ln in warnings), stderr
    summary = summary_of(out)
    tiles = summary["tiles"]
    assert [t["linked"] for t in tiles] == [k != 4 for k in range(9)]
    assert all(t["used"] for t in tiles)
    others = [k for k in range(9) if k != 4]
    assert_at_true_positions(found_in(out, truth), truth, others)
    # the blank tile keeps its grid place relative to the others (they move as one rigid group)
    found = found_in(out, truth)
    nominal = truth.grid * np.asarray(truth.step, np.float64)
    expected = nominal[4] + (found[others] - nominal[others]).mean(axis=0)
    assert np.abs(found[4] - expected).max() <= 1.0, (found[4], expected)


def test_tile_of_another_section_is_not_linked_by_a_weak_correlation(linkable, tmp_path, capsys):
    folder = tmp_path / "tiles"
    shutil.copytree(linkable.pp_paths[0].parent, folder)
    add_stray(folder, *synthetic_source(SMALL_TILE, 99))
    out = tmp_path / "results" / "pano"
    code, _, stderr = stitch(capsys, folder, "-o", out, "--layout", "auto")
    assert_refused(code, stderr, folder / "S1_stray_PP.png", "overlap no other tile", out)
