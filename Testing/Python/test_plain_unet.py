"""The MONAI-free UNet: same module tree, keys and outputs as MONAI's UNet, and no MONAI import
when the bundled model is loaded for segmentation."""

import subprocess
import sys

import pytest
import torch
from monai.networks.nets import UNet

from thinseg.model.networks import build_network, network_channels
from thinseg.model.plain_unet import PlainUNet, plain_unet_supports

BASE = dict(spatial_dims=2, in_channels=6, out_channels=7, channels=[4, 8, 16], strides=[2, 2])

VARIANTS = [
    {},  # MONAI's defaults: PReLU, instance norm, no residual units
    dict(num_res_units=2, norm="batch"),  # the bundled model's layout
    dict(num_res_units=1, norm=("batch", {"momentum": 0.2}), act=("prelu", {"init": 0.1})),
    dict(num_res_units=2, norm=("instance", {"affine": True}), act="relu", dropout=0.1),
    dict(num_res_units=1, act=("leakyrelu", {"negative_slope": 0.2}), dropout=None, bias=False),
    dict(channels=[4, 8], strides=[1], kernel_size=5, up_kernel_size=1, norm="BATCH", act="PReLU"),
    dict(channels=[8, 8], strides=[1], kernel_size=1, up_kernel_size=1, num_res_units=0, norm="batch"),
    dict(channels=[4, 8, 8, 16], strides=[2, 1, 2], num_res_units=3, kernel_size=(3, 3), norm="batch", act="elu"),
]


def _pair(params):
    torch.manual_seed(0)
    monai_net = UNet(**params)
    with torch.no_grad():  # non-trivial norm statistics and weights
        for name, buffer in monai_net.named_buffers():
            if name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
            elif name.endswith("running_mean"):
                buffer.normal_(0, 0.3)
        for p in monai_net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    plain = PlainUNet(**params)
    plain.load_state_dict(monai_net.state_dict(), strict=True)
    return monai_net, plain


@pytest.mark.parametrize("variant", VARIANTS, ids=range(len(VARIANTS)))
def test_same_tree_keys_and_outputs_as_monai(variant):
    params = {**BASE, **variant}
    assert plain_unet_supports(params)
    monai_net, plain = _pair(params)
    assert [n for n, _ in monai_net.named_modules()] == [n for n, _ in plain.named_modules()]
    assert [(type(m).__name__) for m in monai_net.modules() if not list(m.children())] == [
        type(m).__name__ for m in plain.modules() if not list(m.children())
    ]
    assert {k: v.shape for k, v in monai_net.state_dict().items()} == {
        k: v.shape for k, v in plain.state_dict().items()
    }
    x = torch.rand(2, 6, 32, 48)
    with torch.no_grad():
        assert torch.equal(monai_net.eval()(x), plain.eval()(x))
        if not variant.get("dropout"):  # train mode (batch statistics) too, where it is deterministic
            assert torch.allclose(monai_net.train()(x), plain.train()(x), atol=1e-6)


def test_unsupported_configurations_are_left_to_monai():
    for extra in (
        dict(spatial_dims=3),
        dict(adn_ordering="AN"),
        dict(norm="group"),
        dict(act="swish"),
        dict(kernel_size=4),
        dict(strides=[2, 2, 2]),
        dict(dropout=("alphadropout", {"p": 0.1})),
    ):
        params = {**BASE, **extra}
        assert not plain_unet_supports(params)
    net = build_network("UNet", {**BASE, "adn_ordering": "AN"})
    assert isinstance(net, UNet) and network_channels(net) == (6, 7)
    net = build_network("UNetAct", dict(spatial_dims=2, in_channels=6, out_channels=7, base_channels=4, scales=3))
    assert isinstance(net.unet, PlainUNet) and network_channels(net) == (6, 7)
    assert "unet.model.0.conv.weight" in net.state_dict()


def test_loading_the_bundled_model_does_not_import_monai():
    code = (
        "import sys\n"
        "from thinseg.model.bundle import load_bundle\n"
        "from thinseg.resources import default_model_dir\n"
        "from thinseg.inference.engine import Segmenter, InferenceOptions\n"
        "Segmenter(load_bundle(default_model_dir()), InferenceOptions(device='cpu'))\n"
        "print('monai' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
