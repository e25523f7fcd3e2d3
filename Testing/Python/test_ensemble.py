"""LiteUNet ensembles: the cross-fitted folds, the network (averaged probabilities), tiny
cross-fitted and seed ensemble trainings through `train` and the command line, and the bundle
they write."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from thinseg.classes.files import default_class_table
from thinseg.errors import ThinSegError
from thinseg.inference.engine import InferenceOptions, Segmenter
from thinseg.io.images import ArraySource
from thinseg.model.bundle import load_bundle, save_bundle
from thinseg.model.lite_unet import LiteUNet, LiteUNetEnsemble, lite_unet_ensemble_params
from thinseg.model.networks import build_network, describe_network, network_requirements
from thinseg.resources import default_model_dir
from thinseg.training import TrainConfig, synthetic_sections, train
from thinseg.training.ensemble import combine_members, member_folds
from thinseg.training.recipes import recipe_settings

TABLE = default_class_table()


def test_each_member_validates_on_its_own_sections_and_the_first_on_the_single_trainings():
    pool = ["2a", "3a", "4a", "5a", "6a", "7a", "8a"]
    folds = member_folds(pool, ["4a"], 3, seed=0)
    assert folds[0] == ([n for n in pool if n != "4a"], ["4a"])
    vals = [v for _t, v in folds]
    assert len({n for v in vals for n in v}) == 3  # no section validates twice
    for train_names, val in folds:
        assert sorted(train_names + val) == pool
    assert member_folds(pool, ["4a"], 3, seed=0) == folds  # seeded
    assert [len(v) for _t, v in member_folds(pool, ["2a", "3a"], 3)] == [2, 2, 2]
    with pytest.raises(ThinSegError, match="3 sections are too few for 3 ensemble members"):
        member_folds(["a", "b", "c"], ["a"], 3)


def test_the_ensemble_outputs_the_log_of_its_members_averaged_probabilities():
    torch.manual_seed(0)
    net = build_network("LiteUNetEnsemble", {"members": 3, "in_images": 2, "out_channels": 7})
    assert isinstance(net, LiteUNetEnsemble) and len(net.members) == 3
    net.eval()
    x = torch.rand(2, 6, 64, 64)
    with torch.no_grad():
        expected = torch.stack([torch.softmax(m(x), dim=1) for m in net.members]).mean(0)
        out = net(x)
    assert torch.allclose(torch.softmax(out, dim=1), expected, atol=1e-6)
    assert torch.allclose(out.exp().sum(1), torch.ones(2, 64, 64), atol=1e-5)
    one = describe_network("LiteUNet", {"in_images": 2, "out_channels": 7}).min_weights
    assert (
        describe_network("LiteUNetEnsemble", {"members": 3, "in_images": 2, "out_channels": 7}).min_weights == 3 * one
    )
    for bad, words in [({"members": 1}, "members 1"), ({"members": 99}, "members 99"), ({}, "members")]:
        with pytest.raises(ThinSegError, match=words):
            describe_network("LiteUNetEnsemble", {"in_images": 2, "out_channels": 7, **bad})
    assert network_requirements("LiteUNetEnsemble", {"members": 2})["thinseg"] == "0.3.0"
    assert network_requirements("LiteUNet", {"encoder": "efficientnet-lite0"})["thinseg"] == "0.2.0"
    assert network_requirements("LiteUNet", {"encoder": "efficientnet-lite2"})["thinseg"] == "0.3.0"
    assert network_requirements("UNet", {}) is None


def test_members_of_different_architectures_are_refused():
    a = LiteUNet(2, 7)
    b = LiteUNet(2, 7, decoder_channels=(64, 32, 16, 16, 8))
    assert lite_unet_ensemble_params([a, a])["members"] == 2
    with pytest.raises(ThinSegError, match="ensemble members differ"):
        lite_unet_ensemble_params([a, b])


def tiny_settings(members: int, member_split: str = "cross-fitted") -> dict:
    settings = recipe_settings("small-data")
    settings.update(
        epochs=1,
        steps_per_epoch=2,
        warmup_steps=1,
        patch_size=64,
        batch_size=2,
        average_last=0,
        members=members,
        member_split=member_split,
    )
    return settings


def test_a_tiny_ensemble_training_writes_one_bundle_of_its_cross_fitted_members(tmp_path):
    sections = synthetic_sections(5, 128, seed=3)
    config = TrainConfig(
        output_dir=tmp_path / "run",
        train_sections=sections[:3],
        val_sections=sections[3:4],
        test_sections=sections[4:],
        val_tile=96,
        val_overlap=16,
        progress=False,
        precision="fp32",
        **tiny_settings(2),
    )
    messages: list[str] = []
    epochs: list[int] = []
    result = train(config, log=messages.append, on_epoch=lambda row, _best: epochs.append(row["epoch"]))
    assert result.model_dir == tmp_path / "run" / "model"
    assert epochs == [1, 2]  # the members' epochs one after another, as the panel's progress shows them
    bundle = load_bundle(result.model_dir)
    assert isinstance(bundle.network, LiteUNetEnsemble) and len(bundle.network.members) == 2
    meta = json.loads((result.model_dir / "meta.json").read_text())
    assert meta["requires"]["thinseg"] == "0.3.0"
    assert meta["min_region_px"] == 256 and bundle.min_region_px == 256  # the members' sieve, carried over
    vals = [m["val_sections"] for m in meta["ensemble"]]
    assert vals[0] == [sections[3].name] and vals[1] != vals[0] and len(vals[1]) == 1
    assert any(m.startswith("ensemble member 2 of 2: seed 0, validates on") for m in messages)
    assert any(m.startswith("member 1/2: epoch 1/1") for m in messages)
    # each member scored the test section alone; the ensemble is left to thinseg evaluate
    assert result.test_metrics is None and any(m.startswith("score it on the test sections") for m in messages)
    assert (tmp_path / "run" / "members" / "member-2" / "test_metrics.json").is_file()
    # the ensemble's weights are its members' exported weights, temperature folded in
    for k, slot in enumerate(bundle.network.members, start=1):
        member = load_bundle(tmp_path / "run" / "members" / f"member-{k}" / "model").network
        assert all(torch.equal(v, member.state_dict()[key]) for key, v in slot.state_dict().items())
    # segmenting with it labels each pixel by the members' averaged probabilities
    rng = np.random.default_rng(0)
    pp, xp = (rng.integers(0, 256, (64, 96, 3), dtype=np.uint8) for _ in range(2))
    labels = Segmenter(bundle, InferenceOptions(tile=64, overlap=0, tta="none", precision="fp32")).segment(
        [ArraySource(pp), ArraySource(xp)]
    )
    assert labels.labels.shape == (64, 96) and labels.labels.max() <= len(TABLE)
    # a second run into the same folder is refused unless asked to overwrite
    with pytest.raises(ThinSegError, match="--overwrite"):
        train(config, log=messages.append)


def test_a_seed_ensemble_repeats_the_single_training_with_other_seeds_on_the_same_sections(tmp_path):
    sections = synthetic_sections(4, 128, seed=3)
    common = dict(
        train_sections=sections[:3],
        val_sections=sections[3:],
        val_tile=96,
        val_overlap=16,
        progress=False,
        precision="fp32",
    )
    config = TrainConfig(output_dir=tmp_path / "run", **common, **tiny_settings(2, "seeds"))
    messages: list[str] = []
    result = train(config, log=messages.append)
    meta = json.loads((result.model_dir / "meta.json").read_text())
    assert [m["seed"] for m in meta["ensemble"]] == [0, 1]
    assert [m["val_sections"] for m in meta["ensemble"]] == [[sections[3].name]] * 2
    assert "trained with their own seeds" in meta["description"]
    assert any(m.startswith("ensemble member 2 of 2: seed 1, validates on") for m in messages)
    members = [load_bundle(tmp_path / "run" / "members" / f"member-{k}" / "model").network for k in (1, 2)]
    for k in (1, 2):
        trained = json.loads((tmp_path / "run" / "members" / f"member-{k}" / "model" / "meta.json").read_text())
        assert trained["training"]["data"]["train_sections"] == [s.name for s in sections[:3]]
    first, second = (m.state_dict() for m in members)
    assert any(not torch.equal(first[key], second[key]) for key in first)  # another seed, another network
    # member 1 is the single training of the same settings, weight for weight
    single = train(TrainConfig(output_dir=tmp_path / "single", **common, **tiny_settings(1)), log=messages.append)
    alone = load_bundle(single.model_dir).network.state_dict()
    assert all(torch.equal(value, alone[key]) for key, value in first.items())


def test_an_ensemble_of_pooled_sections_splits_them_into_a_new_run_folder(tmp_path):
    """As `thinseg train FOLDER --output NEW` does: the split is saved in a folder not yet made."""
    config = TrainConfig(
        output_dir=tmp_path / "new" / "run",
        sections=synthetic_sections(5, 128, seed=4),
        val_fraction=0.2,
        val_tile=96,
        val_overlap=16,
        progress=False,
        precision="fp32",
        **tiny_settings(2, "seeds"),
    )
    result = train(config, log=lambda _m: None)
    split = json.loads((tmp_path / "new" / "run" / "split.json").read_text())
    assert len(split["val"]) == 1 and len(split["train"]) == 4
    meta = json.loads((result.model_dir / "meta.json").read_text())
    assert [m["val_sections"] for m in meta["ensemble"]] == [split["val"]] * 2


def test_only_lite_unets_of_one_kind_combine(tmp_path):
    net = LiteUNet(2, len(TABLE) + 1).eval()
    saved = save_bundle(
        tmp_path / "lite",
        net,
        network_name="LiteUNet",
        network_params={"in_images": 2, "out_channels": len(TABLE) + 1},
        class_table=TABLE,
        input_names=("PP", "PX"),
        pixels_per_mm=1 / 0.00264,
        title="lite",
        description="",
    )
    combined = combine_members([saved, saved], tmp_path / "both", title="both", description="")
    assert len(load_bundle(combined).network.members) == 2
    with pytest.raises(ThinSegError, match="only LiteUNet models"):
        combine_members([saved, default_model_dir()], tmp_path / "mixed", title="x", description="")
    with pytest.raises(ThinSegError, match="a model folder already exists here"):
        combine_members([saved, saved], tmp_path / "both", title="both", description="")


def test_the_command_line_and_a_job_ask_for_members(tmp_path):
    from thinseg.cli.main import build_parser
    from thinseg.cli.train_cmd import train_config
    from thinseg.jobs.runner import train_config as job_train_config

    parser = build_parser()
    (tmp_path / "s.nc").write_bytes(b"")  # named only: the config is built, no section is read
    base = ["train", str(tmp_path), "-o", str(tmp_path / "r")]
    assert train_config(parser.parse_args([*base, "--recipe", "small-data", "--members", "3"])).members == 3
    with pytest.raises(ThinSegError, match="--members applies to the small-data recipe"):
        train_config(parser.parse_args([*base, "--members", "2"]))
    job = {"sections": ["a.nc"], "run_dir": str(tmp_path / "run"), "recipe": "small-data", "members": 2}
    assert job_train_config(job, tmp_path).members == 2
    with pytest.raises(ThinSegError, match="2 to 8 members, not 9"):
        train(TrainConfig(output_dir=tmp_path / "big", **tiny_settings(9)))
