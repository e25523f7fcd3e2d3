"""Void borders: which pixels are left out, and that left-out pixels are neither right nor wrong."""

import numpy as np
import pytest

from thinseg.classes.table import ClassTable
from thinseg.metrics import ConfusionAccumulator, Evaluator, metrics_from_confusion, void_border_mask

TABLE = ClassTable.from_names_colors(["A", "B", "C"], ["#ff0000", "#00ff00", "#0000ff"])

# two classes meeting along a vertical line, one row of no truth at the bottom
TRUTH = np.array(
    [
        [1, 1, 1, 2, 2, 2],
        [1, 1, 1, 2, 2, 2],
        [1, 1, 1, 2, 2, 2],
        [0, 0, 0, 0, 0, 0],
    ],
    np.uint8,
)


def test_hand_checked_mask_width_1():
    expected = np.array(
        [
            [1, 1, 0, 0, 1, 1],
            [1, 1, 0, 0, 1, 1],
            [1, 1, 0, 0, 1, 1],
            [0, 0, 0, 0, 0, 0],  # no truth: never kept
        ],
        bool,
    )
    assert np.array_equal(void_border_mask(TRUTH, 1), expected)


def test_unlabelled_edge_is_a_boundary_only_when_asked():
    keep = void_border_mask(TRUTH, 1, unlabelled_is_boundary=True)
    assert not keep[2].any()  # the row touching the no-truth row goes too
    assert np.array_equal(keep[:2], void_border_mask(TRUTH, 1)[:2])


def test_width_0_keeps_every_labelled_pixel_and_width_2_takes_two_each_side():
    assert np.array_equal(void_border_mask(TRUTH, 0), TRUTH != 0)
    keep = void_border_mask(TRUTH, 2)
    assert np.array_equal(keep[0], [1, 0, 0, 0, 0, 1])


def test_distance_is_euclidean_and_counts_across_a_gap_of_no_truth():
    corner = np.array([[1, 1, 1], [1, 1, 1], [1, 1, 2]], np.uint8)
    assert void_border_mask(corner, 1)[1, 1]  # diagonal neighbour: sqrt(2) away
    assert not void_border_mask(corner, 1.5)[1, 1]
    gap = np.array([[1, 0, 2]], np.uint8)
    assert np.array_equal(void_border_mask(gap, 1), [[True, False, True]])  # 2 px apart
    assert np.array_equal(void_border_mask(gap, 2), [[False, False, False]])


def brute_force(truth, width, unlabelled_is_boundary):
    """The definition, literally: another class (or 0 if asked) within Euclidean distance `width`."""
    h, w = truth.shape
    keep = truth != 0
    r = int(width)
    for y, x in zip(*np.nonzero(truth)):
        for dy in range(-r, r + 1):
            for dx in range(-r, r + 1):
                yy, xx = y + dy, x + dx
                if dy * dy + dx * dx <= width * width and 0 <= yy < h and 0 <= xx < w:
                    v = truth[yy, xx]
                    if v != truth[y, x] and (v != 0 or unlabelled_is_boundary):
                        keep[y, x] = False
    return keep


@pytest.mark.parametrize("width", [1, 1.5, 2, 3.2])
@pytest.mark.parametrize("unlabelled", [False, True])
def test_mask_matches_the_definition_and_does_not_depend_on_bands(width, unlabelled):
    rng = np.random.default_rng(int(width * 10) + unlabelled)
    truth = np.kron(rng.integers(0, 4, (5, 5)), np.ones((3, 4), int)).astype(np.uint8)
    expected = brute_force(truth, width, unlabelled)
    for band_rows in (2048, 5, 1):
        assert np.array_equal(void_border_mask(truth, width, unlabelled, band_rows=band_rows), expected)


def test_excluded_pixels_count_neither_as_right_nor_as_wrong():
    pred = TRUTH.copy()
    pred[:3, 3] = 1  # registration-like error on the boundary
    pred[0, 0] = 2  # one error away from it
    keep = void_border_mask(TRUTH, 1)
    everything, kept = ConfusionAccumulator(3), ConfusionAccumulator(3)
    everything.update(TRUTH, pred)
    kept.update(TRUTH, pred, keep)
    assert metrics_from_confusion(everything.matrix, TABLE).pixel_accuracy == pytest.approx(14 / 18)
    # 12 pixels kept, 1 wrong: accuracy on kept pixels only (not (11 + 6 excluded) / 18)
    assert metrics_from_confusion(kept.matrix, TABLE).pixel_accuracy == pytest.approx(11 / 12)
    assert kept.evaluated_pixels == 12 and kept.excluded_pixels == 6 and kept.unlabelled_pixels == 6


def test_evaluator_reports_both_figures_and_the_excluded_count():
    pred = TRUTH.copy()
    pred[:3, 3] = 1
    evaluator = Evaluator(TABLE, void_border_px=1)
    evaluator.add_section("s", TRUTH, pred)
    report = evaluator.report("m")
    assert report.metrics.pixel_accuracy == pytest.approx(15 / 18)
    assert report.metrics_void_excluded.pixel_accuracy == 1.0  # the boundary error is excused
    assert report.void_border_pixels == 6
    no_borders = Evaluator(TABLE)
    no_borders.add_section("s", TRUTH, pred)
    assert no_borders.report().metrics_void_excluded is None
