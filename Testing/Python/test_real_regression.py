"""Regression on REAL rock: a PP+XP model trained briefly (CPU, about two minutes) on two real
sandstone fields must segment a third field clearly better than the trivial answer (the
training majority class everywhere). The sections go through the user's data path
(`thinseg prepare`: XP aligned to PP, mask codes named by the class file, GeoSlicer netCDF),
and the checks fail if that path swaps PP and XP or leaves XP offset from PP.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import REAL_CLASSES, read_rgb, real_field, run_main

from thinseg.classes.files import read_model_classes
from thinseg.data.sections import open_section
from thinseg.io.netcdf import NetcdfWriter
from thinseg.metrics.evaluator import Evaluator
from thinseg.model.bundle import load_bundle
from thinseg.pipelines.evaluate import evaluate_model
from thinseg.registration.ppxp import estimate_xp_offset, shift_image
from thinseg.training import TrainConfig, train

TRAIN_FIELDS, TEST_FIELD = ("2a", "3a"), "10a"
MODEL_MM = 0.00264  # half the (nominal) image resolution: a 256 px patch holds several grains


def prepare(capsys, field: str, out) -> object:
    files = real_field(field)
    code, _, err = run_main(
        capsys,
        "prepare",
        files["pp"],
        files["mask"],
        "--xp",
        files["xp"],
        "--pp-pattern",
        "paralelos",
        "--classes",
        REAL_CLASSES,
        "--output",
        out,
    )
    assert code == 0, err
    return out / f"{field}.nc"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    capsys = _NoCapture()
    root = tmp_path_factory.mktemp("real")
    train_files = [prepare(capsys, f, root / "train") for f in TRAIN_FIELDS]
    test_file = prepare(capsys, TEST_FIELD, root / "test")
    torch.manual_seed(0)
    config = TrainConfig(
        output_dir=root / "run",
        train_sections=train_files,
        val_sections=(),
        class_table=read_model_classes(REAL_CLASSES),
        pixels_per_mm=1 / MODEL_MM,
        patch_size=256,
        batch_size=8,
        steps_per_epoch=50,
        epochs=2,
        warmup_steps=10,
        lr=2e-3,
        device="cpu",
        precision="fp32",
        seed=0,
        progress=False,
        patience=None,
    )
    result = train(config, log=lambda _m: None)
    return {"model": load_bundle(result.model_dir), "train": train_files, "test": test_file, "root": root}


class _NoCapture:
    """run_main wants capsys; module fixtures cannot have it, so output is simply let through."""

    def readouterr(self):
        return "", ""


def _majority_baseline(train_files, test_file, table) -> float:
    counts = sum(np.bincount(open_section(f).read_labels().reshape(-1), minlength=len(table) + 1) for f in train_files)
    majority = int(np.argmax(counts[1:])) + 1
    truth = open_section(test_file).read_labels()
    evaluator = Evaluator(table)
    evaluator.add_section("majority", truth, np.full_like(truth, majority))
    return evaluator.report().metrics.mean_iou


def test_training_sections_have_xp_aligned_to_pp(run):
    for path in run["train"]:
        section = open_section(path)
        pp = section.source("PP").read(0, 1200, 0, 1600)
        xp = section.source("XP").read(0, 1200, 0, 1600)
        assert estimate_xp_offset(pp, xp)[:2] == (0, 0), path.name
        raw_xp = read_rgb(real_field(path.stem)["xp"])
        assert estimate_xp_offset(pp, raw_xp)[:2] != (0, 0)  # the photographs themselves are offset


def test_a_briefly_trained_model_beats_the_majority_baseline_on_an_unseen_field(run):
    table = run["model"].class_table
    baseline = _majority_baseline(run["train"], run["test"], table)
    report = evaluate_model(run["model"], [run["test"]], void_border_px=0)
    miou = report.metrics.mean_iou
    print(
        f"{TEST_FIELD}: mean IoU {miou:.3f}, majority baseline {baseline:.3f}, "
        f"accuracy {report.metrics.pixel_accuracy:.3f}"
    )
    assert miou > baseline + 0.10 and miou > 1.8 * baseline


def test_the_model_reads_pp_and_xp_in_the_documented_order(run, tmp_path):
    """PP from the PPL photograph and XP from the XPL one, read here without the data path: if
    the path had swapped them for training, the model would score better on the swapped file."""
    files = real_field(TEST_FIELD)
    pp, xp = read_rgb(files["pp"]), read_rgb(files["xp"])
    dy, dx, _ = estimate_xp_offset(pp, xp)
    xp = shift_image(xp, dy, dx)
    truth = open_section(run["test"]).read_labels()
    scores = {}
    for name, (first, second) in {"documented": (pp, xp), "swapped": (xp, pp)}.items():
        path = tmp_path / f"{name}.nc"
        with NetcdfWriter(path) as writer:
            ref = writer.add_rgb_image("S_PP", first, 0.00132)
            writer.add_rgb_image("S_XP", second, 0.00132)
            writer.add_labelmap("S_labels", truth, run["model"].class_table, 0.00132, reference=ref)
        scores[name] = evaluate_model(run["model"], [path], void_border_px=0).metrics.mean_iou
    assert scores["documented"] > scores["swapped"] + 0.08, scores
