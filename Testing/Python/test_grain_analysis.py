"""Grain analysis against answers known from the geometry: digital discs and ellipses of known
size, pairs of touching discs of one mineral that must be split (and single convex grains that
must not), contact lengths of straight and round boundaries, the grain table's independence of
band size and worker count, edge grains, neighbours, the size statistics (Folk & Ward, Wentworth)
and the modal mineralogy.

Labelmaps are generated (grain_shapes) at 0.01 mm per pixel, a few hundred pixels across; one
band test is larger. Lengths below are compared in pixels.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from grain_shapes import (
    CLASSES,
    FELDSPAR,
    LITHIC,
    MATRIX,
    QUARTZ,
    convex_blob,
    disc,
    ellipse,
    paint_discs,
    rectangle_mosaic,
    scatter_discs,
    touching_pair,
)
from helpers import REAL_CLASSES, real_field

from thinseg.analysis import GRAIN_COLUMNS, ArrayLabelmap, GrainAnalysis, GrainOptions, analyze, open_labelmap
from thinseg.analysis.sizes import folk_ward, size_distribution, wentworth_class

MM = 0.01
#: Crofton's reading of an axis-aligned straight boundary of length L, four directions: the
#: transitions across it in the perpendicular direction (weight pi/8) and both diagonals
#: (pi/(8 sqrt 2) each): L * pi/8 * (1 + sqrt 2) = 0.948 L, 5.2% short.
AXIS_LINE_FACTOR = math.pi / 8 * (1 + math.sqrt(2))


def run(labels: np.ndarray, **options: Any) -> GrainAnalysis:
    opts = {"resamples": 100, **options}
    return analyze(ArrayLabelmap(labels, CLASSES, MM), GrainOptions(**opts))


def centroids_px(result: GrainAnalysis) -> np.ndarray:
    """(row, col) of each grain's centroid in pixel-centre coordinates."""
    c = result.table.columns
    return np.stack([c["centroid_y_mm"] / MM - 0.5, c["centroid_x_mm"] / MM - 0.5], axis=1)


def brute_feret(mask: np.ndarray) -> tuple[float, float]:
    """(max, min) caliper width of the mask's pixel squares over 3600 directions."""
    padded = np.pad(mask, 1)
    inner = padded[1:-1, 1:-1] & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    ys, xs = np.nonzero(mask & ~inner)
    corners = np.concatenate([np.stack([ys + dy, xs + dx], 1) for dy in (-0.5, 0.5) for dx in (-0.5, 0.5)])
    t = np.radians(np.arange(0, 180, 0.05))
    proj = corners[:, 0:1] * np.sin(t)[None, :] + corners[:, 1:2] * np.cos(t)[None, :]
    widths = proj.max(axis=0) - proj.min(axis=0)
    return float(widths.max()), float(widths.min())


def axial_difference(a: float, b: float) -> float:
    """Difference of two axis directions in degrees (an axis at 90 is the one at -90)."""
    return abs((a - b + 90) % 180 - 90)


# ---------------------------------------------------------------------------------------------
# single grains: sizes and shapes


@pytest.fixture(scope="module")
def disc_field():
    """400 x 400: fourteen discs of radii 5..60 px (three minerals) in a matrix, none touching."""
    rng = np.random.default_rng(7)
    shape = (400, 400)
    radii = [5, 6, 7, 8, 10, 12, 15, 18, 22, 27, 33, 40, 48, 60]
    discs = scatter_discs(shape, [float(r) + float(rng.uniform(0, 0.4)) for r in radii], rng)
    labels = paint_discs(shape, discs)
    return discs, labels, run(labels)


def test_discs_are_counted_per_class(disc_field):
    discs, labels, result = disc_field
    c = result.table.columns
    assert len(result.table) == len(discs)
    for value in (QUARTZ, FELDSPAR, LITHIC):
        expected = sum(d.label == value for d in discs)
        assert int((c["class"] == value).sum()) == expected
        entry = result.summary["classes"][value - 1]
        assert entry["grains"] == entry["grains_measured"] == entry["size"]["count"] == expected
    assert result.summary["classes"][MATRIX - 1]["role"] == "matrix"
    assert result.summary["classes"][MATRIX - 1]["grains"] == 0
    assert not c["touches_edge"].any()


def _grain_areas_add_up(result: GrainAnalysis) -> None:
    """Every pixel of a grain class is in exactly one grain, listed or too small to list."""
    c = result.table.columns
    for value, entry in enumerate(result.summary["classes"], 1):
        if entry["role"] == "matrix":
            continue
        listed = float(c["area_mm2"][c["class"] == value].sum())
        assert listed + entry["small_grain_area_mm2"] == pytest.approx(entry["area_mm2"], rel=1e-9), entry["class"]


def test_grain_areas_add_up_to_the_class_areas(disc_field):
    _grain_areas_add_up(disc_field[2])


def test_disc_sizes_centroids_and_feret_are_exact(disc_field):
    discs, labels, result = disc_field
    c = result.table.columns
    found = centroids_px(result)
    for d in discs:
        i = int(np.argmin(np.hypot(found[:, 0] - d.cy, found[:, 1] - d.cx)))
        mask = disc(labels.shape, d.cy, d.cx, d.r)
        ys, xs = np.nonzero(mask)
        n = int(mask.sum())
        assert c["class"][i] == d.label
        assert c["area_mm2"][i] == pytest.approx(n * MM * MM, rel=1e-12)
        diameter = c["equivalent_diameter_mm"][i] / MM
        assert diameter == pytest.approx(2 * math.sqrt(n / math.pi), rel=1e-9)
        assert c["phi"][i] == pytest.approx(-math.log2(diameter * MM), rel=1e-9)
        if d.r >= 8:
            assert abs(diameter - 2 * d.r) < 0.02 * 2 * d.r
        # centroid: the digital disc's pixel mean exactly, the true centre within half a pixel
        assert found[i] == pytest.approx([ys.mean(), xs.mean()], abs=1e-9)
        assert abs(found[i][0] - d.cy) < 0.5 and abs(found[i][1] - d.cx) < 0.5
        fmax, fmin = c["feret_max_mm"][i] / MM, c["feret_min_mm"][i] / MM
        bmax, bmin = brute_feret(mask)
        assert fmax == pytest.approx(bmax, abs=0.01)
        assert fmin == pytest.approx(bmin, abs=0.02)
        assert abs(fmax - 2 * d.r) < 1.5 and abs(fmin - 2 * d.r) <= 1.0
        assert c["aspect_ratio"][i] == pytest.approx(fmin / fmax, rel=1e-9)
        if d.r >= 20:
            assert c["circularity"][i] > 0.9
            # Crofton perimeter of a digital circle within 3% of 2 pi r
            assert c["perimeter_mm"][i] / MM == pytest.approx(2 * math.pi * d.r, rel=0.03)


@pytest.mark.parametrize("angle", [0, 30, 60, 90, -45])
def test_ellipse_orientation_feret_and_aspect(angle):
    """An ellipse a=40, b=15: orientation counter-clockwise from +x (rows grow down) within 2
    degrees, Feret ~ 2a and 2b, aspect ~ b/a (split off: only the measures are under test)."""
    shape = (200, 200)
    labels = np.full(shape, MATRIX, np.uint8)
    labels[ellipse(shape, 100.3, 99.6, 40, 15, angle)] = QUARTZ
    result = run(labels, split=False)
    c = result.table.columns
    assert len(result.table) == 1
    assert axial_difference(float(c["orientation_deg"][0]), angle) < 2.0
    assert -90 <= c["orientation_deg"][0] <= 90
    fmax, fmin = c["feret_max_mm"][0] / MM, c["feret_min_mm"][0] / MM
    assert abs(fmax - 80) < 1.5 and abs(fmin - 30) < 1.5
    assert c["aspect_ratio"][0] == pytest.approx(15 / 40, abs=0.03)
    unit = dict(GRAIN_COLUMNS)["orientation_deg"]
    assert "counter-clockwise from +x" in unit


# ---------------------------------------------------------------------------------------------
# splitting touching grains of one mineral

CELL = 180


def _pair_sheets(n_sheets: int, seed: int):
    """Sheets of 5 x 5 cells, one touching pair of Quartz discs in each cell."""
    rng = np.random.default_rng(seed)
    shape = (5 * CELL, 5 * CELL)
    for _ in range(n_sheets):
        labels = np.full(shape, MATRIX, np.uint8)
        pairs = []
        for j in range(5):
            for i in range(5):
                r1, r2 = sorted(rng.uniform(10, 40, 2))
                neck = rng.uniform(0.15, 0.55) * r1
                pair = touching_pair(
                    shape, (j + 0.5) * CELL, (i + 0.5) * CELL, r1, r2, neck, float(rng.uniform(-90, 90))
                )
                labels[pair.union] = QUARTZ
                pairs.append(((j, i), pair))
        yield labels, pairs


def test_touching_pairs_of_discs_are_split_in_two():
    split = total = 0
    bad_area = []
    for labels, pairs in _pair_sheets(5, seed=11):
        result = run(labels)
        cells = (centroids_px(result) // CELL).astype(int)
        areas = result.table.columns["area_mm2"] / MM**2
        for (j, i), pair in pairs:
            total += 1
            pieces = np.flatnonzero((cells[:, 0] == j) & (cells[:, 1] == i))
            if len(pieces) != 2:
                continue
            split += 1
            shares = sorted(int(s.sum()) for s in pair.shares)
            got = sorted(float(a) for a in areas[pieces])
            if any(abs(g - s) > 0.10 * s for g, s in zip(got, shares)):
                bad_area.append((pair.radii, pair.neck_half_width, shares, got))
    assert total >= 100
    assert split >= 0.95 * total, f"{split} of {total} pairs split in two"
    assert len(bad_area) <= 0.05 * total, bad_area[:5]


def test_single_ellipses_and_convex_blobs_stay_whole():
    rng = np.random.default_rng(5)
    shape = (5 * CELL, 5 * CELL)
    whole = total = 0
    failures = []
    for sheet in range(4):
        labels = np.full(shape, MATRIX, np.uint8)
        cells = []
        for j in range(5):
            for i in range(5):
                cy, cx = (j + 0.5) * CELL + rng.uniform(-2, 2), (i + 0.5) * CELL + rng.uniform(-2, 2)
                if sheet % 2 == 0:
                    a = float(rng.uniform(12, 60))
                    aspect = float(rng.uniform(1, 3))
                    angle = float(rng.uniform(-90, 90))
                    mask = ellipse(shape, cy, cx, a, a / aspect, angle)
                    what = f"ellipse a={a:.1f} aspect={aspect:.2f} angle={angle:.0f}"
                else:
                    mask = convex_blob(shape, cy, cx, float(rng.uniform(12, 45)), rng)
                    what = "blob"
                labels[mask] = QUARTZ
                cells.append(((j, i), what))
        result = run(labels)
        found = (centroids_px(result) // CELL).astype(int)
        for (j, i), what in cells:
            total += 1
            n = int(((found[:, 0] == j) & (found[:, 1] == i)).sum())
            if n == 1:
                whole += 1
            else:
                failures.append(f"{what}: {n} grains")
    assert total == 100
    assert whole >= 98, failures


def test_a_smooth_ellipse_is_one_grain_at_any_angle():
    """A smooth convex grain has one distance maximum: it must not be cut (a=40, b=15)."""
    shape = (200, 200)
    for angle in (0, 30, 60, 90, -45):
        labels = np.full(shape, MATRIX, np.uint8)
        labels[ellipse(shape, 100, 100, 40, 15, angle)] = QUARTZ
        result = run(labels)
        assert len(result.table) == 1, f"ellipse at {angle} deg cut into {len(result.table)} grains"


def test_wide_touching_pairs_are_split_on_the_coarser_grid_and_wide_grains_stay_whole():
    """Regions of wide grains (mean chord >= 96 px: radii 60-150 here) are sought for seeds on
    every 4th or 8th row and column; they split as the small pairs do, along their chord, and a
    wide single ellipse or blob stays one grain."""
    rng = np.random.default_rng(7)
    cell = 600
    shape = (3 * cell, 3 * cell)
    split = total = 0
    bad = []
    for _ in range(2):
        labels = np.full(shape, MATRIX, np.uint8)
        pairs = []
        for j in range(3):
            for i in range(3):
                r1, r2 = sorted(rng.uniform(60, 150, 2))
                neck = rng.uniform(0.15, 0.55) * r1
                pair = touching_pair(shape, (j + 0.5) * cell, (i + 0.5) * cell, r1, r2, neck, rng.uniform(-90, 90))
                labels[pair.union] = QUARTZ
                pairs.append(((j, i), pair))
        result = run(labels)
        found = (centroids_px(result) // cell).astype(int)
        areas = result.table.columns["area_mm2"] / MM**2
        for (j, i), pair in pairs:
            total += 1
            pieces = np.flatnonzero((found[:, 0] == j) & (found[:, 1] == i))
            if len(pieces) != 2:
                continue
            split += 1
            shares = sorted(int(s.sum()) for s in pair.shares)
            got = sorted(float(a) for a in areas[pieces])
            if any(abs(g - s) > 0.05 * s for g, s in zip(got, shares)):
                bad.append((pair.radii, pair.neck_half_width, shares, got))
        # the cut is the chord, read by Crofton within 10%, though flooded on a coarse grid first
        q = QUARTZ - 1
        chords = sum(2 * p.neck_half_width for _, p in pairs)
        assert np.array(result.summary["contacts"]["length_mm"])[q, q] / MM == pytest.approx(chords, rel=0.10)
    assert split == total == 18
    assert not bad, bad
    for sheet in range(2):
        labels = np.full(shape, MATRIX, np.uint8)
        for j in range(3):
            for i in range(3):
                cy, cx = (j + 0.5) * cell, (i + 0.5) * cell
                if sheet == 0:
                    a = float(rng.uniform(60, 250))
                    mask = ellipse(shape, cy, cx, a, a / float(rng.uniform(1, 3)), float(rng.uniform(-90, 90)))
                else:
                    mask = convex_blob(shape, cy, cx, float(rng.uniform(60, 250)), rng)
                labels[mask] = QUARTZ
        assert len(run(labels).table) == 9


# ---------------------------------------------------------------------------------------------
# contacts


def test_contact_lengths_follow_the_geometry():
    shape = (400, 400)
    labels = np.full(shape, MATRIX, np.uint8)
    r = 60.0
    labels[disc(shape, 100.2, 100.7, r)] = QUARTZ
    labels[220:300, 100:180] = FELDSPAR  # an 80 x 80 square ...
    labels[220:340, 180:260] = LITHIC  # ... sharing its right edge (80 px) with a rectangle
    result = run(labels)
    names = result.summary["contacts"]["classes"]
    assert names == CLASSES.names
    length = np.array(result.summary["contacts"]["length_mm"]) / MM
    assert np.array_equal(length, length.T)
    m, q, f, li = MATRIX - 1, QUARTZ - 1, FELDSPAR - 1, LITHIC - 1
    assert length[q, m] == pytest.approx(2 * math.pi * r, rel=0.03)
    assert length[f, li] == pytest.approx(80, rel=0.06)
    assert length[f, li] == pytest.approx(80 * AXIS_LINE_FACTOR, rel=0.02)
    # the square's other three sides face the matrix, and the rectangle's 2 x (120 + 80) - 80
    assert length[f, m] == pytest.approx(3 * 80 * AXIS_LINE_FACTOR, rel=0.03)
    assert length[li, m] == pytest.approx(320 * AXIS_LINE_FACTOR, rel=0.03)
    assert length[q, f] == length[q, li] == 0.0
    assert np.all(np.diag(length) == 0.0)
    # the matrix's share of the quartz boundary is all of it
    shares = result.summary["contacts"]["share_of_boundary"]
    assert shares[q][m] == pytest.approx(1.0)
    assert shares[f][li] == pytest.approx(80 / (80 + 240), rel=0.02)


@pytest.mark.parametrize("angle", [0, 45])
def test_a_split_between_grains_of_one_mineral_is_their_diagonal_contact(angle):
    """Two equal discs (r=30) whose chord is 24 px: each piece is its disc's side of the chord
    and the contact matrix's diagonal holds the chord (Crofton reads a straight digital line
    within 6% at any angle)."""
    shape = (240, 240)
    labels = np.full(shape, MATRIX, np.uint8)
    pair = touching_pair(shape, 120.3, 119.6, 30, 30, 12, angle)
    labels[pair.union] = QUARTZ
    result = run(labels)
    assert len(result.table) == 2
    areas = sorted(result.table.columns["area_mm2"] / MM**2)
    assert areas == pytest.approx(sorted(int(s.sum()) for s in pair.shares), rel=0.02)
    length = np.array(result.summary["contacts"]["length_mm"]) / MM
    q = QUARTZ - 1
    assert length[q, q] == pytest.approx(2 * pair.neck_half_width, rel=0.10)
    not_split = run(labels, split=False)
    assert len(not_split.table) == 1
    assert np.array(not_split.summary["contacts"]["length_mm"])[q, q] == 0.0


# ---------------------------------------------------------------------------------------------
# bands and workers


def _band_field() -> tuple[np.ndarray, np.ndarray, int]:
    """1200 x 400: scattered discs, six touching pairs across band boundaries and one ellipse
    700 rows tall, none touching another; returns (labels, the tall ellipse, the grains there are)."""
    rng = np.random.default_rng(3)
    shape = (1200, 400)
    pairs = [(128.0 + 192 * k, 70.0 if k % 2 else 330.0) for k in range(6)]
    discs = [
        d
        for d in scatter_discs(shape, [float(v) for v in rng.uniform(4, 25, 110)], rng, gap=1.0)
        if abs(d.cx - 200) > d.r + 50 and all(math.hypot(d.cy - y, d.cx - x) > d.r + 60 for y, x in pairs)
    ]
    labels = paint_discs(shape, discs)
    tall = ellipse(shape, 600.5, 200.2, 350, 30, 88)
    labels[tall] = LITHIC
    for k, (y, x) in enumerate(pairs):
        labels[touching_pair(shape, y, x, 25, 30, 8, 30 * k).union] = QUARTZ
    return labels, tall, len(discs) + 2 * len(pairs) + 1


def _same(a: GrainAnalysis, b: GrainAnalysis) -> None:
    assert set(a.table.columns) == set(b.table.columns)
    for name, values in a.table.columns.items():
        assert np.array_equal(values, b.table.columns[name], equal_nan=values.dtype.kind == "f"), name
    assert len(a.table.neighbours) == len(b.table.neighbours)
    for x, y in zip(a.table.neighbours, b.table.neighbours):
        assert np.array_equal(x, y)
    assert a.table.csv_text() == b.table.csv_text()
    _same_json(a.summary, b.summary, "summary")


def _same_json(x: object, y: object, where: str) -> None:
    """Equal JSON trees; floats equal to 1e-12 (sums of the bands' shares in another order)."""
    if isinstance(x, dict) and isinstance(y, dict):
        assert sorted(x) == sorted(y), where
        for k in x:
            _same_json(x[k], y[k], f"{where}.{k}")
    elif isinstance(x, list) and isinstance(y, list):
        assert len(x) == len(y), where
        for i, (u, v) in enumerate(zip(x, y)):
            _same_json(u, v, f"{where}[{i}]")
    elif isinstance(x, float) and isinstance(y, float):
        assert x == pytest.approx(y, rel=1e-12, abs=1e-15, nan_ok=True), where
    else:
        assert x == y, where


def test_bands_and_workers_give_identical_results():
    labels, tall, n_grains = _band_field()
    one = run(labels)
    banded = run(labels, band_pixels=400 * 64)
    assert one.scan.halo_growths == 0
    assert banded.scan.halo_growths >= 2  # the tall grain needs halos of 512 and 1024 rows
    assert banded.scan.cut_bands == 0
    _same(one, banded)
    assert len(one.table) == n_grains and one.scan.split_regions == 6
    # the tall grain: measured once, whole
    c = one.table.columns
    at_centre = np.hypot(c["centroid_y_mm"] / MM - 600.5, c["centroid_x_mm"] / MM - 200.2) < 1.0
    tall_rows = np.flatnonzero((c["class"] == LITHIC) & at_centre)
    assert len(tall_rows) == 1
    assert c["area_mm2"][tall_rows[0]] / MM**2 == pytest.approx(int(tall.sum()), abs=1e-6)
    two = run(labels, band_pixels=400 * 64, workers=2)
    _same(one, two)


def test_a_winding_grain_crossing_every_band_is_measured_once_and_whole():
    """A serpentine grain runs from the top to the bottom of the section through every band,
    with discs of another mineral touching it. Unsplit, it is listed once and whole, and its
    neighbours list it; split (its corners are domes), its pieces are alike. Any band size and
    worker count give the same table."""
    shape = (1600, 300)
    labels = np.full(shape, MATRIX, np.uint8)
    snake = np.zeros(shape, bool)
    for k, y in enumerate(range(10, 1590, 60)):
        snake[y : y + 12, 20:280] = True  # rungs ...
        x = 20 if k % 2 else 268
        snake[y : min(y + 72, 1590), x : x + 12] = True  # ... joined at alternate ends
    labels[snake] = LITHIC
    touching = [(46.0, 150.0), (466.0, 90.0), (886.0, 210.0), (1306.0, 150.0)]
    for y, x in touching:
        labels[disc(shape, y, x, 26) & ~snake] = FELDSPAR  # between two rungs, touching both
    one = run(labels, split=False)
    lithic = np.flatnonzero(one.table.columns["class"] == LITHIC)
    assert len(lithic) == 1
    assert one.table.columns["area_mm2"][lithic[0]] / MM**2 == pytest.approx(int(snake.sum()), abs=1e-6)
    feldspar = np.flatnonzero(one.table.columns["class"] == FELDSPAR)
    assert len(feldspar) == len(touching)
    for g in feldspar:
        assert lithic[0] in {int(n) for n in one.table.neighbours[g]}
        assert g in {int(n) for n in one.table.neighbours[lithic[0]]}
    _same(one, run(labels, split=False, band_pixels=300 * 64))
    whole = run(labels)
    assert whole.scan.split_regions == 1
    pieces = whole.table.columns["class"] == LITHIC
    assert pieces.sum() > 1
    assert whole.table.columns["area_mm2"][pieces].sum() / MM**2 == pytest.approx(int(snake.sum()), abs=1e-6)
    for band_rows in (64, 130, 400):
        banded = run(labels, band_pixels=300 * band_rows)
        assert banded.scan.cut_bands == 0
        _same(whole, banded)
    _same(whole, run(labels, band_pixels=300 * 64, workers=2))


def test_regions_are_the_connected_components_of_each_class():
    """The run-based labelling gives, class by class, the partition scipy's `label` gives
    (4-connected), with each region's box, pixel count and first pixel; other classes are one
    cell each."""
    from scipy import ndimage as ndi  # deferred: the reference labelling only

    from thinseg.analysis.band_grains import label_cells  # deferred: an inner function of the analysis

    rng = np.random.default_rng(12)
    is_grain = np.zeros(256, bool)
    is_grain[[2, 3, 4]] = True
    for shape in ((1, 1), (1, 37), (41, 1), (60, 80), (123, 97)):
        labels = rng.integers(0, 5, shape).astype(np.uint8)
        labels[rng.random(shape) < 0.5] = 3  # larger regions too
        cells, runs = label_cells(labels, is_grain)
        image = runs.paint(shape[0], shape[1])
        n_cells = 0
        for value in range(1, 5):
            where = labels == value
            if not where.any():
                continue
            ours = image[where]
            assert np.all(cells.cls[ours - 1] == value)
            if not is_grain[value]:
                assert np.unique(ours).size == 1
                n_cells += 1
                continue
            reference, n = ndi.label(where)
            pairs = np.unique(np.stack([ours, reference[where]], axis=1), axis=0)
            assert len(pairs) == n == np.unique(ours).size  # one to one
            n_cells += n
            for cell, region in pairs:
                box = ndi.find_objects((reference == region).astype(np.uint8))[0]
                assert list(cells.box[cell - 1]) == [box[0].start, box[0].stop, box[1].start, box[1].stop]
                assert cells.area[cell - 1] == np.count_nonzero(reference == region)
                assert cells.first[cell - 1] == np.flatnonzero(reference.ravel() == region)[0]
        assert cells.count == n_cells
        assert np.all(image[labels == 0] == 0)


def test_a_grain_taller_than_the_largest_read_is_flagged_as_cut():
    shape = (600, 60)
    labels = np.full(shape, MATRIX, np.uint8)
    labels[20:580, 20:40] = QUARTZ
    result = run(labels, band_pixels=60 * 64, max_read_pixels=60 * 400)  # reads of 400 rows at most
    assert result.scan.cut_bands >= 1 and result.summary["notes"]
    assert result.table.columns["touches_edge"].all()
    assert result.summary["grains"]["measured"] == 0


# ---------------------------------------------------------------------------------------------
# edges and neighbours


def test_edge_grains_are_flagged_and_left_out_of_size_statistics():
    shape = (300, 300)
    rng = np.random.default_rng(2)
    inner = scatter_discs(shape, [12.0] * 10, rng, gap=4, margin=35)
    edge = [(0.0, 150.0, 20.0), (150.0, 299.0, 15.0), (299.0, 10.0, 25.0), (100.0, 0.4, 10.0)]
    labels = paint_discs(shape, inner)
    for cy, cx, r in edge:
        labels[disc(shape, cy, cx, r)] = QUARTZ
    result = run(labels)
    c = result.table.columns
    found = centroids_px(result)
    assert len(result.table) == len(inner) + len(edge)
    at_edge = np.array([min(y, x, shape[0] - 1 - y, shape[1] - 1 - x) < 30 for y, x in found])
    assert np.array_equal(c["touches_edge"].astype(bool), at_edge)
    quartz = result.summary["classes"][QUARTZ - 1]
    n_inner_quartz = sum(d.label == QUARTZ for d in inner)
    assert quartz["grains"] == n_inner_quartz + len(edge)
    assert quartz["grains_at_edge"] == len(edge)
    assert quartz["grains_measured"] == quartz["size"]["count"] == n_inner_quartz
    assert result.summary["grains"]["measured"] == result.summary["grains"]["size"]["count"] == len(inner)
    assert result.summary["grains"]["at_edge"] == len(edge)


def test_neighbours_are_the_rectangles_sharing_an_edge():
    shape = (260, 300)
    labels, cell = rectangle_mosaic(shape, np.random.default_rng(4))
    result = run(labels, matrix_classes=("none",))
    rows, cols = 6, 7
    assert len(result.table) == rows * cols
    found = centroids_px(result).round().astype(int)
    cell_of = cell[found[:, 0], found[:, 1]]
    assert sorted(cell_of) == list(range(rows * cols))
    grain_of = {int(k): g for g, k in enumerate(cell_of)}
    for g, k in enumerate(cell_of):
        j, i = divmod(int(k), cols)
        expected = {
            grain_of[jj * cols + ii]
            for jj, ii in ((j - 1, i), (j + 1, i), (j, i - 1), (j, i + 1))
            if 0 <= jj < rows and 0 <= ii < cols
        }
        got = {int(n) for n in result.table.neighbours[g]}
        assert got == expected, (j, i)
        for n in got:
            assert g in {int(v) for v in result.table.neighbours[n]}
    text = result.table.csv_text().splitlines()
    first = text[1].split(",")
    assert first[-1] == ";".join(str(n + 1) for n in result.table.neighbours[0])


# ---------------------------------------------------------------------------------------------
# size statistics and the modal mineralogy


def test_folk_ward_measures_by_hand():
    """phi = 1..21: percentiles by linear interpolation are p5=2, p16=4.2, p25=6, p50=11,
    p75=16, p84=17.8, p95=20."""
    fw = folk_ward(np.arange(1, 22, dtype=float)[::-1])
    assert fw is not None
    assert fw["percentiles_phi"] == pytest.approx(
        {"5": 2.0, "16": 4.2, "25": 6.0, "50": 11.0, "75": 16.0, "84": 17.8, "95": 20.0}
    )
    assert fw["mean_phi"] == pytest.approx(11.0)
    assert fw["mean_mm"] == pytest.approx(2.0**-11)
    assert fw["sorting_phi"] == pytest.approx(13.6 / 4 + 18 / 6.6)
    assert fw["skewness"] == pytest.approx(0.0, abs=1e-12)
    assert fw["kurtosis"] == pytest.approx(18 / (2.44 * 10))
    assert (fw["sorting"], fw["skewness_words"], fw["kurtosis_words"]) == (
        "extremely poorly sorted",
        "symmetrical",
        "platykurtic",
    )
    assert folk_ward([2.0]) is None


def test_folk_ward_of_a_normal_phi_sample():
    rng = np.random.default_rng(0)
    fw = folk_ward(rng.normal(2.0, 0.5, 40_000))
    assert fw is not None
    assert fw["mean_phi"] == pytest.approx(2.0, abs=0.01)
    assert fw["sorting_phi"] == pytest.approx(0.5, abs=0.01)
    assert fw["skewness"] == pytest.approx(0.0, abs=0.02)
    assert fw["kurtosis"] == pytest.approx(1.0, abs=0.03)
    assert fw["sorting"] == "well sorted" and fw["kurtosis_words"] == "mesokurtic"
    assert fw["mean_class"] == "medium sand"  # 2 phi = 0.25 mm
    # a tail of fine grains (large phi) skews to the fine side
    fine_tail = folk_ward(rng.exponential(1.0, 20_000))
    assert fine_tail is not None and fine_tail["skewness"] > 0.1


@pytest.mark.parametrize(
    ("mm", "name"),
    [
        (0.001, "clay"),
        (1 / 256, "silt"),
        (0.0624, "silt"),
        (0.0625, "very fine sand"),
        (0.125, "fine sand"),
        (0.2499, "fine sand"),
        (0.25, "medium sand"),
        (0.5, "coarse sand"),
        (1.0, "very coarse sand"),
        (2.0, "granule"),
        (4.0, "pebble"),
        (64.0, "cobble"),
        (256.0, "boulder"),
    ],
)
def test_wentworth_class_boundaries(mm, name):
    assert wentworth_class(mm) == name


def test_size_distribution_counts_and_phi_histogram():
    d = np.array([0.07, 0.07, 0.2, 0.3, 0.6])
    out = size_distribution(d)
    assert out["count"] == 5
    assert out["wentworth"] == {"very fine sand": 2, "fine sand": 1, "medium sand": 1, "coarse sand": 1}
    hist = out["histogram"]
    assert sum(hist["counts"]) == 5 and hist["cumulative_percent"][-1] == pytest.approx(100.0)
    edges = np.array(hist["phi_edges"])
    assert np.allclose(np.diff(edges), 0.5)
    assert edges[0] <= -math.log2(0.6) and edges[-1] >= -math.log2(0.07)
    assert out["median_mm"] == pytest.approx(0.2)


def _texture(shape: tuple[int, int], seed: int) -> np.ndarray:
    """Classes drawn per 4 x 4 cell (Matrix 60%, Quartz 25%, Feldspar 15%), some unclassified."""
    rng = np.random.default_rng(seed)
    cells = rng.choice([MATRIX, QUARTZ, FELDSPAR], size=(shape[0] // 4, shape[1] // 4), p=[0.6, 0.25, 0.15])
    labels = np.kron(cells, np.ones((4, 4), np.uint8)).astype(np.uint8)
    labels[:8, :8] = 0
    return labels


def test_modal_percentages_are_the_pixel_counts_and_intervals_narrow_with_more_blocks():
    small = _texture((256, 256), 1)
    result = run(small, resamples=400)
    counts = np.bincount(small.ravel(), minlength=len(CLASSES) + 1)
    classified = counts[1:].sum()
    assert result.summary["section"]["not_classified_area_mm2"] == pytest.approx(64 * MM * MM)
    widths_small = []
    for value, entry in enumerate(result.summary["classes"], 1):
        assert entry["area_percent"] == 100 * counts[value] / classified
        assert entry["area_mm2"] == pytest.approx(counts[value] * MM * MM)
        if counts[value]:
            lo, hi = entry["area_percent_interval"]
            assert lo <= entry["area_percent"] <= hi
            widths_small.append(hi - lo)
    assert sum(e["area_percent"] for e in result.summary["classes"]) == pytest.approx(100.0)
    large = run(_texture((256, 1024), 2), resamples=400)  # 16 x 64 blocks instead of 16 x 16
    assert (
        large.summary["settings"]["modal_interval"]["blocks"]
        == 4 * result.summary["settings"]["modal_interval"]["blocks"]
    )
    widths_large = [
        e["area_percent_interval"][1] - e["area_percent_interval"][0]
        for e in large.summary["classes"]
        if e["area_percent"]
    ]
    assert all(wl < 0.7 * ws for wl, ws in zip(widths_large, widths_small)), (widths_small, widths_large)


# ---------------------------------------------------------------------------------------------
# a real mask


def test_real_sandstone_mask_modal_percentages_and_determinism():
    paths = real_field("10a")
    import tifffile

    codes = tifffile.imread(paths["mask"])
    source = open_labelmap(paths["mask"], classes=REAL_CLASSES, mm_per_pixel=0.002)
    options = GrainOptions(resamples=200)
    first = analyze(source, options)
    names = [e["class"] for e in first.summary["classes"]]
    assert names == ["Matrix", "K-feldspar", "Lithic fragments", "Plagioclase", "Quartz"]
    counts = np.bincount(codes.ravel(), minlength=5)  # code k is class k + 1
    for code, entry in enumerate(first.summary["classes"]):
        assert entry["area_percent"] == pytest.approx(100 * counts[code] / codes.size, rel=1e-12)
    assert first.summary["settings"]["matrix_classes"] == ["Matrix"]
    _grain_areas_add_up(first)
    second = analyze(open_labelmap(paths["mask"], classes=REAL_CLASSES, mm_per_pixel=0.002), options)
    _same(first, second)


@pytest.mark.parametrize("field", ["2a", "10a"])
def test_real_mask_tables_do_not_depend_on_the_bands(field):
    """Real grain-supported rock, where touching grains of one mineral chain into regions that
    cross many bands and regions next to a band's own are split by more than one band: thin
    bands (64 rows) and two workers give the one-band tables and summary, the count of split
    regions included."""
    source = open_labelmap(real_field(field)["mask"], classes=REAL_CLASSES, mm_per_pixel=0.002)
    options = {"resamples": 50}
    one = analyze(source, GrainOptions(**options))
    assert one.scan.split_regions > 0
    width = source.shape[1]
    banded = analyze(source, GrainOptions(band_pixels=width * 64, **options))
    assert banded.scan.halo_growths > 0 and banded.scan.cut_bands == 0
    _same(one, banded)
    _same(one, analyze(source, GrainOptions(band_pixels=width * 100, workers=2, **options)))
