"""Inference-only network rewrites that keep fp32 results (up to rounding) but run faster."""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

_CONVS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def fold_batchnorm(network: nn.Module) -> tuple[nn.Module, int]:
    """Return a copy of `network` with every eval-mode BatchNorm that directly follows a conv
    folded into that conv's weights (MONAI's Convolution block: conv -> adn(N, D, A)).

    A BatchNorm in eval mode is an affine map per channel, so folding it is exact in real
    arithmetic and removes one full pass over every activation.
    """
    net = copy.deepcopy(network).eval()
    folded = 0
    last_conv: _ConvNd | None = None
    parents: dict[nn.Module, tuple[nn.Module, str]] = {}
    for parent in net.modules():
        for name, child in parent.named_children():
            parents[child] = (parent, name)
    for module in net.modules():
        if isinstance(module, _CONVS):
            last_conv = module
        elif isinstance(module, _NORMS) and last_conv is not None and module.track_running_stats:
            if last_conv.out_channels == module.num_features:
                _fold_into(last_conv, module)
                parent, name = parents[module]
                setattr(parent, name, nn.Identity())
                folded += 1
            last_conv = None
        elif len(list(module.children())) == 0 and not isinstance(module, (nn.Identity, nn.Dropout)):
            last_conv = None  # anything else in between (activation, ...) breaks the pattern
    return net, folded


@torch.no_grad()
def _fold_into(conv: _ConvNd, bn: _BatchNorm) -> None:
    """Fold eval-mode `bn` (scale and shift per channel) into the weights and bias of `conv`."""
    if bn.running_mean is None or bn.running_var is None:
        raise ValueError("only a BatchNorm with running statistics can be folded")
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1.0 / torch.sqrt(bn.running_var + bn.eps)
    shift = (bn.bias if bn.affine else 0.0) - bn.running_mean * scale
    out_dim = 1 if isinstance(conv, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)) else 0
    shape = [1] * conv.weight.dim()
    if out_dim == 1 and conv.groups != 1:
        raise ValueError("grouped transposed convolution not supported for folding")
    shape[out_dim] = -1
    conv.weight.mul_(scale.reshape(shape))
    bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
    new_bias = bias * scale + shift
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias)
    else:
        conv.bias.copy_(new_bias)


def prepare_network(
    network: nn.Module, device: torch.device, *, channels_last: bool = True, fold_bn: bool = True
) -> nn.Module:
    """The network as the engine runs it: eval mode, BatchNorm folded, on `device`, channels-last."""
    net = fold_batchnorm(network)[0] if fold_bn else copy.deepcopy(network).eval()
    net = net.to(device)
    if channels_last:
        # Module.to takes memory_format at run time; torch's type stubs leave it out
        net = net.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    for p in net.parameters():
        p.requires_grad_(False)
    return net
