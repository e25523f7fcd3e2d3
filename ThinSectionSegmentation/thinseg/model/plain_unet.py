"""MONAI's `UNet`, rebuilt from plain torch modules: same module tree, state_dict keys and arithmetic.

Why: importing MONAI takes about 3 s (its package imports all of its submodules), which is a
large share of a `thinseg segment` run. Every weight-bearing layer here is the torch module
MONAI itself instantiates (Conv2d, ConvTranspose2d, BatchNorm2d/InstanceNorm2d, PReLU, ...),
arranged under the same attribute names (`model.0.conv.unit0.conv.weight`, `...adn.N`,
`...adn.A`, `model.1.submodule...`), so GeoSlicer's weights load with `strict=True` and give
the same outputs; tests compare both with MONAI over a grid of configurations.

Only the configurations GeoSlicer and this project use are rebuilt (`plain_unet_supports`);
anything else (other activations, norms, orderings, 3-D) is built by MONAI itself.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

#: MONAI activation names (lower case) -> torch module, for the names rebuilt here.
_ACTIVATIONS = {"prelu": nn.PReLU, "relu": nn.ReLU, "leakyrelu": nn.LeakyReLU, "elu": nn.ELU}
_NORMS = {"batch": nn.BatchNorm2d, "instance": nn.InstanceNorm2d}


def _split(spec: Any) -> tuple[str, dict[str, Any]] | None:
    """MONAI's `split_args`: "name" or ("name", {kwargs}) -> (lower-case name, kwargs)."""
    if isinstance(spec, str):
        return spec.lower(), {}
    if isinstance(spec, (tuple, list)) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], dict):
        return spec[0].lower(), dict(spec[1])
    return None


def _odd_int(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return len(value) == 2 and value[0] == value[1] and _odd_int(value[0])
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1 and value % 2 == 1


def plain_unet_supports(params: Mapping[str, Any]) -> bool:
    """True when MONAI `UNet(**params)` is one this module rebuilds exactly."""
    known = {
        "spatial_dims",
        "in_channels",
        "out_channels",
        "channels",
        "strides",
        "kernel_size",
        "up_kernel_size",
        "num_res_units",
        "act",
        "norm",
        "dropout",
        "bias",
        "adn_ordering",
    }
    if set(params) - known or params.get("spatial_dims") != 2:
        return False
    channels, strides = params.get("channels"), params.get("strides")
    if not isinstance(channels, (list, tuple)) or len(channels) < 2 or not isinstance(strides, (list, tuple)):
        return False
    if len(strides) != len(channels) - 1 or not all(isinstance(s, int) and s >= 1 for s in strides):
        return False
    if not all(_odd_int(params.get(k, 3)) for k in ("kernel_size", "up_kernel_size")):
        return False
    act, norm = _split(params.get("act", "prelu")), _split(params.get("norm", "instance"))
    if act is None or act[0] not in _ACTIVATIONS or norm is None or norm[0] not in _NORMS:
        return False
    dropout = params.get("dropout", 0.0)
    if dropout is not None and not isinstance(dropout, (int, float)):
        return False
    return params.get("adn_ordering", "NDA") == "NDA" and isinstance(params.get("num_res_units", 0), int)


def _kernel(value: Any) -> int:
    return int(value[0] if isinstance(value, (list, tuple)) else value)


class _Layers:
    """The UNet's shared settings, making each building block as MONAI's factories do."""

    def __init__(self, act: Any, norm: Any, dropout: float | None, bias: bool) -> None:
        act_spec, norm_spec = _split(act), _split(norm)
        if act_spec is None or norm_spec is None:
            raise ValueError(f"PlainUNet does not rebuild act={act!r}, norm={norm!r}")
        self.act, self.norm, self.dropout, self.bias = act_spec, norm_spec, dropout, bias

    def adn(self, channels: int) -> nn.Sequential:
        """MONAI's ADN with ordering "NDA": norm, dropout, activation (absent ones skipped)."""
        adn = nn.Sequential()
        name, kwargs = self.norm
        adn.add_module("N", _NORMS[name](**{"num_features": channels, **kwargs}))
        if self.dropout is not None:
            adn.add_module("D", nn.Dropout(float(self.dropout)))
        name, kwargs = self.act
        adn.add_module("A", _ACTIVATIONS[name](**kwargs))
        return adn

    def convolution(
        self, cin: int, cout: int, stride: int, kernel: int, *, transposed: bool = False, conv_only: bool = False
    ) -> nn.Sequential:
        """MONAI's `Convolution`: `.conv` (same padding) then `.adn` unless conv_only."""
        block = nn.Sequential()
        padding = (kernel - 1) // 2
        if transposed:
            conv: nn.Module = nn.ConvTranspose2d(
                cin, cout, kernel, stride=stride, padding=padding, output_padding=stride - 1, bias=self.bias
            )
        else:
            conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=padding, bias=self.bias)
        block.add_module("conv", conv)
        if not conv_only:
            block.add_module("adn", self.adn(cout))
        return block

    def residual_unit(
        self, cin: int, cout: int, stride: int, kernel: int, subunits: int, last_conv_only: bool = False
    ) -> ResidualUnit:
        return ResidualUnit(self, cin, cout, stride, kernel, subunits, last_conv_only)


class ResidualUnit(nn.Module):
    """MONAI's ResidualUnit: `.conv` (unit0, unit1, ...) plus `.residual` (conv or identity)."""

    def __init__(
        self, layers: _Layers, cin: int, cout: int, stride: int, kernel: int, subunits: int, last_conv_only: bool
    ) -> None:
        super().__init__()
        self.conv = nn.Sequential()
        subunits = max(1, subunits)
        channels, step = cin, stride
        for i in range(subunits):
            conv_only = last_conv_only and i == subunits - 1
            self.conv.add_module(f"unit{i}", layers.convolution(channels, cout, step, kernel, conv_only=conv_only))
            channels, step = cout, 1
        self.residual: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            rkernel, rpadding = (kernel, (kernel - 1) // 2) if stride != 1 else (1, 0)
            self.residual = nn.Conv2d(cin, cout, rkernel, stride, rpadding, bias=layers.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        res: torch.Tensor = self.residual(x)
        out: torch.Tensor = self.conv(x) + res
        return out


class SkipConnection(nn.Module):
    """MONAI's SkipConnection (mode "cat"): input and `submodule(input)` side by side."""

    def __init__(self, submodule: nn.Module) -> None:
        super().__init__()
        self.submodule = submodule

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x, self.submodule(x)], dim=1)


class PlainUNet(nn.Module):
    """MONAI `UNet(spatial_dims=2, ...)` for the parameters `plain_unet_supports` accepts."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        channels: Sequence[int],
        strides: Sequence[int],
        kernel_size: Any = 3,
        up_kernel_size: Any = 3,
        num_res_units: int = 0,
        act: Any = "prelu",
        norm: Any = "instance",
        dropout: float | None = 0.0,
        bias: bool = True,
        adn_ordering: str = "NDA",
    ) -> None:
        super().__init__()
        params = dict(
            spatial_dims=spatial_dims,
            channels=channels,
            strides=strides,
            kernel_size=kernel_size,
            up_kernel_size=up_kernel_size,
            num_res_units=num_res_units,
            act=act,
            norm=norm,
            dropout=dropout,
            adn_ordering=adn_ordering,
        )
        if not plain_unet_supports(params):
            raise ValueError(f"PlainUNet does not rebuild these UNet parameters: {params}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.channels, self.strides, self.num_res_units = list(channels), list(strides), num_res_units
        layers = _Layers(act, norm, dropout, bias)
        kernel, up_kernel = _kernel(kernel_size), _kernel(up_kernel_size)

        def down(cin: int, cout: int, stride: int) -> nn.Module:
            if num_res_units > 0:
                return layers.residual_unit(cin, cout, stride, kernel, num_res_units)
            return layers.convolution(cin, cout, stride, kernel)

        def up(cin: int, cout: int, stride: int, is_top: bool) -> nn.Module:
            conv = layers.convolution(
                cin, cout, stride, up_kernel, transposed=True, conv_only=is_top and num_res_units == 0
            )
            if num_res_units > 0:
                return nn.Sequential(conv, layers.residual_unit(cout, cout, 1, kernel, 1, last_conv_only=is_top))
            return conv

        def block(cin: int, cout: int, chans: Sequence[int], strides_: Sequence[int], is_top: bool) -> nn.Module:
            c, s = chans[0], strides_[0]
            if len(chans) > 2:
                sub, upc = block(c, c, chans[1:], strides_[1:], False), c * 2
            else:
                sub, upc = down(c, chans[1], 1), c + chans[1]
            return nn.Sequential(down(cin, c, s), SkipConnection(sub), up(upc, cout, s, is_top))

        self.model = block(in_channels, out_channels, self.channels, self.strides, True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(x)
        return out
