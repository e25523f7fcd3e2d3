"""Dataset reports (terminal table, JSON), model comparison, and the PNG/HTML outputs."""

import json
import math

import numpy as np
import pytest

from thinseg.classes.files import default_class_table
from thinseg.metrics import Evaluator, comparison_dict, format_comparison_table

TABLE = default_class_table()  # 6 classes, QEMSCAN colours


def sections(count=3, shape=(48, 64)):
    """Blocky truth maps with different mineral fractions and a strip of no truth."""
    rng = np.random.default_rng(7)
    out = []
    for i in range(count):
        blocks = rng.choice(
            [1, 2, 3, 4, 5], size=(shape[0] // 8, shape[1] // 8), p=np.roll([0.5, 0.2, 0.1, 0.1, 0.1], i)
        )
        truth = np.kron(blocks, np.ones((8, 8), int)).astype(np.uint8)
        truth[:, :4] = 0
        pp = np.repeat((60 + 35 * truth)[..., None], 3, axis=2).astype(np.uint8)
        pred = np.roll(truth, 1, axis=0)  # boundary errors
        pred[5:9, 20:26] = 2  # a blob error
        pred[-3:, -3:] = 0  # left unclassified
        out.append((f"S{i}", pp, truth, pred))
    return out


def evaluate(data, void_border_px=1, model="m"):
    evaluator = Evaluator(TABLE, void_border_px=void_border_px)
    for name, _pp, truth, pred in data:
        evaluator.add_section(name, truth, pred)
    return evaluator.report(model)


def test_perfect_prediction_gives_iou_1_and_r2_1():
    data = [(n, pp, t, t.copy()) for n, pp, t, _ in sections()]
    report = evaluate(data)
    present = report.metrics.present
    assert present[:5].all() and not present[5]  # "Others" absent: NaN, not in the mean
    assert np.all(report.metrics.iou[present] == 1.0) and math.isnan(report.metrics.iou[5])
    assert report.metrics.mean_iou == 1.0 and report.metrics_void_excluded.mean_iou == 1.0
    assert report.fraction_stats.r2_overall == 1.0 and report.fraction_stats.rmse_overall == 0.0


def test_json_is_plain_with_null_for_undefined():
    report = evaluate(sections())
    text = report.to_json()
    assert "NaN" not in text
    data = json.loads(text)
    others = data["metrics"]["classes"][5]
    assert others["name"] == "Others" and others["iou"] is None and others["in_mean"] is False
    assert len(data["confusion"]) == 7 and all(isinstance(v, int) for v in data["confusion"][1])
    assert data["void_border_pixels"] == report.void_border_pixels > 0
    assert [s["name"] for s in data["sections"]] == ["S0", "S1", "S2"]
    assert data["fractions"]["n_sections"] == 3
    assert data["metrics_void_excluded"]["pixel_accuracy"] > data["metrics"]["pixel_accuracy"]


def test_terminal_table_lists_every_class_and_the_headline_figures():
    report = evaluate(sections())
    table = report.format_table()
    for name in TABLE.names:
        assert name in table
    assert "pixel accuracy" in table and "R^2" in table and "void borders" in table
    assert "left unclassified by the model" in table
    rows = [line for line in table.splitlines() if line.startswith(("Calcite", "Others"))]
    assert len({len(r) for r in rows}) == 1  # fixed width


def test_comparison_table_and_json_put_models_side_by_side():
    data = sections()
    good = evaluate(data, model="good")
    worse = evaluate([(n, pp, t, np.roll(p, 2, axis=1)) for n, pp, t, p in data], model="worse")
    text = format_comparison_table({"good": good, "worse": worse})
    assert "good" in text.splitlines()[0] and "worse" in text.splitlines()[0]
    mean_iou_row = next(line for line in text.splitlines() if line.strip().startswith("mean IoU "))
    assert mean_iou_row.split()[-2].endswith("*")  # the better model is starred
    plain = comparison_dict({"good": good, "worse": worse})
    assert [m["name"] for m in plain["models"]] == ["good", "worse"]
    json.dumps(plain, allow_nan=False)


def is_png(path):
    data = path.read_bytes()
    return data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_plots_write_pngs(tmp_path):
    from thinseg.reports.plots import plot_confusion, plot_fractions_scatter, plot_per_class_bars, plot_section_overlay

    data = sections()
    report = evaluate(data)
    other = evaluate([(n, pp, t, np.roll(p, 2, axis=1)) for n, pp, t, p in data], model="other")
    name, pp, truth, pred = data[0]
    plot_confusion(report.confusion, TABLE, tmp_path / "confusion.png", title="m")
    plot_per_class_bars({"m": report}, tmp_path / "bars.png")
    plot_per_class_bars({"m": report, "other": other}, tmp_path / "bars2.png", void_excluded=True)
    plot_fractions_scatter(
        report.true_fractions, report.pred_fractions, TABLE, tmp_path / "scatter.png", report.fraction_stats
    )
    from thinseg.metrics import void_border_mask

    plot_section_overlay(pp, truth, pred, TABLE, tmp_path / "overlay.tmp", keep=void_border_mask(truth, 1), title=name)
    plot_section_overlay(None, truth, pred, TABLE, tmp_path / "overlay_nopp.png", max_side=20)
    for file in ("confusion.png", "bars.png", "bars2.png", "scatter.png", "overlay.tmp", "overlay_nopp.png"):
        assert is_png(tmp_path / file), file


def test_compare_sheet_shows_the_regions_where_models_disagree(tmp_path):
    from thinseg.reports.comparison import (
        Region,
        choose_regions,
        compare_sheet,
        difference_codes,
        write_comparison_html,
    )

    _name, pp, truth, pred = sections(1, shape=(64, 96))[0]
    other = pred.copy()
    other[40:50, 70:80] = 5  # the only disagreement
    regions = choose_regions(truth, [pred, other], count=2, size=32)
    assert regions[0] == Region(32, 64, 32, 32)  # the window holding the disagreement comes first
    (ya, xa), (yb, xb) = regions[0].slices, regions[1].slices
    assert ya.stop <= yb.start or yb.stop <= ya.start or xa.stop <= xb.start or xb.stop <= xa.start  # no overlap
    t, a, b = truth[40:50, 70:80], pred[40:50, 70:80], other[40:50, 70:80]
    codes = difference_codes(t, [a, b])
    assert np.all(codes[(a == t) & (b != t)] == 10)  # only model 0 right: code 10 + 0
    assert np.all(codes[(a == t) & (b == t)] == 1)  # all agree and right
    shown = compare_sheet(
        pp, truth, {"A": pred, "B": other}, TABLE, tmp_path / "sheet.png", count=2, size=32, title="S0"
    )
    assert shown == regions and is_png(tmp_path / "sheet.png")
    data = sections()
    reports = {"A": evaluate(data, model="A"), "B": evaluate(data, model="B")}
    write_comparison_html(tmp_path / "compare.html", reports, [("S0", tmp_path / "sheet.png")])
    html = (tmp_path / "compare.html").read_text(encoding="utf-8")
    assert html.count("data:image/png;base64,") == 1 and "Calcite" in html and "mean IoU" in html


def test_evaluator_streams_tile_counts_like_whole_sections():
    from thinseg.metrics import ConfusionAccumulator, void_border_mask

    data = sections()
    whole = evaluate(data)
    streamed = Evaluator(TABLE, void_border_px=1)
    for name, _pp, truth, pred in data:
        keep = void_border_mask(truth, 1)  # on the whole map: right at tile edges
        counts, kept = ConfusionAccumulator(len(TABLE)), ConfusionAccumulator(len(TABLE))
        for y in range(0, truth.shape[0], 16):
            band = slice(y, y + 16)
            counts.update(truth[band], pred[band])
            kept.update(truth[band], pred[band], keep[band])
        streamed.add_section_counts(name, counts, kept)
    assert streamed.report("m").to_json() == whole.to_json()
    with pytest.raises(ValueError):
        streamed.add_section_counts("x", counts)  # void borders on, kept counts missing
