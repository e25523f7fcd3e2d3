"""JSON for results that hold numpy numbers, arrays, paths and NaNs (reports, transforms, events).

Standard JSON has no NaN or infinity, and readers such as GeoSlicer's or a browser's reject
them, so every JSON document the project writes goes through `dumps`/`write_json`: non-finite
numbers become `null`, numpy values become plain numbers and lists, paths become strings.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from thinseg.io.atomic import write_text_atomic


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
