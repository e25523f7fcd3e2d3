"""The tile-set generator behind the stitching tests and benchmark: tiles are exact source crops
at the recorded positions, vignetting is one gain shared by PP and XP, jitter stays in reach,
and the truth survives its JSON file and a Fiji TileConfiguration round trip."""

from __future__ import annotations

import numpy as np
import pytest
from tile_sets import (
    FIJI_NAMING,
    TileSetTruth,
    accuracy,
    cut_tiles,
    found_positions,
    jitter_reach,
    nominal_step,
    position_errors,
    read_tile,
    read_tile_configuration,
    real_field_source,
    source_shape_for,
    synthetic_source,
    vignetting_gain,
)


def random_source(shape: tuple[int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (
        rng.integers(0, 256, (*shape, 3), dtype=np.uint8),
        rng.integers(0, 256, (*shape, 3), dtype=np.uint8),
    )


@pytest.mark.parametrize("fmt", [".png", ".tif"])
def test_tile_files_equal_source_crops_at_their_positions(tmp_path, fmt):
    rows, cols, tile = 3, 4, (60, 80)
    pp, xp = random_source(source_shape_for(rows, cols, tile, 0.2, 0.05), 1)
    truth = cut_tiles(pp, xp, tmp_path, rows=rows, cols=cols, tile_shape=tile, overlap=0.2, jitter=0.05, fmt=fmt)
    assert len(truth.pp_paths) == len(truth.xp_paths) == rows * cols
    for k, ((y, x), pp_path, xp_path) in enumerate(zip(truth.positions, truth.pp_paths, truth.xp_paths)):
        r, c = truth.grid[k]
        assert pp_path.name == f"S1_r{r:02d}_c{c:02d}_PP{fmt}"
        assert xp_path.name == f"S1_r{r:02d}_c{c:02d}_XP{fmt}"
        np.testing.assert_array_equal(read_tile(pp_path), pp[y : y + 60, x : x + 80])
        np.testing.assert_array_equal(read_tile(xp_path), xp[y : y + 60, x : x + 80])
    # a tile is not the crop one pixel off: the positions are pinned, not merely close
    y, x = truth.positions[5]
    assert not np.array_equal(read_tile(truth.pp_paths[5]), pp[y + 1 : y + 61, x : x + 80])


def test_vignetting_is_one_gain_on_pp_and_xp(tmp_path):
    tile = (48, 64)
    pp, xp = random_source(source_shape_for(2, 2, tile, 0.15, 0.03), 2)
    truth = cut_tiles(pp, xp, tmp_path, rows=2, cols=2, tile_shape=tile, overlap=0.15, jitter=0.03, vignetting=0.3)
    gain = vignetting_gain(tile, 0.3)
    np.testing.assert_array_equal(truth.gain, gain)
    assert gain[0, 0] == gain[-1, -1] == pytest.approx(0.7, abs=1e-6)
    assert gain.max() == pytest.approx(1.0, abs=2e-3) and gain.min() == pytest.approx(0.7, abs=1e-6)
    for (y, x), pp_path, xp_path in zip(truth.positions, truth.pp_paths, truth.xp_paths):
        for source, path in ((pp, pp_path), (xp, xp_path)):
            crop = source[y : y + 48, x : x + 64].astype(np.float32)
            expected = np.clip(np.rint(crop * gain[:, :, None]), 0, 255).astype(np.uint8)
            np.testing.assert_array_equal(read_tile(path), expected)
        # the gain read back from the two files agrees where the source is bright enough to tell
        ratio_pp = read_tile(pp_path)[..., 0] / np.maximum(pp[y : y + 48, x : x + 64, 0], 1)
        ratio_xp = read_tile(xp_path)[..., 0] / np.maximum(xp[y : y + 48, x : x + 64, 0], 1)
        bright = (pp[y : y + 48, x : x + 64, 0] > 100) & (xp[y : y + 48, x : x + 64, 0] > 100)
        assert np.abs(ratio_pp - ratio_xp)[bright].max() < 0.02


def test_noise_differs_between_pp_and_xp_with_the_asked_sigma(tmp_path):
    tile = (100, 120)
    pp = np.full((*source_shape_for(1, 2, tile, 0.1, 0.0), 3), 128, np.uint8)
    truth = cut_tiles(pp, pp.copy(), tmp_path, rows=1, cols=2, tile_shape=tile, overlap=0.1, noise=4.0, seed=3)
    a, b = (read_tile(p).astype(np.float64) for p in (truth.pp_paths[0], truth.xp_paths[0]))
    assert (a - 128).std() == pytest.approx(4.0, rel=0.05)
    assert (a - b).std() == pytest.approx(4.0 * np.sqrt(2), rel=0.05)


@pytest.mark.parametrize("seed", range(5))
def test_jitter_stays_within_reach_and_varies(tmp_path, seed):
    rows, cols, tile, overlap, jitter = 5, 6, (40, 50), 0.15, 0.05
    shape = source_shape_for(rows, cols, tile, overlap, jitter)
    grey = np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)
    truth = cut_tiles(
        grey, None, tmp_path, rows=rows, cols=cols, tile_shape=tile, overlap=overlap, jitter=jitter, seed=seed
    )
    step, reach = nominal_step(tile, overlap), jitter_reach(tile, jitter)
    assert step == (34, 42) and reach == (2, 2)
    nominal = truth.grid * np.asarray(step) + np.asarray(reach)
    offsets = truth.positions - nominal
    assert np.abs(offsets).max(axis=0).tolist() <= list(reach)
    assert len({tuple(o) for o in offsets.tolist()}) > 5  # drawn per tile, not one shift for all
    assert (truth.positions >= 0).all()
    assert ((truth.positions + np.asarray(tile)) <= np.asarray(shape)).all()
    assert truth.xp_paths == [] and read_tile(truth.pp_paths[0]).shape == tile


def test_source_shape_for_is_the_smallest_source_that_fits(tmp_path):
    tile = (64, 80)
    need = source_shape_for(3, 4, tile, 0.2, 0.05)
    assert need == (2 * 3 + 2 * 51 + 64, 2 * 4 + 3 * 64 + 80)
    pp = np.zeros((need[0], need[1] - 1, 3), np.uint8)
    with pytest.raises(ValueError, match="smaller than"):
        cut_tiles(pp, None, tmp_path, rows=3, cols=4, tile_shape=tile, overlap=0.2, jitter=0.05)
    with pytest.raises(ValueError, match="half the overlap"):
        cut_tiles(pp, None, tmp_path, rows=3, cols=4, tile_shape=tile, overlap=0.1, jitter=0.05)


def test_truth_file_round_trips_and_fiji_names_carry_x_and_y(tmp_path):
    tile = (32, 40)
    pp, _ = random_source(source_shape_for(2, 3, tile, 0.2, 0.04), 4)
    truth = cut_tiles(
        pp,
        pp,
        tmp_path / "t",
        rows=2,
        cols=3,
        tile_shape=tile,
        overlap=0.2,
        jitter=0.04,
        naming=FIJI_NAMING,
        fmt=".jpg",
    )
    assert truth.pp_paths[5].name == "S1_x002_y001_PP.jpg"
    back = TileSetTruth.load(truth.save(tmp_path / "t" / "truth.json"))
    np.testing.assert_array_equal(back.positions, truth.positions)
    np.testing.assert_array_equal(back.grid, truth.grid)
    np.testing.assert_array_equal(back.gain, truth.gain)
    assert back.pp_paths == truth.pp_paths and back.xp_paths == truth.xp_paths
    assert (back.tile_shape, back.step, back.source_shape) == (truth.tile_shape, truth.step, truth.source_shape)
    assert back.panorama_shape() == tuple((truth.positions.max(0) - truth.positions.min(0) + tile).tolist())


def test_accuracy_removes_the_common_offset_and_counts_lost_and_wrong_tiles(tmp_path):
    tile = (32, 40)
    pp, _ = random_source(source_shape_for(2, 3, tile, 0.2, 0.0), 5)
    truth = cut_tiles(pp, None, tmp_path, rows=2, cols=3, tile_shape=tile, overlap=0.2)
    lines = ["# Define the number of dimensions we are working on", "dim = 2", "", "# Define the image coordinates"]
    for k, ((y, x), path) in enumerate(zip(truth.positions, truth.pp_paths)):
        if k == 4:
            continue  # a tile the stitcher lost
        dy, dx = (3.0, 0.0) if k == 2 else (0.0, 0.0)
        lines.append(f"{path.name}; ; ({x + 100 + dx:.1f}, {y - 7 + dy:.1f})")
    (tmp_path / "TileConfiguration.registered.txt").write_text("\n".join(lines) + "\n")
    found = found_positions(truth, read_tile_configuration(tmp_path / "TileConfiguration.registered.txt"))
    assert np.isnan(found[4]).all() and not np.isnan(np.delete(found, 4, axis=0)).any()
    np.testing.assert_array_equal(found[0], truth.positions[0] + [-7, 100])
    summary = accuracy(truth, found)
    assert summary == {
        "tiles": 6,
        "missing": 1,
        "max_error_px": 3.0,
        "median_error_px": 0.0,
        "share_within_1px": 4 / 6,
    }
    np.testing.assert_array_equal(position_errors(truth.positions + [5, -9], truth.positions), np.zeros(6))


def test_synthetic_source_is_seeded_colour_and_textured():
    pp, xp = synthetic_source((200, 300), seed=7)
    again, _ = synthetic_source((200, 300), seed=7)
    other, _ = synthetic_source((200, 300), seed=8)
    assert pp.shape == xp.shape == (200, 300, 3) and pp.dtype == xp.dtype == np.uint8
    np.testing.assert_array_equal(pp, again)
    assert not np.array_equal(pp, other)
    assert pp.std() > 10 and xp.std() > 10


def test_real_field_source_gives_both_photographs_of_a_field():
    pp, xp = real_field_source("2a")
    assert pp.shape == xp.shape == (1200, 1600, 3)
    assert not np.array_equal(pp, xp)
