"""`thinseg train`, `thinseg evaluate` and `thinseg compare` end to end on generated sections
written as GeoSlicer netCDF files (PP, XP, labelmap): split by section, resume after Ctrl-C,
PP-only models, mapping of QEMSCAN mineral names, whole-dataset confusion matrices checked
against a direct engine run, the figures, comparison sheets, and refusals.

Networks are tiny (base 4, depth 2, 64 px patches, a few steps); the evaluated models are tiny
random UNets, whose labels mean nothing but are reproduced pixel by pixel.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from helpers import error_lines, make_bundle, run_main

from thinseg.classes.files import default_class_table
from thinseg.synth import generate_section

TABLE = default_class_table()
H, W = 128, 144
MM = 0.00132
TINY_TRAIN = [
    "--epochs",
    "2",
    "--steps-per-epoch",
    "2",
    "--patch-size",
    "64",
    "--batch-size",
    "2",
    "--base-channels",
    "4",
    "--depth",
    "2",
    "--val-tile",
    "128",
    "--device",
    "cpu",
    "--precision",
    "fp32",
    "-q",
]
#: QEMSCAN value of each class (GeoSlicer palette order of the synthetic QEMSCAN table); Others
#: become Pyrite left and K-Feldspar right, so mapping by mineral name has work to do.
CLASS_TO_QEMSCAN = {1: 3, 2: 4, 3: 5, 4: 1, 5: 2, 6: 6}
PYRITE, K_FELDSPAR = 6, 7


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def no_traceback(text: str) -> None:
    assert "Traceback" not in text, text


def qemscan_values(labels: np.ndarray) -> np.ndarray:
    lut = np.zeros(256, np.uint8)
    for cls, value in CLASS_TO_QEMSCAN.items():
        lut[cls] = value
    out = lut[labels]
    right = np.zeros(labels.shape, bool)
    right[:, labels.shape[1] // 2 :] = True
    out[(labels == 6) & right] = K_FELDSPAR
    return out


def write_section(path, seed, *, qemscan_names=False, xp=True, mm=MM, unlabelled_rows=6):
    """A GeoSlicer netCDF training section; the top rows carry no truth (label 0)."""
    from thinseg.io.netcdf import NetcdfWriter
    from thinseg.synth.qemscan_like import qemscan_table

    s = generate_section(H, W, seed=seed, mm_per_pixel=mm)
    labels = s.labels.astype(np.uint8).copy()
    labels[:unlabelled_rows] = 0
    stem = path.stem
    path.parent.mkdir(parents=True, exist_ok=True)
    with NetcdfWriter(path) as writer:
        pp = writer.add_rgb_image(f"{stem}_PP", s.pp, mm)
        if xp:
            writer.add_rgb_image(f"{stem}_XP", s.xp, mm)
        if qemscan_names:
            writer.add_labelmap(f"{stem}_QEMSCAN", qemscan_values(labels), qemscan_table(), mm, reference=pp)
        else:
            writer.add_labelmap(f"{stem}_labels", labels, TABLE, mm, reference=pp)
    return path, s, labels


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """data/A..C.nc in the model's classes, data/D.nc with QEMSCAN mineral names."""
    root = tmp_path_factory.mktemp("data")
    sections = {}
    for name, seed, names in (("A", 10, False), ("B", 11, False), ("C", 12, False), ("D", 13, True)):
        path, s, labels = write_section(root / "data" / f"{name}.nc", seed, qemscan_names=names)
        sections[name] = dict(path=path, synth=s, labels=labels, qemscan=names)
    return root / "data", sections


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models") / "ThinSectionEnv"
    return {
        "m1": make_bundle(root / "m1", inputs=("PP", "PX"), seed=0, title="tiny one"),
        "m2": make_bundle(root / "m2", inputs=("PP", "PX"), seed=1, title="tiny two"),
        "pp": make_bundle(root / "pp-only", inputs=("PP",), seed=2, title="tiny PP"),
    }


def truth_of(entry, mapping: dict[int, int] | None = None) -> np.ndarray:
    """Truth in the model's classes, computed here without the library's mapping code."""
    if not entry["qemscan"]:
        return entry["labels"]
    lut = np.zeros(256, np.uint8)
    lut[1:8] = [4, 5, 1, 2, 3, 6, 6]  # Pores, Quartz, Calcite, Dolomite, Mg-Clay, Pyrite, K-Feldspar
    for value, cls in (mapping or {}).items():
        lut[value] = cls
    return lut[qemscan_values(entry["labels"])]


def direct_confusion(model_dir, entries, void_px=2.0, mapping=None):
    """Confusion matrices (all labelled, void borders excluded) from a direct engine run."""
    from thinseg.inference.engine import InferenceOptions, Segmenter
    from thinseg.io.images import ArraySource
    from thinseg.metrics import ConfusionAccumulator, void_border_mask
    from thinseg.model.bundle import load_bundle

    bundle = load_bundle(model_dir)
    segmenter = Segmenter(bundle, InferenceOptions(device="cpu"))
    full, kept = ConfusionAccumulator(len(TABLE)), ConfusionAccumulator(len(TABLE))
    for entry in entries:
        s = entry["synth"]
        images = [ArraySource(s.pp), ArraySource(s.xp)][: len(bundle.input_names)]
        pred = segmenter.segment(images).labels
        truth = truth_of(entry, mapping)
        full.update(truth, pred)
        kept.update(truth, pred, void_border_mask(truth, void_px))
    return full.matrix, kept.matrix


def files_in(folder) -> set[str]:
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


EVAL_FILES = {
    "evaluation.json",
    "evaluation.txt",
    "confusion_matrix.png",
    "confusion_matrix_all_pixels.png",
    "per_class_scores.png",
    "fractions.png",
    "reliability.png",
}


def check_png(path) -> None:
    from PIL import Image

    with Image.open(path) as image:
        assert image.format == "PNG" and min(image.size) > 200


# ---------------------------------------------------------------------------------------------
# evaluate


def test_evaluate_scores_the_whole_dataset_and_writes_figures(tmp_path, capsys, data, models):
    folder, sections = data
    out = tmp_path / "ev"
    code, stdout, stderr = run_main(capsys, "evaluate", "--model", models["m1"], folder, "--output", out, "-q")
    assert code == 0, stderr
    no_traceback(stderr)
    assert files_in(out) == EVAL_FILES | {"overlay_A.png", "overlay_B.png", "overlay_C.png"}  # --overlays 3
    doc = json.loads((out / "evaluation.json").read_text())
    full, kept = direct_confusion(models["m1"], [sections[k] for k in "ABCD"])
    assert np.array_equal(np.array(doc["confusion"]), full)  # one matrix summed over all sections
    assert np.array_equal(np.array(doc["confusion_void_excluded"]), kept)
    assert doc["void_border_px"] == 2.0 and doc["model"] == "tiny one" and doc["model_folder"] == str(models["m1"])
    assert doc["section_files"] == [str(sections[k]["path"]) for k in "ABCD"] and doc["mapping_csv"] is None
    assert [s["name"] for s in doc["sections"]] == ["A", "B", "C", "D"]
    labelled = sum(int(np.count_nonzero(truth_of(sections[k]))) for k in "ABCD")
    assert doc["metrics"]["evaluated_pixels"] == labelled == int(full.sum())
    # the terminal table is EvaluationReport.format_table, also written as text
    assert stdout.startswith("model: tiny one   sections: 4   scored pixels: " + f"{labelled:,}")
    assert "with void borders of 2 px excluded" in stdout and re.search(r"^Calcite\s+\d\.\d{3}", stdout, re.M)
    assert (out / "evaluation.txt").read_text().startswith(stdout.split("\n\n")[0].split("\n")[0])
    assert re.search(r"^D\s+[\d,]+\s+\d+\.\d\d\s+\d\.\d{3}$", stdout, re.M)  # per-section line
    for name in EVAL_FILES | {"overlay_A.png"}:
        assert f"-> {out / name}" in stdout
        if name.endswith(".png"):
            check_png(out / name)
    assert "model: tiny one" in stderr and "4 section(s): A, B, C, D" in stderr


def test_mapping_table_decides_what_qemscan_minerals_count_as(tmp_path, capsys, data, models):
    folder, sections = data
    mapping = tmp_path / "map.csv"
    mapping.write_text("mineral,class\nPyrite,ignore\nK-Feldspar,Quartz\n", encoding="utf-8")
    out = tmp_path / "ev"
    code, _, stderr = run_main(
        capsys,
        "evaluate",
        "--model",
        models["m1"],
        sections["D"]["path"],
        "--mapping",
        mapping,
        "--output",
        out,
        "--overlays",
        "1",
        "--void-border-px",
        "0",
        "-q",
    )
    assert code == 0, stderr
    assert files_in(out) == (EVAL_FILES - {"confusion_matrix_all_pixels.png"}) | {"overlay_D.png"}
    doc = json.loads((out / "evaluation.json").read_text())
    full, _ = direct_confusion(models["m1"], [sections["D"]], mapping={PYRITE: 0, K_FELDSPAR: 5})
    assert np.array_equal(np.array(doc["confusion"]), full)
    assert doc["confusion_void_excluded"] is None and doc["metrics_void_excluded"] is None
    default_full, _ = direct_confusion(models["m1"], [sections["D"]])
    assert full.sum() < default_full.sum()  # the pyrite pixels are no longer scored


def test_existing_reports_are_refused_unless_overwrite(tmp_path, capsys, data, models):
    _, sections = data
    out = tmp_path / "ev"
    args = [
        "evaluate",
        "--model",
        models["m1"],
        sections["A"]["path"],
        "--output",
        out,
        "--overlays",
        "0",
        "--void-border-px",
        "0",
        "-q",
    ]
    assert run_main(capsys, *args)[0] == 0
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    code, _, stderr = run_main(capsys, *args)
    assert code == 2 and error_lines(stderr) == [
        f"thinseg: error: {out}: output exists already (evaluation.json, evaluation.txt, confusion_matrix.png, "
        "per_class_scores.png and 2 more); use --overwrite or another --output"
    ]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    code, _, stderr = run_main(capsys, *args, "--overwrite")
    assert code == 0, stderr
    assert files_in(out) == EVAL_FILES - {"confusion_matrix_all_pixels.png"}  # replaced in place, no temporaries


def test_sections_at_another_resolution_are_resampled_for_the_model(tmp_path, capsys, models):
    path, _, labels = write_section(tmp_path / "coarse" / "E.nc", 20, mm=2 * MM)
    out = tmp_path / "ev"
    code, _, stderr = run_main(capsys, "evaluate", "--model", models["m1"], path, "--output", out, "-q")
    assert code == 0, stderr
    assert f"E: resampling from {2 * MM:g} to the model's {MM:g} mm/px and back" in stderr
    doc = json.loads((out / "evaluation.json").read_text())
    assert doc["metrics"]["evaluated_pixels"] == int(np.count_nonzero(labels))  # scored on the section's grid


def _bad_data(kind, folder, models):
    """(evaluate arguments, the path the message names or None, problem regex)."""
    model = ["--model", models["m1"]]
    if kind == "missing file":
        return model + [folder / "nope.nc"], folder / "nope.nc", "not found"
    if kind == "empty folder":
        (folder / "empty").mkdir()
        return model + [folder / "empty"], folder / "empty", "folder holds no netCDF files and no section images"
    if kind == "no labelmap":
        from helpers import write_geoslicer_netcdf

        s = generate_section(H, W, seed=30)
        path = write_geoslicer_netcdf(folder / "nolab.nc", {"N_PP": s.pp, "N_XP": s.xp})
        return model + [path], path, "no labelmap variable"
    if kind == "no xp for a pp+xp model":
        path, _, _ = write_section(folder / "ponly.nc", 31, xp=False)
        return model + [path], path, r"section 'ponly' has no XP image; model 'tiny one' needs PP\+XP"
    if kind == "no truth in model classes":
        path, _, _ = write_section(folder / "blank.nc", 32, unlabelled_rows=H)
        return model + [path], path, r"section 'blank': no labelled pixel belongs to a model class"
    if kind == "mapping to an unknown class":
        path, _, _ = write_section(folder / "ok.nc", 33)
        mapping = folder / "map.csv"
        mapping.write_text("Pyrite,Gold\n", encoding="utf-8")
        return (
            model + [path, "--mapping", mapping],
            mapping,
            r"mapping table sends 'pyrite' to 'Gold', which is not a model class",
        )
    if kind == "missing model":
        path, _, _ = write_section(folder / "ok.nc", 33)
        return ["--model", folder / "nomodel", path], folder / "nomodel", "model folder not found"
    raise AssertionError(kind)


BAD_DATA = [
    "missing file",
    "empty folder",
    "no labelmap",
    "no xp for a pp+xp model",
    "no truth in model classes",
    "mapping to an unknown class",
    "missing model",
]


@pytest.mark.parametrize("kind", BAD_DATA)
def test_bad_data_gets_one_line_and_no_output(tmp_path, capsys, models, kind):
    folder = tmp_path / "in"
    folder.mkdir()
    args, culprit, problem = _bad_data(kind, folder, models)
    out = tmp_path / "ev"
    code, _, stderr = run_main(capsys, "evaluate", *args, "--output", out, "-q")
    assert code == 2, stderr
    no_traceback(stderr)
    lines = error_lines(stderr)
    assert len(lines) == 1, stderr
    prefix = f"thinseg: error: {re.escape(str(culprit))}: " if culprit is not None else "thinseg: error: "
    assert re.match(prefix + problem, lines[0]), lines[0]
    assert files_in(out) == set()


def test_ctrl_c_during_evaluation_keeps_nothing(tmp_path, capsys, data, models, monkeypatch):
    from thinseg.reports import plots

    folder, _ = data

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(plots, "plot_fractions_scatter", interrupted)  # after the JSON and other PNGs
    out = tmp_path / "ev"
    code, _, stderr = run_main(capsys, "evaluate", "--model", models["m1"], folder, "--output", out, "-q")
    assert code == 130 and "no partial output was kept" in stderr
    assert files_in(out) == set()


def test_library_call_on_in_memory_sections(data, models):
    """`evaluate_model` (what the Slicer logic can call) on ArraySections: the same matrices, and
    each section handed to `on_section` with its truth, prediction, mask and PP image."""
    from thinseg.model.bundle import load_bundle
    from thinseg.pipelines.evaluate import evaluate_model
    from thinseg.training import ArraySection

    _, sections = data
    entries = [sections[k] for k in "AB"]
    arrays = [
        ArraySection(k, e["synth"].pp, e["labels"], e["synth"].xp, mm_per_pixel=MM) for k, e in zip("AB", entries)
    ]
    seen = []

    def on_section(sp):
        assert sp.images["PP"].read(0, 2).shape == (2, W, 3) and sp.keep.shape == sp.truth.shape
        seen.append((sp.name, int(np.count_nonzero(sp.truth)), sp.preds["tiny"].shape))

    report = evaluate_model(load_bundle(models["m1"]), arrays, 2.0, name="tiny", on_section=on_section)
    full, kept = direct_confusion(models["m1"], entries)
    assert np.array_equal(report.confusion, full) and np.array_equal(report.confusion_void_excluded, kept)
    assert seen == [(k, int(np.count_nonzero(e["labels"])), (H, W)) for k, e in zip("AB", entries)]
    assert report.model == "tiny" and report.section_names == ["A", "B"]


# ---------------------------------------------------------------------------------------------
# compare


def test_compare_shows_models_side_by_side_with_sheets_and_html(tmp_path, capsys, data, models):
    folder, sections = data
    out = tmp_path / "cmp"
    code, stdout, stderr = run_main(
        capsys, "compare", "--models", models["m1"], models["m2"], folder, "--output", out, "--sheets", "2", "-q"
    )
    assert code == 0, stderr
    no_traceback(stderr)
    assert files_in(out) == {
        "comparison.json",
        "comparison.txt",
        "per_class_scores.png",
        "comparison.html",
        "compare_A.png",
        "compare_B.png",
    }
    doc = json.loads((out / "comparison.json").read_text())
    assert [m["name"] for m in doc["models"]] == ["m1", "m2"]
    for entry, key in zip(doc["models"], ("m1", "m2")):  # the same numbers evaluate gives
        full, kept = direct_confusion(models[key], [sections[k] for k in "ABCD"])
        assert np.array_equal(np.array(entry["confusion"]), full)
        assert np.array_equal(np.array(entry["confusion_void_excluded"]), kept)
    assert doc["sections"] == ["A", "B", "C", "D"] and [s["section"] for s in doc["sheets"]] == ["A", "B"]
    assert all(len(s["regions_yx"]) >= 1 for s in doc["sheets"])
    # the table: one column per model, the best value starred
    header = stdout.splitlines()[0]
    assert header.split() == ["m1", "m2"]
    assert re.search(r"^  mean IoU\s+\d\.\d{3}[* ]\s+\d\.\d{3}[* ]", stdout, re.M) and "*" in stdout
    html = (out / "comparison.html").read_text()
    assert html.count("<img src='data:image/png;base64,") == 3  # bars + 2 sheets
    for name in ("compare_A.png", "compare_B.png", "per_class_scores.png"):
        check_png(out / name)

    # DATA first, then --models: the same result
    code, stdout2, _ = run_main(
        capsys,
        "compare",
        folder,
        "--models",
        models["m1"],
        models["m2"],
        "--output",
        tmp_path / "cmp2",
        "--sheets",
        "0",
        "-q",
    )
    assert code == 0 and stdout2.split("\n\n")[0] == stdout.split("\n\n")[0]
    assert files_in(tmp_path / "cmp2") == {
        "comparison.json",
        "comparison.txt",
        "per_class_scores.png",
        "comparison.html",
    }


def test_compare_refuses_what_it_cannot_compare(tmp_path, capsys, data, models):
    folder, _ = data
    other = make_bundle(tmp_path / "three", inputs=("PP", "PX"))
    from helpers import rewrite_bundle

    def rename(meta):
        meta["outputs"]["y"]["class_names"] = [n.upper() for n in meta["outputs"]["y"]["class_names"]]

    rewrite_bundle(other, edit_meta=rename, edit_saved=lambda saved: rename(saved["config"]["meta"]))
    cases = [
        (["--models", models["m1"], folder], "give at least two model folders to compare"),
        (["--models", models["m1"], models["m2"]], "no DATA given"),
        (["--models", models["m1"], other, folder], "the models predict different classes"),
        (["--models", models["m1"], models["pp"], folder / "A.nc", tmp_path / "nope.nc"], "not found"),
    ]
    for args, problem in cases:
        out = tmp_path / "cmp"
        code, _, stderr = run_main(capsys, "compare", *args, "--output", out, "-q")
        assert code == 2, stderr
        lines = error_lines(stderr)
        assert len(lines) == 1 and problem in lines[0], stderr
        assert files_in(out) == set()


# ---------------------------------------------------------------------------------------------
# train


def test_train_splits_by_section_exports_a_model_and_evaluate_reads_it(tmp_path, capsys, data):
    folder, _ = data
    run = tmp_path / "run"
    code, stdout, stderr = run_main(capsys, "train", folder, "--output", run, "--val-fraction", "0.25", *TINY_TRAIN)
    assert code == 0, stderr
    no_traceback(stderr)
    split = json.loads((run / "split.json").read_text())
    assert len(split["val"]) == 1 and len(split["train"]) == 3 and split["test"] == []
    assert sorted(split["train"] + split["val"]) == ["A", "B", "C", "D"]
    meta = json.loads((run / "model" / "meta.json").read_text())
    assert meta["training"]["data"]["val_sections"] == split["val"]
    assert meta["inputs"].keys() == {"PP", "PX"}
    best = meta["metrics"]["epoch"]
    assert f"model: {run / 'model'}" in stdout and f"best epoch: {best} of 2 run" in stdout
    assert f"mean IoU {meta['metrics']['mean_iou']:.4f}" in stdout and "IoU Calcite" in stdout
    assert "epoch 1/2: loss" in stderr and "epoch 2/2: loss" in stderr  # the loop's epoch lines

    # the same run folder again: refused, nothing touched
    log_before = (run / "training_log.csv").read_bytes()
    code, _, stderr = run_main(capsys, "train", folder, "--output", run, *TINY_TRAIN)
    assert code == 2 and len(error_lines(stderr)) == 1 and "a training run already exists here" in stderr
    assert (run / "training_log.csv").read_bytes() == log_before

    # the trained model evaluates
    code, stdout, stderr = run_main(
        capsys,
        "evaluate",
        "--model",
        run / "model",
        folder / "A.nc",
        "--output",
        tmp_path / "ev",
        "--overlays",
        "0",
        "-q",
    )
    assert code == 0, stderr
    assert "model: Thin-section multiphase U-Net" in stdout


def test_ctrl_c_then_resume(tmp_path, capsys, data, monkeypatch):
    from thinseg.training.loop import TrainingRun

    folder, sections = data
    run = tmp_path / "run"
    original = TrainingRun.train_epoch

    def second_epoch_interrupted(self):
        if self.epoch == 1:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(TrainingRun, "train_epoch", second_epoch_interrupted)
    args = ["train", folder / "A.nc", folder / "D.nc", "--val", folder / "B.nc", "--output", run, *TINY_TRAIN]
    code, stdout, stderr = run_main(capsys, *args)
    assert code == 130
    no_traceback(stderr)
    assert (
        f"thinseg: interrupted; finished epochs are kept in {run}: run the same command with --resume to continue"
        in stderr
    )
    assert (run / "checkpoint.pt").is_file() and len((run / "training_log.csv").read_text().splitlines()) == 2
    monkeypatch.setattr(TrainingRun, "train_epoch", original)
    code, stdout, stderr = run_main(capsys, *args, "--resume")
    assert code == 0, stderr
    assert "resuming after epoch 1" in stderr and "best epoch:" in stdout
    assert len((run / "training_log.csv").read_text().splitlines()) == 3  # header + epochs 1, 2
    split = json.loads((run / "split.json").read_text())
    assert split["train"] == ["A", "D"] and split["val"] == ["B"]


def test_pp_only_model_without_validation(tmp_path, capsys, data):
    folder, _ = data
    run = tmp_path / "run"
    code, stdout, stderr = run_main(
        capsys,
        "train",
        folder / "C.nc",
        "--output",
        run,
        "--pp-only",
        "--model-name",
        "pp-model",
        "--title",
        "PP only",
        *TINY_TRAIN,
    )
    assert code == 0, stderr
    meta = json.loads((run / "pp-model" / "meta.json").read_text())
    assert list(meta["inputs"]) == ["PP"] and meta["title"] == "PP only"
    assert "no validation sections: the last epoch was exported" in stdout


@pytest.mark.parametrize(
    "case", ["resume and overwrite", "val and split file", "missing data", "no labelmap", "bad patch size"]
)
def test_train_refusals(tmp_path, capsys, data, case):
    folder, _ = data
    run = tmp_path / "run"
    args = ["train", folder, "--output", run, *TINY_TRAIN]
    if case == "resume and overwrite":
        args += ["--resume", "--overwrite"]
        problem = "--resume continues the run in RUN_DIR and --overwrite starts it again"
    elif case == "val and split file":
        args += ["--val", folder / "A.nc", "--split-file", tmp_path / "split.json"]
        problem = "--val names the validation sections; --split-file cannot be used with it"
    elif case == "missing data":
        args[1] = tmp_path / "nothing"
        problem = f"{tmp_path / 'nothing'}: not found"
    elif case == "no labelmap":
        from helpers import write_geoslicer_netcdf

        s = generate_section(H, W, seed=40)
        args[1] = write_geoslicer_netcdf(tmp_path / "bare.nc", {"bare_PP": s.pp, "bare_XP": s.xp})
        problem = "no labelmap variable"
    else:
        args += ["--patch-size", "65"]
        problem = "patch size 65 (--patch-size) must be a multiple of 2"
    code, _, stderr = run_main(capsys, *args)
    assert code == 2, stderr
    no_traceback(stderr)
    lines = error_lines(stderr)
    assert len(lines) == 1 and problem in lines[0], stderr
    assert not (run / "model").exists() and not (run / "checkpoint.pt").exists()
