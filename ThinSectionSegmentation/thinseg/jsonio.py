"""JSON in and out: writing results that hold numpy numbers, arrays, paths and NaNs (reports,
transforms, events), and reading documents people hand over (meta.json, job files, landmarks)
within bounds.

Standard JSON has no NaN or infinity, and readers such as GeoSlicer's or a browser's reject
them, so every JSON document the project writes goes through `dumps`/`write_json`: non-finite
numbers become `null`, numpy values become plain numbers and lists, paths become strings.

Python's own parser recurses once per nesting level and turns integers of any length into
Python ints, so a few hundred kilobytes of `[[[[...` end in a RecursionError and a 5000-digit
number in a ValueError (Python 3.11 and later) or in a huge int that later arithmetic chokes on
(3.9, 3.10). Every JSON the project reads from a user goes through `loads`/`read_json`, which
refuse a document that is too large, nested too deep or holds an absurdly long integer, before
or while parsing, with one line.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import numpy as np

from thinseg.errors import ThinSegError
from thinseg.io.atomic import write_text_atomic

#: Largest JSON document read by default (job files, landmark files; meta.json reads less).
MAX_JSON_BYTES = 16 * 1024 * 1024
#: Deepest nesting of arrays and objects read: the project's documents nest under ten levels.
MAX_JSON_DEPTH = 64
#: Longest integer literal read, in digits: any 64-bit integer has at most 20.
MAX_JSON_INT_DIGITS = 32

#: A JSON string literal (escapes included), whose brackets do not nest anything.
_STRING_LITERAL = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


class JSONBoundError(ValueError):
    """A JSON document beyond one of the bounds (`MAX_JSON_DEPTH`, `MAX_JSON_INT_DIGITS`)."""


def nesting_depth(text: str) -> int:
    """How deep arrays and objects nest in JSON `text`, brackets inside strings left out; found
    without parsing (so without recursion), in one vectorised pass."""
    brackets = _NOT_BRACKET.sub("", _STRING_LITERAL.sub("", text))
    if not brackets:
        return 0
    codes = np.frombuffer(brackets.encode("ascii"), dtype=np.uint8)
    steps = np.where((codes == ord("[")) | (codes == ord("{")), np.int8(1), np.int8(-1))
    return int(np.cumsum(steps, dtype=np.int32).max())


def _bounded_int(literal: str) -> int:
    digits = len(literal.lstrip("-"))
    if digits > MAX_JSON_INT_DIGITS:
        raise JSONBoundError(f"holds an integer of {digits} digits (at most {MAX_JSON_INT_DIGITS} are read)")
    return int(literal)


def loads(text: str, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """`json.loads(text)` within the bounds: a document nested deeper than `max_depth` or holding
    an integer longer than MAX_JSON_INT_DIGITS raises JSONBoundError (a ValueError), as a
    malformed one raises json.JSONDecodeError; neither recurses past the bound nor allocates
    more than the text."""
    depth = nesting_depth(text)
    if depth > max_depth:
        raise JSONBoundError(f"nests arrays and objects {depth} levels deep (at most {max_depth} are read)")
    return json.loads(text, parse_int=_bounded_int)


def read_json(path: str | os.PathLike[str], max_bytes: int = MAX_JSON_BYTES, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """The JSON document in `path`, read within the bounds; anything else (unreadable, too large,
    not UTF-8, not JSON, too deep, absurd numbers) is one ThinSegError naming the file."""
    path = Path(path)
    name = path.name
    try:
        with path.open("rb") as stream:
            data = stream.read(max_bytes + 1)
    except OSError as exc:
        raise ThinSegError(f"{name} cannot be read: {exc.strerror or exc}", path) from None
    if len(data) > max_bytes:
        raise ThinSegError(f"{name} is larger than {max_bytes:,} bytes, more than a JSON file of this kind holds", path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ThinSegError(f"{name} is not UTF-8 text", path) from None
    try:
        return loads(text, max_depth)
    except JSONBoundError as exc:
        raise ThinSegError(f"{name} {exc}", path) from None
    except json.JSONDecodeError as exc:
        raise ThinSegError(f"{name} is not valid JSON ({exc})", path) from None


def json_default(value: Any) -> Any:
    """`json.dumps(..., default=json_default)`: numpy scalars/arrays and paths as plain values."""
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def finite(value: Any) -> Any:
    """`value` with every NaN/infinity (also inside numpy arrays, lists and dicts) as None."""
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    if isinstance(value, np.ndarray):
        return finite(value.tolist())
    if isinstance(value, dict):
        return {key: finite(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite(item) for item in value]
    return value


def dumps(value: Any, indent: int | None = None, sort_keys: bool = False) -> str:
    """Standard JSON text of `value` (NaN/inf as null, numpy and paths as plain values)."""
    return json.dumps(finite(value), indent=indent, sort_keys=sort_keys, default=json_default, allow_nan=False)


def write_json(path: str | os.PathLike[str], value: Any, indent: int | None = 2) -> Path:
    """Write `value` as standard JSON to `path`, all or nothing (temporary name, then rename)."""
    return write_text_atomic(path, dumps(value, indent=indent) + "\n")
