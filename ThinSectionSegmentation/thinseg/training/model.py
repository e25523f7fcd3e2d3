"""The network to train: MONAI's residual U-Net (the network of GeoSlicer's thin-section
segmentation models), or an existing bundle to fine-tune.

Default (depth 5, base 16): channels 16-32-64-128-256, strides 2, 2 residual units per block,
batch norm. Outputs are N + 1: channel 0 = "not classified" (never a training target), channel
k = class k, the layout thinseg bundles use (ArgmaxTransform first_label 0). Parameters are kept
as plain values so the bundle's config can rebuild the network in GeoSlicer
(`monai.networks.nets.UNet(**params)`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from thinseg.classes.table import ClassTable
from thinseg.errors import ThinSegError
from thinseg.model.bundle import ModelBundle, build_network, load_bundle
from thinseg.model.lite_unet import lite_unet_params, load_pretrained_encoder


def unet_params(
    in_channels: int,
    n_classes: int,
    *,
    base_channels: int = 16,
    depth: int = 5,
    num_res_units: int = 2,
    norm: str = "batch",
) -> dict[str, Any]:
    if depth < 2:
        raise ThinSegError(f"U-Net depth must be at least 2, got {depth}")
    if base_channels < 1:
        raise ThinSegError(f"--base-channels must be positive, got {base_channels}")
    return {
        "spatial_dims": 2,
        "in_channels": int(in_channels),
        "out_channels": int(n_classes),
        "channels": [int(base_channels) * 2**i for i in range(depth)],
        "strides": [2] * (depth - 1),
        "num_res_units": int(num_res_units),
        "norm": norm,
    }


@dataclass
class ModelSpec:
    network: torch.nn.Module
    name: str
    params: dict[str, Any]
    class_table: ClassTable
    roles: tuple[str, ...]  # "PP"/"XP", in network channel order
    pixels_per_mm: float | None
    source: str  # "new" or the bundle folder fine-tuned from
    first_label: int = 0  # output channel c scores label c + first_label


def new_model(
    roles: tuple[str, ...],
    class_table: ClassTable,
    *,
    name: str = "UNet",
    base_channels: int = 16,
    depth: int = 5,
    num_res_units: int = 2,
    norm: str = "batch",
    pretrained: bool = True,
    decoder_channels: tuple[int, ...] | None = None,
    encoder: str = "efficientnet-lite0",
    shared_encoder: bool = True,
) -> ModelSpec:
    """A new network: MONAI's UNet (what GeoSlicer runs) or a LiteUNet, whose encoder starts
    from ImageNet weights when `pretrained`."""
    if name == "LiteUNet":
        lite = lite_unet_params(len(roles), len(class_table) + 1, decoder_channels, encoder, shared_encoder)
        network = build_network(name, lite)
        if pretrained:
            load_pretrained_encoder(network)  # type: ignore[arg-type]  # build_network's LiteUNet
        return ModelSpec(network, name, lite, class_table, roles, None, "new")
    if name != "UNet":
        raise ThinSegError(f"new models are MONAI UNets or LiteUNets; {name!r} can only be fine-tuned (--init-from)")
    params = unet_params(
        3 * len(roles),
        len(class_table) + 1,
        base_channels=base_channels,
        depth=depth,
        num_res_units=num_res_units,
        norm=norm,
    )
    return ModelSpec(build_network(name, params), name, params, class_table, roles, None, "new")


def model_from_bundle(path: str | Path) -> ModelSpec:
    """Fine-tune an existing bundle (ours or GeoSlicer's): same network, classes, inputs."""
    bundle: ModelBundle = load_bundle(path)
    spec = bundle.config["model"]
    roles = []
    for name, channels in zip(bundle.input_names, bundle.input_channels):
        role = name.upper()
        if role not in ("PP", "PX", "XP") or channels != 3:
            raise ThinSegError(
                f"cannot fine-tune: input {name!r} ({channels} channels) is not a PP or XP RGB image", path
            )
        roles.append("XP" if role == "PX" else "PP")
    if bundle.input_range != (0.0, 255.0, 0.0, 1.0):
        raise ThinSegError(
            f"cannot fine-tune: the bundle rescales its input from {bundle.input_range}, not 0..255 -> 0..1", path
        )
    name, params, network = str(spec["name"]), dict(spec.get("params") or {}), bundle.network
    if bundle.first_label == 1:  # GeoSlicer layout, N outputs: add the "not classified" channel
        network, params = widen_outputs(network, name, params, path)
    network = network.train()
    for p in network.parameters():
        p.requires_grad_(True)
    return ModelSpec(network, name, params, bundle.class_table, tuple(roles), bundle.pixels_per_mm, str(Path(path)))


def widen_outputs(
    network: torch.nn.Module, name: str, params: dict[str, Any], path: Any = None
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """N-output network -> the same network with N + 1 outputs, old output k at channel k + 1.

    Every tensor whose shape grows (the last layers of the up path) gets the old values at
    indices 1.. along each grown axis and zeros at index 0, so the old channels compute exactly
    what they did and the new channel 0 starts as a constant (its logit then learns to stay low,
    as no pixel is ever labelled 0 in training). Norm statistics of the new channel stay neutral.
    """
    if "out_channels" not in params or name == "UNetActWithBoundarySupervision":
        raise ThinSegError(
            f"cannot fine-tune a {name} bundle with {params.get('out_channels')} outputs into the N + 1 layout", path
        )
    wide = dict(params, out_channels=int(params["out_channels"]) + 1)
    fresh = build_network(name, wide)
    old = network.state_dict()
    new_state = {}
    for key, value in fresh.state_dict().items():
        src = old[key]
        if tuple(src.shape) == tuple(value.shape):
            new_state[key] = src.clone()
            continue
        grown = [d for d, (a, b) in enumerate(zip(src.shape, value.shape)) if a != b]
        if len(src.shape) != len(value.shape) or any(value.shape[d] != src.shape[d] + 1 for d in grown):
            raise ThinSegError(f"cannot widen {key} from {list(src.shape)} to {list(value.shape)}", path)
        if key.endswith("running_var") or (key.endswith("weight") and value.ndim == 1):
            out = torch.ones_like(value)  # neutral norm scale/variance for the new channel
        else:
            out = torch.zeros_like(value)
        region = tuple(slice(1, None) if d in grown else slice(None) for d in range(value.ndim))
        out[region] = src
        new_state[key] = out
    fresh.load_state_dict(new_state, strict=True)
    return fresh, wide
