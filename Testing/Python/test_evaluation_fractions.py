"""Mineral fractions and their agreement (R^2 against the 1:1 line, RMSE)."""

import math

import numpy as np
import pytest

from thinseg.metrics import ConfusionAccumulator, area_fractions, fraction_agreement, fractions_from_confusion


def test_area_fractions_are_of_classified_pixels():
    labels = np.array([[1, 1, 2, 0], [3, 1, 0, 0]], np.uint8)
    assert np.allclose(area_fractions(labels, 3), [3 / 5, 1 / 5, 1 / 5])
    mask = np.array([[1, 1, 1, 1], [0, 0, 0, 0]], bool)
    assert np.allclose(area_fractions(labels, 3, mask), [2 / 3, 1 / 3, 0])
    assert np.isnan(area_fractions(np.zeros((2, 2), np.uint8), 3)).all()


def test_section_fractions_from_confusion_use_the_pixels_with_truth():
    rng = np.random.default_rng(5)
    truth = rng.integers(0, 4, (20, 30)).astype(np.uint8)
    pred = rng.integers(0, 4, (20, 30)).astype(np.uint8)
    acc = ConfusionAccumulator(3)
    acc.update(truth, pred)
    true_f, pred_f = fractions_from_confusion(acc.matrix)
    assert np.allclose(true_f, area_fractions(truth, 3))
    assert np.allclose(pred_f, area_fractions(pred, 3, truth != 0))


def test_hand_computed_r2_and_rmse():
    true = np.array([[0.1, 0.3, 0.6], [0.4, 0.4, 0.2]])
    pred = np.array([[0.2, 0.3, 0.5], [0.3, 0.5, 0.2]])
    stats = fraction_agreement(true, pred, ["a", "b", "c"])
    # per class: 1 - SS_res / SS_tot = 1 - .02/.045, 1 - .01/.005, 1 - .01/.08
    assert np.allclose(stats.r2, [5 / 9, -1.0, 0.875])
    # overall, pooled over 6 pairs with one mean (1/3): SS_tot = 138/900, SS_res = .04
    assert stats.r2_overall == pytest.approx(1 - 0.04 / (138 / 900))
    assert np.allclose(stats.rmse, [0.1, math.sqrt(0.005), math.sqrt(0.005)])
    assert stats.rmse_overall == pytest.approx(math.sqrt(0.04 / 6))
    assert np.allclose(stats.bias, [0.0, 0.05, -0.05])
    assert stats.n_sections == 2


def test_r2_is_one_for_identical_and_negative_for_anti_correlated_fractions():
    true = np.array([[0.2, 0.8], [0.5, 0.5], [0.7, 0.3]])
    same = fraction_agreement(true, true.copy())
    assert np.allclose(same.r2, 1.0) and same.r2_overall == 1.0 and same.rmse_overall == 0.0
    anti = fraction_agreement(np.array([[0.2, 0.8], [0.8, 0.2]]), np.array([[0.8, 0.2], [0.2, 0.8]]))
    assert np.allclose(anti.r2, -3.0) and anti.r2_overall == pytest.approx(-3.0)


def test_undefined_cases_are_nan_and_empty_sections_are_left_out():
    one = fraction_agreement(np.array([[0.5, 0.5]]), np.array([[0.4, 0.6]]))
    assert np.isnan(one.r2).all()  # one section: the truth does not vary per class
    true = np.array([[0.2, 0.8], [np.nan, np.nan], [0.6, 0.4]])
    pred = np.array([[0.2, 0.8], [0.5, 0.5], [0.6, 0.4]])
    stats = fraction_agreement(true, pred)
    assert stats.n_sections == 2 and np.allclose(stats.r2, 1.0)
