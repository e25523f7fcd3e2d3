"""The tiled engine: exact bookkeeping, small images, progress, cancel and bad input."""

import numpy as np
import pytest
import torch
from helpers import make_pointwise_bundle

from thinseg.classes.files import default_class_table
from thinseg.errors import ThinSegError
from thinseg.inference import Cancelled, InferenceOptions, Segmenter
from thinseg.model.bundle import load_bundle, save_bundle
from thinseg.model.networks import build_network


class ArraySource:
    def __init__(self, array):
        self.array, self.shape = array, array.shape[:2]

    def read(self, y0, y1, x0=0, x1=None):
        return self.array[y0:y1, x0:x1]


@pytest.fixture(scope="module")
def pointwise_bundle(tmp_path_factory):
    return make_pointwise_bundle(tmp_path_factory.mktemp("models") / "ThinSectionEnv" / "pointwise")


def images(h, w, seed=0):
    rng = np.random.default_rng(seed)
    return [(rng.random((h, w, 3)) * 255).astype(np.uint8) for _ in range(2)]


def whole_image_forward(bundle, pp, xp):
    x = bundle.prepare([torch.from_numpy(a).permute(2, 0, 1)[None] for a in (pp, xp)])
    with torch.no_grad():
        logits = bundle.network.eval()(x)
    labels = bundle.logits_to_labels(logits)[0].numpy()
    confidence = (torch.softmax(logits, 1).max(1).values[0] * 255).round().numpy()
    return labels, confidence


# (120, 121) with 64 px tiles: three tiles along each axis, 28 px apart, so some pixels are
# covered by three tiles in a row (and nine in all)
@pytest.mark.parametrize(
    "shape, tile", [((200, 300), 64), ((64, 64), 64), ((130, 65), 64), ((300, 220), 192), ((120, 121), 64)]
)
def test_tiled_equals_whole_image_for_a_pointwise_network(pointwise_bundle, shape, tile):
    """(The 192 px tiles give strips taller than the confidence is computed in at once.)"""
    pp, xp = images(*shape)
    seg = Segmenter(
        pointwise_bundle,
        InferenceOptions(tile=tile, overlap=16, batch_size=3, with_confidence=True, device="cpu", precision="fp32"),
    )
    result = seg.segment([ArraySource(pp), ArraySource(xp)])
    labels, confidence = whole_image_forward(pointwise_bundle, pp, xp)
    assert result.labels.shape == shape and result.labels.dtype == np.uint8
    assert (result.labels == labels).mean() > 0.9999  # only float ties may differ
    assert np.abs(result.confidence.astype(int) - confidence).max() <= 1
    assert set(np.unique(result.labels)) <= set(range(7))


def test_image_smaller_than_a_tile_is_padded_not_refused(pointwise_bundle):
    pp, xp = images(21, 37)
    result = Segmenter(pointwise_bundle, InferenceOptions(tile=64, overlap=16, device="cpu", precision="fp32")).segment(
        [ArraySource(pp), ArraySource(xp)]
    )
    labels, _ = whole_image_forward(pointwise_bundle, pp, xp)
    assert result.tiles == 1 and np.array_equal(result.labels, labels)


def test_progress_reports_every_tile_and_cancel_stops(pointwise_bundle):
    pp, xp = images(200, 300)
    seen = []
    seg = Segmenter(pointwise_bundle, InferenceOptions(tile=64, overlap=16, batch_size=2, device="cpu"))
    result = seg.segment([ArraySource(pp), ArraySource(xp)], progress=lambda d, t: seen.append((d, t)))
    assert seen[-1] == (result.tiles, result.tiles) and [d for d, _ in seen] == sorted(d for d, _ in seen)
    calls = []

    def cancel():
        calls.append(1)
        return len(calls) > 2

    with pytest.raises(Cancelled):
        seg.segment([ArraySource(pp), ArraySource(xp)], cancel=cancel)


def test_size_mismatch_and_wrong_input_count_are_clear_errors(pointwise_bundle):
    pp, _ = images(100, 100)
    _, xp = images(100, 90)
    seg = Segmenter(pointwise_bundle, InferenceOptions(tile=64, overlap=16, device="cpu"))
    with pytest.raises(ThinSegError, match="same size"):
        seg.segment([ArraySource(pp), ArraySource(xp)])
    with pytest.raises(ThinSegError, match="needs 2 images"):
        seg.segment([ArraySource(pp)])


def test_fp16_on_cpu_is_refused_cuda_without_gpu_refused_and_auto_falls_back(pointwise_bundle, monkeypatch):
    with pytest.raises(ThinSegError, match="fp16"):
        Segmenter(pointwise_bundle, InferenceOptions(precision="fp16", device="cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ThinSegError, match="device cuda needs a CUDA GPU"):
        Segmenter(pointwise_bundle, InferenceOptions(device="cuda", overlap=16))
    seg = Segmenter(pointwise_bundle, InferenceOptions(device="auto", overlap=16))
    assert seg.device.type == "cpu" and seg.messages[0] == "no CUDA GPU found: running on the CPU (device auto)"


def test_default_tile_grows_only_for_tile_independent_networks(pointwise_bundle):
    from monai.networks.nets import UNet

    from thinseg.inference.engine import LARGE_TILE, default_tile

    assert default_tile(pointwise_bundle.network, (64, 64)) == (LARGE_TILE, LARGE_TILE)  # BatchNorm
    instance_norm = UNet(2, 6, 7, (4, 8), (2,), num_res_units=1)  # MONAI default, GeoSlicer's UNetAct
    assert default_tile(instance_norm, (512, 512)) == (512, 512)
    assert Segmenter(pointwise_bundle, InferenceOptions(device="cpu")).tile == (LARGE_TILE, LARGE_TILE)
    assert Segmenter(pointwise_bundle, InferenceOptions(device="cpu", tile=64, overlap=16)).tile == (64, 64)


def test_auto_precision_is_bf16_only_where_the_hardware_runs_it_natively(pointwise_bundle, monkeypatch):
    from thinseg.inference import device as device_module

    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: False)
    assert Segmenter(pointwise_bundle, InferenceOptions(device="cpu", overlap=16)).precision == "fp32"
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: True)
    seg = Segmenter(pointwise_bundle, InferenceOptions(device="cpu", overlap=16))
    assert seg.precision == "bf16" and "--precision fp32 for exact fp32" in seg.messages[-1]
    exact = Segmenter(pointwise_bundle, InferenceOptions(device="cpu", overlap=16, precision="fp32"))
    assert exact.precision == "fp32" and exact.messages == []


def test_the_one_pass_input_is_bit_identical_to_the_bundle_pre_processing(pointwise_bundle):
    """The engine builds the network input itself (uint8 straight into a channels-last float
    batch, rescaled in place); it must equal the bundle's own Concatenate/MinMax steps, also
    when the bundle concatenates its inputs in another order or rescales to another range."""
    import dataclasses

    from thinseg.model.transforms import ConcatenateTransform, MinMaxTransform

    names = pointwise_bundle.input_names
    swapped = dataclasses.replace(
        pointwise_bundle,
        pre_transforms=[ConcatenateTransform({"x": names[::-1]}), MinMaxTransform("x", (10, 250), (-1.0, 1.0))],
    )
    assert swapped.fused_pre_processing()[0] == [1, 0]
    pp, xp = images(70, 90)
    bands = [torch.from_numpy(a[:64]) for a in (pp, xp)]
    cols = [0, 26]
    for bundle in (pointwise_bundle, swapped):
        seg = Segmenter(bundle, InferenceOptions(tile=64, overlap=16, device="cpu", precision="fp32"))
        order, _ = seg._fused
        fused = seg._fused_input([bands[i] for i in order], cols, 64)
        generic = bundle.prepare([torch.stack([b[:, c : c + 64] for c in cols]).permute(0, 3, 1, 2) for b in bands])
        assert fused.is_contiguous(memory_format=torch.channels_last) and torch.equal(fused, generic)
        labels, _ = whole_image_forward(bundle, pp, xp)
        assert (seg.segment([ArraySource(pp), ArraySource(xp)]).labels == labels).mean() > 0.9999


def test_pre_processing_that_is_not_one_rescale_takes_the_bundle_path(pointwise_bundle):
    import dataclasses

    from thinseg.model.transforms import ConcatenateTransform, MinMaxTransform

    names = pointwise_bundle.input_names
    odd = dataclasses.replace(
        pointwise_bundle,
        pre_transforms=[MinMaxTransform(names[0], (0, 100), (0.0, 1.0)), ConcatenateTransform({"x": names})],
    )
    assert odd.fused_pre_processing() is None  # PP rescaled, XP not: not one map for all channels
    pp, xp = images(90, 100)
    seg = Segmenter(odd, InferenceOptions(tile=64, overlap=16, device="cpu", precision="fp32"))
    labels, _ = whole_image_forward(odd, pp, xp)
    assert (seg.segment([ArraySource(pp), ArraySource(xp)]).labels == labels).mean() > 0.9999


def test_the_automatic_tile_shrinks_to_overlap_by_about_the_overlap(pointwise_bundle):
    from thinseg.inference.engine import LARGE_TILE

    seg = Segmenter(pointwise_bundle, InferenceOptions(device="cpu"))
    plan = seg.plan_for(8192, 3000)
    assert (plan.tile_h, plan.tile_w) == (976, 800)  # 9 and 4 tiles, as 1024 px tiles would need
    assert len(plan.ys) == 9 and len(plan.xs) == 4
    for starts, tile in ((plan.ys, plan.tile_h), (plan.xs, plan.tile_w)):
        overlaps = [tile - (b - a) for a, b in zip(starts, starts[1:])]
        assert min(overlaps) >= 64 and max(overlaps) < 100  # 1024 px tiles: 128 and 683 px
    assert (seg.plan_for(16384, 500).tile_h, seg.plan_for(500, 500).tile_w) == (LARGE_TILE, 512)
    chosen = Segmenter(pointwise_bundle, InferenceOptions(device="cpu", tile=1024))  # the user's tile stays
    assert chosen.plan_for(8192, 3000).tile_h == 1024


@pytest.mark.parametrize("shape", [(40, 50), (70, 200)])
def test_a_deep_network_pads_small_sections_to_its_own_multiple(tmp_path, shape):
    """Six levels of stride 2 need sides divisible by 32, not 16: a section smaller than the
    tile is padded to a multiple of 32 (16 would fail inside the network on 40 x 50)."""
    table = default_class_table()
    params = dict(
        spatial_dims=2, in_channels=6, out_channels=len(table) + 1, channels=[4] * 6, strides=[2] * 5, num_res_units=0
    )
    torch.manual_seed(0)
    folder = save_bundle(
        tmp_path / "deep",
        build_network("UNet", params).eval(),
        network_name="UNet",
        network_params=params,
        class_table=table,
        input_names=("PP", "PX"),
        pixels_per_mm=1 / 0.00132,
        roi_shape=(256, 256),
        title="deep",
        description="six levels",
    )
    segmenter = Segmenter(load_bundle(folder), InferenceOptions(device="cpu", precision="fp32"))
    assert segmenter.multiple == 32
    rng = np.random.default_rng(1)
    pp, xp = (rng.integers(0, 256, (*shape, 3), dtype=np.uint8) for _ in range(2))
    result = segmenter.segment([ArraySource(pp), ArraySource(xp)])
    assert result.labels.shape == shape
    plan = segmenter.plan_for(*shape)
    assert plan.tile_h % 32 == 0 and plan.tile_w % 32 == 0
