"""Networks a GeoSlicer bundle can name in `config.model.name`, built from `config.model.params`.

The module tree (attribute names and order) of each class matches the classes GeoSlicer's
AI Segmenter builds, so GeoSlicer's `model_state_dict` loads here with `strict=True` and ours
loads there: `UNetAct` keeps the MONAI UNet in `.unet` (keys `unet.model.…`), and
`UNetActWithBoundarySupervision` also registers `.segmentation_head`, `.boundary_head` and a
`.main_model` Sequential that re-registers the UNet and the head (so its keys appear twice).

A bundle's parameters are checked before anything is built (`describe_network`): 2-D, every
channel count, stride, kernel size, depth and residual-unit count within sane bounds, and the
convolution weights they imply (a lower bound of the network's size, counted without building
it) within `limits.MAX_NETWORK_PARAMETERS`; a few bytes of description could otherwise ask for
terabytes of weights.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from thinseg import limits
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


def _lite_network(class_name: str) -> Callable[..., torch.nn.Module]:
    """The builder of thinseg.model.lite_unet's `class_name`, whose encoder's code comes from the
    efficientnet-lite-pytorch package."""

    def build(**params: Any) -> torch.nn.Module:
        from thinseg.model import lite_unet  # deferred: imports MONAI's decoder (about 3 s)

        try:
            network: torch.nn.Module = getattr(lite_unet, class_name)(**params)
        except ImportError as exc:
            raise ThinSegError(
                f"the {class_name} network needs the {exc.name or 'efficientnet_lite_pytorch'} package "
                "(pip install efficientnet-lite-pytorch)"
            ) from None
        return network

    return build


#: Network names GeoSlicer's model loader knows, mapped to their builders.
GEOSLICER_NETWORKS: dict[str, Callable[..., torch.nn.Module]] = {
    "UNet": _monai_unet,
    "UNetAct": UNetAct,
    "UNetActWithBoundarySupervision": UNetActWithBoundarySupervision,
}
#: Every network a bundle may name: GeoSlicer's, and networks only thinseg builds (their bundles
#: say in meta.json `requires` which thinseg version they need).
NETWORKS: dict[str, Callable[..., torch.nn.Module]] = {
    **GEOSLICER_NETWORKS,
    "LiteUNet": _lite_network("LiteUNet"),
    "LiteUNetEnsemble": _lite_network("LiteUNetEnsemble"),
}
_LITE_PACKAGES = ["efficientnet-lite-pytorch>=0.1"]
#: The networks only thinseg builds, and the first thinseg version that builds each.
_FIRST_THINSEG: dict[str, str] = {"LiteUNet": "0.2.0", "LiteUNetEnsemble": "0.3.0"}
#: ... and that builds a LiteUNet around this encoder (absent: the one LiteUNet started with).
_FIRST_THINSEG_FOR_ENCODER: dict[str, str] = {"efficientnet-lite1": "0.3.0", "efficientnet-lite2": "0.3.0"}
#: ... and that builds one encoder per image (`shared_encoder` false).
_FIRST_THINSEG_FOR_SEPARATE_ENCODERS = "0.4.0"


def network_requirements(name: str, params: Mapping[str, Any] | None = None) -> dict[str, Any] | None:
    """meta.json `requires` for a bundle of network `name(**params)`: the first thinseg version
    that builds it and the pip packages it needs; None for networks GeoSlicer builds."""
    known = canonical_network_name(name)
    if known not in _FIRST_THINSEG:
        return None
    params = params or {}
    versions = [_FIRST_THINSEG[known], _FIRST_THINSEG_FOR_ENCODER.get(str(params.get("encoder")), "0")]
    if params.get("shared_encoder") is False:
        versions.append(_FIRST_THINSEG_FOR_SEPARATE_ENCODERS)
    newest = max(versions, key=lambda v: tuple(int(part) for part in v.split(".")))
    return {"thinseg": newest, "python_packages": list(_LITE_PACKAGES)}


SUPPORTED_NETWORKS: tuple[str, ...] = tuple(NETWORKS)


def canonical_network_name(name: str) -> str:
    """GeoSlicer matches class names case-insensitively; return our spelling or raise."""
    for known in NETWORKS:
        if isinstance(name, str) and known.lower() == name.lower():
            return known
    raise ThinSegError(f"unsupported network {name!r} (supported: {', '.join(SUPPORTED_NETWORKS)})")


#: Most resolution levels (entries of `channels`, or `scales`) a network may have.
MAX_NETWORK_DEPTH = 12
#: Largest stride of one level, and largest convolution kernel side.
MAX_STRIDE = 8
MAX_KERNEL_SIZE = 15
#: Most residual units per block.
MAX_RESIDUAL_UNITS = 16


@dataclass(frozen=True)
class NetworkShape:
    """What a checked network description says without building it: input and output channels
    and how many convolution weights the network has at least."""

    in_channels: int
    out_channels: int
    min_weights: int


def _count(value: Any, what: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ThinSegError(f"{what} must be an integer, not {value!r}")
    if not low <= value <= high:
        raise ThinSegError(f"{what} {value} is outside the sane range {low} to {high}")
    return value


def _kernel_area(value: Any, what: str) -> int:
    sides = list(value) if isinstance(value, (list, tuple)) else [value]
    if len(sides) not in (1, 2):
        raise ThinSegError(f"{what} must be one side or two, not {value!r}")
    areas = [_count(side, what, 1, MAX_KERNEL_SIZE) for side in sides]
    return areas[0] * areas[-1]


def _unet_shape(params: Mapping[str, Any], heads: int = 0) -> NetworkShape:
    """Check MONAI UNet parameters; count the weights of its convolutions (biases, norms and
    activations left out, so a lower bound) level by level, as the UNet nests them."""
    dims = params.get("spatial_dims", params.get("dimensions"))
    if dims != 2:
        raise ThinSegError(f"the network is {dims}-D (spatial_dims {dims!r}); thin sections need a 2-D network")
    cmax = limits.MAX_NETWORK_CHANNELS
    cin = _count(params.get("in_channels"), "in_channels", 1, cmax)
    cout = _count(params.get("out_channels"), "out_channels", 1, cmax)
    channels, strides = params.get("channels"), params.get("strides")
    if not isinstance(channels, (list, tuple)) or not 2 <= len(channels) <= MAX_NETWORK_DEPTH:
        raise ThinSegError(f"channels must list 2 to {MAX_NETWORK_DEPTH} levels, not {str(channels)[:80]}")
    chans = [_count(c, "a channel count", 1, cmax) for c in channels]
    if not isinstance(strides, (list, tuple)) or len(strides) != len(chans) - 1:
        raise ThinSegError(f"strides must give one stride per level but the last ({len(chans) - 1}), not {strides!r}")
    steps = [_count(s, "a stride", 1, MAX_STRIDE) for s in strides]
    k = _kernel_area(params.get("kernel_size", 3), "kernel_size")
    ku = _kernel_area(params.get("up_kernel_size", 3), "up_kernel_size")
    units = _count(params.get("num_res_units", 0), "num_res_units", 0, MAX_RESIDUAL_UNITS)

    def down(a: int, b: int, stride: int) -> int:
        if units == 0:
            return a * b * k
        residual = 0 if stride == 1 and a == b else a * b * (k if stride != 1 else 1)
        return a * b * k + (units - 1) * b * b * k + residual

    def up(a: int, b: int) -> int:
        return a * b * ku + (b * b * k if units else 0)

    total = down(chans[-2], chans[-1], 1)  # the bottom
    for level, (width, stride) in enumerate(zip(chans, steps)):
        outer = cin if level == 0 else chans[level - 1]
        inner = 2 * width if level < len(chans) - 2 else width + chans[-1]
        total += down(outer, width, stride) + up(inner, cout if level == 0 else outer)
    for head in [cout, 1][:heads]:  # the boundary model's heads: 3 x 3 residual units on the input count
        total += cin * head * 9 + (max(1, units) - 1) * head * head * 9 + (cin * head if cin != head else 0)
    return NetworkShape(cin, cout, total)


#: Convolution weights of each EfficientNet-Lite encoder up to its last feature map (no
#: classifier), and the channels of its four skip levels (deepest first).
LITE_ENCODERS: dict[str, tuple[int, tuple[int, ...]]] = {
    "efficientnet-lite0": (2_919_392, (112, 40, 24, 16)),
    "efficientnet-lite1": (3_672_416, (112, 40, 24, 16)),
    "efficientnet-lite2": (4_302_416, (120, 48, 24, 16)),
}


def _lite_unet_shape(params: Mapping[str, Any]) -> NetworkShape:
    """Check LiteUNet parameters: one or two RGB images, five decoder levels, a known encoder;
    count the encoder's weights and the decoder's convolutions."""
    allowed = {"in_images", "out_channels", "decoder_channels", "encoder", "drop_connect_rate", "shared_encoder"}
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise ThinSegError(f"unknown LiteUNet parameter {unknown[0]!r}")
    images = _count(params.get("in_images"), "in_images", 1, 2)
    cout = _count(params.get("out_channels"), "out_channels", 1, limits.MAX_NETWORK_CHANNELS)
    encoder = params.get("encoder", "efficientnet-lite0")
    if not isinstance(encoder, str) or encoder not in LITE_ENCODERS:
        raise ThinSegError(f"unknown LiteUNet encoder {str(encoder)[:80]!r} (known: {', '.join(LITE_ENCODERS)})")
    encoder_weights, skip_channels = LITE_ENCODERS[encoder]
    shared = params.get("shared_encoder", True)
    if not isinstance(shared, bool):
        raise ThinSegError(f"shared_encoder must be true or false, not {str(shared)[:80]!r}")
    encoder_weights *= 1 if shared else images
    decoder = params.get("decoder_channels", [128, 64, 32, 24, 16])
    if not isinstance(decoder, (list, tuple)) or len(decoder) != 5:
        raise ThinSegError(f"decoder_channels must list 5 levels, not {str(decoder)[:80]}")
    widths = [_count(c, "a decoder channel count", 1, limits.MAX_NETWORK_CHANNELS) for c in decoder]
    skips = [images * c for c in skip_channels] + [0]
    total = encoder_weights + widths[-1] * cout * 9  # encoder and head
    for skip, width in zip(skips, widths):  # each level's skip and second convolution (a lower bound)
        total += skip * width * 9 + width * width * 9
    return NetworkShape(3 * images, cout, total)


def describe_network(name: str, params: Mapping[str, Any]) -> NetworkShape:
    """Check the description `name(**params)` within the bounds, building nothing; its shape, or
    a one-line ThinSegError naming the parameter out of bounds."""
    known = canonical_network_name(name)
    if not isinstance(params, Mapping):
        raise ThinSegError(f"network parameters for {name!r} must be a mapping, not {type(params).__name__}")
    if known == "UNet":
        shape = _unet_shape(params)
    elif known == "LiteUNet":
        shape = _lite_unet_shape(params)
    elif known == "LiteUNetEnsemble":
        members = _count(params.get("members"), "members", 2, limits.MAX_ENSEMBLE_MEMBERS)
        one = _lite_unet_shape({k: v for k, v in params.items() if k != "members"})
        shape = NetworkShape(one.in_channels, one.out_channels, members * one.min_weights)
    else:
        cmax = limits.MAX_NETWORK_CHANNELS
        cin = _count(params.get("in_channels", 1), "in_channels", 1, cmax)
        base = params.get("base_channels")
        base = cin if base is None else _count(base, "base_channels", 1, cmax)
        scales = _count(params.get("scales", 3), "scales", 2, MAX_NETWORK_DEPTH)
        multiplier = _count(params.get("channel_multiplier", 2), "channel_multiplier", 1, cmax)
        widest = base * multiplier ** (scales - 1)
        if widest > cmax:
            raise ThinSegError(
                f"base_channels {base} x channel_multiplier {multiplier} ^ {scales - 1} gives {widest} channels,"
                f" more than the {cmax} a layer may have"
            )
        unet = {
            **_scaled_unet_params(
                params.get("spatial_dims", 3),
                cin,
                params.get("out_channels"),
                base,
                scales,
                params.get("stride", 2),
                multiplier,
                params.get("num_res_units", 0),
            ),
        }
        shape = _unet_shape(unet, heads=2 if known == "UNetActWithBoundarySupervision" else 0)
    if shape.min_weights > limits.MAX_NETWORK_PARAMETERS:
        raise ThinSegError(
            f"network {known!r} as described would have at least {shape.min_weights:,} weights, more than the"
            f" {limits.MAX_NETWORK_PARAMETERS:,} a model may have"
        )
    return shape


def stored_values(state: Mapping[str, Any]) -> int:
    """How many values the storages under a state dict's tensors hold, each counted once (the
    boundary model's re-registered layers share theirs): what the file really carries, whatever
    shapes its tensors claim."""
    seen: dict[tuple[int, int], int] = {}
    for tensor in state.values():
        if isinstance(tensor, torch.Tensor) and tensor.numel():
            # torch 2 names a tensor's bytes `untyped_storage`; torch 1.12 only has `storage`
            storage_of: Any = tensor.untyped_storage if hasattr(tensor, "untyped_storage") else tensor.storage
            storage = storage_of()
            seen[(storage.data_ptr(), storage.nbytes())] = storage.nbytes() // tensor.element_size()
    return sum(seen.values())


def build_network(name: str, params: Mapping[str, Any]) -> torch.nn.Module:
    """Instantiate `name(**params)` as GeoSlicer does, once `describe_network` has found the
    description within bounds; bad names/params become ThinSegError."""
    builder = NETWORKS[canonical_network_name(name)]
    describe_network(name, params)
    try:
        return builder(**dict(params))
    except (TypeError, ValueError, AssertionError, KeyError) as exc:
        raise ThinSegError(f"invalid parameters for network {name!r}: {exc}") from None


def network_channels(network: torch.nn.Module) -> tuple[int, int]:
    """(input channels, output channels) of a supported network, read from its MONAI UNet."""
    if type(network).__name__ in _FIRST_THINSEG:  # thinseg's own networks keep their counts (no MONAI UNet)
        lite: Any = network
        return int(lite.in_channels), int(lite.out_channels)
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
