"""Test-time augmentation: the averaged probabilities are those of the 4 or 8 passes mapped back
(checked against a hand-written average over torch.flip/torch.rot90), a network that is itself
symmetric is unchanged by it, the engine's labels and confidence come from the average, and
`thinseg segment`/`thinseg evaluate` run it and record the mode they used."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import (
    error_lines,
    make_bundle,
    make_pointwise_bundle,
    open_nc,
    rewrite_bundle,
    run_main,
    section_images,
    tiny_network,
    write_pair,
)

from thinseg.classes.files import default_class_table
from thinseg.cli import options as cli_options
from thinseg.errors import ThinSegError
from thinseg.inference import InferenceOptions, Segmenter, tta
from thinseg.io.images import ArraySource
from thinseg.model import bundle as bundle_module
from thinseg.model.bundle import load_bundle

EXACT = dict(device="cpu", precision="fp32")


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="module")
def pointwise_bundle(tmp_path_factory):
    return make_pointwise_bundle(tmp_path_factory.mktemp("models") / "ThinSectionEnv" / "pointwise")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random U-Net (3x3 kernels): not symmetric under flips or rotations."""
    return make_bundle(tmp_path_factory.mktemp("models") / "ThinSectionEnv" / "tiny", title="tiny")


def hand_average(net, x, mode):
    """The mean softmax over the transformed passes, written out with torch.rot90/torch.flip."""
    if mode == "flips":
        ops = [
            (lambda t: t, lambda t: t),
            (lambda t: t.flip(3), lambda t: t.flip(3)),
            (lambda t: t.flip(2), lambda t: t.flip(2)),
            (lambda t: t.flip(2).flip(3), lambda t: t.flip(3).flip(2)),
        ]
    else:
        ops = []
        for k in range(4):
            ops.append((lambda t, k=k: torch.rot90(t, k, (2, 3)), lambda t, k=k: torch.rot90(t, -k, (2, 3))))
            ops.append(
                (lambda t, k=k: torch.rot90(t.flip(3), k, (2, 3)), lambda t, k=k: torch.rot90(t, -k, (2, 3)).flip(3))
            )
    with torch.no_grad():
        probs = [inverse(torch.softmax(net(forward(x)), 1)) for forward, inverse in ops]
    assert len(probs) == (4 if mode == "flips" else 8)
    return torch.stack(probs).mean(0)


def segment(bundle, pp, xp, **options):
    segmenter = Segmenter(bundle, InferenceOptions(with_confidence=True, **EXACT, **options))
    return segmenter, segmenter.segment([ArraySource(pp), ArraySource(xp)])


def test_mode_lists_agree_with_the_bundle_and_the_command_line():
    assert tta.MODES == bundle_module.TTA_MODES
    assert tta.CHOICES == cli_options.TTA_CHOICES == ("auto",) + tta.MODES
    assert [len(tta.augmentations(m)) for m in tta.MODES] == [1, 4, 8]


@pytest.mark.parametrize("mode", ["flips", "dihedral"])
@pytest.mark.parametrize("shape", [(32, 32), (32, 48)])
def test_average_is_the_mean_of_the_passes_mapped_back(mode, shape):
    """A non-symmetric network: the average equals the hand-computed one, on square and on
    non-square batches (a 90-degree turn of a 32 x 48 batch is 48 x 32), and differs from the
    plain pass (so the passes really saw transformed copies)."""
    net, _ = tiny_network(6, 7, seed=3)
    torch.manual_seed(0)
    x = torch.rand(2, 6, *shape)
    averaged = tta.average_probabilities(net, x, mode, multiple=2)
    expected = hand_average(net, x, mode)
    assert averaged.shape == (2, 7, *shape) and averaged.dtype == torch.float32
    torch.testing.assert_close(averaged, expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(averaged.sum(1), torch.ones(2, *shape))
    with torch.no_grad():
        plain = torch.softmax(net(x), 1)
    assert (averaged - plain).abs().max() > 1e-3
    torch.testing.assert_close(tta.average_probabilities(net, x, "none"), plain)


def test_each_augmentation_is_undone_by_its_inverse_and_the_eight_are_distinct():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float32).reshape(2, 3, 4, 6)
    seen = set()
    for augmentation in tta.augmentations("dihedral"):
        y = augmentation.forward(x)
        assert torch.equal(augmentation.inverse(y), x)
        seen.add((tuple(y.shape), tuple(y.flatten().tolist())))
    rotations = {
        (tuple(r.shape), tuple(r.flatten().tolist()))
        for k in range(4)
        for r in (torch.rot90(x, k, (2, 3)), torch.rot90(x.flip(3), k, (2, 3)))
    }
    assert seen == rotations and len(seen) == 8


def test_turning_a_tile_the_network_cannot_take_is_refused():
    """32 x 40 turned is 40 x 32, which a network of total stride 16 cannot take; a square tile
    keeps its shape when turned, and flips never change it."""
    net, _ = tiny_network(6, 7)
    with pytest.raises(ThinSegError, match="multiples of 16 px"):
        tta.average_probabilities(net, torch.rand(1, 6, 32, 40), "dihedral", multiple=16)
    assert tta.average_probabilities(net, torch.rand(1, 6, 24, 24), "dihedral", multiple=16).shape == (1, 7, 24, 24)
    assert tta.average_probabilities(net, torch.rand(1, 6, 32, 40), "flips", multiple=16).shape == (1, 7, 32, 40)


@pytest.mark.parametrize("tile", [64, None])  # None: the engine's own tile, 112 x 144 (not square) here
@pytest.mark.parametrize("mode", ["flips", "dihedral"])
def test_symmetric_network_gives_the_same_result_with_and_without_tta(pointwise_bundle, mode, tile):
    pp, xp = section_images(100, 140, seed=4)
    _, plain = segment(pointwise_bundle, pp, xp, tile=tile, overlap=16)
    segmenter, averaged = segment(pointwise_bundle, pp, xp, tile=tile, overlap=16, tta=mode)
    assert segmenter.tta == mode
    plan = segmenter.plan_for(100, 140)
    assert (plan.tile_h, plan.tile_w) == ((64, 64) if tile else (112, 144))
    assert np.array_equal(averaged.labels, plain.labels)
    difference = np.abs(averaged.confidence.astype(int) - plain.confidence.astype(int))
    assert difference.max() <= 1 and np.mean(difference == 0) > 0.99  # uint8 rounding of equal probabilities


@pytest.mark.parametrize("mode", ["flips", "dihedral"])
def test_engine_labels_and_confidence_come_from_the_averaged_probabilities(tiny_model, mode):
    """One 64 px tile covers the section: the engine's labels are the argmax and its confidence
    the max of the hand-computed average (not of the plain pass, which differs)."""
    bundle = load_bundle(tiny_model)
    pp, xp = section_images(64, 64, seed=5)
    segmenter, result = segment(bundle, pp, xp, tile=64, overlap=16, tta=mode, fold_batchnorm=False)
    x = bundle.prepare([torch.from_numpy(a).permute(2, 0, 1)[None] for a in (pp, xp)])
    expected = hand_average(bundle.network.eval(), x, mode)[0]
    labels = expected.argmax(0).numpy() + bundle.first_label
    assert np.array_equal(result.labels, labels)
    confidence = (expected.max(0).values * 255 + 0.5).floor().numpy()
    assert np.abs(result.confidence - confidence).max() <= 1
    _, plain = segment(bundle, pp, xp, tile=64, overlap=16, fold_batchnorm=False)
    assert not np.array_equal(plain.labels, result.labels)
    assert mode in segmenter.messages[-1] and "probabilities averaged" in segmenter.messages[-1]


def test_auto_follows_the_bundle_and_an_explicit_mode_overrides_it(tmp_path, tiny_model):
    folder = make_bundle(tmp_path / "ThinSectionEnv" / "dihedral", title="tiny dihedral")
    rewrite_bundle(folder, edit_meta=lambda meta: meta.update(test_time_augmentation="dihedral"))
    bundle = load_bundle(folder)
    assert bundle.test_time_augmentation == "dihedral"
    pp, xp = section_images(64, 80, seed=6)
    auto, auto_result = segment(bundle, pp, xp, overlap=16)  # InferenceOptions' default: "auto"
    _, dihedral_result = segment(bundle, pp, xp, overlap=16, tta="dihedral")
    none, none_result = segment(bundle, pp, xp, overlap=16, tta="none")
    assert (auto.tta, none.tta) == ("dihedral", "none")
    assert np.array_equal(auto_result.labels, dihedral_result.labels)
    assert not np.array_equal(auto_result.labels, none_result.labels)
    assert Segmenter(load_bundle(tiny_model), InferenceOptions(**EXACT)).tta == "none"  # no recommendation
    with pytest.raises(ThinSegError, match="unknown test-time augmentation 'rot45'"):
        Segmenter(bundle, InferenceOptions(tta="rot45", **EXACT))


def test_segment_records_the_mode_in_the_netcdf_and_auto_follows_meta(tmp_path, capsys, tiny_model):
    pp_path, xp_path = write_pair(tmp_path / "in", "S_PP", "S_XP", height=64, width=80, seed=7)
    common = ["--precision", "fp32", "--device", "cpu", "--overlap", "16", "--probabilities", "-q"]
    code, _, stderr = run_main(
        capsys, "segment", pp_path, "--model", tiny_model, "--tta", "dihedral", "-o", tmp_path / "d.nc", *common
    )
    assert code == 0, stderr
    assert "test-time augmentation: dihedral" in stderr
    pp, xp = section_images(64, 80, seed=7)
    _, direct = segment(load_bundle(tiny_model), pp, xp, overlap=16, tta="dihedral")
    with open_nc(tmp_path / "d.nc") as ds:
        assert ds.getncattr("thinseg_test_time_augmentation") == "dihedral"
        assert np.array_equal(np.asarray(ds.variables["S_Segmentation"][:]).squeeze(), direct.labels)
    rewrite_bundle(tiny_model, edit_meta=lambda meta: meta.update(test_time_augmentation="flips"))
    try:
        code, _, stderr = run_main(capsys, "segment", pp_path, "--model", tiny_model, "-o", tmp_path / "a.nc", *common)
    finally:
        rewrite_bundle(tiny_model, edit_meta=lambda meta: meta.pop("test_time_augmentation"))
    assert code == 0, stderr
    with open_nc(tmp_path / "a.nc") as ds:
        assert ds.getncattr("thinseg_test_time_augmentation") == "flips"


def write_labelled_section(path, seed):
    from thinseg.io.netcdf import NetcdfWriter
    from thinseg.synth import generate_section

    s = generate_section(64, 80, seed=seed, mm_per_pixel=0.00132)
    path.parent.mkdir(parents=True, exist_ok=True)
    with NetcdfWriter(path) as writer:
        pp = writer.add_rgb_image("A_PP", s.pp, 0.00132)
        writer.add_rgb_image("A_XP", s.xp, 0.00132)
        writer.add_labelmap("A_labels", s.labels.astype(np.uint8), default_class_table(), 0.00132, reference=pp)
    return s


def test_evaluate_scores_the_averaged_predictions_and_records_the_mode(tmp_path, capsys, tiny_model):
    s = write_labelled_section(tmp_path / "data" / "A.nc", seed=8)
    out = tmp_path / "ev"
    args = ["--device", "cpu", "--precision", "fp32", "--void-border-px", "0", "--overlays", "0", "-q"]
    code, _, stderr = run_main(
        capsys, "evaluate", tmp_path / "data", "--model", tiny_model, "--tta", "dihedral", "-o", out, *args
    )
    assert code == 0, stderr
    doc = json.loads((out / "evaluation.json").read_text())
    assert doc["test_time_augmentation"] == "dihedral"
    bundle = load_bundle(tiny_model)
    _, direct = segment(bundle, s.pp, s.xp, tta="dihedral")
    n = len(bundle.class_table) + 1
    truth = s.labels.astype(np.int64)
    scored = truth > 0
    _, plain = segment(bundle, s.pp, s.xp)
    for labels in (direct.labels, plain.labels):
        pairs = truth[scored] * n + labels[scored].astype(np.int64)
        matrix = np.bincount(pairs, minlength=n * n).reshape(n, n)  # row/column 0: not classified
        assert np.array_equal(np.array(doc["confusion"]), matrix) == (labels is direct.labels)


@pytest.mark.parametrize("command", ["segment", "evaluate"])
def test_an_unknown_tta_value_is_one_error_line(tmp_path, capsys, command):
    with pytest.raises(SystemExit) as exit_info:
        run_main(capsys, command, tmp_path / "x.nc", "--tta", "rot45")
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    [line] = error_lines(stderr)  # argparse's wording of the choices differs between Python versions
    assert line.startswith("thinseg: error: argument --tta: invalid choice:") and "rot45" in line, stderr
    assert all(mode in line for mode in tta.CHOICES) and "Traceback" not in stderr
    assert not (tmp_path / "x.nc").exists()


def test_a_segmentation_job_passes_the_mode_on_and_records_it(tmp_path, tiny_model):
    """The jobs the Slicer panel starts: job.json "tta" (default auto) reaches the engine and
    summary.json says which mode ran; a bad value is one ThinSegError before anything is written."""
    from helpers import write_geoslicer_netcdf

    from thinseg.jobs.runner import run_segment_job

    pp, xp = section_images(64, 80, seed=9)
    write_geoslicer_netcdf(tmp_path / "S1.nc", {"S1_PP": pp, "S1_XP": xp})
    job = {"inputs": ["S1.nc"], "output": "out.nc", "model_dir": str(tiny_model), "device": "cpu", "tta": "flips"}
    summary = run_segment_job(job, tmp_path, emit=lambda event: None)
    assert summary["test_time_augmentation"] == "flips"
    assert json.loads((tmp_path / "summary.json").read_text())["test_time_augmentation"] == "flips"
    del job["tta"]
    assert run_segment_job(job, tmp_path, emit=lambda event: None)["test_time_augmentation"] == "none"
    (tmp_path / "summary.json").unlink()
    with pytest.raises(ThinSegError, match="unknown test-time augmentation 'rot45'"):
        run_segment_job(dict(job, tta="rot45", output="bad.nc"), tmp_path, emit=lambda event: None)
    assert not (tmp_path / "bad.nc").exists() and not (tmp_path / "summary.json").exists()
