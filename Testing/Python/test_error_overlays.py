"""Truth | prediction | errors pictures (`thinseg.reports.errors`, `thinseg evaluate --overlays`):
the panels are checked pixel for pixel in the PNG (drawn 1:1 for small sections), the error
colour exactly where labelled truth and prediction differ, pixels without truth neutral, large
sections shown at the panel limit with the PP read by region, the scores those of the section,
and existing pictures refused without overwrite."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import error_lines, leftovers, make_bundle, run_main, write_geoslicer_netcdf

from thinseg.classes.files import default_class_table
from thinseg.classes.table import hex_to_rgb
from thinseg.errors import ThinSegError
from thinseg.metrics import ConfusionAccumulator
from thinseg.metrics.scores import metrics_from_confusion
from thinseg.reports.errors import (
    ERROR_COLOR,
    MIN_SLOT,
    NEUTRAL_COLORS,
    PAD,
    class_panel,
    draw_error_overlay,
    error_panel,
    faded_grey,
    write_error_overlay,
)
from thinseg.reports.preview import shrink
from thinseg.synth import generate_section

TABLE = default_class_table()
MAGENTA = np.array(hex_to_rgb(ERROR_COLOR), np.uint8)
NEUTRALS = {hex_to_rgb(c) for c in NEUTRAL_COLORS}


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def read_png(path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG"
        return np.asarray(image.convert("RGB"))


def crop(picture: np.ndarray, box) -> np.ndarray:
    x0, y0, x1, y1 = box
    return picture[y0:y1, x0:x1]


def tiny_case(seed: int = 0, shape=(24, 36)):
    """Random truth/prediction/PP with a block of pixels without truth and agreeing areas."""
    rng = np.random.default_rng(seed)
    truth = rng.integers(1, len(TABLE) + 1, shape).astype(np.uint8)
    pred = truth.copy()
    flip = rng.random(shape) < 0.3
    pred[flip] = rng.integers(0, len(TABLE) + 1, int(flip.sum()))
    truth[:5, :7] = 0  # no truth here, whatever the prediction says
    pp = rng.integers(0, 256, (*shape, 3)).astype(np.uint8)
    return truth, pred, pp


def test_error_colour_is_drawn_exactly_where_labelled_truth_and_prediction_differ(tmp_path):
    truth, pred, pp = tiny_case()
    drawn = draw_error_overlay(tmp_path / "o.png", truth, pred, TABLE, pp, title="tiny")
    picture = read_png(tmp_path / "o.png")
    errors = crop(picture, drawn.panels["errors"])
    assert errors.shape == (*truth.shape, 3)  # drawn 1:1
    wrong = (truth != pred) & (truth > 0)
    is_magenta = (errors == MAGENTA).all(axis=-1)
    assert wrong.sum() > 50 and np.array_equal(is_magenta, wrong)
    correct = (truth == pred) & (truth > 0)
    grey = np.round(faded_grey(pp)).astype(np.uint8)
    assert np.array_equal(errors[correct], np.repeat(grey[correct][:, None], 3, axis=1))  # faded PP
    unlabelled = errors[truth == 0]
    assert {tuple(p) for p in unlabelled} == NEUTRALS  # striped neutral, nothing else
    assert not (unlabelled == MAGENTA).all(axis=-1).any()  # predictions there are not errors


def test_truth_and_prediction_panels_are_class_colours_over_the_faded_pp(tmp_path):
    truth, pred, pp = tiny_case(1)
    drawn = draw_error_overlay(tmp_path / "o.png", truth, pred, TABLE, pp)
    picture = read_png(tmp_path / "o.png")
    assert np.array_equal(crop(picture, drawn.panels["truth"]), class_panel(truth, TABLE, pp))
    assert np.array_equal(crop(picture, drawn.panels["prediction"]), class_panel(pred, TABLE, pp))
    assert np.array_equal(crop(picture, drawn.panels["errors"]), error_panel(truth, pred, pp))
    # a class pixel leans to its class colour: Quartz (yellow) has more red+green than blue
    quartz = crop(picture, drawn.panels["truth"])[truth == TABLE.names.index("Quartz") + 1].astype(int)
    assert (quartz[:, 0] > quartz[:, 2] + 60).all() and (quartz[:, 1] > quartz[:, 2] + 60).all()
    # without a PP: plain class colours, correct pixels light grey
    plain = draw_error_overlay(tmp_path / "plain.png", truth, pred, TABLE)
    panel = crop(read_png(tmp_path / "plain.png"), plain.panels["prediction"])
    for k, cls in enumerate(TABLE.classes, start=1):
        assert (panel[pred == k] == np.array(cls.rgb, np.uint8)).all()


def test_picture_is_three_panels_wide_and_large_sections_are_shown_at_the_panel_limit(tmp_path):
    s = generate_section(600, 900, seed=3)
    truth = s.labels.astype(np.uint8)
    pred = np.roll(truth, 3, axis=1)
    reads = []

    class Reader:  # a region reader that records what was read
        shape = truth.shape

        def read(self, y0, y1, x0=0, x1=None):
            reads.append((y0, y1))
            return s.pp[y0:y1, x0:x1]

    drawn = draw_error_overlay(tmp_path / "big.png", truth, pred, TABLE, Reader(), max_panel_side=400)
    picture = read_png(tmp_path / "big.png")
    assert picture.shape[1] == 3 * 400 + 4 * PAD
    boxes = [drawn.panels[k] for k in ("truth", "prediction", "errors")]
    assert [(b[2] - b[0], b[3] - b[1]) for b in boxes] == [(400, 267)] * 3
    assert len({b[1] for b in boxes}) == 1 and boxes[0][2] < boxes[1][0] < boxes[1][2] < boxes[2][0]
    small_truth, small_pred, small_pp = shrink(truth, 400), shrink(pred, 400), shrink(s.pp, 400)
    assert np.array_equal(crop(picture, boxes[2]), error_panel(small_truth, small_pred, small_pp))
    assert np.array_equal(crop(picture, boxes[0]), class_panel(small_truth, TABLE, small_pp))
    assert reads and all(y1 - y0 <= 2048 for y0, y1 in reads)  # read by bands, never asked whole as an array
    assert drawn.scale == (600 / 267, 900 / 400)
    # the scores are the section's at full resolution, not the picture's
    counts = ConfusionAccumulator(len(TABLE))
    counts.update(truth, pred)
    metrics = metrics_from_confusion(counts.matrix, TABLE)
    assert (drawn.pixel_accuracy, drawn.mean_iou) == (metrics.pixel_accuracy, metrics.mean_iou)
    assert drawn.evaluated_pixels == truth.size and drawn.pixel_accuracy_kept is None
    # a tiny section keeps a readable slot per panel
    t, p, pp = tiny_case()
    assert read_png(draw_error_overlay(tmp_path / "t.png", t, p, TABLE, pp).path).shape[1] == 3 * MIN_SLOT + 4 * PAD


def test_mismatched_inputs_are_refused():
    truth, pred, pp = tiny_case()
    with pytest.raises(ValueError, match="must be label maps of one size"):
        draw_error_overlay("unused.png", truth, pred[:, :-1], TABLE, pp)
    with pytest.raises(ValueError, match="the PP image is"):
        draw_error_overlay("unused.png", truth, pred, TABLE, pp[:-2])


def test_write_error_overlay_refuses_an_existing_file_unless_overwrite(tmp_path):
    truth, pred, pp = tiny_case()
    target = tmp_path / "figure.png"
    target.write_bytes(b"someone's figure")
    with pytest.raises(ThinSegError, match="output exists already") as caught:
        write_error_overlay(target, truth, pred, TABLE, pp)
    assert caught.value.path == target
    assert target.read_bytes() == b"someone's figure" and leftovers(tmp_path) == []
    drawn = write_error_overlay(target, truth, pred, TABLE, pp, overwrite=True)
    assert drawn.path == str(target) and read_png(target).shape[1] == 3 * MIN_SLOT + 4 * PAD
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figure.png"]  # no temporary left


# ---------------------------------------------------------------------------------------------
# thinseg evaluate --overlays


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """Two 1:1-sized sections S1, S2 (top rows without truth) and a tiny random model."""
    root = tmp_path_factory.mktemp("overlays")
    sections = {}
    for name, seed in (("S1", 21), ("S2", 22)):
        s = generate_section(96, 120, seed=seed)
        labels = s.labels.astype(np.uint8).copy()
        labels[:6] = 0
        path = write_geoslicer_netcdf(
            root / "data" / f"{name}.nc",
            {f"{name}_PP": s.pp, f"{name}_XP": s.xp},
            labelmaps={f"{name}_labels": labels},
        )
        sections[name] = dict(path=path, synth=s, labels=labels)
    model = make_bundle(root / "models" / "ThinSectionEnv" / "m", seed=4, title="tiny")
    return root, sections, model


def predicted(model, synth) -> np.ndarray:
    from thinseg.inference.engine import InferenceOptions, Segmenter
    from thinseg.io.images import ArraySource
    from thinseg.model.bundle import load_bundle

    segmenter = Segmenter(load_bundle(model), InferenceOptions(device="cpu", precision="fp32"))
    return segmenter.segment([ArraySource(synth.pp), ArraySource(synth.xp)]).labels


def test_evaluate_overlays_show_each_section_truth_prediction_and_errors(tmp_path, capsys, evaluated):
    root, sections, model = evaluated
    out = tmp_path / "ev"
    args = ("evaluate", "--model", model, root / "data", "--output", out, "--precision", "fp32", "-q")
    code, stdout, stderr = run_main(capsys, *args, "--overlays", "2")
    assert code == 0, stderr
    doc = json.loads((out / "evaluation.json").read_text())
    scores = {s["name"]: s for s in doc["sections"]}
    for name, entry in sections.items():
        overlay = out / f"overlay_{name}.png"
        assert f"-> {overlay}" in stdout
        picture = read_png(overlay)
        truth, pred, pp = entry["labels"], predicted(model, entry["synth"]), entry["synth"].pp
        # panels at 1:1, each slot MIN_SLOT wide: find them by their exact content
        top = picture.shape[0] - 1
        found = {}
        for panel, image in (
            ("truth", class_panel(truth, TABLE, pp)),
            ("prediction", class_panel(pred, TABLE, pp)),
            ("errors", error_panel(truth, pred, pp)),
        ):
            i = ("truth", "prediction", "errors").index(panel)
            x0 = PAD + i * (MIN_SLOT + PAD) + (MIN_SLOT - truth.shape[1]) // 2
            rows = [y for y in range(top - truth.shape[0]) if np.array_equal(picture[y, x0 : x0 + 120], image[0])]
            assert any(np.array_equal(picture[y : y + 96, x0 : x0 + 120], image) for y in rows), panel
            found[panel] = image
        wrong = int(((found["errors"] == MAGENTA).all(axis=-1)).sum())
        expected_wrong = scores[name]["evaluated_pixels"] * (1 - scores[name]["pixel_accuracy"])
        assert wrong == round(expected_wrong) and wrong > 0  # the errors panel counts what the report scores


def test_evaluate_overlays_count_and_refusal_without_overwrite(tmp_path, capsys, evaluated):
    root, sections, model = evaluated
    out = tmp_path / "ev"
    out.mkdir()
    (out / "overlay_S1.png").write_bytes(b"an older picture")
    args = ("evaluate", "--model", model, root / "data", "--output", out, "-q")
    code, _, stderr = run_main(capsys, *args, "--overlays", "1")
    assert code == 2 and error_lines(stderr) == [
        f"thinseg: error: {out}: output exists already (overlay_S1.png); use --overwrite or another --output"
    ]
    assert sorted(p.name for p in out.iterdir()) == ["overlay_S1.png"]
    assert (out / "overlay_S1.png").read_bytes() == b"an older picture"
    code, _, stderr = run_main(capsys, *args, "--overlays", "1", "--overwrite")
    assert code == 0, stderr
    assert read_png(out / "overlay_S1.png").shape[1] == 3 * MIN_SLOT + 4 * PAD
    assert not (out / "overlay_S2.png").exists()  # only the first N sections
    code, _, stderr = run_main(capsys, *args, "--overlays", "0", "--output", tmp_path / "none")
    assert code == 0 and not [p for p in (tmp_path / "none").iterdir() if p.name.startswith("overlay")]
