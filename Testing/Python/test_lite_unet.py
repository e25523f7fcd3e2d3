"""LiteUNet (EfficientNet-Lite encoder pre-trained on ImageNet + MONAI decoder) and the
`small-data` training recipe: the network, its bundles (which say that they need thinseg), the
pre-trained weights, inference through the engine, and a tiny training run of the recipe."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from helpers import error_lines, rewrite_bundle, run_main

from thinseg.classes.files import default_class_table
from thinseg.errors import ThinSegError
from thinseg.inference.engine import InferenceOptions, Segmenter
from thinseg.io.images import ArraySource
from thinseg.model.bundle import load_bundle, save_bundle
from thinseg.model.lite_unet import (
    ENCODERS,
    LiteUNet,
    lite_unet_params,
    load_pretrained_encoder,
    pad_in_convolution,
    pretrained_weights_file,
)
from thinseg.model.meta import cannot_run
from thinseg.model.networks import build_network, describe_network, network_requirements
from thinseg.model.safe_load import load_packaged_weights
from thinseg.training import TrainConfig, synthetic_sections, train
from thinseg.training.config import MEMBER_SPLITS
from thinseg.training.loop import make_optimizer
from thinseg.training.recipes import RECIPE_NAMES, recipe_settings

TABLE = default_class_table()


def lite(in_images: int = 2, seed: int = 0) -> LiteUNet:
    torch.manual_seed(seed)
    net = build_network("LiteUNet", {"in_images": in_images, "out_channels": len(TABLE) + 1})
    assert isinstance(net, LiteUNet)
    return net


def test_pp_and_xp_go_through_one_shared_encoder():
    one, two = lite(1), lite(2)
    enc = sum(p.numel() for p in one.encoder.parameters())
    assert enc == sum(p.numel() for p in two.encoder.parameters())  # one encoder, whatever the image count
    x = torch.rand(2, 6, 64, 96)
    two.eval()
    with torch.no_grad():
        out = two(x)
        assert out.shape == (2, 7, 64, 96)
        # the same image as PP and as XP gives the same features in both halves of every level
        same = torch.cat([x[:, :3], x[:, :3]], dim=1)
        features = two.encode(same.reshape(4, 3, 64, 96))
        for f in features:
            pairs = f.reshape(2, 2, *f.shape[1:])
            assert torch.equal(pairs[:, 0], pairs[:, 1])
    with pytest.raises(ThinSegError, match="multiples of 32"):
        two(torch.rand(1, 6, 48, 64))


def test_separate_encoders_with_equal_weights_compute_what_the_shared_one_computes():
    shared = lite(2)
    torch.manual_seed(0)
    separate = build_network("LiteUNet", {"in_images": 2, "out_channels": len(TABLE) + 1, "shared_encoder": False})
    assert isinstance(separate, LiteUNet) and len(separate.encoders) == 2 and len(shared.encoders) == 1
    # the second encoder is built last: a seed draws the shared network's weights as before
    assert all(torch.equal(v, separate.state_dict()[k]) for k, v in shared.state_dict().items())
    assert load_pretrained_encoder(shared) == 288 and load_pretrained_encoder(separate) == 2 * 288
    x = torch.rand(2, 6, 64, 96)
    with torch.no_grad():
        torch.testing.assert_close(separate.eval()(x), shared.eval()(x), rtol=0, atol=0)
        # with different XP weights only the XP half of each level changes
        for p in separate.other_encoders[0].parameters():
            p.mul_(0.5)
        assert not torch.allclose(separate(x), shared(x))
    pp_features = separate.encode(x[:, :3], separate.encoders[0])
    assert all(torch.equal(a, b) for a, b in zip(pp_features, shared.encode(x[:, :3])))


def test_separate_encoders_each_learn_keep_imagenet_norms_and_freeze_alike():
    torch.manual_seed(0)
    net = build_network("LiteUNet", {"in_images": 2, "out_channels": 7, "shared_encoder": False})
    load_pretrained_encoder(net)
    assert len(net.encoder_parameters()) == 2 * len(list(net.encoder.parameters()))
    net.train()
    assert all(not m.training for e in net.encoders for m in e.modules() if isinstance(m, torch.nn.BatchNorm2d))
    net(torch.rand(2, 6, 64, 64)).square().mean().backward()
    for encoder in net.encoders:
        assert encoder._conv_stem.weight.grad is not None and encoder._conv_stem.weight.grad.abs().sum() > 0
    net.freeze_stages(2)
    assert not any(e._conv_stem.weight.requires_grad for e in net.encoders)
    assert all(e._blocks[3]._project_conv.weight.requires_grad for e in net.encoders)


def test_separate_encoders_are_written_in_the_bundle_and_need_thinseg_0_4(tmp_path):
    torch.manual_seed(1)
    net = build_network("LiteUNet", {"in_images": 2, "out_channels": 7, "shared_encoder": False})
    params = lite_unet_params(2, 7, shared_encoder=False)
    assert params["shared_encoder"] is False and "shared_encoder" not in lite_unet_params(2, 7)
    assert "shared_encoder" not in lite_unet_params(1, 7, shared_encoder=False)  # one image: nothing to share
    shape = describe_network("LiteUNet", params)
    assert shape.min_weights > describe_network("LiteUNet", lite_unet_params(2, 7)).min_weights + 2_900_000
    assert shape.min_weights <= sum(v.numel() for v in net.state_dict().values())
    folder = save_lite(tmp_path / "separate", net, params)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["requires"]["thinseg"] == "0.4.0"
    bundle = load_bundle(folder)
    assert len(bundle.network.encoders) == 2
    x = torch.rand(1, 6, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(bundle.network(x), net(x), rtol=0, atol=1e-6)
    with pytest.raises(ThinSegError, match="shared_encoder must be true or false"):
        describe_network("LiteUNet", {"in_images": 2, "out_channels": 7, "shared_encoder": "no"})


def test_imagenet_weights_come_from_the_installed_wheel_exactly():
    net = lite(2)
    assert load_pretrained_encoder(net) == 288
    stored = load_packaged_weights(pretrained_weights_file())
    for key, value in net.encoder.state_dict().items():
        assert torch.equal(value, stored[key]), key
    assert not any(key.startswith("_fc") for key in net.encoder.state_dict())  # the classifier is dropped


def test_training_keeps_the_encoder_norms_at_their_imagenet_statistics():
    net = lite(2)
    load_pretrained_encoder(net)
    before = {k: v.clone() for k, v in net.state_dict().items() if "running_mean" in k}
    net.train()
    net(torch.rand(2, 6, 64, 64))
    after = net.state_dict()
    encoder = [k for k in before if k.startswith("encoder.")]
    decoder = [k for k in before if not k.startswith("encoder.")]
    assert encoder and decoder
    assert all(torch.equal(before[k], after[k]) for k in encoder)
    assert any(not torch.equal(before[k], after[k]) for k in decoder)


def package_features(
    encoder: torch.nn.Module, images: torch.Tensor, taps: set[int] | None = None
) -> list[torch.Tensor]:
    """The encoder's feature maps after the blocks in `taps` (default: the last block), as the
    package's own blocks compute them, without random depth."""
    taps = {len(encoder._blocks) - 1} if taps is None else taps
    x = encoder._swish(encoder._bn0(encoder._conv_stem(images)))
    features = []
    for index, block in enumerate(encoder._blocks):
        x = block(x, drop_connect_rate=None)
        if index in taps:
            features.append(x)
    return features


def run_encoder(encoder: torch.nn.Module, images: torch.Tensor) -> torch.Tensor:
    """The encoder's last feature map, as the package's own forward computes it."""
    return package_features(encoder, images)[-1]


def test_padding_inside_the_convolutions_computes_what_the_package_computes():
    from efficientnet_lite_pytorch import EfficientNet
    from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding

    net = lite(2)
    load_pretrained_encoder(net)
    package = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    missing, unexpected = package.load_state_dict(net.encoder.state_dict(), strict=False)
    assert not unexpected and all(k.split(".")[0] in ("_conv_head", "_bn1", "_fc") for k in missing)
    convs = [m for m in net.encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    kept = [m for m in convs if isinstance(m, Conv2dDynamicSamePadding)]
    assert len(convs) == 48 and len(kept) == 5 and all(tuple(m.stride) == (2, 2) for m in kept)
    assert pad_in_convolution(package) == 44  # 43 as in ours, and the classifier's 1x1 head
    assert pad_in_convolution(package) == 0  # nothing left to replace
    package = EfficientNet.from_name("efficientnet-lite0", image_size=None)
    package.load_state_dict(net.encoder.state_dict(), strict=False)
    for shape in ((2, 3, 64, 96), (1, 3, 37, 50)):  # any size: only the strided convolutions care
        torch.manual_seed(1)
        images = torch.rand(*shape)
        ours_in, theirs_in = images.clone().requires_grad_(), images.clone().requires_grad_()
        ours, theirs = run_encoder(net.encoder.eval(), ours_in), run_encoder(package.eval(), theirs_in)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        ours.square().sum().backward()
        theirs.square().sum().backward()
        torch.testing.assert_close(ours_in.grad, theirs_in.grad, rtol=1e-4, atol=1e-6)


def test_padding_inside_the_convolutions_leaves_a_seeds_network_as_it_was(monkeypatch):
    import thinseg.model.lite_unet as lite_unet

    ours = lite(2, seed=3).state_dict()
    monkeypatch.setattr(lite_unet, "pad_in_convolution", lambda encoder: 0)
    package = lite(2, seed=3).state_dict()
    assert list(ours) == list(package)
    assert all(torch.equal(ours[key], package[key]) for key in ours)


def test_folded_encoder_norms_give_the_package_blocks_features_and_gradients():
    """encode() folds each frozen-statistics norm into its convolution: the features and the
    gradients of every encoder weight (the norms' own included) stay those of the package's blocks,
    and no norm runs as a pass of its own."""
    net = lite(2)
    load_pretrained_encoder(net)
    net.train()
    enc = net.encoder
    enc._global_params = enc._global_params._replace(drop_connect_rate=None)  # no random depth
    torch.manual_seed(1)
    images = torch.rand(2, 3, 64, 96)

    expected = package_features(enc, (images - 127.0 / 255.0) / (128.0 / 255.0), net._taps)
    norms = [m for m in enc.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    calls: list[torch.nn.Module] = []
    hooks = [m.register_forward_hook(lambda module, inputs, output: calls.append(module)) for m in norms]
    folded = net.encode(images)
    for hook in hooks:
        hook.remove()
    assert len(norms) == 48 and not calls
    assert [f.shape for f in folded] == [f.shape for f in expected]
    for a, b in zip(expected, folded):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-4)
    weights = list(enc.parameters())
    grads_expected = torch.autograd.grad(sum(f.square().mean() for f in expected), weights)
    grads_folded = torch.autograd.grad(sum(f.square().mean() for f in folded), weights)
    for a, b in zip(grads_expected, grads_folded):  # float rounding only: 1e-3 of each tensor's scale
        assert float((b - a).abs().max()) <= 1e-3 * float(a.abs().max())
    assert all(float(g.abs().sum()) > 0 for g in grads_folded)  # the norms' weights learn too


def test_norms_that_learn_their_statistics_are_applied_as_they_are():
    """A norm in training mode (or one the engine has folded away) is not folded."""
    from thinseg.model.lite_unet import conv_then_norm

    conv, norm = torch.nn.Conv2d(3, 4, 3, padding=1, bias=False), torch.nn.BatchNorm2d(4).train()
    reference = copy.deepcopy(norm)
    x = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(conv_then_norm(conv, norm, x), reference(conv(x)))
    assert int(norm.num_batches_tracked) == 1  # it ran as a norm and learnt the batch's statistics
    torch.testing.assert_close(norm.running_var, reference.running_var)
    torch.testing.assert_close(conv_then_norm(conv, torch.nn.Identity(), x), conv(x))


@pytest.mark.parametrize("encoder", list(ENCODERS))
def test_each_encoder_feeds_the_decoder_its_declared_levels_from_its_own_wheel(encoder):
    spec = ENCODERS[encoder]
    pytest.importorskip(spec.weights_module, reason=f"{spec.weights_package} is not installed")
    net = build_network("LiteUNet", {"in_images": 2, "out_channels": 7, "encoder": encoder})
    assert isinstance(net, LiteUNet)
    assert load_pretrained_encoder(net) == len(net.encoder.state_dict())
    stored = load_packaged_weights(pretrained_weights_file(encoder))
    assert all(torch.equal(value, stored[key]) for key, value in net.encoder.state_dict().items())
    features = net.encode(torch.rand(1, 3, 64, 64))
    assert [f.shape[1] for f in features] == list(spec.channels)
    assert [f.shape[-1] for f in features] == [32, 16, 8, 4, 2]
    weights = sum(v.numel() for v in net.state_dict().values())
    assert describe_network("LiteUNet", {"in_images": 2, "out_channels": 7, "encoder": encoder}).min_weights <= weights


def test_the_command_line_and_the_bundle_checks_know_the_same_encoders():
    from thinseg.cli.train_cmd import LITE_ENCODER_NAMES
    from thinseg.model.networks import LITE_ENCODERS

    assert LITE_ENCODER_NAMES == tuple(ENCODERS) == tuple(LITE_ENCODERS)
    assert all(LITE_ENCODERS[name][1] == ENCODERS[name].channels[-2::-1] for name in ENCODERS)


def test_an_unknown_encoder_is_named():
    with pytest.raises(ThinSegError, match="unknown LiteUNet encoder 'efficientnet-lite9'"):
        pretrained_weights_file("efficientnet-lite9")


def test_the_encoder_can_learn_at_a_scaled_rate():
    net = lite(2)
    groups = make_optimizer(net, 1e-3, 1e-4, encoder_lr_scale=0.3).param_groups
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 3e-4])
    assert sum(len(g["params"]) for g in groups) == len(list(net.parameters()))
    assert len(make_optimizer(net, 1e-3, 1e-4).param_groups) == 1


def tiny_small_data_config(tmp_path, **changes) -> TrainConfig:
    """The small-data recipe sized to train in seconds on one generated section (`changes` win)."""
    settings = recipe_settings("small-data")
    settings.update(epochs=2, steps_per_epoch=2, warmup_steps=1, patch_size=64, batch_size=2, members=1)
    settings.update(changes)
    return TrainConfig(
        output_dir=tmp_path / "run",
        train_sections=synthetic_sections(1, 128, seed=0),
        val_sections=synthetic_sections(1, 96, seed=9),
        val_tile=96,
        val_overlap=16,
        progress=False,
        precision="fp32",
        **settings,
    )


def test_frozen_stages_keep_their_imagenet_weights_through_a_training(tmp_path):
    config = tiny_small_data_config(
        tmp_path, epochs=1, frozen_encoder_stages=2, calibrate_temperature=False, prior_correction=False, average_last=0
    )
    result = train(config, log=lambda _m: None)
    trained = load_bundle(result.model_dir).network
    stored = load_packaged_weights(pretrained_weights_file())
    encoder = trained.encoder.state_dict()
    # blocks 0-2 end at 1/4 resolution (block 3 is the first stride-2 block after them)
    frozen = [k for k in encoder if k.startswith(("_conv_stem", "_bn0", "_blocks.0.", "_blocks.1.", "_blocks.2."))]
    learnt = [k for k in encoder if k.startswith("_blocks.3.") and k.endswith("weight")]
    assert frozen and learnt
    assert all(torch.equal(encoder[k], stored[k]) for k in frozen)
    assert any(not torch.equal(encoder[k], stored[k]) for k in learnt)
    assert json.loads((result.model_dir / "meta.json").read_text())["training"]["config"]["frozen_encoder_stages"] == 2


def test_an_ensemble_with_separate_encoders_trains_and_loads(tmp_path):
    config = tiny_small_data_config(
        tmp_path, shared_encoder=False, members=2, member_split="seeds", epochs=1, calibrate_temperature=False
    )
    result = train(config, log=lambda _m: None)
    meta = json.loads((result.model_dir / "meta.json").read_text())
    assert meta["requires"]["thinseg"] == "0.4.0"
    assert meta["training"]["config"]["shared_encoder"] is False
    network = load_bundle(result.model_dir).network
    assert [len(member.encoders) for member in network.members] == [2, 2]
    first, second = (member.other_encoders[0]._conv_stem.weight for member in network.members)
    assert not torch.equal(first, second)  # each member's XP encoder learnt on its own


def test_frozen_stages_are_left_out_of_the_optimiser_and_bounded():
    net = lite(2)
    total = len(list(net.parameters()))
    net.freeze_stages(2)
    trainable = [p for p in net.parameters() if p.requires_grad]
    assert 0 < len(trainable) < total
    groups = make_optimizer(net, 1e-3, 1e-4, encoder_lr_scale=0.3).param_groups
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    net.freeze_stages(5)  # the whole encoder: its learning-rate group is dropped, not left empty
    assert len(make_optimizer(net, 1e-3, 1e-4, encoder_lr_scale=0.3).param_groups) == 1
    with pytest.raises(ThinSegError, match="5 stages to freeze, not 6"):
        net.freeze_stages(6)


def test_description_bounds_and_weight_count():
    params = {"in_images": 2, "out_channels": 7}
    shape = describe_network("LiteUNet", params)
    assert (shape.in_channels, shape.out_channels) == (6, 7)
    assert shape.min_weights <= sum(v.numel() for v in lite(2).state_dict().values())
    for bad, words in [
        ({"in_images": 3, "out_channels": 7}, "in_images 3"),
        ({"in_images": 2, "out_channels": 7, "decoder_channels": [8, 8]}, "5 levels"),
        ({"in_images": 2, "out_channels": 7, "encoder": "efficientnet-b7"}, "encoder"),
        ({"in_images": 2, "out_channels": 7, "layers": 3}, "unknown LiteUNet parameter"),
    ]:
        with pytest.raises(ThinSegError, match=words):
            describe_network("LiteUNet", bad)


def save_lite(folder, net: LiteUNet, params: dict | None = None):
    return save_bundle(
        folder,
        net.eval(),
        network_name="LiteUNet",
        network_params=params or {"in_images": net.in_images, "out_channels": net.out_channels},
        class_table=TABLE,
        input_names=("PP", "PX")[: net.in_images],
        pixels_per_mm=1 / 0.00132,
        roi_shape=(128, 128),
        title="lite",
        description="test",
    )


def test_bundle_round_trip_says_which_thinseg_it_needs(tmp_path):
    net = lite(2, seed=3)
    folder = save_lite(tmp_path / "lite", net)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["requires"] == {"thinseg": "0.2.0", "python_packages": ["efficientnet-lite-pytorch>=0.1"]}
    assert network_requirements("UNet") is None  # what GeoSlicer builds needs nothing more
    bundle = load_bundle(folder)
    x = torch.rand(1, 6, 64, 64)
    with torch.no_grad():
        assert torch.allclose(bundle.network(x), net(x), atol=1e-6)
    assert cannot_run(meta) is None


def test_a_bundle_for_a_newer_thinseg_is_refused_in_one_line(tmp_path, capsys):
    folder = save_lite(tmp_path / "lite", lite(2))
    rewrite_bundle(folder, edit_meta=lambda m: m.update(requires={"thinseg": "99.1"}))
    reason = cannot_run(json.loads((folder / "meta.json").read_text()))
    assert reason is not None and "thinseg 99.1 or newer" in reason  # the Slicer model list says why
    with pytest.raises(ThinSegError, match="needs thinseg 99.1 or newer"):
        load_bundle(folder)
    image = tmp_path / "s_PP.png"
    from PIL import Image

    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(image)
    code, _, err = run_main(capsys, "segment", image, "--model", folder, "--output", tmp_path / "out")
    assert code == 2 and len(error_lines(err)) == 1 and "99.1" in err and "Traceback" not in err


def test_the_engine_runs_a_lite_bundle_as_the_network_itself(tmp_path):
    net = lite(2, seed=5)
    with torch.no_grad():  # non-trivial decoder statistics, so that folding them must be exact
        for name, buffer in net.named_buffers():
            if name.startswith("decoder.") and name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
    bundle = load_bundle(save_lite(tmp_path / "lite", net))
    rng = np.random.default_rng(0)
    pp, xp = (rng.integers(0, 256, (96, 128, 3), dtype=np.uint8) for _ in range(2))
    result = Segmenter(bundle, InferenceOptions(tile=96, overlap=0, tta="none", precision="fp32")).segment(
        [ArraySource(pp), ArraySource(xp)]
    )
    x = torch.from_numpy(np.concatenate([pp, xp], axis=2)).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        expected = (net.eval()(torch.nn.functional.pad(x, (0, 32, 0, 0), mode="reflect"))[..., :128]).argmax(1)[0]
    agree = np.mean(result.labels == expected.numpy().astype(np.uint8))
    assert agree > 0.98  # tiles are 96 x 96 with padding at the edge: the borders may differ


def test_recipes_are_named_settings_of_train_config():
    assert RECIPE_NAMES == ("unet", "small-data")
    assert recipe_settings("unet") == {"recipe": "unet"}
    small = recipe_settings("small-data")
    TrainConfig(output_dir=".", **small)  # every key is a TrainConfig field
    assert (small["members"], small["member_split"]) == (3, "seeds")  # three seeds averaged
    assert (small["ema_decay"], small.get("average_last", 0)) == (0.99, 0)  # a moving average exported
    assert small["min_region_px"] == 256  # the sieve segment and evaluate then run
    small["augment"].gamma = 0.9
    assert recipe_settings("small-data")["augment"].gamma == 0.15  # a fresh copy each time
    with pytest.raises(ThinSegError, match="unknown training recipe"):
        recipe_settings("big-data")


def test_a_tiny_small_data_run_exports_an_averaged_model_with_its_inference_default(tmp_path):
    config = tiny_small_data_config(
        tmp_path,
        average_last=2,
        test_time_augmentation="dihedral",  # what a recipe may record as the inference default
        keep_candidates=True,  # keep both candidates under their own names, to measure what averaging gives
        ema_decay=0.0,  # the validated choice between the best epoch and the last epochs' average
    )
    messages: list[str] = []
    result = train(config, log=messages.append)
    meta = json.loads((result.model_dir / "meta.json").read_text())
    assert meta["test_time_augmentation"] == "dihedral"
    exported_average = meta["training"]["averaged_epochs"] == [1, 2]
    kept = sorted(p.name for p in result.model_dir.parent.glob(result.model_dir.name + "-*"))
    assert kept == ["model-average", "model-best-epoch"]
    same = result.model_dir.with_name("model-average" if exported_average else "model-best-epoch")
    other = result.model_dir.with_name("model-best-epoch" if exported_average else "model-average")
    assert (json.loads((other / "meta.json").read_text())["training"]["averaged_epochs"] == [1, 2]) is not (
        exported_average
    )
    # each kept candidate is calibrated and corrected as the export: the exported one is its twin
    exported = load_bundle(result.model_dir).network.state_dict()
    assert all(torch.equal(v, exported[k]) for k, v in load_bundle(same).network.state_dict().items())
    assert not all(torch.equal(v, exported[k]) for k, v in load_bundle(other).network.state_dict().items())
    other_meta = json.loads((other / "meta.json").read_text())["training"]
    assert other_meta["temperature"] > 0 and set(other_meta["prior_correction"]) == set(TABLE.names)
    assert meta["training"]["recipe"] == "small-data"
    assert meta["requires"]["thinseg"] == "0.2.0"
    averaged = [m for m in messages if m.startswith("average of epochs 1-2")]
    assert len(averaged) == 1
    assert (meta["training"]["averaged_epochs"] == [1, 2]) == averaged[0].endswith("exported")
    assert load_bundle(result.model_dir).test_time_augmentation == "dihedral"
    assert meta["min_region_px"] == 256 and load_bundle(result.model_dir).min_region_px == 256
    temperature = meta["training"]["temperature"]
    assert 0.05 <= temperature <= 20 and any(m.startswith("confidence calibrated") for m in messages)
    # the class shares of the training section folded in after the temperature, and recorded
    correction = meta["training"]["prior_correction"]
    assert set(correction) == set(TABLE.names) and all(w > 0 for w in correction.values())
    assert any(m.startswith("class shares of the training sections restored") for m in messages)
    assert meta["metrics"]["mean_iou"] == result.best_mean_iou  # validated as exported


def test_train_command_line_recipe_and_overrides(tmp_path, capsys):
    from thinseg.cli.main import build_parser
    from thinseg.cli.train_cmd import train_config

    parser = build_parser()
    (tmp_path / "s.nc").write_bytes(b"")  # named only: the config is built, no section is read
    args = parser.parse_args(["train", str(tmp_path), "-o", str(tmp_path / "r"), "--recipe", "small-data"])
    config = train_config(args)
    assert (config.network, config.epochs, config.members, config.member_split) == ("LiteUNet", 4, 3, "seeds")
    base = ["train", str(tmp_path), "-o", str(tmp_path / "r"), "--recipe", "small-data"]
    assert train_config(parser.parse_args([*base, "--members", "1"])).members == 1
    assert train_config(parser.parse_args(base)).min_region_px == 256
    assert train_config(parser.parse_args([*base, "--min-region", "0"])).min_region_px == 0
    assert train_config(parser.parse_args([*base, "--min-region", "90"])).min_region_px == 90
    split = train_config(parser.parse_args([*base, "--member-split", "cross-fitted"]))
    train_parser = parser._subparsers._group_actions[0].choices["train"]  # type: ignore[union-attr]
    # the command line writes its choices out (keeping torch out of its start-up): the same ones
    assert tuple(train_parser._option_string_actions["--member-split"].choices) == MEMBER_SPLITS
    assert (split.members, split.member_split) == (3, "cross-fitted")
    # fine-tuning trains one network unless more are asked for
    assert train_config(parser.parse_args([*base, "--init-from", str(tmp_path)])).members == 1
    args = parser.parse_args(
        [
            "train",
            str(tmp_path),
            "-o",
            str(tmp_path / "r"),
            "--recipe",
            "small-data",
            "--epochs",
            "3",
            "--no-pretrained",
            "--average-last",
            "0",
        ]
    )
    config = train_config(args)
    assert (config.epochs, config.pretrained, config.average_last) == (3, False, 0)
    assert (
        config.prior_correction
        and not train_config(parser.parse_args([*base, "--no-prior-correction"])).prior_correction
    )
    args = parser.parse_args(["train", str(tmp_path), "-o", str(tmp_path / "r"), "--no-prior-correction"])
    with pytest.raises(ThinSegError, match="--no-prior-correction applies to the small-data recipe"):
        train_config(args)
    args = parser.parse_args(["train", str(tmp_path), "-o", str(tmp_path / "r"), "--no-pretrained"])
    with pytest.raises(ThinSegError, match="small-data"):
        train_config(args)
    for encoder in ENCODERS:
        argv = ["train", str(tmp_path), "-o", str(tmp_path / "r"), "--recipe", "small-data", "--encoder", encoder]
        assert train_config(parser.parse_args(argv)).encoder == encoder
    args = parser.parse_args(["train", str(tmp_path), "-o", str(tmp_path / "r"), "--encoder", "efficientnet-lite2"])
    with pytest.raises(ThinSegError, match="--encoder applies to the small-data recipe"):
        train_config(args)
    with pytest.raises(SystemExit) as exit_info:
        run_main(capsys, "train", tmp_path, "-o", tmp_path / "r", "--encoder", "efficientnet-b7")
    [line] = error_lines(capsys.readouterr().err)
    assert exit_info.value.code == 2 and "--encoder: invalid choice" in line and "efficientnet-b7" in line


def test_a_training_job_takes_the_recipe_and_its_own_settings_win(tmp_path):
    from thinseg.jobs.runner import train_config as job_train_config

    job = {"sections": ["a.nc"], "run_dir": str(tmp_path / "run"), "recipe": "small-data"}
    config = job_train_config(job, tmp_path)
    assert (config.network, config.epochs, config.recipe) == ("LiteUNet", 4, "small-data")
    assert (config.members, config.member_split) == (3, "seeds")
    assert job_train_config({**job, "init_from": str(tmp_path)}, tmp_path).members == 1
    assert job_train_config({**job, "member_split": "cross-fitted"}, tmp_path).member_split == "cross-fitted"
    with pytest.raises(ThinSegError, match="'member_split' is one of seeds, cross-fitted, not 'folds'"):
        job_train_config({**job, "member_split": "folds"}, tmp_path)
    config = job_train_config({**job, "epochs": 2, "patch_size": 128}, tmp_path)
    assert (config.epochs, config.patch_size, config.ema_decay) == (2, 128, 0.99)
    assert job_train_config({"sections": ["a.nc"], "run_dir": str(tmp_path)}, tmp_path).network == "UNet"
    with pytest.raises(ThinSegError, match="unknown training recipe 'huge'"):
        job_train_config({**job, "recipe": "huge"}, tmp_path)


def test_the_fitted_temperature_undoes_an_over_confident_scaling():
    from thinseg.training.calibration import fit_temperature, fold_temperature

    generator = torch.Generator().manual_seed(0)
    true_logits = torch.randn(20000, 5, generator=generator) * 1.5
    target = torch.multinomial(torch.softmax(true_logits, dim=1), 1, generator=generator)[:, 0]
    assert fit_temperature(true_logits * 3.0, target) == pytest.approx(3.0, rel=0.05)
    assert fit_temperature(true_logits, target) == pytest.approx(1.0, rel=0.05)
    net = lite(1, seed=2).eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        before = net(x)
        fold_temperature(net, 2.5)
        after = net(x)
    assert torch.allclose(after, before / 2.5, atol=1e-5)
    assert torch.equal(after.argmax(1), before.argmax(1))
