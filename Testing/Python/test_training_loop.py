"""Training loop: loss falls, checkpoint/resume, early stop, export as a GeoSlicer bundle,
PP-only models, split by section, fine-tuning. Tiny networks and patches keep it fast."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from thinseg.classes.files import default_class_table
from thinseg.errors import ThinSegError
from thinseg.inference.device import cpu_has_amx
from thinseg.inference.engine import InferenceOptions, Segmenter
from thinseg.model.bundle import load_bundle, save_bundle
from thinseg.model.networks import build_network
from thinseg.model.safe_load import load_torch_file
from thinseg.training import AugmentConfig, TrainConfig, load_split, synthetic_sections, train
from thinseg.training.averaging import averaged_state, exponential_average
from thinseg.training.checkpoint import load_checkpoint
from thinseg.training.loop import TrainingRun, lr_factor, resolve_precision
from thinseg.training.model import unet_params, widen_outputs

TABLE = default_class_table()
TINY = dict(
    patch_size=64,
    batch_size=4,
    base_channels=8,
    depth=3,
    num_res_units=1,
    warmup_steps=2,
    val_tile=128,
    val_overlap=16,
    progress=False,
    lr=3e-3,
)


@pytest.fixture(scope="module")
def data():
    return {"train": synthetic_sections(2, 192, seed=0), "val": synthetic_sections(1, 160, seed=50)}


def _config(tmp: Path, data, **kw) -> TrainConfig:
    base = dict(output_dir=tmp, train_sections=data["train"], val_sections=data["val"], epochs=2, steps_per_epoch=3)
    base.update(TINY)
    base.update(kw)
    return TrainConfig(**base)


def test_loss_falls_when_a_tiny_model_trains(tmp_path, data):
    run = TrainingRun(
        _config(tmp_path, data, augment=AugmentConfig.none(), warmup_steps=0, lr=5e-3), log=lambda m: None
    )
    run.start()
    images, target, jitter = next(iter(run.loader))
    losses = [run.step(images, target, jitter) for _ in range(15)]
    assert all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3])


def test_train_exports_a_bundle_with_classes_resolution_and_metrics(tmp_path, data):
    result = train(_config(tmp_path, data))
    assert result.epochs_run == 2 and len(result.history) == 2 and result.best_epoch in (1, 2)
    assert result.log_csv.is_file() and result.curves_png.is_file() and result.checkpoint.is_file()
    header = result.log_csv.read_text().splitlines()[0].split(",")
    assert {"epoch", "train_loss", "val_mean_iou", "val_iou_Calcite", "train_samples_per_s"} <= set(header)

    bundle = load_bundle(result.model_dir)
    assert result.model_dir == tmp_path / "model"
    assert bundle.input_names == ["PP", "PX"] and bundle.in_channels == 6
    assert bundle.class_table.names == TABLE.names and bundle.class_table.colors == TABLE.colors
    assert bundle.pixels_per_mm == pytest.approx(1 / 0.00132)
    meta = json.loads((result.model_dir / "meta.json").read_text())
    out = meta["outputs"]["y"]
    assert out["class_names"] == TABLE.names and [c.lower() for c in out["class_colors"]] == TABLE.colors
    metrics = meta["metrics"]
    assert metrics["epoch"] == result.best_epoch and 0.0 <= metrics["mean_iou"] <= 1.0
    assert set(metrics["per_class_iou"]) == set(TABLE.names)
    assert metrics["mean_iou"] == pytest.approx(result.best_mean_iou)
    data_record = meta["training"]["data"]
    assert data_record["train_sections"] == [s.name for s in data["train"]]
    assert data_record["val_sections"] == [data["val"][0].name]
    assert data_record["train_sources"][0] == "thinseg.synth.generate_section(192x192, seed=0)"
    assert meta["training"]["channels"] == ["PP", "PX"]

    # the exported model segments a section through the inference engine
    section = data["val"][0]
    seg = Segmenter(bundle, InferenceOptions(tile=128, overlap=16, device="cpu")).segment(
        [section.source("PP"), section.source("XP")]
    )
    assert seg.labels.shape == section.shape and seg.labels.max() <= len(TABLE)
    assert load_split(result.split_file)["train"] == sorted(s.name for s in data["train"]) or load_split(
        result.split_file
    )["train"] == [s.name for s in data["train"]]


def test_interrupted_run_resumes_exactly(tmp_path, data, monkeypatch):
    straight = train(_config(tmp_path / "straight", data, epochs=2))

    calls = {"n": 0}
    real_step = TrainingRun.step

    def step_then_ctrl_c(self, *batch):
        calls["n"] += 1
        if calls["n"] == 5:  # second batch of epoch 2 (3 steps per epoch)
            raise KeyboardInterrupt
        return real_step(self, *batch)

    monkeypatch.setattr(TrainingRun, "step", step_then_ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        train(_config(tmp_path / "cut", data, epochs=2))
    monkeypatch.setattr(TrainingRun, "step", real_step)
    saved = load_checkpoint(tmp_path / "cut" / "checkpoint.pt")
    assert saved["epoch"] == 1  # the interrupted epoch is lost, nothing more

    with pytest.raises(ThinSegError, match="already exists"):
        train(_config(tmp_path / "cut", data, epochs=2))

    run = TrainingRun(_config(tmp_path / "cut", data, epochs=2, resume=True), log=lambda m: None)
    run.start()
    assert run.epoch == 1 and len(run.history) == 1
    state = run.optimizer.state_dict()
    assert state["state"], "optimizer moments restored"
    for key, value in saved["optimizer"]["state"].items():
        assert torch.equal(state["state"][key]["exp_avg"], value["exp_avg"])
    assert run.scheduler.last_epoch == saved["scheduler"]["last_epoch"] == 3
    for key, value in saved["model"].items():
        assert torch.equal(run.network.state_dict()[key].cpu(), value)

    resumed = train(_config(tmp_path / "cut", data, epochs=2, resume=True))
    assert resumed.epochs_run == 2 and [h["epoch"] for h in resumed.history] == [1, 2]
    assert len(resumed.log_csv.read_text().splitlines()) == 3  # header + 2 epochs
    # same seeds, same data stream, restored state: the resumed epoch is the uninterrupted one
    assert resumed.history[1]["train_loss"] == pytest.approx(straight.history[1]["train_loss"], rel=1e-4)
    assert resumed.best_mean_iou == pytest.approx(straight.best_mean_iou, abs=1e-3)


def test_class_mix_changes_the_batches_not_the_patches_drawn(tmp_path, data, monkeypatch):
    seen: dict[str, list[torch.Tensor]] = {}
    real_step = TrainingRun.step

    def recording_step(self, images, target, jitter=None):
        seen.setdefault(str(self.config.output_dir), []).append(target.clone())
        return real_step(self, images, target, jitter)

    monkeypatch.setattr(TrainingRun, "step", recording_step)
    runs = {}
    for name, share in (("plain", 0.0), ("mixed", 0.5), ("again", 0.5)):
        run = TrainingRun(_config(tmp_path / name, data, class_mix=share), log=lambda m: None)
        run.start()
        runs[name] = (run.train_epoch()["train_loss"], run.stream.last_stats)
    plain, mixed, again = (seen[str(tmp_path / n)] for n in ("plain", "mixed", "again"))
    # the same patches were drawn and emitted; mixing happened after, reproducibly
    assert np.array_equal(runs["plain"][1].drawn_for, runs["mixed"][1].drawn_for)
    assert np.array_equal(runs["plain"][1].class_pixels, runs["mixed"][1].class_pixels)
    assert any(not torch.equal(p, m) for p, m in zip(plain, mixed))
    assert all(torch.equal(m, a) for m, a in zip(mixed, again)) and runs["mixed"][0] == runs["again"][0]


def test_a_moving_average_follows_the_weights_and_not_the_norm_statistics():
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = exponential_average(net, 0.75)
    seen = []
    for step in range(4):
        with torch.no_grad():
            for parameter in net.parameters():
                parameter.add_(torch.randn_like(parameter))
            net[1].running_mean.fill_(float(step))
        seen.append([p.detach().double().clone() for p in net.parameters()])
        ema.update_parameters(net)
    expected = seen[0]  # the first update copies
    for weights in seen[1:]:
        expected = [0.75 * e + 0.25 * w for e, w in zip(expected, weights)]
    for got, want in zip(ema.module.parameters(), expected):
        assert torch.allclose(got.double(), want, atol=1e-6)
    assert not torch.allclose(next(ema.module.parameters()).double(), seen[-1][0])
    state = averaged_state(ema, net)  # the averaged parameters with the network's own norm statistics
    assert torch.equal(state["1.running_mean"], net[1].running_mean)
    assert all(torch.equal(state[n], p) for n, p in ema.module.named_parameters())
    for decay in (0.0, 1.0):
        with pytest.raises(ValueError, match="decay"):
            exponential_average(net, decay)


def test_a_moving_average_is_exported_without_validation_sections_too(tmp_path, data):
    result = train(_config(tmp_path, data, val_sections=[], ema_decay=0.5))
    saved = load_checkpoint(tmp_path / "checkpoint.pt")["ema"]
    exported = load_bundle(result.model_dir).network
    assert all(torch.equal(p, saved[f"module.{n}"]) for n, p in exported.named_parameters())
    assert json.loads((result.model_dir / "meta.json").read_text())["training"]["ema_decay"] == 0.5


def test_a_moving_average_decay_outside_its_range_is_refused(tmp_path, data):
    run = TrainingRun(_config(tmp_path, data, ema_decay=1.0), log=lambda m: None)
    with pytest.raises(ThinSegError, match=r"decay must be in \[0, 1\)"):
        run.start()


def test_a_moving_average_is_exported_and_leaves_the_training_unchanged(tmp_path, data):
    plain = train(_config(tmp_path / "plain", data))
    messages: list[str] = []
    config = _config(
        tmp_path / "ema", data, ema_decay=0.5, average_last=2, keep_candidates=True, candidate_ema_decays=(0.75,)
    )
    watched = train(config, log=messages.append)
    # the averages only watch: the same batches, losses and validations as without them
    for key in ("train_loss", "val_mean_iou"):
        assert [h[key] for h in watched.history] == [h[key] for h in plain.history]
    run = tmp_path / "ema"
    assert sorted(p.name for p in run.glob("model-*")) == [
        "model-average",
        "model-best-epoch",
        "model-ema",
        "model-ema-0.75",
    ]
    metas = {k: json.loads((run / f"model-{k}" / "meta.json").read_text()) for k in ("best-epoch", "average", "ema")}
    assert metas["ema"]["training"]["ema_decay"] == 0.5 and metas["ema"]["training"]["averaged_epochs"] is None
    assert metas["average"]["training"]["averaged_epochs"] == [1, 2] and "ema_decay" not in metas["average"]["training"]
    assert any(m.startswith("moving average (decay 0.5): val mean IoU") for m in messages)
    # the candidate's weights are the moving average kept step by step (checkpointed for a resume)
    saved = load_checkpoint(run / "checkpoint.pt")["ema"]
    assert int(saved["n_averaged"]) == 2 * 3  # every step of both epochs
    candidate = load_bundle(run / "model-ema").network
    for name, parameter in candidate.named_parameters():
        assert torch.equal(parameter, saved[f"module.{name}"])
    best_epoch = dict(load_bundle(run / "model-best-epoch").network.named_parameters())
    assert not all(torch.equal(p, best_epoch[n]) for n, p in candidate.named_parameters())
    # a moving average with another decay, kept beside it for comparison on the same training
    compared = load_checkpoint(run / "checkpoint.pt")["compared_emas"]["0.75"]
    assert int(compared["n_averaged"]) == 2 * 3
    other = load_bundle(run / "model-ema-0.75")
    assert all(torch.equal(p, compared[f"module.{n}"]) for n, p in other.network.named_parameters())
    assert not all(torch.equal(p, dict(candidate.named_parameters())[n]) for n, p in other.network.named_parameters())
    other_meta = json.loads((run / "model-ema-0.75" / "meta.json").read_text())["training"]
    assert other_meta["ema_decay"] == 0.75 and other_meta["averaged_epochs"] is None
    assert any(m.startswith("moving average (decay 0.75): val mean IoU") and "comparison only" in m for m in messages)
    # exported: the moving average, whatever its validation
    exported = load_bundle(watched.model_dir).network.state_dict()
    twin = load_bundle(run / "model-ema").network.state_dict()
    assert all(torch.equal(v, exported[k]) for k, v in twin.items())
    assert watched.best_mean_iou == pytest.approx(metas["ema"]["metrics"]["mean_iou"])
    # without the candidates kept, the same export, and no average of epochs validated for nothing
    product_log: list[str] = []
    product = train(_config(tmp_path / "product", data, ema_decay=0.5, average_last=2), log=product_log.append)
    assert all(torch.equal(v, exported[k]) for k, v in load_bundle(product.model_dir).network.state_dict().items())
    assert not any(m.startswith("average of epochs") for m in product_log)
    assert sorted(p.name for p in (tmp_path / "product").glob("model*")) == ["model"]
    resumed = TrainingRun(
        _config(
            run, data, ema_decay=0.5, average_last=2, keep_candidates=True, candidate_ema_decays=(0.75,), resume=True
        ),
        log=lambda m: None,
    )
    resumed.start()
    assert resumed.ema is not None
    assert all(torch.equal(v, saved[k]) for k, v in resumed.ema.state_dict().items())
    assert all(torch.equal(v, compared[k]) for k, v in resumed.compared_emas[0.75].state_dict().items())


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"candidate_ema_decays": (0.9,)}, "need keep_candidates"),
        ({"candidate_ema_decays": (0.5,), "keep_candidates": True}, "not the exported 0.5"),
        ({"candidate_ema_decays": (0.9, 0.9), "keep_candidates": True}, "distinct"),
        ({"candidate_ema_decays": (1.0,), "keep_candidates": True}, r"in \(0, 1\)"),
    ],
)
def test_moving_averages_kept_for_comparison_are_checked(tmp_path, data, settings, message):
    run = TrainingRun(_config(tmp_path, data, ema_decay=0.5, **settings), log=lambda m: None)
    with pytest.raises(ThinSegError, match=message):
        run.start()


def test_early_stopping_on_validation_iou(tmp_path, data):
    result = train(_config(tmp_path, data, epochs=5, patience=1, min_delta=1.0))
    assert result.stopped_early and result.epochs_run == 2 and result.best_epoch == 1
    assert load_checkpoint(result.checkpoint)["stopped_early"] is True


def test_a_time_budget_stops_before_an_epoch_that_would_not_fit_and_resume_continues(tmp_path, data):
    messages = []
    result = train(_config(tmp_path, data, epochs=3, max_minutes=1e-4), log=messages.append)
    assert result.epochs_run == 1 and not result.stopped_early and result.model_dir is not None
    assert any("time budget of 0.0001 min reached" in m for m in messages)
    resumed = train(_config(tmp_path, data, epochs=3, resume=True))
    assert resumed.epochs_run == 3


def test_pp_only_model_pooled_sections_and_saved_split(tmp_path, data):
    pool = data["train"] + data["val"] + synthetic_sections(1, 160, seed=70)
    result = train(
        TrainConfig(
            output_dir=tmp_path,
            sections=pool,
            val_fraction=0.25,
            test_fraction=0.25,
            inputs=("PP",),
            epochs=1,
            steps_per_epoch=2,
            **TINY,
        )
    )
    bundle = load_bundle(result.model_dir)
    assert bundle.input_names == ["PP"] and bundle.in_channels == 3
    split = load_split(result.split_file)
    assert len(split["val"]) == 1 and len(split["test"]) == 1 and len(split["train"]) == 2
    assert not set(split["val"]) & set(split["train"]) and not set(split["test"]) & set(split["train"])
    assert result.test_metrics["sections"] == split["test"] and 0.0 <= result.test_metrics["mean_iou"] <= 1.0
    assert (tmp_path / "test_metrics.json").is_file()
    # the saved split reproduces the run's partition, whatever the order sections are given in
    again = TrainingRun(
        TrainConfig(
            output_dir=tmp_path / "again",
            sections=list(reversed(pool)),
            split_file=result.split_file,
            inputs=("PP",),
            epochs=1,
            steps_per_epoch=1,
            **TINY,
        ),
        log=lambda m: None,
    )
    assert [s.name for s in again.parts["val"]] == split["val"]


def test_fine_tune_from_an_exported_bundle(tmp_path, data):
    first = train(_config(tmp_path / "a", data, epochs=1))
    tuned = train(_config(tmp_path / "b", data, epochs=1, init_from=first.model_dir, base_channels=99))
    bundle = load_bundle(tuned.model_dir)
    assert bundle.config["model"]["params"]["channels"] == [8, 16, 32]  # the bundle's network, not base 99
    assert json.loads((tuned.model_dir / "meta.json").read_text())["training"]["fine_tuned_from"] == str(
        first.model_dir
    )


def test_geoslicer_n_output_network_is_widened_exactly():
    torch.manual_seed(0)
    params = unet_params(6, 6, base_channels=8, depth=3, num_res_units=2)  # N outputs, first_label 1
    old = build_network("UNet", params).eval()
    with torch.no_grad():  # give the norms non-trivial statistics
        for m in old.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    wide, wide_params = widen_outputs(old, "UNet", params)
    assert wide_params["out_channels"] == 7
    x = torch.rand(1, 6, 32, 32)
    with torch.no_grad():
        a, b = old(x), wide.eval()(x)
    assert torch.allclose(b[:, 1:], a, atol=1e-5)


def test_fine_tune_from_geoslicer_layout_bundle(tmp_path, data):
    params = unet_params(6, 6, base_channels=8, depth=3, num_res_units=1)
    net = build_network("UNet", params)
    folder = tmp_path / "gs" / "ThinSectionEnv" / "m"
    _write_geoslicer_n_output_bundle(folder, net, params)
    assert load_bundle(folder).first_label == 1
    result = train(_config(tmp_path / "run", data, epochs=1, init_from=folder))
    bundle = load_bundle(result.model_dir)
    assert bundle.first_label == 0 and bundle.config["model"]["params"]["out_channels"] == 7


def _write_geoslicer_n_output_bundle(folder: Path, net: torch.nn.Module, params: dict) -> None:
    """A bundle as GeoSlicer ships them: N outputs, ArgmaxTransform first_label 1."""
    tmp = folder.parent / "tmp"
    params7 = dict(params, out_channels=7)
    save_bundle(
        tmp,
        build_network("UNet", params7),
        network_name="UNet",
        network_params=params7,
        class_table=TABLE,
        pixels_per_mm=1 / 0.00132,
        title="gs",
        description="",
    )
    meta = json.loads((tmp / "meta.json").read_text())
    saved = load_torch_file(tmp / "model.pth")
    saved["model_state_dict"] = net.state_dict()
    saved["config"]["model"]["params"] = params
    for t in saved["config"]["transforms"]["post_processing_transforms"]:
        t.setdefault("params", {})["first_label"] = 1
    folder.mkdir(parents=True)
    (folder / "meta.json").write_text(json.dumps(meta))
    torch.save(saved, folder / "model.pth")


def test_precision_and_schedule_choices(monkeypatch):
    from thinseg.training import loop as loop_module

    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == (torch.bfloat16 if cpu_has_amx() else None)
    # training on a CPU: bf16 only with AMX, even where inference takes it (AVX512-BF16 alone),
    # and never for the LiteUNet, whose depthwise convolutions train slower in bf16 even with AMX
    monkeypatch.setattr(loop_module, "cpu_has_amx", lambda: False)
    assert resolve_precision("auto", cpu) is None
    assert resolve_precision("auto", cpu, "LiteUNet") is None
    monkeypatch.setattr(loop_module, "cpu_has_amx", lambda: True)
    assert resolve_precision("auto", cpu) == torch.bfloat16
    assert resolve_precision("auto", cpu, "UNet") == torch.bfloat16
    assert resolve_precision("auto", cpu, "LiteUNet") is None
    assert resolve_precision("bf16", cpu, "LiteUNet") == torch.bfloat16  # asked for, given
    assert resolve_precision("fp32", cpu) is None and resolve_precision("bf16", cpu) == torch.bfloat16
    with pytest.raises(ThinSegError, match="CUDA"):
        resolve_precision("fp16", cpu)
    factors = [lr_factor(s, 100, 10, "cosine") for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[9:], factors[10:])) and factors[-1] < 0.05
    assert resolve_precision("auto", cpu, "LiteUNet") is None
    assert resolve_precision("auto", cpu, "UNet") == torch.bfloat16
    assert resolve_precision("auto", cpu, "LiteUNet") is None
    assert resolve_precision("bf16", cpu, "LiteUNet") == torch.bfloat16  # asked for, given
