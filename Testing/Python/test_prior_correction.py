"""The class-prior correction of the small-data recipe: what the sampler feeds, the weights, the fold."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from thinseg.classes.files import default_class_table
from thinseg.errors import ThinSegError
from thinseg.model.lite_unet import LiteUNet
from thinseg.model.networks import build_network
from thinseg.training.priors import fold_prior_correction, prior_weights, sampled_class_shares
from thinseg.training.sampler import build_patch_index

TABLE = default_class_table()


def striped_target(size: int = 512) -> np.ndarray:
    """Classes 1 (80% of the pixels), 2 (15%) and 3 (5%) in vertical bands away from the edges
    (which uniform patches that must fit inside the section see less often): 3 is the rare one."""
    target = np.ones((size, size), np.uint8)
    target[:, int(size * 0.30) : int(size * 0.45)] = 2
    target[:, int(size * 0.60) : int(size * 0.65)] = 3
    return target


def shares(strength: float, seed: int = 0) -> np.ndarray:
    target = striped_target()
    index = build_patch_index(target, 3, footprint=64, cell=8)
    return sampled_class_shares(
        [index], [target], 3, balancing_strength=strength, patches_per_epoch=200, epochs=2, seed=seed
    )


def test_without_balancing_the_sampler_feeds_the_rock_as_it_is():
    natural = np.array([0.80, 0.15, 0.05])
    assert shares(0.0) == pytest.approx(natural, abs=0.02)
    np.testing.assert_allclose(prior_weights(natural * 1000, shares(0.0)), 1.0, atol=0.2)


def test_balancing_feeds_the_rare_class_more_and_the_weights_take_it_back():
    balanced = shares(1.0)
    assert balanced[2] > 0.2 and balanced[0] < 0.6  # the rare class is fed several times its share
    weights = prior_weights(np.array([800, 150, 50]), balanced)
    assert weights[2] < 0.25 < 1.4 < weights[0]
    assert np.array_equal(shares(1.0, seed=3), shares(1.0, seed=3))  # the run's seed replays it exactly


def test_a_class_either_share_lacks_keeps_its_weight():
    weights = prior_weights(np.array([600, 0, 400]), np.array([0.5, 0.2, 0.0]))
    np.testing.assert_allclose(weights, [1.2, 1.0, 1.0])


def test_the_fold_is_bayes_rule_on_the_network_output():
    torch.manual_seed(0)
    net = build_network("LiteUNet", {"in_images": 2, "out_channels": len(TABLE) + 1})
    assert isinstance(net, LiteUNet)
    net.eval()
    x = torch.rand(1, 6, 64, 64)
    weights = np.linspace(0.4, 1.6, len(TABLE))
    with torch.no_grad():
        before = torch.softmax(net(x), dim=1)
        fold_prior_correction(net, weights)
        after = torch.softmax(net(x), dim=1)
    full = torch.cat([torch.ones(1), torch.as_tensor(weights, dtype=torch.float32)])  # label 0's channel kept
    expected = before * full[None, :, None, None]
    expected = expected / expected.sum(1, keepdim=True)
    assert torch.allclose(after, expected, atol=1e-5)
    assert not torch.equal(after.argmax(1), before.argmax(1))  # the weights moved some labels


def test_a_network_without_a_head_bias_is_refused():
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1))
    with pytest.raises(ThinSegError, match="cannot fold a class-prior correction into a Sequential"):
        fold_prior_correction(net, np.ones(3))
