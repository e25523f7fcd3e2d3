"""The minimum-region sieve: a speck gives way to its runner-up class and a grain stays; the
sieve on a stream of bands equals the whole-map sieve for any band height; the engine's labels
and confidence are the sieve of its own top two classes (checked against the network's logits),
also in column stripes and parts, where regions touching a seam are kept; a bundle's
`min_region_px` is what "auto" runs; `thinseg segment`/`evaluate` and segmentation jobs run the
sieve and record it, and a trained bundle carries the recipe's value."""

from __future__ import annotations

import json
from typing import ClassVar

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
from helpers import make_bundle, open_nc, rewrite_bundle, run_main, section_images, write_pair

from thinseg.errors import ThinSegError
from thinseg.inference import InferenceOptions, Segmenter
from thinseg.inference import engine as engine_module
from thinseg.inference.regions import RegionSieve, Seams, runner_up_confidence, sieve, small_regions, still_small
from thinseg.io.images import ArraySource
from thinseg.model.bundle import load_bundle

EXACT = dict(device="cpu", precision="fp32")


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A tiny random U-Net: its maps are speckled, so the sieve has work to do."""
    return make_bundle(tmp_path_factory.mktemp("models") / "ThinSectionEnv" / "tiny", title="tiny")


def blob_maps(height, width, seed, classes=4):
    """Labels with grains and specks (smoothed noise, argmax), a runner-up class that differs from
    each label, and confidences with p1 + p2 <= 255."""
    rng = np.random.default_rng(seed)
    noise = ndi.gaussian_filter(rng.random((classes, height, width)), sigma=(0, 2.5, 2.5))
    labels = (noise.argmax(0) + 1).astype(np.uint8)
    runner = ((labels + rng.integers(0, classes - 1, labels.shape)) % classes + 1).astype(np.uint8)
    p1 = rng.integers(100, 256, labels.shape).astype(np.uint8)
    p2 = (rng.random(labels.shape) * (256 - p1.astype(int))).astype(np.uint8)
    return labels, runner, p1, p2


def test_a_speck_takes_its_runner_up_class_and_a_grain_stays():
    labels = np.full((40, 40), 2, np.uint8)
    labels[10:13, 10:13] = 3  # a 9 px speck of class 3 in a grain of class 2
    labels[25:35, 25:35] = 4  # a 100 px grain
    labels[0:2, 30:34] = 5  # 8 px at the top edge, whose runner-up (1) is in no grain around it
    labels[35:37, 23:25] = 3  # 4 px touching the 100 px grain, whose runner-up is that grain's class
    runner = np.full_like(labels, 1)
    runner[10:13, 10:13] = 2
    runner[35:37, 23:25] = 4
    p1 = np.full_like(labels, 204)  # 0.8
    p2 = np.full_like(labels, 38)  # 0.149: 0.745 of what is left without the removed class
    out, conf = sieve(labels, runner, 20, p1, p2)
    assert (out[10:13, 10:13] == 2).all() and (out[25:35, 25:35] == 4).all()
    assert (out[35:37, 23:25] == 4).all()  # joined the grain of its runner-up class
    assert (out[0:2, 30:34] == 2).all()  # still a speck as class 1: it takes the class around it
    changed = labels != out
    assert conf is not None and (conf[changed] == round(38 * 255 / 51)).all() and (conf[~changed] == 204).all()
    assert np.array_equal(runner_up_confidence(np.array([204, 255], np.uint8), np.array([38, 0], np.uint8)), [190, 0])
    # 8-connected: four pixels touching only at corners are one region of 4 px
    diagonal = np.full((20, 20), 2, np.uint8)
    for i in range(4):
        diagonal[5 + i, 5 + i] = 3
    assert (sieve(diagonal, np.full_like(diagonal, 2), 4)[0] == 3).sum() == 4
    assert (sieve(diagonal, np.full_like(diagonal, 2), 5)[0] == 3).sum() == 0
    # a region touching a seam may go on beyond it: kept
    kept, _ = sieve(labels, runner, 20, seams=Seams(top=True))
    assert (kept[0:2, 30:34] == 5).all() and (kept[10:13, 10:13] == 2).all()
    assert np.array_equal(sieve(labels, runner, 0)[0], labels) and np.array_equal(sieve(labels, runner, 1)[0], labels)


@pytest.mark.parametrize("seams", [Seams(), Seams(top=True, right=True), Seams(True, True, True, True)])
def test_the_second_round_finds_exactly_the_regions_a_full_relabelling_finds(seams):
    """`still_small` labels only the changed pixels; it must agree with labelling the whole map."""
    for seed in range(4):
        labels, runner, _, _ = blob_maps(97, 83, seed=seed)
        changed = small_regions(labels, 60, seams)
        out = labels.copy()
        out[changed] = runner[changed]
        expected = changed & small_regions(out, 60, seams)
        assert expected.any()
        assert np.array_equal(still_small(out, changed, 60, seams), expected)


class Bands:
    def __init__(self):
        self.rows = []

    def write_rows(self, y0, labels, confidence, x0=0):
        self.rows.append((y0, x0, labels.copy(), None if confidence is None else confidence.copy()))


@pytest.mark.parametrize("band", [1, 7, 30, 64, 200])
@pytest.mark.parametrize("min_pixels", [5, 40, 150])
def test_the_streamed_sieve_equals_the_whole_map_sieve(band, min_pixels):
    labels, runner, p1, p2 = blob_maps(173, 61, seed=band + min_pixels)
    whole, whole_conf = sieve(labels, runner, min_pixels, p1, p2)
    assert not np.array_equal(whole, labels)  # there were specks to remove
    sink = Bands()
    stream = RegionSieve(sink, min_pixels)
    for y0 in range(0, 173, band):
        y1 = min(173, y0 + band)
        stream.write_band(y0, labels[y0:y1], runner[y0:y1], p1[y0:y1], p2[y0:y1], x0=0)
    stream.finish()
    starts = [y0 for y0, _, _, _ in sink.rows]
    assert starts == sorted(starts) and all(x0 == 0 for _, x0, _, _ in sink.rows)
    assert np.array_equal(np.concatenate([r[2] for r in sink.rows]), whole)
    assert np.array_equal(np.concatenate([r[3] for r in sink.rows]), whole_conf)
    # bands must follow each other
    stream = RegionSieve(Bands(), min_pixels)
    stream.write_band(10, labels[:5], runner[:5], x0=3)
    with pytest.raises(AssertionError, match="expected row 15"):
        stream.write_band(16, labels[:5], runner[:5], x0=3)


def top_two(logits, first_label):
    """Labels, runner-up, and both probabilities x 255 (uint8, rounded as the engine rounds) of (C, H, W) logits."""
    prob = torch.softmax(logits.double(), dim=0)
    values, indices = prob.topk(2, dim=0)
    to_u8 = lambda p: (p * 255 + 0.5).floor().clamp(0, 255).to(torch.uint8).numpy()  # noqa: E731
    return (
        (indices[0] + first_label).numpy().astype(np.uint8),
        (indices[1] + first_label).numpy().astype(np.uint8),
        to_u8(values[0]),
        to_u8(values[1]),
    )


def test_the_engine_sieves_its_own_top_two_classes(tiny_model):
    """One 64 px tile covers the section, so the engine's logits are the network's."""
    bundle = load_bundle(tiny_model)
    pp, xp = section_images(64, 64, seed=5)
    options = dict(with_confidence=True, tile=64, overlap=16, fold_batchnorm=False, **EXACT)
    plain = Segmenter(bundle, InferenceOptions(min_region=0, **options)).segment([ArraySource(pp), ArraySource(xp)])
    segmenter = Segmenter(bundle, InferenceOptions(min_region=30, **options))
    sieved = segmenter.segment([ArraySource(pp), ArraySource(xp)])
    assert segmenter.min_region == 30 and "regions under 30 px" in segmenter.messages[-1]
    x = bundle.prepare([torch.from_numpy(a).permute(2, 0, 1)[None] for a in (pp, xp)])
    with torch.no_grad():
        logits = bundle.network.eval()(x)[0]
    labels, runner, p1, p2 = top_two(logits, bundle.first_label)
    assert np.array_equal(plain.labels, labels)
    expected, expected_conf = sieve(labels, runner, 30, p1, p2)
    changed = expected != labels
    assert changed.sum() > 20  # the random network leaves specks
    assert np.array_equal(sieved.labels, expected)
    assert np.abs(sieved.confidence.astype(int) - expected_conf.astype(int)).max() <= 1  # uint8 rounding
    touched = small_regions(labels, 30)  # a pixel can end with its own class again, but a new confidence
    assert np.array_equal(sieved.confidence[~touched], plain.confidence[~touched]) and changed.sum() <= touched.sum()


class RawBands(RegionSieve):
    """A RegionSieve that also keeps what it was given: the engine's unsieved top two classes."""

    given: ClassVar[list] = []

    def write_band(self, y0, labels, runner_up, confidence=None, runner_up_probability=None, x0=0):
        RawBands.given.append((y0, x0, labels.copy(), runner_up.copy(), self.seams))
        super().write_band(y0, labels, runner_up, confidence, runner_up_probability, x0)


@pytest.mark.parametrize("parts", [None, 2])
def test_in_stripes_and_parts_each_is_sieved_whole_and_seams_keep_their_regions(tiny_model, monkeypatch, parts):
    from test_segment_streaming import WindowRecorder

    from thinseg.inference.engine import tile_row_groups

    seg = Segmenter(
        load_bundle(tiny_model), InferenceOptions(tile=64, overlap=16, min_region=25, with_confidence=True, **EXACT)
    )
    sources = [ArraySource(a) for a in section_images(200, 330, seed=3)]
    monkeypatch.setattr(engine_module, "STRIPE_WIDTH", 128)
    monkeypatch.setattr(engine_module, "STRIPE_ALIGN", 32)
    monkeypatch.setattr(engine_module, "RegionSieve", RawBands)
    RawBands.given = []
    sink = WindowRecorder()
    runs = [None] if parts is None else tile_row_groups(len(seg.plan_for(200, 330).ys), parts)
    for part in runs:
        seg.stream(sources, sink, tile_rows=part)
    labels, _ = sink.maps(200, 330)
    raw = np.zeros((200, 330), np.uint8)
    runner = np.zeros_like(raw)
    streams: dict = {}
    for y0, x0, lab, run, seams in RawBands.given:
        h, w = lab.shape
        raw[y0 : y0 + h, x0 : x0 + w], runner[y0 : y0 + h, x0 : x0 + w] = lab, run
        streams.setdefault((x0, seams), []).append((y0, h, w))
    assert len({x0 for x0, _ in streams}) == 3 and any(s.left and s.right for _, s in streams)
    if parts is not None:
        assert any(s.bottom for _, s in streams) and any(s.top for _, s in streams)
    expected = np.zeros_like(raw)
    for (x0, seams), bands in streams.items():
        y0, y1, w = bands[0][0], bands[-1][0] + bands[-1][1], bands[0][2]
        expected[y0:y1, x0 : x0 + w] = sieve(raw[y0:y1, x0 : x0 + w], runner[y0:y1, x0 : x0 + w], 25, seams=seams)[0]
    assert np.array_equal(labels, expected)
    whole = sieve(raw, runner, 25)[0]
    differs = labels != whole
    assert 0 < differs.sum() < 0.05 * differs.size  # only regions on seams are kept
    assert (labels != raw).sum() > 100


def test_auto_follows_the_bundle_and_a_bad_value_is_refused(tmp_path, tiny_model):
    folder = make_bundle(tmp_path / "ThinSectionEnv" / "sieved", title="tiny sieved")
    rewrite_bundle(folder, edit_meta=lambda meta: meta.update(min_region_px=40))
    bundle = load_bundle(folder)
    assert bundle.min_region_px == 40 and load_bundle(tiny_model).min_region_px == 0
    pp, xp = section_images(64, 80, seed=6)
    run = lambda b, **o: Segmenter(b, InferenceOptions(overlap=16, **EXACT, **o)).segment(  # noqa: E731
        [ArraySource(pp), ArraySource(xp)]
    )
    assert np.array_equal(run(bundle).labels, run(bundle, min_region=40).labels)
    assert not np.array_equal(run(bundle).labels, run(bundle, min_region=0).labels)
    assert Segmenter(bundle, InferenceOptions(min_region=0, **EXACT)).min_region == 0
    for bad_meta in (-5, "big", True):
        rewrite_bundle(folder, edit_meta=lambda meta: meta.update(min_region_px=bad_meta))  # noqa: B023
        assert load_bundle(folder).min_region_px == 0
    for bad in (-1, 2.5, "x"):
        with pytest.raises(ThinSegError, match="minimum region"):
            Segmenter(bundle, InferenceOptions(min_region=bad, **EXACT))


def test_segment_runs_the_sieve_and_records_it(tmp_path, capsys, tiny_model):
    pp_path, _ = write_pair(tmp_path / "in", "S_PP", "S_XP", height=64, width=80, seed=7)
    common = ["--precision", "fp32", "--device", "cpu", "--overlap", "16", "--probabilities", "-q"]
    code, _, stderr = run_main(
        capsys, "segment", pp_path, "--model", tiny_model, "--min-region", "30", "-o", tmp_path / "s.nc", *common
    )
    assert code == 0, stderr
    assert "minimum region: 30" in stderr
    pp, xp = section_images(64, 80, seed=7)
    direct = Segmenter(load_bundle(tiny_model), InferenceOptions(overlap=16, min_region=30, **EXACT)).segment(
        [ArraySource(pp), ArraySource(xp)]
    )
    with open_nc(tmp_path / "s.nc") as ds:
        assert int(ds.getncattr("thinseg_min_region_px")) == 30
        assert np.array_equal(np.asarray(ds.variables["S_Segmentation"][:]).squeeze(), direct.labels)
    code, _, stderr = run_main(capsys, "segment", pp_path, "--model", tiny_model, "-o", tmp_path / "n.nc", *common)
    assert code == 0 and "minimum region: off" in stderr
    with open_nc(tmp_path / "n.nc") as ds:
        assert int(ds.getncattr("thinseg_min_region_px")) == 0
        assert not np.array_equal(np.asarray(ds.variables["S_Segmentation"][:]).squeeze(), direct.labels)


@pytest.mark.parametrize("value", ["-3", "ten", "2.5"])
@pytest.mark.parametrize("command", ["segment", "evaluate", "train"])
def test_a_bad_min_region_is_one_error_line(tmp_path, capsys, command, value):
    from helpers import error_lines

    with pytest.raises(SystemExit) as exit_info:
        run_main(capsys, command, tmp_path / "x.nc", f"--min-region={value}")
    assert exit_info.value.code == 2
    stderr = capsys.readouterr().err
    [line] = error_lines(stderr)
    assert line.startswith("thinseg: error: argument --min-region:") and value in line, stderr
    assert not (tmp_path / "x.nc").exists()


def test_evaluate_and_jobs_run_the_sieve_and_record_it(tmp_path, capsys, tiny_model):
    from helpers import write_geoslicer_netcdf
    from test_tta import write_labelled_section

    from thinseg.jobs.runner import run_segment_job

    s = write_labelled_section(tmp_path / "data" / "A.nc", seed=8)
    args = ["--device", "cpu", "--precision", "fp32", "--void-border-px", "0", "--overlays", "0", "-q"]
    docs = {}
    for value in ("0", "30"):
        out = tmp_path / f"ev{value}"
        code, _, stderr = run_main(
            capsys, "evaluate", tmp_path / "data", "--model", tiny_model, "--min-region", value, "-o", out, *args
        )
        assert code == 0, stderr
        docs[value] = json.loads((out / "evaluation.json").read_text())
    assert (docs["0"]["min_region_px"], docs["30"]["min_region_px"]) == (0, 30)
    bundle = load_bundle(tiny_model)
    direct = Segmenter(bundle, InferenceOptions(min_region=30, **EXACT)).segment([ArraySource(s.pp), ArraySource(s.xp)])
    n = len(bundle.class_table) + 1
    truth = s.labels.astype(np.int64)
    pairs = truth[truth > 0] * n + direct.labels[truth > 0].astype(np.int64)
    assert np.array_equal(np.array(docs["30"]["confusion"]), np.bincount(pairs, minlength=n * n).reshape(n, n))
    assert docs["0"]["confusion"] != docs["30"]["confusion"]
    pp, xp = section_images(64, 80, seed=9)
    write_geoslicer_netcdf(tmp_path / "S1.nc", {"S1_PP": pp, "S1_XP": xp})
    job = {"inputs": ["S1.nc"], "output": "out.nc", "model_dir": str(tiny_model), "device": "cpu", "min_region": 30}
    assert run_segment_job(job, tmp_path, emit=lambda event: None)["min_region_px"] == 30
