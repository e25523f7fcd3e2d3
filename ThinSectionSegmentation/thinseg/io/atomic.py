"""All-or-nothing outputs: write to a hidden temporary name, rename at the end.

A segmentation of a gigapixel section takes minutes; if it is interrupted (error, Ctrl-C,
closed Slicer) the user must never find a half-written netCDF under the final name, and an
existing result is never replaced unless the caller asked for it. Files go through
`AtomicOutput`; folders that must appear whole (a model bundle) through `atomic_directory`.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from thinseg.errors import ThinSegError

PARTIAL_SUFFIX = ".partial"


def temporary_name(path: Path) -> Path:
    """A hidden, unique sibling of `path`: same folder, so the final rename is atomic."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}{PARTIAL_SUFFIX}")


class AtomicOutput:
    """Context manager yielding a temporary path that becomes `path` only on success.

    On any exception, KeyboardInterrupt included, the temporary file is removed and `path` is
    left as it was. `commit()` / `discard()` allow the same without a `with` block (the
    netCDF writer keeps one open across method calls).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.tmp = temporary_name(self.path)
        self._done = False

    def __enter__(self) -> Path:
        return self.tmp

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.discard()

    def commit(self) -> Path:
        """Rename the temporary file onto the target (replacing it) and return the target."""
        if self._done:
            return self.path
        self._done = True
        if not self.tmp.exists():
            raise RuntimeError(f"atomic_output: nothing was written to {self.tmp}")
        try:
            os.replace(self.tmp, self.path)
        except OSError as error:
            _remove(self.tmp)
            raise ThinSegError(f"cannot write the output file: {error.strerror or error}", self.path) from error
        return self.path

    def discard(self) -> None:
        """Remove the temporary file; the target is untouched."""
        self._done = True
        _remove(self.tmp)


def atomic_output(path: str | os.PathLike[str]) -> AtomicOutput:
    """`with atomic_output(target) as tmp:` write `tmp`; it is renamed onto `target` on success."""
    return AtomicOutput(path)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path`, all or nothing: readers see the old file or the whole new one."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 `text` to `path`, all or nothing (see `write_bytes_atomic`)."""
    return write_bytes_atomic(path, text.encode("utf-8"))


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike[str], *, overwrite: bool = False) -> Iterator[Path]:
    """`with atomic_directory(target) as tmp:` fill the folder `tmp`; it becomes `target` on success.

    `tmp` is a new hidden folder beside `target` (same file system, so the final rename is
    atomic; hidden, so folder scans skip it). On any exception, KeyboardInterrupt included, it is
    removed and `target` is left as it was. An existing `target` is replaced only with
    `overwrite` (else FileExistsError): it is first renamed aside, and renamed back if the new
    folder cannot take its place, so a reader sees the old folder or the whole new one.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        _swap_into_place(tmp, target, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _swap_into_place(tmp: Path, target: Path, overwrite: bool) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    if not overwrite:
        raise FileExistsError(f"{target} already exists")
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    old.rmdir()  # a free hidden name for the old folder
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def free_output_path(path: str | os.PathLike[str]) -> Path:
    """`path` if it does not exist, else the first free `stem_1.ext`, `stem_2.ext`, ...

    Existing results are never overwritten unless the user asked for it; the caller decides.
    """
    path = Path(path)
    if not _exists(path):
        return path
    n = 1
    while True:
        candidate = path.with_name(f"{path.stem}_{n}{path.suffix}")
        if not _exists(candidate):
            return candidate
        n += 1


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()  # a dangling link still occupies the name


def ensure_writable_dir(directory: str | os.PathLike[str]) -> Path:
    """Create `directory` if needed and prove it is writable (by writing a probe file).

    `os.access` is unreliable on network shares and with ACLs, so the check really writes.
    """
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ThinSegError("cannot write here: it is a file, not a folder", directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = temporary_name(directory / "write-test")
        probe.write_bytes(b"")
        probe.unlink()
    except PermissionError:
        raise ThinSegError("cannot write here: permission denied", directory) from None
    except OSError as error:
        raise ThinSegError(f"cannot write here: {error.strerror or error}", directory) from None
    return directory
