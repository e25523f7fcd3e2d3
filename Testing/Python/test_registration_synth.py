"""Registration accuracy and refusals on generated sections, whose true transform is known."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import make_refinement_diverge

from thinseg.errors import ThinSegError
from thinseg.registration import (
    SearchRange,
    align_xp_to_pp,
    register_section,
    target_registration_error,
)
from thinseg.synth import generate_section

SIZE = 768


@pytest.fixture(scope="module")
def section():
    return generate_section(SIZE, SIZE, seed=11)


@pytest.fixture(scope="module")
def other_section():
    return generate_section(SIZE, SIZE, seed=12)


def _register(s, **kwargs):
    return register_section(
        s.pp,
        s.xp,
        s.qemscan,
        s.qemscan_table,
        image_mm_per_pixel=s.mm_per_pixel,
        qemscan_mm_per_pixel=s.qemscan_mm_per_pixel,
        **kwargs,
    )


def _clicks(s, rng: np.random.Generator, noise_px: float = 2.0):
    """Four landmarks, one per quadrant, clicked with Gaussian noise of `noise_px` IMAGE pixels
    on both the PP image and the QEMSCAN map (0.26 QEMSCAN px there)."""
    h, w = s.pp.shape[:2]
    image = np.array([[0.15 * w, 0.15 * h], [0.85 * w, 0.12 * h], [0.88 * w, 0.85 * h], [0.12 * w, 0.88 * h]])
    inv = np.linalg.inv(s.qemscan_to_image)
    qemscan = image @ inv[:2, :2].T + inv[:2, 2]
    ratio = s.qemscan_mm_per_pixel / s.mm_per_pixel
    return qemscan + rng.normal(0, noise_px / ratio, qemscan.shape), image + rng.normal(0, noise_px, image.shape)


def test_four_noisy_landmarks_then_refinement(section):
    s = section
    landmarks = _clicks(s, np.random.default_rng(0))
    only = _register(s, landmarks=landmarks, refine=False)
    tre_landmarks = target_registration_error(only.transform, s.qemscan_to_image)
    assert tre_landmarks < 1.0
    assert only.labels.shape == s.pp.shape[:2] and only.labels.dtype == np.uint8

    refined = _register(s, landmarks=landmarks)
    tre_refined = target_registration_error(refined.transform, s.qemscan_to_image)
    assert tre_refined < 0.5
    assert tre_refined <= tre_landmarks
    assert refined.metric_final >= refined.metric_initial
    assert refined.refinement.change["mean_displacement_qemscan_px"] > 0
    assert refined.transform.kind == "similarity"
    # the registered QEMSCAN classes agree with the exact labels nearly everywhere (QEMSCAN is
    # 7.6x coarser, so boundary pixels differ)
    to_class = np.zeros(256, np.uint8)
    for value, cls in s.image_to_class.items():
        to_class[value] = cls
    assert (to_class[refined.labels] == s.labels).mean() > 0.92


def test_refinement_from_affine_and_tps_starts(section):
    s = section
    landmarks = _clicks(s, np.random.default_rng(1))
    # affine: from the PP image alone (no XP), to cover single-image sections too
    r = register_section(
        s.pp,
        None,
        s.qemscan,
        s.qemscan_table,
        image_mm_per_pixel=s.mm_per_pixel,
        qemscan_mm_per_pixel=s.qemscan_mm_per_pixel,
        landmarks=landmarks,
        kind="affine",
    )
    assert r.transform.kind == "affine" and r.xp is None
    assert target_registration_error(r.transform, s.qemscan_to_image) < 0.5
    r = _register(s, landmarks=landmarks, kind="tps")
    assert r.transform.kind == "tps"
    assert target_registration_error(r.transform, s.qemscan_to_image) < 0.5
    # the refined spline stays one flat transform: correction x affine part, then the field
    assert [t.GetName() for t in _parts(r.transform.itk)] == ["AffineTransform", "DisplacementFieldTransform"]


def _parts(itk):
    itk = itk.Downcast()
    return [itk.GetNthTransform(i).Downcast() for i in range(itk.GetNumberOfTransforms())]


def test_no_landmarks_coarse_search_recovers_the_transform(section, other_section):
    for s in (section, other_section):
        r = _register(s)
        assert r.coarse is not None
        assert target_registration_error(r.transform, s.qemscan_to_image) < 0.5
        assert r.contrast > 3


def test_bspline_stage_keeps_the_accuracy(section):
    s = section
    r = _register(s, landmarks=_clicks(s, np.random.default_rng(2)), bspline=True, bspline_mesh=3)
    assert r.transform.kind == "similarity+bspline"
    assert target_registration_error(r.transform, s.qemscan_to_image) < 0.5


def test_xp_offset_is_found_and_undone(section):
    s = section
    shifted = np.roll(s.xp, (-4, -9), axis=(0, 1))
    dy, dx, aligned = align_xp_to_pp(s.pp, shifted)
    assert (dy, dx) == (-4, -9)
    assert np.array_equal(aligned[4:, 9:], s.xp[4:, 9:])  # xp_shifted[y, x] showed xp[y + 4, x + 9]
    assert align_xp_to_pp(s.pp, s.xp)[:2] == (0, 0)


def test_unrelated_map_without_landmarks_is_refused(section, other_section):
    # a narrower search than the default only to keep the test fast: the refusal comes from the
    # match contrast after refinement, whatever the search found
    with pytest.raises(ThinSegError, match="no match found"):
        register_section(
            section.pp,
            section.xp,
            other_section.qemscan,
            other_section.qemscan_table,
            image_mm_per_pixel=section.mm_per_pixel,
            qemscan_mm_per_pixel=section.qemscan_mm_per_pixel,
            search=SearchRange(rotation_deg=3.0, scale=0.03),
        )


def test_map_that_misses_the_image_is_refused(section):
    s = section
    q_px, img_px = _clicks(s, np.random.default_rng(0), 0.0)
    qemscan = np.zeros_like(s.qemscan)
    qemscan[:12, :12] = s.qemscan[:12, :12] + 1  # labels only in a corner the image barely reaches
    qemscan[:12, :12] = np.minimum(qemscan[:12, :12], len(s.qemscan_table))
    with pytest.raises(ThinSegError, match="do not overlap"):
        register_section(
            s.pp,
            s.xp,
            qemscan,
            s.qemscan_table,
            image_mm_per_pixel=s.mm_per_pixel,
            qemscan_mm_per_pixel=s.qemscan_mm_per_pixel,
            landmarks=(q_px, img_px),
        )


def test_diverging_refinement_is_refused(section, monkeypatch):
    """(That nothing is written then is checked through the command, test_cli_register.)"""
    s = section
    make_refinement_diverge(monkeypatch)
    with pytest.raises(ThinSegError, match="diverged"):
        _register(s, landmarks=_clicks(s, np.random.default_rng(0)))


def test_without_landmarks_refinement_is_required(section):
    with pytest.raises(ThinSegError, match="without landmarks"):
        _register(section, refine=False)
