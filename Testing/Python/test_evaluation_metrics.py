"""Confusion matrices and scores: hand-computed cases, dataset-wide accumulation, edge cases."""

import math

import numpy as np
import pytest

from thinseg.classes.table import ClassTable
from thinseg.errors import ThinSegError
from thinseg.metrics import ConfusionAccumulator, metrics_from_confusion

TABLE = ClassTable.from_names_colors(["A", "B", "C", "D"], ["#ff0000", "#00ff00", "#0000ff", "#ffff00"])

# truth 0 = no truth (2 pixels, never counted); prediction 0 = left unclassified (an error)
TRUTH = np.array([[1, 1, 1, 2], [1, 1, 2, 2], [3, 3, 2, 2], [0, 0, 3, 3]], np.uint8)
PRED = np.array([[1, 1, 2, 2], [1, 3, 2, 2], [3, 3, 2, 0], [1, 0, 3, 2]], np.uint8)


def confusion(truth, pred, mask=None, n=4):
    acc = ConfusionAccumulator(n)
    acc.update(truth, pred, mask)
    return acc


def test_hand_computed_confusion_matrix():
    acc = confusion(TRUTH, PRED)
    expected = np.zeros((5, 5), np.int64)
    expected[1, [0, 1, 2, 3]] = [0, 3, 1, 1]
    expected[2, [0, 1, 2, 3]] = [1, 0, 4, 0]
    expected[3, [0, 1, 2, 3]] = [0, 0, 1, 3]
    assert np.array_equal(acc.matrix, expected)
    assert acc.matrix.dtype == np.int64
    assert acc.unlabelled_pixels == 2 and acc.evaluated_pixels == 14


def test_hand_computed_scores():
    m = metrics_from_confusion(confusion(TRUTH, PRED).matrix, TABLE)
    # A: TP 3 FP 0 FN 2 (the 1 predicted on truth 0 is not counted)
    # B: TP 4 FP 2 FN 1 (the unclassified pixel)   C: TP 3 FP 1 FN 1   D: absent
    assert np.allclose(m.precision[:3], [1.0, 4 / 6, 3 / 4])
    assert np.allclose(m.recall[:3], [3 / 5, 4 / 5, 3 / 4])
    assert np.allclose(m.f1[:3], [6 / 8, 8 / 11, 6 / 8])
    assert np.allclose(m.iou[:3], [3 / 5, 4 / 7, 3 / 5])
    assert all(math.isnan(v) for v in (m.iou[3], m.f1[3], m.precision[3], m.recall[3]))
    assert m.mean_iou == pytest.approx((3 / 5 + 4 / 7 + 3 / 5) / 3)  # D left out, not counted as 1
    assert m.mean_f1 == pytest.approx((6 / 8 + 8 / 11 + 6 / 8) / 3)
    assert m.pixel_accuracy == pytest.approx(10 / 14)
    assert list(m.support) == [5, 5, 4, 0] and list(m.predicted) == [3, 6, 4, 0]
    assert m.unclassified_predictions == 1 and m.evaluated_pixels == 14
    assert list(m.present) == [True, True, True, False]


def test_mean_iou_leaves_out_absent_classes_but_keeps_predicted_only_ones():
    truth = np.array([[1, 1], [2, 2]], np.uint8)
    m = metrics_from_confusion(confusion(truth, truth).matrix, TABLE)
    assert m.mean_iou == 1.0  # C and D absent from both: not averaged in as 0 or 1
    pred = np.array([[1, 3], [2, 2]], np.uint8)  # C only predicted: IoU 0, counted
    m = metrics_from_confusion(confusion(truth, pred).matrix, TABLE)
    assert m.iou[2] == 0.0 and m.present[2]
    assert m.mean_iou == pytest.approx((1 / 2 + 1 + 0) / 3)


def test_perfect_prediction_scores_one_for_every_present_class():
    truth = TRUTH.copy()
    m = metrics_from_confusion(confusion(truth, truth).matrix, TABLE)
    assert np.all(m.iou[:3] == 1.0) and np.all(m.f1[:3] == 1.0)
    assert m.mean_iou == 1.0 and m.pixel_accuracy == 1.0
    assert math.isnan(m.iou[3])


def test_accumulation_is_over_pixels_not_an_average_of_images():
    big_t = np.ones((2, 50), np.uint8)
    big_p = big_t.copy()  # 100 pixels, all right
    small_t = np.full((2, 2), 2, np.uint8)
    small_p = np.ones((2, 2), np.uint8)  # 4 pixels, all wrong
    acc = ConfusionAccumulator(4)
    acc.update(big_t, big_p)
    acc.update(small_t, small_p)
    whole = confusion(np.hstack([big_t, small_t]), np.hstack([big_p, small_p]))
    assert np.array_equal(acc.matrix, whole.matrix)
    pooled = metrics_from_confusion(acc.matrix, TABLE).pixel_accuracy
    per_image = [
        metrics_from_confusion(confusion(t, p).matrix, TABLE).pixel_accuracy
        for t, p in ((big_t, big_p), (small_t, small_p))
    ]
    assert pooled == pytest.approx(100 / 104)
    assert np.mean(per_image) == pytest.approx(0.5)  # what a per-image average would have said


def test_merge_equals_updating_one_accumulator_and_tiles_equal_the_whole():
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 5, (30, 40)).astype(np.uint8)
    pred = rng.integers(0, 5, (30, 40)).astype(np.uint8)
    mask = rng.random((30, 40)) > 0.3
    whole = confusion(truth, pred, mask)
    tiles = ConfusionAccumulator(4)
    for y in range(0, 30, 16):
        for x in range(0, 40, 16):
            part = ConfusionAccumulator(4)
            part.update(truth[y : y + 16, x : x + 16], pred[y : y + 16, x : x + 16], mask[y : y + 16, x : x + 16])
            tiles.merge(part)
    assert np.array_equal(tiles.matrix, whole.matrix)
    assert (tiles.excluded_pixels, tiles.unlabelled_pixels) == (whole.excluded_pixels, whole.unlabelled_pixels)


def test_bad_inputs_are_user_errors():
    acc = ConfusionAccumulator(4)
    with pytest.raises(ThinSegError, match="outside the class table"):
        acc.update(TRUTH, np.full_like(PRED, 5))
    with pytest.raises(ThinSegError, match="differ in size"):
        acc.update(TRUTH, PRED[:, :3])
    with pytest.raises(ValueError):
        metrics_from_confusion(np.zeros((3, 3)), TABLE)
    assert acc.evaluated_pixels == 0  # nothing half-counted


def test_empty_confusion_gives_undefined_scores_not_zero():
    m = metrics_from_confusion(np.zeros((5, 5), np.int64), TABLE)
    assert math.isnan(m.mean_iou) and math.isnan(m.pixel_accuracy) and m.evaluated_pixels == 0
