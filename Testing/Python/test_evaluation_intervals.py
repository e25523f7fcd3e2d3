"""Honest estimates from `thinseg evaluate`: bootstrap intervals over sections and the expected
calibration error (ECE) of the model's confidence, in the report's JSON and table and in
`thinseg evaluate` end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import make_bundle, run_main, write_geoslicer_netcdf

from thinseg.classes.files import default_class_table
from thinseg.classes.table import ClassTable
from thinseg.metrics import ConfusionAccumulator, Evaluator, comparison_dict, format_comparison_table
from thinseg.metrics.bootstrap import bootstrap_intervals, weights_of
from thinseg.metrics.calibration import CalibrationAccumulator, confidence_bins
from thinseg.metrics.fractions import fractions_from_confusion
from thinseg.synth import generate_section

TABLE = default_class_table()  # 6 classes
TWO = ClassTable.from_names_colors(["A", "B"], ["#ff0000", "#00ff00"])

#: Section "good": 100 px, all right. Section "bad": 100 px, half right (rows truth, columns prediction).
GOOD = np.array([[0, 0, 0], [0, 60, 0], [0, 0, 40]], np.int64)
BAD = np.array([[0, 0, 0], [0, 30, 20], [0, 30, 20]], np.int64)


def maps_of(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A (1, pixels) truth and prediction pair whose confusion matrix is `cm`."""
    truth, pred = [], []
    for t in range(cm.shape[0]):
        for p in range(cm.shape[1]):
            truth += [t] * int(cm[t, p])
            pred += [p] * int(cm[t, p])
    return np.array([truth], np.uint8), np.array([pred], np.uint8)


def report_of(cms, table=TABLE, resamples=2000, seed=0, confidences=None):
    evaluator = Evaluator(table)
    for i, cm in enumerate(cms):
        truth, pred = maps_of(cm)
        conf = None if confidences is None else np.full(truth.shape, confidences[i], np.float64)
        evaluator.add_section(f"S{i}", truth, pred, confidence=conf)
    return evaluator.report("m", resamples=resamples, seed=seed)


def blocky_sections(count=4, shape=(48, 64), seed=7):
    """Truth maps of blocks of five minerals in varying shares; predictions with boundary and blob errors."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        blocks = rng.choice(
            [1, 2, 3, 4, 5], size=(shape[0] // 8, shape[1] // 8), p=np.roll([0.4, 0.2, 0.2, 0.1, 0.1], i)
        )
        truth = np.kron(blocks, np.ones((8, 8), int)).astype(np.uint8)
        pred = np.roll(truth, i % 3, axis=0)
        pred[5:9, 10 + 4 * i : 16 + 4 * i] = 2
        confidence = rng.uniform(0.4, 1.0, truth.shape)
        out.append((f"S{i}", truth, pred, confidence))
    return out


def blocky_report(seed=0, count=4):
    evaluator = Evaluator(TABLE, void_border_px=1)
    for name, truth, pred, confidence in blocky_sections(count):
        evaluator.add_section(name, truth, pred, confidence=confidence)
    return evaluator.report("m", seed=seed)


# --- bootstrap intervals ------------------------------------------------------------------------


def test_identical_sections_give_zero_width_intervals_at_the_point_estimate():
    same = np.array([[0, 0, 0], [0, 50, 10], [0, 5, 35]])  # truth 60/40 %, predicted 55/45 %
    report = report_of([same, same, same], table=TWO)
    ci, m, fs = report.intervals, report.metrics, report.fraction_stats
    assert ci.mean_iou == (m.mean_iou, m.mean_iou) and ci.pixel_accuracy == (0.85, 0.85)
    assert ci.per_class_iou == ((m.iou[0], m.iou[0]), (m.iou[1], m.iou[1]))
    assert ci.fraction_r2 == pytest.approx((fs.r2_overall, fs.r2_overall), abs=1e-12)
    assert fs.r2_overall == pytest.approx(1 - (6 * 0.05**2) / (6 * 0.1**2))  # 6 (section, class) pairs
    assert ci.fraction_rmse == pytest.approx((0.05, 0.05), abs=1e-12)
    assert ci.degenerate_resamples > 0  # drew S0 (or S1, S2) three times: left out of R^2, counted


def test_two_sections_interval_is_the_percentile_of_all_four_resamples():
    """Resamples of {good, bad}: good+good, good+bad, bad+good, bad+bad, worked out by hand."""
    cms = np.array([GOOD, BAD])
    fractions = [fractions_from_confusion(cm) for cm in cms]
    true_f, pred_f = np.array([f[0] for f in fractions]), np.array([f[1] for f in fractions])
    every = weights_of([[0, 0], [0, 1], [1, 0], [1, 1]], 2)
    assert every.tolist() == [[2, 0], [1, 1], [1, 1], [0, 2]]
    ci = bootstrap_intervals(cms, true_f, pred_f, weights=every)

    def central95(sorted4):  # numpy's linear percentile of 4 values at 2.5% and 97.5%
        a, b, c, d = sorted4
        return a + 0.075 * (b - a), c + 0.925 * (d - c)

    assert ci.pixel_accuracy == pytest.approx(central95([0.5, 0.75, 0.75, 1.0]))
    # good+bad: A: tp 90, union 110 + 120 - 90; B: tp 60, union 90 + 80 - 60. bad+bad: 30/80, 20/70
    mixed = (90 / 140 + 60 / 110) / 2
    assert ci.mean_iou == pytest.approx(central95([(30 / 80 + 20 / 70) / 2, mixed, mixed, 1.0]))
    assert ci.per_class_iou[0] == pytest.approx(central95([30 / 80, 90 / 140, 90 / 140, 1.0]))
    # fractions: good 0.6/0.4 predicted exactly; bad truth 0.5/0.5 predicted 0.6/0.4
    pooled_rmse = math.sqrt(0.02 / 4)
    assert ci.fraction_rmse == pytest.approx(central95([0.0, pooled_rmse, pooled_rmse, 0.1]))
    # R^2 only from the two mixed resamples; both are the whole dataset: SS_res 0.02 = SS_tot 0.02
    assert ci.degenerate_resamples == 2 and ci.fraction_r2 == pytest.approx((0.0, 0.0), abs=1e-12)
    assert "2 of 4 resamples drew one section only" in ci.note
    # random draws stay within what any resample can give, and the report uses them by default
    report = report_of([GOOD, BAD], table=TWO)
    assert 0.5 <= report.intervals.pixel_accuracy[0] < report.intervals.pixel_accuracy[1] <= 1.0
    assert report.intervals.resamples == 2000 and report.fraction_stats.r2_overall == pytest.approx(0.0, abs=1e-12)


def test_intervals_contain_the_point_estimates():
    report = blocky_report()
    ci, m, fs = report.intervals, report.metrics, report.fraction_stats
    checks = [
        (ci.mean_iou, m.mean_iou),
        (ci.pixel_accuracy, m.pixel_accuracy),
        (ci.fraction_r2, fs.r2_overall),
        (ci.fraction_rmse, fs.rmse_overall),
        (ci.ece, report.calibration.ece),
    ]
    checks += [(ci.per_class_iou[k], m.iou[k]) for k in range(5)]
    for (lo, hi), point in checks:
        assert lo <= point + 1e-12 and point <= hi + 1e-12 and lo < hi
    assert ci.per_class_iou[5] is None  # Others: in no section, so in no resample


def test_a_fixed_seed_gives_the_same_intervals_and_another_seed_others():
    first, again, other = blocky_report(seed=0), blocky_report(seed=0), blocky_report(seed=1)
    assert first.to_json() == again.to_json()
    # with 4 sections the resampled values are few and discrete: some interval ends move, not all
    assert first.intervals.to_dict(TABLE.names) != other.intervals.to_dict(TABLE.names)
    assert json.loads(other.to_json())["bootstrap"]["seed"] == 1


def test_one_section_has_no_interval_and_says_so():
    report = report_of([BAD], table=TWO)
    assert report.intervals.mean_iou is None and report.intervals.fraction_rmse is None
    doc = json.loads(report.to_json())
    assert doc["intervals"]["mean_iou"] is None and doc["intervals"]["per_class_iou"] == {"A": None, "B": None}
    assert doc["bootstrap"]["note"] == "no intervals: 1 section(s) evaluated, resampling needs at least 2"
    table = report.format_table()
    assert "no intervals: 1 section(s)" in table and "95% interval" not in table and "[" not in table


# --- calibration ---------------------------------------------------------------------------------


def calibration_of(truth, pred, confidence):
    acc = CalibrationAccumulator()
    acc.update(np.array(truth, np.uint8), np.array(pred, np.uint8), np.asarray(confidence))
    return acc.stats()


def test_ece_is_zero_when_confidence_matches_accuracy_and_the_gap_otherwise():
    truth = np.ones((1, 10), np.uint8)
    ninety = np.where(np.arange(10) < 9, 1, 2).reshape(1, 10)
    half = np.where(np.arange(10) < 5, 1, 2).reshape(1, 10)
    assert calibration_of(truth, ninety, np.full((1, 10), 0.9)).ece == pytest.approx(0.0, abs=1e-12)
    assert calibration_of(truth, half, np.full((1, 10), 0.9)).ece == pytest.approx(0.4)
    # two bins: 10 px at 0.25 with 5 right (gap 0.25), 30 px at 0.95 with 27 right (gap 0.05)
    truth = np.ones((1, 40), np.uint8)
    pred = np.ones((1, 40), np.uint8)
    pred[0, 5:10] = 2
    pred[0, 37:] = 2
    conf = np.r_[np.full(10, 0.25), np.full(30, 0.95)].reshape(1, 40)
    stats = calibration_of(truth, pred, conf)
    assert stats.ece == pytest.approx((10 * 0.25 + 30 * 0.05) / 40)
    rows = stats.reliability()
    assert len(rows) == 15 and rows[3][2] == 10 and rows[14][2] == 30 and sum(r[2] for r in rows) == 40
    assert rows[3][:2] == pytest.approx((0.25, 0.5)) and rows[14][:2] == pytest.approx((0.95, 0.9))


def test_uint8_confidence_maps_bin_exactly_and_unlabelled_pixels_do_not_count():
    # 17/255 = 1/15 exactly: the lower edge of bin 1; 255 (1.0) belongs to the last bin
    assert confidence_bins(np.array([0, 16, 17, 33, 34, 254, 255], np.uint8)).tolist() == [0, 0, 1, 1, 2, 14, 14]
    stats = calibration_of([[0, 1, 1, 2]], [[1, 1, 1, 1]], np.array([[10, 255, 255, 255]], np.uint8))
    assert stats.pixels.sum() == 3 and stats.pixels[14] == 3 and stats.correct[14] == 2
    assert stats.ece == pytest.approx(1 / 3)
    with pytest.raises(Exception, match=r"confidence must lie in \[0, 1\]"):
        calibration_of([[1]], [[1]], [[1.5]])


def test_report_json_round_trips_intervals_and_calibration():
    report = blocky_report()
    doc = json.loads(report.to_json())
    ci = report.intervals
    assert doc["intervals"]["mean_iou"] == list(ci.mean_iou)
    assert doc["intervals"]["pixel_accuracy"] == list(ci.pixel_accuracy)
    assert doc["intervals"]["fraction_r2"] == list(ci.fraction_r2)
    assert doc["intervals"]["fraction_rmse"] == list(ci.fraction_rmse)
    assert doc["intervals"]["ece"] == list(ci.ece)
    assert doc["intervals"]["per_class_iou"]["Calcite"] == list(ci.per_class_iou[0])
    assert doc["intervals"]["per_class_iou"]["Others"] is None
    assert doc["bootstrap"] == {
        "resamples": 2000,
        "seed": 0,
        "level": 0.95,
        "unit": "section",
        "sections": 4,
        "method": "percentile",
        "degenerate_resamples": ci.degenerate_resamples,
        "note": ci.note,
    }
    cal = report.calibration
    assert doc["calibration"]["ece"] == cal.ece and doc["calibration"]["bins"] == 15
    assert [tuple(r) for r in doc["calibration"]["reliability"]] == [
        tuple(None if isinstance(v, float) and math.isnan(v) else v for v in row) for row in cal.reliability()
    ]
    # the per-section matrices in the JSON reproduce the intervals
    cms = np.array([s["confusion"] for s in doc["sections"]])
    true_f = np.array([s["true_fractions"] for s in doc["sections"]], np.float64)
    pred_f = np.array([s["pred_fractions"] for s in doc["sections"]], np.float64)
    again = bootstrap_intervals(cms, true_f, pred_f)
    assert again.mean_iou == ci.mean_iou and again.fraction_r2 == ci.fraction_r2


def test_table_and_comparison_print_intervals_and_ece():
    report = blocky_report()
    table = report.format_table()
    lo, hi = report.intervals.mean_iou
    mean_row = next(line for line in table.splitlines() if line.startswith("mean (present"))
    assert mean_row.endswith(f"[{lo:.3f}, {hi:.3f}]")
    calcite = next(line for line in table.splitlines() if line.startswith("Calcite"))
    c_lo, c_hi = report.intervals.per_class_iou[0]
    assert calcite.endswith(f"[{c_lo:.3f}, {c_hi:.3f}]")
    rows = [line for line in table.splitlines() if line.startswith(("Calcite", "Others", "mean (present"))]
    assert len({len(r) for r in rows}) == 1  # the interval column lines up
    a_lo, a_hi = report.intervals.pixel_accuracy
    assert f"pixel accuracy: {100 * report.metrics.pixel_accuracy:.2f}% [{100 * a_lo:.2f}, {100 * a_hi:.2f}]" in table
    e_lo, e_hi = report.intervals.ece
    assert f"calibration: ECE {report.calibration.ece:.3f} [{e_lo:.3f}, {e_hi:.3f}] (15 equal-width bins" in table
    assert "bootstrap over the 4 sections (2000 resamples, seed 0)" in table

    other = Evaluator(TABLE, void_border_px=1)
    for name, truth, pred, confidence in blocky_sections():
        other.add_section(name, truth, np.roll(pred, 2, axis=1), confidence=confidence)
    worse = other.report("worse")
    text = format_comparison_table({"good": report, "worse": worse}).splitlines()
    at = next(i for i, line in enumerate(text) if line.strip().startswith("mean IoU "))
    assert text[at + 1].split() == ["95%", "interval", f"[{lo:.3f},", f"{hi:.3f}]"] + [
        f"[{worse.intervals.mean_iou[0]:.3f},",
        f"{worse.intervals.mean_iou[1]:.3f}]",
    ]
    ece_row = next(line for line in text if line.strip().startswith("calibration ECE"))
    assert f"{report.calibration.ece:.3f}" in ece_row
    plain = comparison_dict({"good": report, "worse": worse})
    assert plain["models"][1]["intervals"]["mean_iou"] == list(worse.intervals.mean_iou)
    assert plain["models"][0]["calibration"]["ece"] == report.calibration.ece


def test_calibration_is_all_sections_or_none():
    evaluator = Evaluator(TWO)
    truth, pred = maps_of(GOOD)
    evaluator.add_section("a", truth, pred, confidence=np.full(truth.shape, 0.9))
    with pytest.raises(ValueError, match="every section or for none"):
        evaluator.add_section("b", truth, pred)
    counts = ConfusionAccumulator(2)
    counts.update(truth, pred)
    assert Evaluator(TWO).add_section_counts("c", counts).confusion.tolist() == GOOD.tolist()


# --- thinseg evaluate end to end --------------------------------------------------------------


def test_thinseg_evaluate_reports_intervals_and_ece(tmp_path, capsys, monkeypatch):
    from thinseg.inference.engine import InferenceOptions, Segmenter
    from thinseg.io.images import ArraySource
    from thinseg.model.bundle import load_bundle

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = make_bundle(tmp_path / "model", title="tiny")
    sections = {}
    for name, seed in (("S1", 3), ("S2", 4)):
        s = generate_section(96, 112, seed=seed)
        labels = s.labels.astype(np.uint8)
        labels[:5] = 0  # no truth: not scored, not in the calibration
        path = write_geoslicer_netcdf(
            tmp_path / "data" / f"{name}.nc",
            {f"{name}_PP": s.pp, f"{name}_XP": s.xp},
            labelmaps={f"{name}_labels": labels},
        )
        sections[name] = (path, s, labels)
    out = tmp_path / "ev"
    args = ["evaluate", "--model", model, *(p for p, _, _ in sections.values()), "-o", out, "-q"]
    code, stdout, stderr = run_main(capsys, *args, "--device", "cpu", "--precision", "fp32", "--overlays", "0")
    assert code == 0, stderr
    doc = json.loads((out / "evaluation.json").read_text(encoding="utf-8"))

    # the ECE worked out here from a direct engine run over the same sections
    segmenter = Segmenter(load_bundle(model), InferenceOptions(device="cpu", precision="fp32", with_confidence=True))
    pixels, correct, conf_sum = np.zeros(15), np.zeros(15), np.zeros(15)
    for _path, s, labels in sections.values():
        result = segmenter.segment([ArraySource(s.pp), ArraySource(s.xp)])
        scored = labels != 0
        conf = result.confidence[scored].astype(np.int64)
        right = labels[scored] == result.labels[scored]
        index = np.minimum(conf * 15 // 255, 14)
        pixels += np.bincount(index, minlength=15)
        correct += np.bincount(index[right], minlength=15)
        conf_sum += np.bincount(index, weights=conf / 255, minlength=15)
    ece = np.abs(correct - conf_sum).sum() / pixels.sum()
    assert doc["calibration"]["ece"] == pytest.approx(ece, abs=1e-12) and doc["calibration"]["bins"] == 15
    assert [row[2] for row in doc["calibration"]["reliability"]] == pixels.astype(int).tolist()
    assert sum(row[2] for row in doc["calibration"]["reliability"]) == doc["metrics"]["evaluated_pixels"]

    assert doc["bootstrap"]["resamples"] == 2000 and doc["bootstrap"]["unit"] == "section"
    lo, hi = doc["intervals"]["mean_iou"]
    assert lo <= hi and doc["intervals"]["ece"] is not None
    assert f"[{lo:.3f}, {hi:.3f}]" in stdout and f"calibration: ECE {ece:.3f} [" in stdout
    assert (out / "evaluation.txt").read_text(encoding="utf-8").startswith(stdout.split("\n\n")[0])
    png = (out / "reliability.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000 and f"-> {out / 'reliability.png'}" in stdout
