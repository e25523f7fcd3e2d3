"""The few GeoSlicer pre/post-processing transforms thin-section models use, parsed from {name, params}.

GeoSlicer applies pre-processing to one unbatched sample, a dict of (C, H, W) float32 tensors
keyed by input name; we apply it to batches (B, C, H, W), so axes written for the unbatched
sample are shifted by one. The arithmetic is GeoSlicer's, operation for operation, so results
are bit-identical. Names are matched case-insensitively, as GeoSlicer does; anything else is
refused rather than guessed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

from thinseg.errors import ThinSegError

Sample = dict[str, torch.Tensor]
_T = TypeVar("_T")

#: dtype names GeoSlicer's ArgmaxTransform accepts.
ARGMAX_DTYPES = ("float16", "float32", "float64", "int8", "uint8")


def _batched_axis(axis: int) -> int:
    """Axis of an unbatched (C, H, W) sample -> the same axis of a (B, C, H, W) batch."""
    return axis + 1 if axis >= 0 else axis


def _pair(value: Any, what: str) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise ThinSegError(f"{what} must be a pair [low, high], not {value!r}")
    lo, hi = value
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (lo, hi)):
        raise ThinSegError(f"{what} must hold numbers, not {value!r}")
    return lo, hi


def _need(sample: Sample, key: str, transform: str) -> torch.Tensor:
    if key not in sample:
        have = ", ".join(sample) or "nothing"
        raise ThinSegError(f"{transform} needs {key!r}, but the sample holds {have}")
    return sample[key]


@dataclass(frozen=True)
class ConcatenateTransform:
    """Stack several inputs into one network input, in `key_groups` order (channel axis)."""

    key_groups: dict[str, list[str]]
    axis: int = 0

    NAME = "ConcatenateTransform"

    def __post_init__(self) -> None:
        ok = isinstance(self.key_groups, Mapping) and all(
            isinstance(k, str) and isinstance(v, (list, tuple)) and v and all(isinstance(n, str) for n in v)
            for k, v in self.key_groups.items()
        )
        if not ok or not self.key_groups:
            raise ThinSegError(
                f"ConcatenateTransform key_groups must map a name to input names, not {self.key_groups!r}"
            )
        if self.axis not in (0, -3):
            raise ThinSegError(
                f"ConcatenateTransform along axis {self.axis} is not supported (only the channel axis 0)"
            )

    def __call__(self, sample: Sample) -> Sample:
        for new_key, old_keys in self.key_groups.items():
            tensors = [_need(sample, k, self.NAME) for k in old_keys]
            joined = torch.cat(tensors, dim=_batched_axis(self.axis))
            for k in old_keys:
                del sample[k]
            sample[new_key] = joined
        return sample

    def to_config(self) -> dict[str, Any]:
        return {
            "name": self.NAME,
            "params": {"key_groups": {k: list(v) for k, v in self.key_groups.items()}, "axis": self.axis},
        }


@dataclass(frozen=True)
class MinMaxTransform:
    """Linear rescale from `move_from` to `move_to`, e.g. uint8 [0, 255] -> [0, 1]."""

    key: str
    move_from: tuple[float, float] = (0, 255)
    move_to: tuple[float, float] = (0.0, 1.0)

    NAME = "MinMaxTransform"

    def __post_init__(self) -> None:
        if not isinstance(self.key, str):
            raise ThinSegError(f"MinMaxTransform key must be a name, not {self.key!r}")
        lo, hi = _pair(self.move_from, "MinMaxTransform move_from")
        _pair(self.move_to, "MinMaxTransform move_to")
        if hi == lo:
            raise ThinSegError(f"MinMaxTransform move_from {list(self.move_from)} is an empty range")

    @property
    def range(self) -> tuple[float, float, float, float]:
        return (*self.move_from, *self.move_to)

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
class ArgmaxTransform:
    """Class map = argmax over the channel axis + `first_label`.

    GeoSlicer's stored source has no `first_label` (labels = argmax), newer instructions add it;
    a missing value therefore means 0. Bundles written here use N+1 outputs with channel 0 =
    "not classified" and no `first_label`, which every GeoSlicer version reads the same way.
    """

    key: str
    dtype: str = "int8"
    dim: int = 1
    keepdim: bool = True
    first_label: int = 0
    batch_dim: bool = True

    NAME = "ArgmaxTransform"

    def __post_init__(self) -> None:
        if not isinstance(self.key, str):
            raise ThinSegError(f"ArgmaxTransform key must be a name, not {self.key!r}")
        if self.dtype not in ARGMAX_DTYPES:
            raise ThinSegError(f"ArgmaxTransform dtype {self.dtype!r} is not one of {', '.join(ARGMAX_DTYPES)}")
        if not isinstance(self.first_label, int) or isinstance(self.first_label, bool) or self.first_label < 0:
            raise ThinSegError(f"ArgmaxTransform first_label must be a non-negative integer, not {self.first_label!r}")
        if not isinstance(self.dim, int) or isinstance(self.dim, bool):
            raise ThinSegError(f"ArgmaxTransform dim must be an integer, not {self.dim!r}")
        channel_dim = self.dim if self.batch_dim else _batched_axis(self.dim)
        if channel_dim not in (1, -3):
            raise ThinSegError(
                f"ArgmaxTransform over dim {self.dim} (batch_dim={self.batch_dim}) is not the class axis"
            )

    def labels(self, logits: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) scores -> (B, H, W) uint8 labels first_label..first_label+C-1."""
        return (torch.argmax(logits, dim=1) + self.first_label).to(torch.uint8)

    def to_config(self) -> dict[str, Any]:
        params: dict[str, Any] = {"key": self.key, "dim": self.dim, "dtype": self.dtype, "keepdim": self.keepdim}
        if self.first_label != 0 or not self.batch_dim:  # only GeoSlicer versions that know them
            params.update(first_label=self.first_label, batch_dim=self.batch_dim)
        return {"name": self.NAME, "params": params}


PreTransform = ConcatenateTransform | MinMaxTransform
PRE_TRANSFORMS: dict[str, type[PreTransform]] = {
    ConcatenateTransform.NAME: ConcatenateTransform,
    MinMaxTransform.NAME: MinMaxTransform,
}
POST_TRANSFORMS: dict[str, type[ArgmaxTransform]] = {ArgmaxTransform.NAME: ArgmaxTransform}


def _parse(spec: Any, known: Mapping[str, type[_T]], stage: str) -> _T:
    """One {name, params} entry -> an instance of the class `known` gives for `name` (any case)."""
    if not isinstance(spec, Mapping) or not isinstance(spec.get("name"), str):
        raise ThinSegError(f"a {stage} transform must be {{name, params}}, not {spec!r}")
    name = spec["name"]
    cls = next((c for n, c in known.items() if n.lower() == name.lower()), None)
    if cls is None:
        raise ThinSegError(f"unsupported {stage} transform {name!r} (supported: {', '.join(known)})")
    params = spec.get("params") or {}
    if not isinstance(params, Mapping):
        raise ThinSegError(f"{name} params must be a mapping, not {params!r}")
    try:
        return cls(**params)
    except TypeError as exc:
        raise ThinSegError(f"invalid parameters for {name}: {exc}") from None


def parse_pre_transforms(specs: Sequence[Any] | None) -> list[PreTransform]:
    """`config.transforms.pre_processing_transforms` -> transform objects, in order."""
    return [_parse(s, PRE_TRANSFORMS, "pre-processing") for s in _as_list(specs, "pre_processing_transforms")]


def parse_post_transforms(specs: Sequence[Any] | None) -> list[ArgmaxTransform]:
    """`config.transforms.post_processing_transforms` -> transform objects, in order."""
    return [_parse(s, POST_TRANSFORMS, "post-processing") for s in _as_list(specs, "post_processing_transforms")]


def _as_list(specs: Any, what: str) -> list[Any]:
    if specs is None:
        return []
    if not isinstance(specs, (list, tuple)):
        raise ThinSegError(f"{what} must be a list, not {type(specs).__name__}")
    return list(specs)


def run_pre_transforms(transforms: Sequence[PreTransform], sample: Sample) -> Sample:
    for transform in transforms:
        sample = transform(sample)
    return sample
