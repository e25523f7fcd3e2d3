"""Networks a GeoSlicer bundle can name in `config.model.name`, built from `config.model.params`.

The module tree (attribute names and order) of each class matches the classes GeoSlicer's
AI Segmenter builds, so GeoSlicer's `model_state_dict` loads here with `strict=True` and ours
loads there: `UNetAct` keeps the MONAI UNet in `.unet` (keys `unet.model.…`), and
`UNetActWithBoundarySupervision` also registers `.segmentation_head`, `.boundary_head` and a
`.main_model` Sequential that re-registers the UNet and the head (so its keys appear twice).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch

from thinseg.errors import ThinSegError
from thinseg.model.plain_unet import PlainUNet, plain_unet_supports

if TYPE_CHECKING:
    from monai.networks.blocks.convolutions import ResidualUnit
    from monai.networks.nets.unet import UNet as MonaiUNet
    from typing_extensions import TypeGuard  # typing has it from Python 3.10 only


def _unet(**params: Any) -> torch.nn.Module:
    """MONAI's UNet(**params): rebuilt from plain torch modules where that is exact (no 3 s
    MONAI import), else MONAI's own class."""
    if plain_unet_supports(params):
        return PlainUNet(**params)
    from monai.networks.nets.unet import UNet  # deferred: MONAI takes about 3 s to import

    return UNet(**params)


def _scaled_unet_params(
    spatial_dims: int,
    in_channels: int,
    out_channels: int | None,
    base_channels: int | None,
    scales: int,
    stride: int,
    channel_multiplier: int,
    num_res_units: int,
) -> dict[str, Any]:
    """MONAI UNet parameters behind GeoSlicer's UNetAct family: channels grow geometrically per scale."""
    base = base_channels or in_channels
    return dict(
        spatial_dims=spatial_dims,
        in_channels=in_channels,
        out_channels=out_channels or in_channels,
        channels=[base * channel_multiplier**i for i in range(scales)],
        strides=[stride] * (scales - 1),
        num_res_units=num_res_units,
    )


def _last_activation(last_act: Any) -> torch.nn.Module:
    """GeoSlicer uses a plain lambda when `last_act` is None; Identity has no weights either."""
    if last_act is None:
        return torch.nn.Identity()
    from monai.networks.layers.utils import get_act_layer  # deferred: MONAI takes about 3 s to import

    layer: torch.nn.Module = get_act_layer(last_act)
    return layer


class UNetAct(torch.nn.Module):
    """MONAI UNet (`.unet`) plus an optional final activation (`.last_act`).

    `act` is accepted and ignored, as in GeoSlicer: the UNet always uses MONAI's default
    activation (PReLU) and norm (instance), so weights trained there match this layout.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int | None = None,
        base_channels: int | None = None,
        scales: int = 3,
        act: Any = "prelu",
        last_act: Any = None,
        stride: int = 2,
        channel_multiplier: int = 2,
        num_res_units: int = 0,
    ) -> None:
        super().__init__()
        self.unet = _unet(
            **_scaled_unet_params(
                spatial_dims,
                in_channels,
                out_channels,
                base_channels,
                scales,
                stride,
                channel_multiplier,
                num_res_units,
            )
        )
        self.last_act = _last_activation(last_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.last_act(self.unet(x))
        return out


class UNetActWithBoundarySupervision(torch.nn.Module):
    """UNetAct with a residual segmentation head and a boundary head (used only in training).

    As in GeoSlicer, both heads are declared with `in_channels` inputs although they read the
    UNet's `out_channels` output, so the network only runs when the two counts are equal.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int | None = None,
        base_channels: int | None = None,
        scales: int = 3,
        act: Any = "prelu",
        last_act: Any = None,
        stride: int = 2,
        channel_multiplier: int = 2,
        num_res_units: int = 0,
    ) -> None:
        super().__init__()
        from monai.networks.nets.unet import UNet  # deferred: MONAI takes about 3 s to import

        out = out_channels or in_channels
        # MONAI's own UNet: the heads are built from its act/norm/dropout settings
        self.unet = UNet(
            **_scaled_unet_params(
                spatial_dims,
                in_channels,
                out_channels,
                base_channels,
                scales,
                stride,
                channel_multiplier,
                num_res_units,
            )
        )
        self.segmentation_head = self._head(spatial_dims, in_channels, out, num_res_units)
        self.boundary_head = self._head(spatial_dims, in_channels, 1, num_res_units)
        self.last_act = _last_activation(last_act)
        self.main_model = torch.nn.Sequential(self.unet, self.segmentation_head)

    def _head(self, spatial_dims: int, in_channels: int, out_channels: int, num_res_units: int) -> ResidualUnit:
        from monai.networks.blocks.convolutions import ResidualUnit  # deferred: MONAI takes about 3 s to import

        return ResidualUnit(
            spatial_dims=spatial_dims,
            in_channels=in_channels,
            out_channels=out_channels,
            strides=1,
            kernel_size=3,
            subunits=num_res_units,
            act=self.unet.act,
            norm=self.unet.norm,
            dropout=self.unet.dropout,
        )

    def forward(self, x: torch.Tensor, boundary: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Segmentation scores; with `boundary`, also the boundary probability map."""
        features = self.unet(x)
        seg: torch.Tensor = self.last_act(self.segmentation_head(features))
        if not boundary:
            return seg
        return seg, torch.sigmoid(self.boundary_head(features))


def _monai_unet(**params: Any) -> torch.nn.Module:
    """MONAI UNet; old GeoSlicer models may still say `dimensions` (MONAI's pre-0.6 name)."""
    if "dimensions" in params and "spatial_dims" not in params:
        params = dict(params)
        params["spatial_dims"] = params.pop("dimensions")
    return _unet(**params)


#: Network names GeoSlicer's model loader knows, mapped to their builders.
NETWORKS: dict[str, Callable[..., torch.nn.Module]] = {
    "UNet": _monai_unet,
    "UNetAct": UNetAct,
    "UNetActWithBoundarySupervision": UNetActWithBoundarySupervision,
}

SUPPORTED_NETWORKS: tuple[str, ...] = tuple(NETWORKS)


def canonical_network_name(name: str) -> str:
    """GeoSlicer matches class names case-insensitively; return our spelling or raise."""
    for known in NETWORKS:
        if isinstance(name, str) and known.lower() == name.lower():
            return known
    raise ThinSegError(f"unsupported network {name!r} (supported: {', '.join(SUPPORTED_NETWORKS)})")


def build_network(name: str, params: Mapping[str, Any]) -> torch.nn.Module:
    """Instantiate `name(**params)` as GeoSlicer does; bad names/params become ThinSegError."""
    builder = NETWORKS[canonical_network_name(name)]
    if not isinstance(params, Mapping):
        raise ThinSegError(f"network parameters for {name!r} must be a mapping, not {type(params).__name__}")
    try:
        return builder(**dict(params))
    except (TypeError, ValueError, AssertionError, KeyError) as exc:
        raise ThinSegError(f"invalid parameters for network {name!r}: {exc}") from None


def network_channels(network: torch.nn.Module) -> tuple[int, int]:
    """(input channels, output channels) of a supported network, read from its MONAI UNet."""
    unet = network if _is_unet(network) else getattr(network, "unet", None)
    if not _is_unet(unet):
        raise ThinSegError(f"cannot tell the channel counts of a {type(network).__name__} network")
    return int(unet.in_channels), int(unet.out_channels)


def _is_unet(module: object) -> TypeGuard[PlainUNet | MonaiUNet]:
    """A UNet built here or by MONAI (MONAI is only imported if it already is)."""
    if isinstance(module, PlainUNet):
        return True
    nets = sys.modules.get("monai.networks.nets")
    return nets is not None and isinstance(module, nets.UNet)
