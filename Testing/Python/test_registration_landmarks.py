"""Landmark registration: exact fits, residuals, outlier flags, bad landmarks, landmark files."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from thinseg.errors import ThinSegError
from thinseg.registration import Geometry, fit_landmarks, read_landmarks
from thinseg.registration.sitk_transforms import map_points_mm

GEOMETRY = Geometry((1200, 1600), 0.00132, (400, 420), 0.01)


def _similarity(points: np.ndarray, angle_deg: float = 4.0, scale: float = 1.05, shift=(12.0, -7.0)) -> np.ndarray:
    """Image px -> QEMSCAN px under a known similarity (about the nominal 1/7.6 scale)."""
    a = math.radians(angle_deg)
    s = scale * GEOMETRY.image_mm_per_pixel / GEOMETRY.qemscan_mm_per_pixel
    r = s * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return points @ r.T + np.array([90.0, 60.0]) + np.array(shift)


def _affine(points: np.ndarray) -> np.ndarray:
    m = np.array([[0.14, 0.01], [-0.006, 0.125]])
    return points @ m.T + np.array([80.0, 50.0])


def _tps_truth(points: np.ndarray) -> np.ndarray:
    """A smooth non-affine map: affine plus a gentle bulge."""
    base = _affine(points)
    bump = 1.5 * np.sin(points[:, 0] / 500.0)[:, None] * np.array([[1.0, 0.5]])
    return base + bump


RNG = np.random.default_rng(3)
IMAGE_PTS = np.column_stack([RNG.uniform(100, 1500, 7), RNG.uniform(100, 1100, 7)])


@pytest.mark.parametrize("kind,truth", [("similarity", _similarity), ("affine", _affine), ("tps", _tps_truth)])
def test_noise_free_pairs_are_fitted_exactly(kind, truth):
    qemscan = truth(IMAGE_PTS)
    fit = fit_landmarks(qemscan, IMAGE_PTS, GEOMETRY, kind)
    assert fit.residuals_px.max() < 1e-6
    assert fit.outliers == []
    # the ITK transform (what resampling uses) sends every clicked image point onto its QEMSCAN click
    mapped = fit.transform.map_image_px(IMAGE_PTS)
    assert np.abs(mapped - qemscan).max() < (1e-6 if kind != "tps" else 0.02)
    if kind != "tps":  # a linear truth is recovered everywhere, not only at the landmarks
        probe = np.array([[0.0, 0.0], [1599.0, 1199.0], [800.0, 30.0]])
        assert np.abs(fit.transform.map_image_px(probe) - truth(probe)).max() < 1e-6


def test_tps_field_matches_the_analytic_spline_between_landmarks():
    qemscan = _tps_truth(IMAGE_PTS)
    fit = fit_landmarks(qemscan, IMAGE_PTS, GEOMETRY, "tps")
    from thinseg.registration.tps import ThinPlateSpline

    spline = ThinPlateSpline.fit(IMAGE_PTS, qemscan)
    probe = np.column_stack([RNG.uniform(0, 1599, 200), RNG.uniform(0, 1199, 200)])
    assert np.abs(fit.transform.map_image_px(probe) - spline(probe)).max() < 0.01  # QEMSCAN px


def test_one_wrong_click_is_flagged_and_named():
    qemscan = _similarity(IMAGE_PTS[:6]) + RNG.normal(0, 0.2, (6, 2))
    image = IMAGE_PTS[:6].copy()
    image[2] += (60.0, -45.0)  # clicked on the wrong grain, 75 image px off
    fit = fit_landmarks(qemscan, image, GEOMETRY, "similarity", names=[f"P{i}" for i in range(6)])
    assert fit.outliers == [2]
    assert fit.loo_px[2] > 60
    assert int(np.argmax(fit.residuals_px)) == 2
    report = fit.report()
    assert report[2]["outlier"] and report[2]["name"] == "P2"
    assert not any(r["outlier"] for i, r in enumerate(report) if i != 2)


def test_four_similarity_landmarks_still_name_the_wrong_one():
    image = np.array([[150.0, 120.0], [1450.0, 160.0], [1400.0, 1080.0], [200.0, 1050.0]])
    qemscan = _similarity(image)
    image[3] += (0.0, 40.0)
    fit = fit_landmarks(qemscan, image, GEOMETRY, "similarity")
    assert fit.outliers == [3]


def test_consistent_noisy_clicks_are_not_flagged():
    qemscan = _similarity(IMAGE_PTS) + RNG.normal(0, 0.25, IMAGE_PTS.shape)
    image = IMAGE_PTS + RNG.normal(0, 2.0, IMAGE_PTS.shape)
    for kind in ("similarity", "affine", "tps"):
        assert fit_landmarks(qemscan, image, GEOMETRY, kind).outliers == []


@pytest.mark.parametrize("kind,n", [("similarity", 2), ("affine", 3), ("tps", 2)])
def test_too_few_landmarks_are_refused(kind, n):
    with pytest.raises(ThinSegError, match=f"{n} landmark pair.*at least"):
        fit_landmarks(_affine(IMAGE_PTS[:n]), IMAGE_PTS[:n], GEOMETRY, kind)


def test_landmarks_outside_the_images_are_refused():
    q = _affine(IMAGE_PTS[:4])
    img = IMAGE_PTS[:4].copy()
    img[1] = (1700.0, 100.0)  # beyond the 1600 px width
    with pytest.raises(ThinSegError, match=r"landmark\(s\) 2 lie outside the PP image"):
        fit_landmarks(q, img, GEOMETRY, "affine")
    q[0] = (-5.0, 10.0)
    with pytest.raises(ThinSegError, match=r"landmark\(s\) 1 lie outside the QEMSCAN map"):
        fit_landmarks(q, IMAGE_PTS[:4], GEOMETRY, "affine")


def test_degenerate_and_mirrored_landmarks_are_refused():
    line = np.column_stack([np.linspace(100, 1500, 5), np.linspace(100, 1100, 5)])
    with pytest.raises(ThinSegError, match="collinear"):
        fit_landmarks(_affine(line), line, GEOMETRY, "affine")
    mirrored = _affine(IMAGE_PTS) * np.array([-1.0, 1.0]) + np.array([400.0, 0.0])
    with pytest.raises(ThinSegError, match="mirrored"):
        fit_landmarks(mirrored, IMAGE_PTS, GEOMETRY, "affine")


def test_itk_transform_works_in_millimetres():
    fit = fit_landmarks(_similarity(IMAGE_PTS), IMAGE_PTS, GEOMETRY, "similarity")
    assert fit.transform.itk.GetName() == "Similarity2DTransform"
    mm = map_points_mm(fit.transform.itk, IMAGE_PTS * GEOMETRY.image_mm_per_pixel)
    assert np.allclose(mm / GEOMETRY.qemscan_mm_per_pixel, _similarity(IMAGE_PTS), atol=1e-6)


def test_landmark_csv(tmp_path):
    path = tmp_path / "pairs.csv"
    rows = ["name,qemscan_x,qemscan_y,image_x,image_y"]
    q = _affine(IMAGE_PTS[:4])
    rows += [f"L{i},{q[i, 0]},{q[i, 1]},{IMAGE_PTS[i, 0]},{IMAGE_PTS[i, 1]}" for i in range(4)]
    path.write_text("\n".join(rows) + "\n")
    pairs = read_landmarks(path)
    assert pairs.names == ["L0", "L1", "L2", "L3"]
    assert np.allclose(pairs.qemscan_px, q) and np.allclose(pairs.image_px, IMAGE_PTS[:4])
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ThinSegError, match="needs columns"):
        read_landmarks(path)


def test_slicer_markups_pairs(tmp_path):
    q = _affine(IMAGE_PTS[:4])

    def markups(points_mm, system):
        sign = -1.0 if system == "RAS" else 1.0
        return {
            "type": "Fiducial",
            "coordinateSystem": system,
            "controlPoints": [
                {"label": f"F-{i + 1}", "position": [sign * x, sign * y, 0.0]} for i, (x, y) in enumerate(points_mm)
            ],
        }

    one = tmp_path / "pairs.mrk.json"
    one.write_text(json.dumps({"markups": [markups(IMAGE_PTS[:4] * 0.00132, "LPS"), markups(q * 0.01, "RAS")]}))
    pairs = read_landmarks(one, image_mm_per_pixel=0.00132, qemscan_mm_per_pixel=0.01)
    assert np.allclose(pairs.image_px, IMAGE_PTS[:4]) and np.allclose(pairs.qemscan_px, q)
    fixed, moving = tmp_path / "F.mrk.json", tmp_path / "M.mrk.json"
    fixed.write_text(json.dumps({"markups": [markups(IMAGE_PTS[:4] * 0.00132, "LPS")]}))
    moving.write_text(json.dumps({"markups": [markups(q[:3] * 0.01, "LPS")]}))
    with pytest.raises(ThinSegError, match="4 image points but 3 QEMSCAN points"):
        read_landmarks(fixed, moving, image_mm_per_pixel=0.00132, qemscan_mm_per_pixel=0.01)


def test_bspline_correction_is_exactly_itks_bspline():
    """The refinement's B-spline (numpy) and the ITK transform written to the .tfm agree."""
    from thinseg.registration.corrections import BSplineCorrection

    model = BSplineCorrection(np.array([3.0, -2.0]), np.array([180.0, 150.0]), (5, 4))
    theta = RNG.normal(0, 1.5, model.size)
    pts = np.column_stack([RNG.uniform(3, 180, 300), RNG.uniform(-2, 150, 300)])
    itk = model.to_itk(theta, 0.01)
    expected = np.array([itk.TransformPoint(tuple(p * 0.01)) for p in pts]) / 0.01
    assert np.abs(model.apply(theta, pts) - expected).max() < 1e-9
    # and the gradient is the adjoint of apply
    gq = RNG.normal(size=pts.shape)
    eps = RNG.normal(size=model.size)
    lhs = float(((model.apply(theta + 1e-3 * eps, pts) - model.apply(theta, pts)) * gq).sum()) / 1e-3
    assert lhs == pytest.approx(float(model.gradient(pts, gq) @ eps), rel=1e-6)


def test_three_pairs_are_enough_for_a_thin_plate_spline():
    """The minimum for a spline: >= 3 pairs. Three pairs fix the spline exactly, so residuals are 0
    and no click can be flagged; the fit still maps the three points onto each other."""
    fit = fit_landmarks(_affine(IMAGE_PTS[:3]), IMAGE_PTS[:3], GEOMETRY, "tps")
    assert np.abs(fit.residuals_px).max() < 1e-6
    assert fit.outliers == []
