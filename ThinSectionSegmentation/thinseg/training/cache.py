"""On-disk cache of derived per-section arrays (mapped label maps, patch probability maps).

The key is a hash of EVERY parameter the arrays depend on (section fingerprint, classes,
mapping, void width, patch footprint, map cell, code version), so a changed setting can
never silently reuse stale maps; an old entry is simply never looked up again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from thinseg.io.atomic import atomic_output

#: Bump when the meaning of cached arrays changes.
CACHE_VERSION = 2


def cache_key(kind: str, params: Mapping[str, Any]) -> str:
    """Stable hex key of `kind` + params (JSON with sorted keys; numpy values as lists)."""
    payload = json.dumps({"kind": kind, "version": CACHE_VERSION, "params": params}, sort_keys=True, default=_plain)
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()[:40]


def _plain(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (set, frozenset, tuple)):
        return list(value)
    raise TypeError(f"cannot hash {type(value).__name__} into a cache key")


class ArrayCache:
    """Folder of `<key>.npy` / `<key>.npz` files; `folder=None` disables caching."""

    def __init__(self, folder: Path | None) -> None:
        self.folder = Path(folder) if folder is not None else None
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)

    def load_array(self, key: str, mmap: bool = True) -> npt.NDArray[Any] | None:
        """A cached (H, W) array, memory-mapped so that big label maps stay on disk."""
        path = self._path(key, ".npy")
        if path is None or not path.is_file():
            return None
        try:
            array: npt.NDArray[Any] = np.load(path, mmap_mode="r" if mmap else None)
        except (OSError, ValueError):
            return None  # truncated or unreadable: recompute
        return array

    def save_array(self, key: str, array: npt.NDArray[Any]) -> None:
        """Store one array as `<key>.npy`, all or nothing (readers never see half a file)."""
        path = self._path(key, ".npy")
        if path is None:
            return
        # a file object, not a name: np.save would append ".npy" to the temporary name
        with atomic_output(path) as tmp, open(tmp, "wb") as f:
            np.save(f, array)

    def load_arrays(self, key: str) -> dict[str, npt.NDArray[Any]] | None:
        """The arrays of a `save_arrays` entry, read into memory; None if absent or unreadable."""
        path = self._path(key, ".npz")
        if path is None or not path.is_file():
            return None
        try:
            with np.load(path) as data:
                return {k: data[k] for k in data.files}
        except (OSError, ValueError):
            return None

    def save_arrays(self, key: str, arrays: Mapping[str, npt.NDArray[Any]]) -> None:
        """Store named arrays as `<key>.npz`, all or nothing."""
        path = self._path(key, ".npz")
        if path is None:
            return
        # a file object: np.savez would append ".npz" to the temporary name; allow_pickle is numpy's
        # default, named so that the type checker does not take an array for it
        with atomic_output(path) as tmp, open(tmp, "wb") as f:
            np.savez(f, allow_pickle=True, **arrays)

    def _path(self, key: str, suffix: str) -> Path | None:
        return None if self.folder is None else self.folder / f"{key}{suffix}"
