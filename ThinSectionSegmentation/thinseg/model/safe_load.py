"""Reading torch-saved files (model.pth, training checkpoints) without running what they name.

A torch file is a pickle, and unpickling calls whatever functions the file names: a model.pth
found in a shared folder could run any command. Here a file may only name the globals in
`allowed_globals()`: what torch writes for tensors and state dicts, a few plain containers, and
numpy's scalar reconstruction (GeoSlicer's saved dicts can hold np.float64 or np.int64 values),
which gives back a plain Python number. Any other name stops the load before anything runs, with
one line naming the file and the global.

One list, two ways to enforce it. Torch 2.6 and later restrict the load themselves
(`weights_only=True`); the numpy entries are added for that one load (`safe_globals`), and the
torch entries are among what torch allows already. Older torch (GeoSlicer 2.8 runs 1.12, whose
`torch.load` has no `weights_only`) is given a pickle module whose Unpickler finds only the
globals of the same list.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import functools
import inspect
import pickle
from collections import Counter, OrderedDict
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

from thinseg.errors import ThinSegError

#: numpy scalar kinds a file may hold: bool, signed and unsigned integers, floats, complex.
NUMPY_SCALAR_KINDS = "biufc"
#: Where numpy's scalar reconstruction lives: numpy 1.x writes the first name, numpy 2.x the second.
NUMPY_SCALAR_GLOBALS = ("numpy.core.multiarray.scalar", "numpy._core.multiarray.scalar")
#: The first torch that restricts loading itself and takes extra globals under the names files use.
TORCH_RESTRICTS_FROM = (2, 6)
#: How torch's own loader says that a file names a global it does not allow (before the name).
_TORCH_REFUSALS = ("Unsupported global: GLOBAL ", "Trying to load unsupported GLOBAL ")
#: How RefusedGlobal says it (torch's own loader passes the message on).
_OWN_REFUSAL = "not allowed: "


class RefusedGlobal(pickle.UnpicklingError):
    """A file names a global that is not in `allowed_globals()` (or calls numpy's reconstruction
    for something other than a number); nothing of it was called."""

    def __init__(self, name: str) -> None:
        super().__init__(f"{_OWN_REFUSAL}{name}")
        self.name = name


def _numpy_dtype(spec: object, align: object = False, copy: object = False) -> np.dtype[Any]:
    """`numpy.dtype` as a pickle calls it, for the numeric scalar types only."""
    if not isinstance(spec, str) or not isinstance(align, bool) or not isinstance(copy, bool):
        raise RefusedGlobal(f"numpy.dtype{(spec, align, copy)!r}")
    try:
        dtype = np.dtype(spec, align, copy)
    except TypeError:
        raise RefusedGlobal(f"numpy.dtype({spec!r})") from None
    if dtype.kind not in NUMPY_SCALAR_KINDS:
        raise RefusedGlobal(f"numpy.dtype({spec!r})")
    return dtype


def _numpy_scalar(dtype: object, data: object = None) -> bool | int | float | complex:
    """numpy's scalar reconstruction (`scalar(dtype, raw bytes)`), given back as a plain Python
    number: files may carry np.float64 or np.int64 where a plain value is meant."""
    if not (isinstance(dtype, np.dtype) and isinstance(data, bytes)) or not (
        dtype.kind in NUMPY_SCALAR_KINDS and dtype.fields is None and not dtype.shape and len(data) == dtype.itemsize
    ):
        raise RefusedGlobal(f"numpy.core.multiarray.scalar({dtype!r}, {type(data).__name__})")
    value: bool | int | float | complex = np.frombuffer(data, dtype=dtype)[0].item()
    return value


@functools.cache
def allowed_globals() -> dict[str, object]:
    """Every global a torch file may name ("module.name" -> what it stands for).

    Torch writes tensors as calls of `torch._utils._rebuild_*` over storages (storage classes are
    resolved by torch.load itself, never through this list), state dicts as OrderedDicts, dtypes and
    devices by name, and bytes (pickle protocol 2) through `_codecs.encode`. numpy's scalars and their
    dtypes go through the checked stand-ins above, never numpy's own functions.
    """
    rebuild = ("_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state")
    names: dict[str, object] = {
        f"torch._utils.{name}": getattr(torch._utils, name) for name in rebuild if hasattr(torch._utils, name)
    }
    names.update(
        {
            "collections.OrderedDict": OrderedDict,
            "collections.Counter": Counter,
            "torch.nn.parameter.Parameter": torch.nn.Parameter,
            "torch.Size": torch.Size,
            "torch.device": torch.device,
            "_codecs.encode": codecs.encode,
            "builtins.set": set,
            "builtins.bytearray": bytearray,
            "builtins.complex": complex,
        }
    )
    names.update({str(value): value for value in vars(torch).values() if isinstance(value, torch.dtype)})
    names.update(dict.fromkeys(NUMPY_SCALAR_GLOBALS, _numpy_scalar))
    names["numpy.dtype"] = _numpy_dtype
    return names


def numpy_globals() -> dict[str, object]:
    """The entries of `allowed_globals()` that torch does not allow by itself: numpy's."""
    return {name: value for name, value in allowed_globals().items() if name.startswith("numpy")}


def _numpy_dtype_classes() -> list[tuple[type, str]]:
    """The classes of the numeric dtypes (numpy.dtypes.Float64DType, ...): torch's own loader
    restores a dtype's state only on an object whose class it was given."""
    codes = "?" + np.typecodes["AllInteger"] + np.typecodes["Float"] + np.typecodes["Complex"]
    classes = {type(np.dtype(code)) for code in codes}
    return [(cls, f"{cls.__module__}.{cls.__qualname__}") for cls in classes]


class _RestrictedUnpickler(pickle.Unpickler):
    """A pickle Unpickler that finds only the globals of `allowed_globals()`."""

    def find_class(self, module: str, name: str) -> Any:
        # pickle protocol 2 (torch's) writes Python 2 names such as `__builtin__.set`
        if (module, name) in _compat_pickle.NAME_MAPPING:
            module, name = _compat_pickle.NAME_MAPPING[(module, name)]
        elif module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        allowed = allowed_globals()
        full = f"{module}.{name}"
        if full not in allowed:
            raise RefusedGlobal(full)
        return allowed[full]


class RestrictedPickle:
    """The pickle module handed to `torch.load` where torch cannot restrict the load itself:
    torch builds its unpickler on `Unpickler` and reads the header records with `load`."""

    Unpickler = _RestrictedUnpickler
    UnpicklingError = pickle.UnpicklingError

    @staticmethod
    def load(file: IO[bytes], **kwargs: Any) -> Any:
        return _RestrictedUnpickler(file, **kwargs).load()


def torch_restricts_loading() -> bool:
    """True where this torch's own `weights_only` loader takes the numpy entries by their file names."""
    release = torch.__version__.split("+", 1)[0].split(".")
    try:
        version = (int(release[0]), int(release[1]))
    except (IndexError, ValueError):
        return False
    return version >= TORCH_RESTRICTS_FROM and hasattr(torch.serialization, "safe_globals")


def _takes_weights_only() -> bool:
    return "weights_only" in inspect.signature(torch.load).parameters


def load_torch_file(path: str | Path, *, restricted: bool | None = None) -> Any:
    """`torch.load(path)` onto the CPU, naming only `allowed_globals()`; numpy scalars come back as
    plain Python numbers. `restricted`: True uses the restricted unpickler even where torch could
    restrict the load itself (None: whichever this torch supports). Any failure (a refused global,
    a corrupt or truncated file) is one ThinSegError naming the file."""
    path = Path(path)
    use_torch = torch_restricts_loading() if restricted is None else not restricted
    try:
        if use_torch:
            extra: list[Any] = [(value, name) for name, value in numpy_globals().items()]
            with torch.serialization.safe_globals(extra + _numpy_dtype_classes()):
                return torch.load(path, map_location="cpu", weights_only=True)
        options = {"weights_only": False} if _takes_weights_only() else {}
        return torch.load(path, map_location="cpu", pickle_module=RestrictedPickle, **options)
    except Exception as exc:  # torch raises many kinds of errors for bad files; all mean "unusable"
        raise ThinSegError(load_failure(exc, path.name), path) from None


def load_failure(exc: BaseException, file: str) -> str:
    """One line saying why `file` could not be loaded."""
    message = str(exc)
    refused = exc.name if isinstance(exc, RefusedGlobal) else _torch_refused(message)
    if refused:
        return (
            f"{file} could not be loaded safely: it names {refused}, which is not a tensor, a plain value "
            "or a number (nothing in the file was run)"
        )
    if "WeightsUnpickler error:" in message:
        message = message.split("WeightsUnpickler error:", 1)[1]
    reason = _first_line(message) or "unexpected end of file"
    return f"{file} is corrupt, truncated or not a torch file of tensors and plain values ({reason})"


def _torch_refused(message: str) -> str | None:
    """The global named in torch's own refusal messages (or in a RefusedGlobal it passed on), if
    `message` is one of them."""
    if _OWN_REFUSAL in message:
        return message.split(_OWN_REFUSAL, 1)[1].splitlines()[0].strip()
    for lead in _TORCH_REFUSALS:
        if lead in message:
            name = message.split(lead, 1)[1].split(" ", 1)[0].strip()
            return name if "." in name else f"builtins.{name}"  # torch drops the "builtins." of builtins
    return None


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    first = lines[0] if lines else ""
    return first.split(". ", 1)[0] if len(first) > 120 else first


__all__ = [
    "NUMPY_SCALAR_GLOBALS",
    "RefusedGlobal",
    "RestrictedPickle",
    "allowed_globals",
    "load_failure",
    "load_torch_file",
    "numpy_globals",
    "torch_restricts_loading",
]
