"""GeoSlicer model bundles: a folder holding `meta.json` (GeoSlicer's model list reads it) and
`model.pth` (a torch-saved dict: the weights `model_state_dict` and a `config` naming the
network, its parameters, the pre/post-processing transforms, and `meta`, the model's description
that meta.json repeats with a title). This is the layout GeoSlicer's AI Segmenter saves and loads.

Loading never calls what a file names beyond tensors, plain values and numbers
(`thinseg.model.safe_load`, on every torch) and checks every part a GeoSlicer model can get wrong
(the descriptions against the schema in `thinseg.model.meta`, the weights against the network
they name, the transforms against the inputs and outputs), so a bad file costs the user one
clear line, not a traceback halfway through a section. Saving writes exactly what GeoSlicer's AI
Segmenter loads, and loads it back before the folder appears.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from thinseg.classes.table import ClassTable
from thinseg.errors import ThinSegError
from thinseg.io.atomic import atomic_directory
from thinseg.jsonio import dumps
from thinseg.model.discovery import META_FILE, WEIGHTS_FILE, find_bundles
from thinseg.model.meta import (
    check_config_meta,
    check_meta,
    check_pixels_per_mm,
    check_roi_shape,
    check_transforms,
    newer_thinseg_needed,
    read_meta,
)
from thinseg.model.networks import (
    SUPPORTED_NETWORKS,
    NetworkShape,
    build_network,
    canonical_network_name,
    describe_network,
    network_channels,
    network_requirements,
    stored_values,
)
from thinseg.model.safe_load import load_torch_file
from thinseg.model.transforms import (
    AddAxisTransform,
    AddConstantTransform,
    ArgmaxTransform,
    ConcatenateTransform,
    IdentityTransform,
    MapLabelValued,
    MinMaxTransform,
    QuantileTransform,
    RenameTransform,
    ToTensorTransform,
    Transform,
    parse_post_transforms,
    parse_pre_transforms,
    run_transforms,
)

#: Names save_bundle gives the concatenated network input and the output.
NETWORK_INPUT = "x"
OUTPUT = "y"
IDENTITY_RANGE = (0.0, 1.0, 0.0, 1.0)
#: Image sizes (height, width) the pre-processing is tried on at load: two, so that no step that
#: picks fixed rows or columns, transposes or reshapes can keep both on the input grid by chance.
_TRIAL_SIZES = ((3, 5), (4, 7))
#: How many more convolution weights than model.pth holds a described network may have and still
#: be built to compare layer by layer (4 MB in float32): beyond it the weights cannot be its own.
_BUILD_SLACK = 1_000_000
_EXISTS = "a model folder already exists here: choose another folder or remove this one"

__all__ = [
    "SUPPORTED_NETWORKS",
    "ModelBundle",
    "build_network",
    "find_bundles",
    "load_bundle",
    "save_bundle",
]


#: Test-time augmentation modes a bundle may recommend (see ModelBundle.test_time_augmentation).
TTA_MODES = ("none", "flips", "dihedral")


@dataclass
class ModelBundle:
    """A loaded model: network (eval, CPU), what it expects as input, and what its labels mean."""

    path: Path
    title: str
    description: str
    network: torch.nn.Module
    input_names: list[str]  # order in which prepare() takes the images (meta `inputs` order)
    input_channels: list[int]
    in_channels: int
    class_table: ClassTable
    first_label: int
    pixels_per_mm: float | None
    roi_shape: tuple[int, int]
    input_range: tuple[float, float, float, float] | None  # None: more than concatenation + one rescale
    meta: dict[str, Any]
    config: dict[str, Any]
    network_input: str = field(default=NETWORK_INPUT, repr=False)
    output: str = field(default=OUTPUT, repr=False)  # the segmentation output's name
    pre_transforms: list[Transform] = field(default_factory=list, repr=False)
    post_transforms: list[Transform] = field(default_factory=list, repr=False)

    @property
    def test_time_augmentation(self) -> str:
        """The flips/rotations to average at inference that the model was evaluated with:
        "none", "flips" (4) or "dihedral" (8 = flips x 90-degree rotations); meta.json
        `test_time_augmentation`, written by training recipes that measured a gain."""
        value = self.meta.get("test_time_augmentation", "none")
        return value if value in TTA_MODES else "none"

    @property
    def min_region_px(self) -> int:
        """The minimum-region sieve the model was evaluated with (thinseg.inference.regions):
        regions of one class under this many pixels of the model's grid take their runner-up
        class; meta.json `min_region_px`, written by training recipes that measured a gain; 0: off."""
        value = self.meta.get("min_region_px", 0)
        return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0

    @property
    def tag(self) -> str:
        """GeoSlicer's tag: the name of the folder holding the model folder."""
        return self.path.parent.name

    def prepare(self, images: Sequence[torch.Tensor]) -> torch.Tensor:
        """One (B, c, H, W) uint8/float tensor per input, in `input_names` order -> float32
        network input (B, C, H, W), via the bundle's own pre-processing. As in GeoSlicer, each
        image of the batch is one float32 sample {input name: (c, H, W)}."""
        if len(images) != len(self.input_names):
            raise ThinSegError(
                f"model {self.title!r} needs {len(self.input_names)} images "
                f"({', '.join(self.input_names)}) but {len(images)} were given"
            )
        for name, channels, image in zip(self.input_names, self.input_channels, images):
            if image.ndim != 4 or image.shape[1] != channels:
                raise ThinSegError(f"input {name!r} must be (B, {channels}, H, W), not {tuple(image.shape)}")
        batch = []
        for b in range(images[0].shape[0]):
            sample = {name: image[b].to(torch.float32) for name, image in zip(self.input_names, images)}
            batch.append(run_transforms(self.pre_transforms, sample)[self.network_input])
        return torch.stack(batch)

    def fused_pre_processing(self) -> tuple[list[int], list[MinMaxTransform]] | None:
        """The pre-processing as (order of the inputs along the network's channels, rescales
        applied to all channels in turn), or None where it is not that simple.

        Concatenate and MinMax steps are per-channel affine maps, so the engine can build the
        network input with one uint8 -> float pass plus in-place rescales (same arithmetic,
        same bits as `prepare`) instead of a copy per step.
        """
        return fuse_pre_processing(self.pre_transforms, self.input_names, self.network_input)

    def logits_to_labels(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, classes, H, W) scores -> (B, H, W) uint8 labels, value k = k-th class: what the
        bundle's post-processing gives (checked at load to be the argmax + `first_label`)."""
        if isinstance(logits, (list, tuple)):
            logits = logits[0]
        return (torch.argmax(logits, dim=1) + self.first_label).to(torch.uint8)

    def post_process(self, logits: torch.Tensor) -> torch.Tensor:
        """The bundle's post-processing chain itself on {output: (B, classes, H, W) logits}, as
        GeoSlicer runs it: the (B, 1, H, W) label map GeoSlicer writes."""
        return run_transforms(self.post_transforms, {self.output: logits})[self.output]


def fuse_pre_processing(
    pre: Sequence[Transform], input_names: Sequence[str], network_input: str
) -> tuple[list[int], list[MinMaxTransform]] | None:
    """`ModelBundle.fused_pre_processing` for a chain `pre` over `input_names`."""
    keys: dict[str, tuple[list[int], list[MinMaxTransform]]] = {name: ([i], []) for i, name in enumerate(input_names)}
    for step in pre:
        if isinstance(step, IdentityTransform):
            continue
        if isinstance(step, ConcatenateTransform):
            for new_key, old_keys in step.key_groups.items():
                if any(k not in keys for k in old_keys):
                    return None
                parts = [keys.pop(k) for k in old_keys]
                if any(ops for _, ops in parts):  # rescaled before joining: channels may differ
                    return None
                keys[new_key] = ([i for order, _ in parts for i in order], [])
        elif isinstance(step, MinMaxTransform) and step.key in keys:
            keys[step.key][1].append(step)
        else:
            return None
    return keys.get(network_input)


# -- loading -----------------------------------------------------------------------------------


def load_bundle(model_dir: Path | str) -> ModelBundle:
    """Load and validate a GeoSlicer model folder; every problem is a one-line ThinSegError."""
    folder = Path(model_dir)
    meta_path, pth_path = _bundle_files(folder)
    meta = read_meta(meta_path)
    saved = _read_weights(pth_path)
    config, cmeta = _config(saved, pth_path)

    declared = check_config_meta(cmeta, pth_path)
    shown = check_meta(meta, meta_path)
    too_old = newer_thinseg_needed(meta)
    if too_old is not None:
        raise ThinSegError(too_old, meta_path)
    _same_inputs(declared.inputs, shown.inputs, folder)
    _same_classes(declared.class_table, shown.class_table, folder)
    inputs = declared.inputs
    # config.meta's pixel size wins; meta.json's is used (and checked) only when it has none
    if "pixels_per_mm" in cmeta:
        pixels_per_mm = declared.pixels_per_mm
    else:
        pixels_per_mm = check_pixels_per_mm(meta.get("pixels_per_mm"), meta_path)

    # everything the description says is checked before the network is built
    name, params, shape = _network_description(config, pth_path)
    in_ch, out_ch = shape.in_channels, shape.out_channels
    pre, post, network_input = _pipeline(config, cmeta, pth_path)
    _check_pre_processing(inputs, pre, network_input, in_ch, pth_path)
    _check_output_count(out_ch, shown.class_table, pth_path)
    first_label = _first_label(post, declared.output, out_ch, pth_path)
    _check_labels(out_ch, shown.class_table, first_label, pth_path)
    network = _network(name, params, shape, saved, pth_path)

    return ModelBundle(
        path=folder,
        title=str(meta.get("title") or saved.get("title") or folder.name),
        description=str(meta.get("description") or ""),
        network=network,
        input_names=[name for name, _ in inputs],
        input_channels=[channels for _, channels in inputs],
        in_channels=in_ch,
        class_table=shown.class_table,
        first_label=first_label,
        pixels_per_mm=pixels_per_mm,
        roi_shape=declared.roi_shape,
        input_range=_input_range(pre, network_input, [name for name, _ in inputs]),
        meta=meta,
        config=config,
        network_input=network_input,
        output=declared.output,
        pre_transforms=pre,
        post_transforms=post,
    )


def _bundle_files(folder: Path) -> tuple[Path, Path]:
    if not folder.is_dir():
        raise ThinSegError("model folder not found", folder)
    meta_path, pth_path = folder / META_FILE, folder / WEIGHTS_FILE
    for path in (meta_path, pth_path):
        if not path.is_file():
            raise ThinSegError(f"not a GeoSlicer model folder: {path.name} is missing", folder)
    return meta_path, pth_path


def _read_weights(pth_path: Path) -> dict[str, Any]:
    """model.pth through `load_torch_file`: tensors, plain values and numbers only, nothing run."""
    saved = load_torch_file(pth_path)
    if not isinstance(saved, dict):
        raise ThinSegError(f"model.pth holds a {type(saved).__name__}, not GeoSlicer's saved-model dict", pth_path)
    if "models_to_compose" in saved:
        raise ThinSegError("composed models (models_to_compose) are not supported; use a single model", pth_path)
    for key in ("model_state_dict", "config"):
        if not isinstance(saved.get(key), Mapping):
            raise ThinSegError(f"model.pth has no {key!r} entry", pth_path)
    return saved


def _config(saved: Mapping[str, Any], pth_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """model.pth's `config` and its `meta` section (the model's description), as dicts."""
    config = dict(saved["config"])
    cmeta = config.get("meta")
    if not isinstance(cmeta, Mapping):
        raise ThinSegError("model.pth config has no 'meta' section", pth_path)
    return config, dict(cmeta)


def _same_inputs(from_pth: list[tuple[str, int]], from_meta: list[tuple[str, int]], folder: Path) -> None:
    if from_pth != from_meta:
        raise ThinSegError(
            f"meta.json and model.pth disagree on the inputs: meta.json has {_fmt_inputs(from_meta)}, "
            f"model.pth has {_fmt_inputs(from_pth)}",
            folder,
        )


def _fmt_inputs(inputs: list[tuple[str, int]]) -> str:
    return ", ".join(f"{name}({channels})" for name, channels in inputs)


def _same_classes(from_pth: ClassTable, from_meta: ClassTable, folder: Path) -> None:
    if from_pth.names != from_meta.names:
        raise ThinSegError(
            f"meta.json and model.pth disagree on the classes: meta.json has {from_meta.names}, "
            f"model.pth has {from_pth.names}",
            folder,
        )


def _network_description(config: Mapping[str, Any], pth_path: Path) -> tuple[str, dict[str, Any], NetworkShape]:
    """config.model's network name and parameters, checked within bounds, and the shape they give."""
    spec = config.get("model")
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
        raise ThinSegError("model.pth config has no model name", pth_path)
    try:
        name = canonical_network_name(spec["name"])
        params = spec.get("params") or {}
        shape = describe_network(name, params)
    except ThinSegError as exc:
        raise ThinSegError(
            exc.problem if exc.problem.startswith("unsupported") else f"config.model.params: {exc.problem}", pth_path
        ) from None
    return name, dict(params), shape


def _network(
    name: str, params: dict[str, Any], shape: NetworkShape, saved: Mapping[str, Any], pth_path: Path
) -> torch.nn.Module:
    """The network built and loaded, once the weights are known to be tensors that hold about
    what the described network needs: nothing much larger than the file is built. (A network
    within `_BUILD_SLACK` of the weights is built, to name the layers that differ.)"""
    state = saved["model_state_dict"]
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ThinSegError("model_state_dict holds values that are not tensors", pth_path)
    held = stored_values(state)
    if shape.min_weights > held + _BUILD_SLACK:
        raise ThinSegError(
            f"model weights do not match network {name!r} built from config.model.params: model_state_dict holds"
            f" {held:,} values but that network has {shape.min_weights:,} convolution weights alone",
            pth_path,
        )
    try:
        network = build_network(name, params)
    except ThinSegError as exc:
        raise ThinSegError(f"config.model.params: {exc.problem}", pth_path) from None
    problem = _state_dict_problem(network, state, name)
    if problem:
        raise ThinSegError(problem, pth_path)
    network.load_state_dict(state, strict=True)
    if network_channels(network) != (shape.in_channels, shape.out_channels):
        raise ThinSegError(f"config.model.params of network {name!r} do not say its channels plainly", pth_path)
    return network.eval()


def _state_dict_problem(network: torch.nn.Module, state: Mapping[str, Any], name: str) -> str | None:
    """Missing/unexpected keys and shape mismatches, summarised in one line (None if fine)."""
    expected = network.state_dict()
    if not all(isinstance(v, torch.Tensor) for v in state.values()):
        return "model_state_dict holds values that are not tensors"
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [
        f"{k} {list(state[k].shape)} vs {list(v.shape)}"
        for k, v in expected.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing ({_some(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected ({_some(unexpected)})")
    if shapes:
        parts.append(f"{len(shapes)} with other shapes (saved vs network: {_some(shapes)})")
    if not parts:
        return None
    return f"model weights do not match network {name!r} built from config.model.params: " + "; ".join(parts)


def _some(items: list[str], limit: int = 3) -> str:
    more = f", ... {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more


def _pipeline(
    config: Mapping[str, Any], cmeta: Mapping[str, Any], pth_path: Path
) -> tuple[list[Transform], list[Transform], str]:
    """Parse the transforms; return (pre-processing, post-processing, network-input key)."""
    transforms = config.get("transforms") or {}
    check_transforms(transforms, pth_path)
    try:
        pre = parse_pre_transforms(transforms.get("pre_processing_transforms"))
        post = parse_post_transforms(transforms.get("post_processing_transforms"))
    except ThinSegError as exc:
        raise ThinSegError(exc.problem, pth_path) from None
    pre_processed = cmeta.get("pre_processed_inputs") or dict(cmeta["inputs"])
    if not isinstance(pre_processed, Mapping) or not pre_processed:
        raise ThinSegError("model.pth config.meta.pre_processed_inputs is empty", pth_path)
    return pre, post, str(next(iter(pre_processed)))  # GeoSlicer feeds the first one to the network


def _check_pre_processing(
    inputs: list[tuple[str, int]], pre: list[Transform], network_input: str, in_ch: int, pth_path: Path
) -> None:
    """Run the pre-processing on small samples, as GeoSlicer would on a section, so that key,
    channel and shape mistakes show up at load time: the network input must be float32
    (channels, H, W) on the input grid."""
    for height, width in _TRIAL_SIZES:
        sample = {name: torch.rand(channels, height, width) * 255 for name, channels in inputs}
        try:
            sample = run_transforms(pre, sample)
        except ThinSegError as exc:
            raise ThinSegError(f"pre-processing does not fit the model inputs: {exc.problem}", pth_path) from None
        except (RuntimeError, IndexError, ValueError, TypeError) as exc:
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ThinSegError(f"pre-processing fails on the model inputs ({reason})", pth_path) from None
        if network_input not in sample:
            raise ThinSegError(
                f"pre-processing does not produce the network input {network_input!r} (it gives {', '.join(sample)})",
                pth_path,
            )
        x = sample[network_input]
        if x.ndim != 3 or tuple(x.shape[1:]) != (height, width):
            raise ThinSegError(
                f"pre-processing turns {height} x {width} images into a {tuple(x.shape)} network input, "
                f"not (channels, {height}, {width}) on the same pixels",
                pth_path,
            )
        if x.dtype != torch.float32:
            raise ThinSegError(f"pre-processing gives a {x.dtype} network input; the network takes float32", pth_path)
        if x.shape[0] != in_ch:
            raise ThinSegError(f"the inputs give {x.shape[0]} channels but the network takes {in_ch}", pth_path)


#: Post-processing steps that keep which output channel has the highest score (argmax unchanged).
_ORDER_KEEPING = (IdentityTransform, RenameTransform, AddConstantTransform, MinMaxTransform, QuantileTransform)
#: Post-processing steps that only relabel the argmax (per pixel, from its value).
_RELABELLING = (IdentityTransform, RenameTransform, AddConstantTransform, MapLabelValued, ToTensorTransform)


def _first_label(post: list[Transform], output: str, channels: int, pth_path: Path) -> int:
    """The post-processing as "label = winning output channel + first_label", or a refusal.

    Before its one ArgmaxTransform the chain may only change the scores in ways that keep their
    order; after it, only relabel (add a constant, map values, cast, put the channel axis back).
    What each channel then becomes is read by running the chain on one pixel per channel, each
    won by its own channel; GeoSlicer writes `[0, 0]` of a (B, 1, H, W) result.
    """
    key, argmax = output, None
    for step in post:
        if isinstance(step, RenameTransform):
            key = step.renames.get(key, key)
        elif isinstance(step, ArgmaxTransform) and step.key == key:
            if argmax is not None:
                raise ThinSegError("post-processing has more than one ArgmaxTransform", pth_path)
            argmax = step
        elif _touches(step, key) and not _allowed_post_step(step, after_argmax=argmax is not None):
            where = "after" if argmax is not None else "before"
            raise ThinSegError(
                f"post-processing {step.NAME} {where} the ArgmaxTransform is not supported "
                f"(before it only order-keeping rescales, after it only relabelling)",
                pth_path,
            )
    if argmax is None:
        raise ThinSegError(f"post-processing has no ArgmaxTransform on the model output {output!r}", pth_path)
    probe = torch.eye(channels).reshape(1, channels, 1, channels)  # pixel j: channel j wins
    try:
        result = run_transforms(post, {output: probe})
    except ThinSegError as exc:
        raise ThinSegError(f"post-processing does not fit the model output: {exc.problem}", pth_path) from None
    except (RuntimeError, IndexError, ValueError, TypeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ThinSegError(f"post-processing fails on the model output ({reason})", pth_path) from None
    if output not in result:
        raise ThinSegError(
            f"post-processing leaves no model output {output!r} (it gives {', '.join(result)})", pth_path
        )
    labels = result[output]
    if tuple(labels.shape) != (1, 1, 1, channels):
        raise ThinSegError(
            f"post-processing gives {tuple(labels.shape)} for a (1, {channels}, 1, {channels}) output, "
            f"not the (B, 1, H, W) label map GeoSlicer writes",
            pth_path,
        )
    values = [float(v) for v in labels.reshape(-1).tolist()]
    first = values[0]
    if first != int(first) or not 0 <= first <= 255 or values != [first + c for c in range(channels)]:
        shown = [int(v) if v == int(v) else v for v in values]
        raise ThinSegError(
            f"post-processing labels output channels 0..{channels - 1} as {shown}; "
            "supported: channel + a constant, within 0..255",
            pth_path,
        )
    return int(first)


def _touches(step: Transform, key: str) -> bool:
    """True when `step` works on the entry `key` (steps naming other entries change nothing here)."""
    keys = getattr(step, "keys", None)
    if isinstance(keys, Mapping):
        return key in keys
    if isinstance(keys, tuple):
        return key in keys
    single = getattr(step, "key", None)
    return single == key if single is not None else True


def _allowed_post_step(step: Transform, *, after_argmax: bool) -> bool:
    if after_argmax:
        if isinstance(step, AddAxisTransform):
            return True
        return isinstance(step, _RELABELLING)
    if isinstance(step, (MinMaxTransform, QuantileTransform)):
        return step.increasing
    if isinstance(step, ToTensorTransform):
        return all(dtype in (None, "float32", "float64") for dtype in step.keys.values())
    return isinstance(step, _ORDER_KEEPING)


def _check_output_count(out_ch: int, classes: ClassTable, pth_path: Path) -> None:
    """One output per class, or one more for "not classified": checked before the
    post-processing is tried on one pixel per output."""
    n = len(classes)
    if out_ch not in (n, n + 1):
        raise ThinSegError(
            f"the network has {out_ch} outputs but the bundle names {n} classes (expected {n} or {n + 1})", pth_path
        )


def _check_labels(out_ch: int, classes: ClassTable, first_label: int, pth_path: Path) -> None:
    n = len(classes)
    if not ((out_ch == n and first_label == 1) or (out_ch == n + 1 and first_label == 0)):
        raise ThinSegError(
            f"the network has {out_ch} outputs with first_label {first_label} but the bundle names {n} classes "
            f"(expected {n} outputs with first_label 1, or {n + 1} with output 0 = not classified)",
            pth_path,
        )


def _input_range(
    pre: list[Transform], network_input: str, input_names: list[str]
) -> tuple[float, float, float, float] | None:
    """The one rescale applied to the whole network input (identity if none), or None when the
    pre-processing is more than concatenating the inputs and one rescale."""
    fused = fuse_pre_processing(pre, input_names, network_input)
    if fused is None or len(fused[1]) > 1:
        return None
    return tuple(float(v) for v in fused[1][0].range) if fused[1] else IDENTITY_RANGE  # type: ignore[return-value]


# -- saving ------------------------------------------------------------------------------------


def save_bundle(
    model_dir: Path | str,
    network: torch.nn.Module,
    *,
    network_name: str,
    network_params: dict[str, Any],
    class_table: ClassTable,
    input_names: Sequence[str] = ("PP", "PX"),
    pixels_per_mm: float,
    roi_shape: Sequence[int] = (512, 512),
    title: str,
    description: str,
    extra_meta: dict[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write `network` as a GeoSlicer model folder (meta.json + model.pth), atomically.

    The folder is written beside the target under a temporary name, loaded back with
    `load_bundle` (so what we write is what we and GeoSlicer can read), then renamed.
    """
    target = Path(model_dir)
    if target.exists() and not overwrite:
        raise ThinSegError(_EXISTS, target)
    name = canonical_network_name(network_name)
    _check_network_matches(network, name, network_params)
    names = _input_names(input_names)
    in_ch, out_ch = network_channels(network)
    if in_ch != 3 * len(names):
        raise ThinSegError(f"the network takes {in_ch} channels but {len(names)} RGB inputs give {3 * len(names)}")
    if out_ch != len(class_table) + 1:
        raise ThinSegError(
            f"the network has {out_ch} outputs; saved bundles need {len(class_table) + 1} "
            f"(output 0 = not classified, then one per class) for {len(class_table)} classes"
        )
    roi = check_roi_shape(list(roi_shape), target)
    ppm = check_pixels_per_mm(pixels_per_mm, target)

    cmeta = _config_meta(names, class_table, roi, ppm)
    requires = network_requirements(name, network_params)
    if requires is not None:  # a network GeoSlicer cannot build: say what can
        extra_meta = {**(extra_meta or {}), "requires": requires}
    meta = _meta_json(title, description, cmeta, extra_meta)
    saved = {
        "title": str(title),
        "model_state_dict": {k: v.detach().to("cpu").clone() for k, v in network.state_dict().items()},
        "config": {
            "meta": cmeta,
            "model": {"name": name, "params": _plain(network_params, "network_params")},
            "transforms": _transforms_config(names),
        },
    }
    _write_atomically(target, meta, saved, overwrite)
    return target


def _check_network_matches(network: torch.nn.Module, name: str, params: dict[str, Any]) -> None:
    """The weights must load into what `name(**params)` builds, or GeoSlicer cannot load them."""
    fresh = build_network(name, params)
    problem = _state_dict_problem(fresh, network.state_dict(), name)
    if problem:
        raise ThinSegError(f"cannot save: {problem}")


def _input_names(input_names: Sequence[str]) -> list[str]:
    names = [str(n) for n in input_names]
    if not names or len(set(names)) != len(names) or not all(names) or NETWORK_INPUT in names:
        raise ThinSegError(f"input names must be distinct, non-empty and not {NETWORK_INPUT!r}: {list(input_names)}")
    return names


def _config_meta(names: list[str], classes: ClassTable, roi: tuple[int, int], ppm: float | None) -> dict[str, Any]:
    return {
        "kind": "torch",
        "is_segmentation_model": True,
        "spatial_dims": 2,
        "input_roi_shape": [roi[0], roi[1]],
        "pixels_per_mm": ppm,
        "inputs": {n: {"spatial_dims": 2, "n_channels": 3} for n in names},
        "pre_processed_inputs": {NETWORK_INPUT: {"spatial_dims": 2, "n_channels": 3 * len(names)}},
        "outputs": {
            OUTPUT: {
                "spatial_dims": 2,
                "n_channels": 1,
                "is_segmentation": True,
                "class_names": list(classes.names),
                "class_colors": [c.upper() for c in classes.colors],
                "class_indices": list(range(1, len(classes) + 1)),
            }
        },
    }


def _transforms_config(names: list[str]) -> dict[str, Any]:
    return {
        "pre_processing_transforms": [
            ConcatenateTransform(key_groups={NETWORK_INPUT: list(names)}, axis=0).to_config(),
            MinMaxTransform(key=NETWORK_INPUT, move_from=(0, 255), move_to=(0.0, 1.0)).to_config(),
        ],
        "post_processing_transforms": [ArgmaxTransform(key=OUTPUT, dtype="uint8", dim=1, keepdim=True).to_config()],
    }


def _meta_json(title: str, description: str, cmeta: dict[str, Any], extra: dict[str, Any] | None) -> dict[str, Any]:
    meta = {"title": str(title), "description": str(description), **cmeta}
    for key, value in (extra or {}).items():
        if key in meta:
            raise ThinSegError(f"extra_meta may not replace {key!r}")
        meta[key] = value
    try:
        json.dumps(meta)
    except (TypeError, ValueError) as exc:
        raise ThinSegError(f"extra_meta is not JSON-serialisable: {exc}") from None
    return meta


def _plain(value: Any, what: str) -> Any:
    """Deep copy into dict/list/str/int/float/bool/None, the types weights_only reads back."""
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, Mapping):
        return {str(k): _plain(v, what) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v, what) for v in value]
    raise ThinSegError(
        f"{what} may only hold plain values (numbers, strings, lists, dicts), not {type(value).__name__}"
    )


def _write_atomically(target: Path, meta: dict[str, Any], saved: dict[str, Any], overwrite: bool) -> None:
    """Write the folder under a hidden temporary name, load it back (what we wrote must load
    safely), then put it in place; an interrupted save leaves no half-written model."""
    try:
        with atomic_directory(target, overwrite=overwrite) as tmp:
            (tmp / META_FILE).write_text(dumps(meta, indent=2) + "\n", encoding="utf-8")
            torch.save(saved, tmp / WEIGHTS_FILE)
            load_bundle(tmp)
    except FileExistsError:  # appeared while we were writing
        raise ThinSegError(_EXISTS, target) from None
