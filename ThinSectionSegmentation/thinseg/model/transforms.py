"""GeoSlicer's pre- and post-processing transforms, built from a bundle's {name, params} entries.

GeoSlicer's model runner applies the pre-processing to one sample, a dict of (C, H, W) float32
tensors keyed by input name, and the post-processing to {output name: (B, C, H, W) network
output}, then writes `[0, 0]` of that output as the label map. Each class here does what
GeoSlicer's class of the same name does (MonaiModelsLib.transforms, and MONAI's MapLabelValued),
operation for operation and on the same layout, so it gives the same bits. Names match
case-insensitively, as in GeoSlicer.

GeoSlicer's runner also knows transforms that a thin-section segmentation cannot use: they read
files named in the sample, unpickle code, fit random scalers, take transform objects as
parameters or make a boundary mask. Those are refused with the reason (`REFUSED`), and so is any
name GeoSlicer does not know. Whether a chain of accepted transforms makes a label map is
checked when a bundle is loaded (thinseg.model.bundle).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, ClassVar, Union, get_args

import numpy as np
import torch

from thinseg.errors import ThinSegError

Sample = dict[str, torch.Tensor]
#: dtype names GeoSlicer's transforms accept (its get_torch_dtype).
TORCH_DTYPES: dict[str, torch.dtype] = {
    "float16": torch.float16,
    "float32": torch.float32,
    "float64": torch.float64,
    "int8": torch.int8,
    "uint8": torch.uint8,
}
ARGMAX_DTYPES = tuple(TORCH_DTYPES)
#: numpy dtype kinds MapLabelValued may write: bool, integers, floats.
_LABEL_KINDS = "biuf"


def _number(value: Any) -> bool:
    """A finite int or float: NaN or infinity in a rescale or a label would turn every pixel into
    NaN, and NaN scores into one arbitrary class or none."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _pair(value: Any, what: str) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ThinSegError(f"{what} must be a pair [low, high], not {value!r}")
    lo, hi = value
    if not (_number(lo) and _number(hi)):
        raise ThinSegError(f"{what} must hold finite numbers, not {value!r}")
    return lo, hi


def _range(value: Any, what: str) -> tuple[float, float]:
    """A pair of finite numbers whose width is finite and not zero (a rescale from or to an
    empty range divides by zero or maps every value onto one). It may run high to low: an
    inverting rescale before the argmax is refused where the chain is checked."""
    lo, hi = _pair(value, what)
    if hi == lo:
        raise ThinSegError(f"{what} {list(value)} is an empty range")
    if not math.isfinite(float(hi) - float(lo)):
        raise ThinSegError(f"{what} {list(value)} is wider than a float can say")
    return lo, hi


def _names(value: Any, what: str) -> tuple[str, ...]:
    """A list of sample keys. A string is iterated as GeoSlicer iterates it: character by character."""
    if not isinstance(value, (str, list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ThinSegError(f"{what} must be a list of names, not {value!r}")
    return tuple(value)


def _axis(value: Any, what: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool):
        raise ThinSegError(f"{what} must be an integer axis, not {value!r}")
    return value


def _need(sample: Sample, key: str, transform: str) -> torch.Tensor:
    if key not in sample:
        have = ", ".join(sample) or "nothing"
        raise ThinSegError(f"{transform} needs {key!r}, but the sample holds {have}")
    return sample[key]


def _dtype(name: Any, what: str) -> torch.dtype:
    if name not in TORCH_DTYPES:
        raise ThinSegError(f"{what} {name!r} is not one of {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]


def _set(obj: object, name: str, value: object) -> None:
    """Normalise a field of a frozen dataclass in __post_init__."""
    object.__setattr__(obj, name, value)


def _converted(value: Any, dtype_name: str | None) -> torch.Tensor:
    """`value` as a tensor (sharing memory where torch can), then cast when a dtype is named."""
    tensor = torch.as_tensor(value)
    return tensor.to(dtype=TORCH_DTYPES[dtype_name]) if dtype_name is not None else tensor


def _rescaled(x: torch.Tensor, source: tuple[float, float], target: tuple[float, float]) -> torch.Tensor:
    """`x` mapped linearly from the range `source` onto `target`, out of place.

    Shift, divide by the source width, multiply by the target width, shift: one torch operation
    each, in that order, so float32 rounding is the same as GeoSlicer's arithmetic.
    """
    source_width = source[1] - source[0]
    target_width = target[1] - target[0]
    shifted = torch.sub(x, source[0])
    return torch.add(torch.mul(torch.div(shifted, source_width), target_width), target[0])


def _update_each(
    sample: Sample, names: Sequence[str], change: Callable[[torch.Tensor], torch.Tensor], required_by: str = ""
) -> Sample:
    """Replace each named entry by `change(entry)`, one name after another (a name listed twice is
    changed twice). Absent names are passed over, unless `required_by` names the transform that
    needs them."""
    for name in names:
        if required_by or name in sample:
            sample[name] = change(_need(sample, name, required_by))
    return sample


class SampleTransform:
    """A step of the chain: takes the sample dict, returns it (changed in place, as GeoSlicer's)."""

    NAME: ClassVar[str] = ""

    def __call__(self, sample: Sample) -> Sample:
        raise NotImplementedError


@dataclass(frozen=True)
class IdentityTransform(SampleTransform):
    """Leaves the sample as it is."""

    NAME: ClassVar[str] = "IdentityTransform"

    def __call__(self, sample: Sample) -> Sample:
        return sample


@dataclass(frozen=True)
class ToTensorTransform(SampleTransform):
    """Converts the named entries (those present) to the dtype given per key (None: unchanged)."""

    keys: Any

    NAME: ClassVar[str] = "ToTensorTransform"

    def __post_init__(self) -> None:
        keys = self.keys if isinstance(self.keys, Mapping) else dict.fromkeys(_names(self.keys, f"{self.NAME} keys"))
        if not all(isinstance(k, str) for k in keys):
            raise ThinSegError(f"{self.NAME} keys must be names, not {self.keys!r}")
        for dtype in keys.values():
            if dtype is not None:
                _dtype(dtype, f"{self.NAME} dtype")
        _set(self, "keys", dict(keys))

    def __call__(self, sample: Sample) -> Sample:
        present = [name for name in self.keys if name in sample]
        sample.update({name: _converted(sample[name], self.keys[name]) for name in present})
        return sample


@dataclass(frozen=True)
class QuantileTransform(SampleTransform):
    """Linear rescale from the `quantile_values` [low, high] to `move_to`, written in place.

    GeoSlicer takes the quantiles of random pixels of a 3-D volume when no values are given (it
    fails on a 2-D section), or reads them from sample entries that a thin-section sample never
    holds: a thin-section model must give `quantile_values`.
    """

    key: str
    quantiles: Any = (0.02, 0.50)
    move_to: Any = (0.0, 0.5)
    quantile_keys: Any = None
    quantile_values: Any = None
    n_samples: Any = 1000

    NAME: ClassVar[str] = "QuantileTransform"

    def __post_init__(self) -> None:
        if not isinstance(self.key, str):
            raise ThinSegError(f"{self.NAME} key must be a name, not {self.key!r}")
        if not self.quantile_values:
            raise ThinSegError(
                f"{self.NAME} without quantile_values takes its quantiles from random pixels of a 3-D volume "
                "or from sample entries a thin section does not have; give quantile_values [low, high]"
            )
        _range(self.quantile_values, f"{self.NAME} quantile_values")
        _range(self.move_to, f"{self.NAME} move_to")

    @property
    def increasing(self) -> bool:
        """True when the rescale keeps the order of values (so an argmax after it is unchanged)."""
        lo, hi = _pair(self.quantile_values, "")
        new_lo, new_hi = _pair(self.move_to, "")
        return (hi - lo > 0) == (new_hi - new_lo > 0) and new_hi != new_lo

    def __call__(self, sample: Sample) -> Sample:
        # GeoSlicer writes the result back into the entry's own storage (and its dtype).
        entry = _need(sample, self.key, self.NAME)
        entry.copy_(_rescaled(entry, _pair(self.quantile_values, ""), _pair(self.move_to, "")))
        return sample


@dataclass(frozen=True)
class AddAxisTransform(SampleTransform):
    """Inserts an axis of length 1 at `axis` into each named entry present."""

    keys: Any = ()
    axis: int = 0

    NAME: ClassVar[str] = "AddAxisTransform"

    def __post_init__(self) -> None:
        _set(self, "keys", _names(self.keys, f"{self.NAME} keys"))
        _axis(self.axis, f"{self.NAME} axis")

    def __call__(self, sample: Sample) -> Sample:
        return _update_each(sample, self.keys, partial(torch.unsqueeze, dim=self.axis))


@dataclass(frozen=True)
class SwapAxesTransform(SampleTransform):
    """Swaps two axes of each named entry."""

    keys: Any
    axis_0: int = -1
    axis_1: int = 0

    NAME: ClassVar[str] = "SwapAxesTransform"

    def __post_init__(self) -> None:
        _set(self, "keys", _names(self.keys, f"{self.NAME} keys"))
        _axis(self.axis_0, f"{self.NAME} axis_0")
        _axis(self.axis_1, f"{self.NAME} axis_1")

    def __call__(self, sample: Sample) -> Sample:
        return _update_each(sample, self.keys, lambda t: t.transpose(self.axis_0, self.axis_1), self.NAME)


@dataclass(frozen=True)
class PermuteTransform(SampleTransform):
    """Reorders the axes of each named entry present."""

    keys: Any
    axes: Any

    NAME: ClassVar[str] = "PermuteTransform"

    def __post_init__(self) -> None:
        _set(self, "keys", _names(self.keys, f"{self.NAME} keys"))
        if not isinstance(self.axes, (list, tuple)):
            raise ThinSegError(f"{self.NAME} axes must be a list of axes, not {self.axes!r}")
        _set(self, "axes", tuple(_axis(a, f"{self.NAME} axes") for a in self.axes))

    def __call__(self, sample: Sample) -> Sample:
        return _update_each(sample, self.keys, lambda t: t.permute(self.axes))


@dataclass(frozen=True)
class ConcatenateTransform(SampleTransform):
    """Joins several inputs into one network input along the channel axis, in `key_groups` order;
    the joined entries leave the sample."""

    key_groups: dict[str, list[str]]
    axis: int = 0

    NAME: ClassVar[str] = "ConcatenateTransform"

    def __post_init__(self) -> None:
        ok = isinstance(self.key_groups, Mapping) and all(
            isinstance(k, str) and isinstance(v, (list, tuple)) and v and all(isinstance(n, str) for n in v)
            for k, v in self.key_groups.items()
        )
        if not ok or not self.key_groups:
            raise ThinSegError(f"{self.NAME} key_groups must map a name to input names, not {self.key_groups!r}")
        twice = sorted({n for parts in self.key_groups.values() for n in parts if list(parts).count(n) > 1})
        if twice:  # GeoSlicer fails on these when it removes the joined entries
            raise ThinSegError(f"{self.NAME} key_groups name {', '.join(twice)} twice in one group")
        if self.axis not in (0, -3):
            raise ThinSegError(f"{self.NAME} along axis {self.axis} is not supported (only the channel axis 0)")

    def __call__(self, sample: Sample) -> Sample:
        # Groups run in turn (a later group may join an earlier one's result). The joined entries
        # leave the sample before the result is stored, so a result may reuse a part's name; it
        # then moves to the end, like any new entry.
        for target, parts in self.key_groups.items():
            joined = torch.cat(tuple(_need(sample, part, self.NAME) for part in parts), self.axis)
            kept = [(name, value) for name, value in sample.items() if name not in parts]
            sample.clear()
            sample.update(kept)
            sample[target] = joined
        return sample

    def to_config(self) -> dict[str, Any]:
        return {
            "name": self.NAME,
            "params": {"key_groups": {k: list(v) for k, v in self.key_groups.items()}, "axis": self.axis},
        }


@dataclass(frozen=True)
class RenameTransform(SampleTransform):
    """Renames entries (old -> new) that are present. As in GeoSlicer, renaming an entry to its
    own name removes it."""

    renames: Any
    axis: Any = 0

    NAME: ClassVar[str] = "RenameTransform"

    def __post_init__(self) -> None:
        if not isinstance(self.renames, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in self.renames.items()
        ):
            raise ThinSegError(f"{self.NAME} renames must map old names to new names, not {self.renames!r}")
        _set(self, "renames", dict(self.renames))

    def __call__(self, sample: Sample) -> Sample:
        # One rename after another, so {"a": "b", "b": "c"} takes `a` on to `c`.
        for source, target in self.renames.items():
            if source not in sample:
                continue
            value = sample.pop(source)
            if target != source:  # a rename onto itself only drops the entry
                sample[target] = value
        return sample


@dataclass(frozen=True)
class BinarizerTransform(SampleTransform):
    """`value > threshold` as 0/1 of `dtype`."""

    key: str
    threshold: float = 0.5
    dtype: str = "int8"

    NAME: ClassVar[str] = "BinarizerTransform"

    def __post_init__(self) -> None:
        if not isinstance(self.key, str) or not _number(self.threshold):
            raise ThinSegError(f"{self.NAME} needs a key name and a numeric threshold")
        _dtype(self.dtype, f"{self.NAME} dtype")

    def __call__(self, sample: Sample) -> Sample:
        sample[self.key] = (_need(sample, self.key, self.NAME) > self.threshold).to(TORCH_DTYPES[self.dtype])
        return sample


@dataclass(frozen=True)
class MinMaxTransform(SampleTransform):
    """Linear rescale from `move_from` to `move_to`, e.g. uint8 [0, 255] -> [0, 1]."""

    key: str
    move_from: tuple[float, float] = (0, 255)
    move_to: tuple[float, float] = (0.0, 1.0)

    NAME: ClassVar[str] = "MinMaxTransform"

    def __post_init__(self) -> None:
        if not isinstance(self.key, str):
            raise ThinSegError(f"{self.NAME} key must be a name, not {self.key!r}")
        _range(self.move_from, f"{self.NAME} move_from")
        _range(self.move_to, f"{self.NAME} move_to")

    @property
    def range(self) -> tuple[float, float, float, float]:
        return (*self.move_from, *self.move_to)

    @property
    def increasing(self) -> bool:
        """True when the rescale keeps the order of values (so an argmax after it is unchanged)."""
        old_min, old_max = self.move_from
        new_min, new_max = self.move_to
        return (old_max - old_min > 0) == (new_max - new_min > 0) and new_max != new_min

    def _steps(self) -> list[tuple[str, float]]:
        """GeoSlicer's `(x - old_min) / old_delta * new_delta + new_min` as (operation, operand)
        steps, exact no-op steps skipped: one definition for `apply` and `apply_`."""
        old_min, old_max = self.move_from
        new_min, new_max = self.move_to
        steps = [("sub", old_min)] if old_min != 0 else []
        steps.append(("div", old_max - old_min))
        if new_max - new_min != 1:
            steps.append(("mul", new_max - new_min))
        if new_min != 0:
            steps.append(("add", new_min))
        return steps

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The rescale, out of place (GeoSlicer's arithmetic, operation for operation)."""
        for op, operand in self._steps():
            x = getattr(torch, op)(x, operand)
        return x

    def apply_(self, x: torch.Tensor) -> torch.Tensor:
        """`apply` in place on a float tensor: the same operations in the same order (so the
        same bits), without a temporary per step."""
        for op, operand in self._steps():
            getattr(x, op + "_")(operand)
        return x

    def __call__(self, sample: Sample) -> Sample:
        sample[self.key] = self.apply(_need(sample, self.key, self.NAME))
        return sample

    def to_config(self) -> dict[str, Any]:
        return {
            "name": self.NAME,
            "params": {"key": self.key, "move_from": list(self.move_from), "move_to": list(self.move_to)},
        }


@dataclass(frozen=True)
class AddConstantTransform(SampleTransform):
    """Adds `constant` to each named entry (GeoSlicer models write labels 1..N this way after an
    ArgmaxTransform that gives 0..N-1)."""

    keys: Any
    constant: float

    NAME: ClassVar[str] = "AddConstantTransform"

    def __post_init__(self) -> None:
        _set(self, "keys", _names(self.keys, f"{self.NAME} keys"))
        if not _number(self.constant):
            raise ThinSegError(f"{self.NAME} constant must be a number, not {self.constant!r}")

    def __call__(self, sample: Sample) -> Sample:
        return _update_each(sample, self.keys, lambda t: t + self.constant, self.NAME)


@dataclass(frozen=True)
class TakeChannelsTransform(SampleTransform):
    """`entry[:, channels]`: the channels of a batched output; of an unbatched (C, H, W) sample,
    as GeoSlicer indexes it, those are image rows."""

    key: str
    channels: Any = ()

    NAME: ClassVar[str] = "TakeChannelsTransform"

    def __post_init__(self) -> None:
        channels = self.channels
        listed = isinstance(channels, (list, tuple)) and bool(channels)
        indices = list(channels) if listed else [channels]
        if not isinstance(self.key, str) or not all(isinstance(c, int) and not isinstance(c, bool) for c in indices):
            raise ThinSegError(f"{self.NAME} needs a key name and channel indices, not {self.key!r}, {channels!r}")
        _set(self, "channels", indices if listed else channels)

    def __call__(self, sample: Sample) -> Sample:
        sample[self.key] = _need(sample, self.key, self.NAME)[:, self.channels]
        return sample


@dataclass(frozen=True)
class ArgmaxTransform(SampleTransform):
    """Class map = argmax over the channel axis (+ `first_label`), as `dtype`.

    GeoSlicer 2.8's ArgmaxTransform takes key, dtype, dim and keepdim only (its models add 1 with
    an AddConstantTransform); its instructions also name `first_label` and `batch_dim`, read here
    as: `first_label` is added to the argmax before the cast, and `dim` counts from the batch
    axis unless `batch_dim` is false. Bundles written here use N+1 outputs with channel 0 =
    "not classified" and no `first_label`, which every GeoSlicer version reads the same way.
    """

    key: str
    dtype: str = "int8"
    dim: int = 1
    keepdim: bool = True
    first_label: int = 0
    batch_dim: bool = True

    NAME: ClassVar[str] = "ArgmaxTransform"

    def __post_init__(self) -> None:
        if not isinstance(self.key, str):
            raise ThinSegError(f"{self.NAME} key must be a name, not {self.key!r}")
        _dtype(self.dtype, f"{self.NAME} dtype")
        if not isinstance(self.first_label, int) or isinstance(self.first_label, bool) or self.first_label < 0:
            raise ThinSegError(f"{self.NAME} first_label must be a non-negative integer, not {self.first_label!r}")
        _axis(self.dim, f"{self.NAME} dim")
        if self.channel_dim not in (1, -3):
            raise ThinSegError(f"{self.NAME} over dim {self.dim} (batch_dim={self.batch_dim}) is not the class axis")

    @property
    def channel_dim(self) -> int:
        """`dim` on the batched (B, C, H, W) output."""
        return self.dim if self.batch_dim or self.dim < 0 else self.dim + 1

    def __call__(self, sample: Sample) -> Sample:
        labels = torch.argmax(_need(sample, self.key, self.NAME), dim=self.channel_dim, keepdim=self.keepdim)
        if self.first_label:
            labels = labels + self.first_label
        sample[self.key] = labels.to(TORCH_DTYPES[self.dtype])
        return sample

    def to_config(self) -> dict[str, Any]:
        params: dict[str, Any] = {"key": self.key, "dim": self.dim, "dtype": self.dtype, "keepdim": self.keepdim}
        if self.first_label != 0 or not self.batch_dim:  # only GeoSlicer versions that know them
            params.update(first_label=self.first_label, batch_dim=self.batch_dim)
        return {"name": self.NAME, "params": params}


@dataclass(frozen=True)
class MapLabelValued(SampleTransform):
    """MONAI's MapLabelValued: label `orig_labels[i]` becomes `target_labels[i]` (all at once,
    from the original values), others keep their value; the result has numpy `dtype`."""

    keys: Any
    orig_labels: Any
    target_labels: Any
    dtype: Any = "float32"
    allow_missing_keys: bool = False
    _dtype: np.dtype[Any] = field(init=False, repr=False, compare=False, default=np.dtype("float32"))

    NAME: ClassVar[str] = "MapLabelValued"

    def __post_init__(self) -> None:
        keys = (self.keys,) if isinstance(self.keys, str) else _names(self.keys, f"{self.NAME} keys")
        _set(self, "keys", keys)
        pairs = (self.orig_labels, self.target_labels)
        if not all(isinstance(p, (list, tuple)) and all(_number(v) for v in p) for p in pairs):
            raise ThinSegError(f"{self.NAME} orig_labels and target_labels must be lists of numbers")
        if len(self.orig_labels) != len(self.target_labels):
            raise ThinSegError(f"{self.NAME} orig_labels and target_labels must have the same length")
        if all(o == t for o, t in zip(self.orig_labels, self.target_labels)):
            raise ThinSegError(f"{self.NAME} maps every label to itself")
        try:
            dtype = np.dtype(self.dtype)
        except TypeError:
            dtype = None
        if not isinstance(self.dtype, str) or dtype is None or dtype.kind not in _LABEL_KINDS:
            raise ThinSegError(f"{self.NAME} dtype {self.dtype!r} is not a numeric dtype name")
        _set(self, "_dtype", dtype)

    def __call__(self, sample: Sample) -> Sample:
        out = dict(sample)
        for key in self.keys:
            if key not in out:
                if self.allow_missing_keys:
                    continue
                _need(out, key, self.NAME)
            image = out[key]
            values = image.detach().cpu().numpy().reshape(-1)
            mapped = values.astype(self._dtype)
            for orig, target in zip(self.orig_labels, self.target_labels):
                if orig != target:
                    mapped[values == orig] = target
            out[key] = torch.as_tensor(mapped.reshape(image.shape), device=image.device)
        return out


Transform = Union[
    IdentityTransform,
    ToTensorTransform,
    QuantileTransform,
    AddAxisTransform,
    SwapAxesTransform,
    PermuteTransform,
    ConcatenateTransform,
    RenameTransform,
    BinarizerTransform,
    MinMaxTransform,
    AddConstantTransform,
    TakeChannelsTransform,
    ArgmaxTransform,
    MapLabelValued,
]
#: Every transform a thin-section bundle may name, by GeoSlicer's name.
TRANSFORMS: dict[str, type[Transform]] = {cls.NAME: cls for cls in get_args(Transform)}
#: Transforms GeoSlicer's runner knows that cannot take part in a thin-section segmentation, and why.
REFUSED: dict[str, str] = {
    "ComposedTransform": "takes transform objects, which a saved model cannot hold",
    "MultiChannelTransform": "takes a transform object, which a saved model cannot hold",
    "ReadNetCDFTransform": "reads a netCDF file named in the sample; a thin-section sample holds images",
    "ReadFirstNetCDFVariableTransform": "reads a netCDF file named in the sample; a thin-section sample holds images",
    "ApplyPickledTransform": "unpickles a scaler stored in the sample, which is never run here",
    "QuantileDeformationTransform": "fits a quantile scaler to random pixels, or unpickles one from the sample",
    "AddBinaryBoundaryMaskTransform": "makes a boundary mask from a label map (a training target)",
}
#: Backwards-compatible name of the transform union (pre-processing may use every transform).
PreTransform = Transform


def parse_transform(spec: Any, stage: str) -> Transform:
    """One {name, params} entry -> the transform of that name (any case), checked."""
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
        raise ThinSegError(f"a {stage} transform must be {{name, params}}, not {spec!r}")
    name = spec["name"]
    refused = next((reason for n, reason in REFUSED.items() if n.lower() == name.lower()), None)
    if refused is not None:
        raise ThinSegError(f"{stage} transform {name!r} is not supported: it {refused}")
    cls = next((c for n, c in TRANSFORMS.items() if n.lower() == name.lower()), None)
    if cls is None:
        raise ThinSegError(f"unsupported {stage} transform {name!r} (supported: {', '.join(TRANSFORMS)})")
    params = spec.get("params") or {}
    if not isinstance(params, Mapping):
        raise ThinSegError(f"{name} params must be a mapping, not {params!r}")
    try:
        return cls(**params)
    except TypeError as exc:
        raise ThinSegError(f"invalid parameters for {name}: {exc}") from None


def parse_transforms(specs: Any, what: str, stage: str) -> list[Transform]:
    """A bundle's transform list (`what` names it in messages) -> transform objects, in order."""
    if specs is None:
        return []
    if not isinstance(specs, (list, tuple)):
        raise ThinSegError(f"{what} must be a list, not {type(specs).__name__}")
    return [parse_transform(spec, stage) for spec in specs]


def parse_pre_transforms(specs: Sequence[Any] | None) -> list[Transform]:
    """`config.transforms.pre_processing_transforms` -> transform objects, in order."""
    return parse_transforms(specs, "pre_processing_transforms", "pre-processing")


def parse_post_transforms(specs: Sequence[Any] | None) -> list[Transform]:
    """`config.transforms.post_processing_transforms` -> transform objects, in order."""
    return parse_transforms(specs, "post_processing_transforms", "post-processing")


def run_transforms(transforms: Sequence[Transform], sample: Sample) -> Sample:
    """Apply the chain as GeoSlicer does: each step takes and returns the sample dict."""
    for transform in transforms:
        sample = transform(sample)
    return sample


#: The name the pre-processing runner had before post-processing shared it.
run_pre_transforms = run_transforms

__all__ = [
    "REFUSED",
    "TRANSFORMS",
    "Sample",
    "Transform",
    "parse_post_transforms",
    "parse_pre_transforms",
    "parse_transform",
    "run_transforms",
]
