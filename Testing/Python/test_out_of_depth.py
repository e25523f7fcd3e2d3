"""The model says when a section is out of its depth: the engine's sampled confidence
histogram, the validation reference that training (and the bundled model's meta.json) records,
the rule that compares them, and the one-line warning of `thinseg segment` on real sandstone
(which the bundled synthetic model has never seen) but not on its own synthetic sample."""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
from helpers import REPO, make_bundle, real_field, rewrite_bundle, run_main, section_images

from thinseg.errors import ThinSegError
from thinseg.inference.confidence import (
    LOW_SHARE_FACTOR,
    MEAN_MARGIN,
    ConfidenceReference,
    ConfidenceStats,
    out_of_depth_warning,
)
from thinseg.inference.engine import CONFIDENCE_BINS, STATS_STRIDE, InferenceOptions, Segmenter
from thinseg.io.images import ArraySource
from thinseg.model.bundle import load_bundle
from thinseg.resources import default_model_dir
from thinseg.training import TrainConfig, synthetic_sections, train
from thinseg.training.targets import prepare_sections
from thinseg.training.validate import make_val_sections, validate_with_confidence

SAMPLE = REPO / "Resources" / "Sample"
WARNING = "the map is unreliable for this rock"


def histogram(values: dict[int, int]) -> np.ndarray:
    counts = np.zeros(CONFIDENCE_BINS, np.int64)
    for bin_, n in values.items():
        counts[bin_] = n
    return counts


# -- statistics and the rule -------------------------------------------------------------------


def test_stats_of_a_histogram_are_exact():
    stats = ConfidenceStats.from_histogram(histogram({255: 6, 51: 3, 127: 1}))  # 1.0, 0.2, 0.498
    assert stats.pixels == 10
    assert stats.mean == pytest.approx((6 * 1.0 + 3 * 0.2 + 127 / 255) / 10)
    assert stats.low_share == pytest.approx(0.4)  # 0.2 and 0.498 are below 0.5
    assert ConfidenceStats.from_histogram(histogram({})) is None


def test_reference_pools_sections_and_keeps_their_extremes():
    ref = ConfidenceReference.from_histograms([histogram({255: 9, 51: 1}), histogram({255: 7, 102: 3})])
    assert (ref.sections, ref.pixels) == (2, 20)
    assert ref.mean == pytest.approx((16 + 0.2 + 3 * 0.4) / 20)
    assert ref.low_share == pytest.approx(4 / 20)
    assert ref.section_mean_min == pytest.approx((7 + 1.2) / 10)
    assert ref.section_low_share_max == pytest.approx(0.3)
    assert ref.quantiles["p05"] == pytest.approx(0.2) and ref.quantiles["p50"] == 1.0
    # what meta.json holds reads back to the same reference (rounded to 4 places)
    back = ConfidenceReference.from_meta({"confidence_reference": ref.to_meta()})
    assert back.sections == 2 and back.mean == pytest.approx(ref.mean, abs=1e-4) and back.quantiles == ref.quantiles
    assert ConfidenceReference.from_meta({"title": "no reference"}) is None


def test_the_rule_fires_past_either_bound_and_not_before():
    ref = ConfidenceReference(0.5, 0.94, 0.02, 4, 1000, 0.93, 0.025, {})
    share_bound = LOW_SHARE_FACTOR * 0.02
    assert not ref.out_of_depth(ConfidenceStats(100, 0.93, share_bound))
    assert ref.out_of_depth(ConfidenceStats(100, 0.93, share_bound + 1e-6))
    assert not ref.out_of_depth(ConfidenceStats(100, 0.93 - MEAN_MARGIN + 1e-6, 0.0))
    assert ref.out_of_depth(ConfidenceStats(100, 0.93 - MEAN_MARGIN - 1e-6, 0.0))
    # a near-zero validation share: a few uncertain pixels are not alarming (1 point above is needed)
    sure = ConfidenceReference(0.5, 0.99, 0.001, 4, 1000, 0.99, 0.002, {})
    assert not sure.out_of_depth(ConfidenceStats(100, 0.99, 0.009))
    assert sure.out_of_depth(ConfidenceStats(100, 0.99, 0.012))


def test_the_warning_is_one_line_with_both_figures():
    ref = ConfidenceReference(0.5, 0.94, 0.02, 4, 1000, 0.93, 0.025, {})
    line = out_of_depth_warning("rock", histogram({255: 5, 51: 5}), ref)
    assert line is not None and "\n" not in line
    assert line.startswith("warning: rock: " + WARNING) and "retrain" in line
    assert "mean confidence 0.60 and 50.0% of pixels below 0.5" in line and "0.94 and 2.0%" in line
    assert out_of_depth_warning("rock", histogram({255: 10}), ref) is None
    assert out_of_depth_warning("rock", histogram({51: 10}), None) is None  # no reference: never judged


# -- the engine's sample -----------------------------------------------------------------------


@pytest.mark.parametrize("tile", [64, 96])
def test_engine_histogram_is_the_confidence_map_on_the_stride_grid(tmp_path, tile):
    bundle = load_bundle(make_bundle(tmp_path / "m"))
    pp, xp = section_images(150, 170, seed=4)
    options = InferenceOptions(device="cpu", precision="fp32", tile=tile, overlap=16, with_confidence=True)
    result = Segmenter(bundle, options).segment([ArraySource(pp), ArraySource(xp)])
    expected = np.bincount(result.confidence[::STATS_STRIDE, ::STATS_STRIDE].ravel(), minlength=CONFIDENCE_BINS)
    assert result.confidence_histogram.sum() == math.ceil(150 / STATS_STRIDE) * math.ceil(170 / STATS_STRIDE)
    assert np.array_equal(result.confidence_histogram, expected)
    # the same statistics without the map
    options.with_confidence = False
    plain = Segmenter(bundle, options).segment([ArraySource(pp), ArraySource(xp)])
    assert plain.confidence is None and np.array_equal(plain.confidence_histogram, expected)


# -- the reference in meta.json ----------------------------------------------------------------


def test_bundled_model_records_its_validation_confidence():
    bundle = load_bundle(default_model_dir())
    ref = ConfidenceReference.from_meta(bundle.meta)
    assert ref is not None and ref.sections == 4 and ref.pixels == 4 * (1024 // STATS_STRIDE) ** 2
    assert ref.low_threshold == 0.5 and 0.9 < ref.mean < 0.97 and 0.0 < ref.low_share < 0.05
    assert ref.section_mean_min <= ref.mean and ref.section_low_share_max >= ref.low_share


def test_a_broken_reference_is_refused_naming_meta_json(tmp_path):
    folder = make_bundle(tmp_path / "m")
    rewrite_bundle(folder, edit_meta=lambda m: m.update(confidence_reference={"low_threshold": 0.5, "mean": 1.5}))
    with pytest.raises(ThinSegError) as caught:
        load_bundle(folder)
    assert caught.value.path == folder / "meta.json"
    assert "confidence_reference" in caught.value.problem


def test_training_records_the_reference_of_its_validation_sections(tmp_path):
    val = synthetic_sections(1, 160, seed=50)
    config = TrainConfig(
        output_dir=tmp_path,
        train_sections=synthetic_sections(2, 192, seed=0),
        val_sections=val,
        epochs=1,
        steps_per_epoch=2,
        patch_size=64,
        batch_size=4,
        base_channels=8,
        depth=3,
        num_res_units=1,
        warmup_steps=1,
        val_tile=128,
        val_overlap=16,
        precision="fp32",
        progress=False,
    )
    result = train(config)
    meta = json.loads((result.model_dir / "meta.json").read_text())
    recorded = meta["confidence_reference"]
    assert recorded["sections"] == 1 and recorded["pixels"] == (160 // STATS_STRIDE) ** 2
    # the exported network measured again on the same section gives the recorded figures
    bundle = load_bundle(result.model_dir)
    prepared = prepare_sections(val, bundle.class_table, patch_size=None, model_mm_per_pixel=1 / bundle.pixels_per_mm)
    _, again = validate_with_confidence(
        bundle.network,
        make_val_sections(prepared, 2.0),
        ["PP", "XP"],
        bundle.class_table,
        tile=128,
        overlap=16,
        first_label=bundle.first_label,
    )
    assert recorded["mean"] == pytest.approx(again.mean, abs=2e-4)
    assert recorded["low_share"] == pytest.approx(again.low_share, abs=2e-4)


# -- the bundled synthetic model on real rock and on its own sample ----------------------------


def segment_pair(capsys, tmp_path, pp, xp, name):
    """`thinseg segment` on one PP/XP pair: (exit code, the warning lines on stderr)."""
    inputs = tmp_path / "in"
    inputs.mkdir(exist_ok=True)
    for role, path in (("PP", pp), ("XP", xp)):
        shutil.copy(path, inputs / f"{name}_{role}{path.suffix}")
    code, _, err = run_main(capsys, "segment", inputs, "--output", tmp_path / "out", "--quiet", "--device", "cpu")
    return code, [line for line in err.splitlines() if WARNING in line]


@pytest.mark.parametrize("field", ["2a", "10a"])
def test_bundled_model_warns_on_real_sandstone(capsys, tmp_path, field):
    files = real_field(field)
    code, warnings = segment_pair(capsys, tmp_path, files["pp"], files["xp"], field)
    assert code == 0
    assert len(warnings) == 1 and warnings[0].startswith(f"thinseg: warning: {field}")


def test_bundled_model_does_not_warn_on_its_own_sample(capsys, tmp_path):
    code, warnings = segment_pair(capsys, tmp_path, SAMPLE / "sample_PP.jpg", SAMPLE / "sample_XP.jpg", "sample")
    assert code == 0 and warnings == []
