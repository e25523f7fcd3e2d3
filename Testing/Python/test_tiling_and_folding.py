"""Tile placement, blending weights and BatchNorm folding: the engine's building blocks."""

import torch
from monai.networks.nets import UNet

from thinseg.inference.rewrites import fold_batchnorm
from thinseg.inference.tiling import blend_weights, padded_size, tile_starts


def test_tile_starts_cover_and_respect_overlap():
    for length in (512, 513, 1000, 4096, 4097, 10_000):
        starts = tile_starts(length, 512, 64)
        assert starts[0] == 0 and starts[-1] == length - 512
        gaps = [b - a for a, b in zip(starts, starts[1:])]
        assert all(g <= 512 - 64 for g in gaps), (length, gaps)  # overlap never below 64 px
        assert max(gaps, default=0) - min(gaps, default=0) <= 1  # evenly spread


def test_small_image_is_one_padded_tile():
    assert tile_starts(300, 512, 64) == [0]
    assert padded_size(300, 512, 16) == 304
    assert padded_size(700, 512, 16) == 512


def test_blend_weights_fall_to_the_border_and_stay_positive():
    w = blend_weights(512, 512, 64)
    assert w.shape == (512, 512)
    assert float(w.min()) > 0
    assert float(w[256, 256]) == 1.0
    assert float(w[0, 256]) < 0.01 and float(w[256, 511]) < 0.01
    assert torch.allclose(w, w.flip(0)) and torch.allclose(w, w.flip(1))


def test_fold_batchnorm_is_exact_and_removes_every_norm():
    torch.manual_seed(0)
    net = UNet(2, 6, 6, (8, 16, 32), (2, 2), num_res_units=2, norm="batch")
    net.train()
    with torch.no_grad():  # non-trivial running statistics
        for _ in range(3):
            net(torch.rand(2, 6, 64, 64) * 3 + 1)
    net.eval()
    folded, count = fold_batchnorm(net)
    n_norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert count == n_norms > 0
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    x = torch.rand(1, 6, 96, 128)
    with torch.no_grad():
        assert torch.allclose(net(x), folded(x), atol=1e-4)
    # the original network is untouched
    assert sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules()) == n_norms


def test_fold_leaves_instance_norm_networks_alone():
    net = UNet(2, 3, 2, (8, 16), (2,), num_res_units=1).eval()  # MONAI default: instance norm
    folded, count = fold_batchnorm(net)
    assert count == 0
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(net(x), folded(x))
