"""GeoSlicer model descriptions, checked against one JSON Schema.

A GeoSlicer model folder describes itself twice: `meta.json` (read by GeoSlicer's model list)
and the `config.meta` section inside `model.pth` (meta.json is that section plus a title and a
description). `meta.schema.json`, shipped beside this module, says which of their fields this
package reads and what each may hold. It is used two ways:

* strictly when a bundle is loaded (`check_meta`, `check_config_meta`): the first field that breaks the schema is
  refused with a one-line `ThinSegError` naming it;
* leniently when models are listed (`summarize`): a field that breaks the schema is left out,
  so a damaged folder still shows in the list; `cannot_run` tells the models of other kinds
  (3-D, not torch, other inputs) found in GeoSlicer's folders from thin-section ones.

meta.json may also hold `confidence_reference` (written by training: the confidence the model
showed on its validation sections, see thinseg.inference.confidence); it is checked with the
rest when a bundle is loaded, and GeoSlicer, which reads only the keys it knows, ignores it.

The schema also describes model.pth's `config.transforms` (`check_transforms`): two lists of
{name, params}, whose names and parameters thinseg.model.transforms checks.

What a schema cannot say is checked here in code: only the first output is the segmentation,
its class lists must hold one colour per class and indices 1..N, and `pixels_per_mm` must be
finite. Python values from `model.pth` count as JSON: any mapping is an object, a tuple is an
array, and an integer is a Python int (not a bool, not 3.0).

This module imports neither torch nor, until a check runs, jsonschema, so the Slicer model list
loads quickly.
"""

from __future__ import annotations

import functools
import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from thinseg import __version__, limits
from thinseg.classes.table import ClassTable
from thinseg.errors import ThinSegError
from thinseg.jsonio import read_json

if TYPE_CHECKING:
    from jsonschema.exceptions import ValidationError
    from jsonschema.protocols import Validator

#: The schema file, shipped in the package beside this module.
SCHEMA_FILE = Path(__file__).resolve().with_name("meta.schema.json")
#: How messages name the documents.
META_JSON = "meta.json"
CONFIG_META = "model.pth config.meta"
CONFIG_TRANSFORMS = "model.pth config.transforms"
#: Channels of each image a thin-section model takes (RGB), and how many images (PP, then XP).
IMAGE_CHANNELS = 3
MAX_IMAGES = 2
#: Most classes a model may name: label maps are uint8, 0 = not classified.
MAX_CLASSES = 255
#: Most images a model may take (thin-section models take one or two), and the largest tile side.
MAX_INPUTS = 16
MAX_ROI_SIDE = 8192
#: Largest meta.json read (GeoSlicer's hold a few kilobytes) and its deepest nesting (they nest 4 deep).
MAX_META_BYTES = 4 * 1024 * 1024
MAX_META_DEPTH = 32

#: Top-level fields in the order they are checked, so that a description with several problems
#: is always refused for the same one; the first output's classes are checked after "outputs".
_FIELD_ORDER = (
    "",  # the document itself
    "kind",
    "is_segmentation_model",
    "spatial_dims",
    "inputs",
    "outputs",
    "pixels_per_mm",
    "input_roi_shape",
)


@dataclass(frozen=True)
class ModelMeta:
    """What a checked description says: the inputs (name, channels) in GeoSlicer's order and the
    segmentation output's name and classes."""

    inputs: list[tuple[str, int]]
    output: str
    class_table: ClassTable


@dataclass(frozen=True)
class ConfigMeta(ModelMeta):
    """A checked config.meta: also the tile size the model was trained on (height, width) and its
    pixel size (None: unknown, or not given here)."""

    roi_shape: tuple[int, int]
    pixels_per_mm: float | None


@dataclass(frozen=True)
class MetaSummary:
    """The fields of a meta.json that the model list shows, each empty/None when it breaks the
    schema (or when jsonschema is not installed yet)."""

    inputs: list[str]
    class_names: list[str]
    class_colors: list[str]
    pixels_per_mm: float | None


def read_meta(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON object in `path`; a one-line ThinSegError when it cannot be read or is not one
    (also when it is larger, deeper or holds longer integers than a model description can)."""
    path = Path(path)
    meta = read_json(path, max_bytes=MAX_META_BYTES, max_depth=MAX_META_DEPTH)
    if not isinstance(meta, dict):
        raise ThinSegError(f"{path.name} must hold a JSON object", path)
    return meta


# -- strict: loading a bundle ------------------------------------------------------------------


def check_meta(meta: Mapping[str, Any], path: Path, where: str = META_JSON) -> ModelMeta:
    """Check a meta.json object; `where` names the document in messages, `path` the file."""
    return _check(meta, where, path, config=False)


def check_config_meta(cmeta: Mapping[str, Any], path: Path, where: str = CONFIG_META) -> ConfigMeta:
    """Check model.pth's config.meta, which also holds what loading the weights needs."""
    checked = _check(cmeta, where, path, config=True)
    ppm = _float_or_none(cmeta.get("pixels_per_mm"))
    roi = _bounded_roi(_roi(cmeta["input_roi_shape"]), path)
    return ConfigMeta(
        checked.inputs,
        checked.output,
        checked.class_table,
        roi,
        None if ppm is None else limits.check_pixels_per_mm(ppm, path),
    )


def _check(meta: Mapping[str, Any], where: str, path: Path, *, config: bool) -> ModelMeta:
    problems = [(_rank(error), _problem(error, where, meta)) for error in _errors(_definition(config), meta)]
    if config:
        problems += [(_rank_of("pixels_per_mm"), message) for message in _not_finite(meta.get("pixels_per_mm"))]
    problems.sort(key=lambda problem: problem[0])  # stable: jsonschema's order within a field
    if problems and problems[0][0] < _rank_of("pixels_per_mm"):
        raise ThinSegError(problems[0][1], path)
    output, table = _check_first_output(meta["outputs"], where, path)
    if problems:
        raise ThinSegError(problems[0][1], path)
    inputs = [(str(name), int((spec or {}).get("n_channels", 1))) for name, spec in meta["inputs"].items()]
    if len(inputs) > MAX_INPUTS or any(channels > limits.MAX_NETWORK_CHANNELS for _, channels in inputs):
        shown = ", ".join(f"{n}({c})" for n, c in inputs[:MAX_INPUTS]) + ", ..." * (len(inputs) > MAX_INPUTS)
        raise ThinSegError(
            f"{where} inputs {shown} exceed the bounds: at most {MAX_INPUTS} images of at most"
            f" {limits.MAX_NETWORK_CHANNELS} channels each",
            path,
        )
    return ModelMeta(inputs, output, table)


def check_transforms(transforms: Any, path: Path) -> None:
    """Check model.pth's config.transforms: two lists of {name, params} (what each name may hold
    is checked by thinseg.model.transforms)."""
    errors = _errors("transforms", transforms)
    if errors:
        where = ".".join(str(p) for p in _path(errors[0]))
        raise ThinSegError(f"{CONFIG_TRANSFORMS}{'.' + where if where else ''}: {errors[0].message}", path)


def check_pixels_per_mm(value: Any, path: str | os.PathLike[str] | None = None) -> float | None:
    """`value` as a pixel size (None = unknown), refused unless a positive finite number."""
    if _errors("pixels_per_mm", value) or _not_finite(value):
        raise ThinSegError(_MESSAGES["pixels_per_mm"]("", value), path)
    ppm = _float_or_none(value)
    return None if ppm is None else limits.check_pixels_per_mm(ppm, path)


def check_roi_shape(value: Any, path: str | os.PathLike[str] | None = None) -> tuple[int, int]:
    """`value` (one side, or [height, width]) as (height, width), refused unless positive integers."""
    if _errors("input_roi_shape", value):
        raise ThinSegError(_MESSAGES["input_roi_shape"]("", value), path)
    return _bounded_roi(_roi(value), path)


def _bounded_roi(roi: tuple[int, int], path: str | os.PathLike[str] | None) -> tuple[int, int]:
    """The tile a model was trained on is the tile some models must run on: at most MAX_ROI_SIDE."""
    if max(roi) > MAX_ROI_SIDE:
        raise ThinSegError(
            f"input_roi_shape {list(roi)} is larger than {MAX_ROI_SIDE} px a side, more than a model's tile can be",
            path,
        )
    return roi


def _definition(config: bool) -> str:
    return "config_meta" if config else "meta"


def _float_or_none(value: Any) -> float | None:
    return None if value is None else float(value)


def _roi(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    return int(value[0]), int(value[1])


def _not_finite(value: Any) -> list[str]:
    """JSON Schema has no word for NaN and infinity, which Python's json reads."""
    if isinstance(value, float) and not math.isfinite(value):
        return [_MESSAGES["pixels_per_mm"]("", value)]
    return []


def _check_first_output(outputs: Mapping[Any, Any], where: str, path: Path) -> tuple[str, ClassTable]:
    """The segmentation output (the first one) and its classes. GeoSlicer needs one colour per
    class and class_indices 1..N (label value k = k-th class)."""
    key, output = next(iter(outputs.items()))
    name = str(key)
    errors = [(_path(error), error) for error in _errors("output", output)]
    if any(not where_ for where_, _ in errors):
        raise ThinSegError(f"{where} output {name!r} is not an object", path)
    if any(where_[0] == "class_names" for where_, _ in errors):
        raise ThinSegError(f"{where} output {name!r} has no class_names", path)
    names = output["class_names"]
    if isinstance(names, (list, tuple)) and len(names) > MAX_CLASSES:
        raise ThinSegError(
            f"{where} output {name!r} names {len(names)} classes; label maps hold at most {MAX_CLASSES}", path
        )
    if any(where_ == ("class_colors",) for where_, _ in errors) or len(output["class_colors"]) != len(names):
        raise ThinSegError(f"{where} output {name!r} needs one class_colors entry per class ({len(names)})", path)
    colours = [error.instance for where_, error in errors if where_[0] == "class_colors"]
    if colours:
        raise ThinSegError(f"{where} class colour {colours[0]!r} is not '#RRGGBB'", path)
    expected = list(range(1, len(names) + 1))
    indices = output.get("class_indices", expected)
    if any(where_[0] == "class_indices" for where_, _ in errors) or list(indices) != expected:
        shown = list(indices) if isinstance(indices, (list, tuple)) else indices
        raise ThinSegError(
            f"{where} class_indices {shown} are not contiguous 1..{len(names)} (label value k must be the k-th class)",
            path,
        )
    return name, ClassTable.from_names_colors(names, output["class_colors"])


# -- lenient: listing models -------------------------------------------------------------------


def summarize(meta: Mapping[str, Any]) -> MetaSummary:
    """The usable fields of a meta.json object for a model list; never raises for its content.

    Without jsonschema (Slicer before the module's requirements are installed) nothing
    structured can be trusted, so only empty fields come back.
    """
    try:
        broken = _broken_fields("meta", meta)
        outputs = meta["outputs"] if "outputs" not in broken else {}
        first = next(iter(outputs.values()), None)
        first_broken = _broken_fields("output", first) if first is not None else {""}
        ppm = meta.get("pixels_per_mm")
        ppm_ok = not _errors("pixels_per_mm", ppm) and not _not_finite(ppm)
    except ImportError:
        return MetaSummary([], [], [], None)

    def strings(field: str) -> list[str]:
        usable = first is not None and not first_broken & {"", field}
        return [str(v) for v in first[field]] if usable else []  # type: ignore[index]

    return MetaSummary(
        inputs=[str(name) for name in meta["inputs"]] if "inputs" not in broken else [],
        class_names=strings("class_names"),
        class_colors=strings("class_colors"),
        pixels_per_mm=_float_or_none(ppm) if ppm_ok else None,
    )


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("+", 1)[0].split(".")[:3] if part.isdigit())


def newer_thinseg_needed(meta: Mapping[str, Any]) -> str | None:
    """Why this thinseg is too old for the model (meta.json `requires.thinseg`), or None: a
    bundle of a network added later says so, instead of failing while it is built."""
    requires = meta.get("requires")
    needed = requires.get("thinseg") if isinstance(requires, Mapping) else None
    if not isinstance(needed, str) or not _version(needed):
        return None
    if _version(needed) <= _version(__version__):
        return None
    return (
        f"the model needs thinseg {needed} or newer (this is {__version__}): "
        "update the ThinSectionSegmentation extension"
    )


def cannot_run(meta: Mapping[str, Any]) -> str | None:
    """Why a model described by this meta.json is not a thin-section segmentation this package
    runs (another kind, 3-D, not segmentation, inputs that are not one or two RGB images), or
    None. Only fields that are present and well-formed count: a damaged description is left to
    loading, which names what is wrong."""
    too_old = newer_thinseg_needed(meta)
    if too_old is not None:
        return too_old
    kind = meta.get("kind")
    if isinstance(kind, str) and kind != "torch":
        return f"a {kind} model (only torch models run here)"
    if meta.get("is_segmentation_model") is False:
        return "not a segmentation model"
    dims = meta.get("spatial_dims")
    if isinstance(dims, int) and not isinstance(dims, bool) and dims != 2:
        return f"a {dims}-D model (thin sections are 2-D)"
    inputs = meta.get("inputs")
    if isinstance(inputs, Mapping) and inputs:
        channels = [
            (spec or {}).get("n_channels", 1) if isinstance(spec, (Mapping, type(None))) else None
            for spec in inputs.values()
        ]
        if len(inputs) > MAX_IMAGES or any(isinstance(c, int) and c != IMAGE_CHANNELS for c in channels):
            return f"its inputs are not one or two RGB images ({', '.join(str(name) for name in inputs)})"
    return None


def _broken_fields(definition: str, instance: Any) -> set[str]:
    """The top-level fields of `instance` that break `definition` ("" = the instance itself)."""
    return {_field(error) for error in _errors(definition, instance)}


# -- the schema and its messages ---------------------------------------------------------------


@functools.cache
def load_schema() -> dict[str, Any]:
    """The schema document (meta.schema.json)."""
    schema: dict[str, Any] = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    return schema


@functools.cache
def _validator(definition: str) -> Validator:
    """A Draft 7 validator for one of the schema's definitions, with Python's types as JSON's."""
    import jsonschema  # deferred: jsonschema costs ~0.2 s at import; the model list loads without it

    schema = load_schema()
    jsonschema.Draft7Validator.check_schema(schema)
    types = jsonschema.Draft7Validator.TYPE_CHECKER.redefine_many(
        {
            "integer": lambda _checker, value: isinstance(value, int) and not isinstance(value, bool),
            "array": lambda _checker, value: isinstance(value, (list, tuple)),
            "object": lambda _checker, value: isinstance(value, Mapping),
        }
    )
    # the stubs leave `extend` untyped; it returns a validator class like Draft7Validator
    validator_class = jsonschema.validators.extend(  # type: ignore[no-untyped-call]
        jsonschema.Draft7Validator, type_checker=types
    )
    wrapper = {"$ref": f"#/definitions/{definition}", "definitions": schema["definitions"]}
    validator: Validator = validator_class(wrapper)
    return validator


def _errors(definition: str, instance: Any) -> list[ValidationError]:
    """Every way `instance` breaks the schema's `definition`, in the order jsonschema finds them."""
    return list(_validator(definition).iter_errors(instance))


def _path(error: ValidationError) -> tuple[Any, ...]:
    """Where in the instance the error is; a missing required field counts as at that field."""
    path = tuple(error.absolute_path)
    required = error.validator_value
    if error.validator == "required" and isinstance(error.instance, Mapping) and isinstance(required, list):
        missing = [field for field in required if field not in error.instance]
        path += tuple(missing[:1])
    return path


def _field(error: ValidationError) -> str:
    """The top-level field an error is about ("" = the document itself)."""
    path = _path(error)
    return str(path[0]) if path else ""


def _rank_of(field: str) -> int:
    return _FIELD_ORDER.index(field) if field in _FIELD_ORDER else len(_FIELD_ORDER)


def _rank(error: ValidationError) -> int:
    return _rank_of(_field(error))


_MESSAGES: dict[str, Callable[[str, Any], str]] = {
    "": lambda where, _value: f"{where} must hold a JSON object",
    "kind": lambda _where, value: f"model kind {value!r} is not supported (only 'torch')",
    "is_segmentation_model": lambda _where, _value: "this is not a segmentation model (is_segmentation_model is false)",
    "spatial_dims": lambda _where, value: f"model works on {value}-D data; thin sections need spatial_dims 2",
    "outputs": lambda where, _value: f"{where} has no 'outputs'",
    "pixels_per_mm": lambda _where, value: f"pixels_per_mm must be a positive number, not {value!r}",
    "input_roi_shape": lambda _where, value: f"input_roi_shape must be two positive integers, not {value!r}",
}


def _problem(error: ValidationError, where: str, document: Mapping[str, Any]) -> str:
    """One line for a schema error in a description, naming the field."""
    path = _path(error)
    field = _field(error)
    if field == "inputs":
        if len(path) == 1:
            return f"{where} has no 'inputs'"
        return f"{where} input {str(path[1])!r} has no valid n_channels"
    if field in _MESSAGES:
        return _MESSAGES[field](where, document.get(field) if field else document)
    return f"{where} field {'.'.join(str(p) for p in path)}: {error.message}"
