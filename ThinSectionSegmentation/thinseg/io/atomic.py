"""All-or-nothing outputs: write to a hidden temporary name, rename at the end.

A segmentation of a gigapixel section takes minutes; if it is interrupted (error, Ctrl-C,
closed Slicer) the user must never find a half-written netCDF under the final name, and an
existing result is never replaced unless the caller asked for it. Files go through
`AtomicOutput`; folders that must appear whole (a model bundle) through `atomic_directory`;
an output folder a failed command created is removed again by `removed_on_failure`.

Outputs get the ordinary permissions of the user's umask (0644 files, 0755 folders under
umask 022): `tempfile.mkdtemp` makes private 0700 folders, which would lock colleagues out of a
shared model or result, so every temporary gets its final mode before it is renamed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import tempfile
from collections.abc import Callable, Iterator
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
            apply_umask(self.tmp)
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
        apply_umask(tmp)
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


def current_umask() -> int:
    """The process umask (read without changing it where /proc allows; else set and restored)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: str | os.PathLike[str]) -> None:
    """Give `path` (and, for a folder, everything in it) the modes a plain `open`/`mkdir` would:
    0o666 or 0o777 less the umask. Links are left alone."""
    mask = current_umask()
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
    root = Path(path)
    if root.is_symlink():
        return
    if not root.is_dir():
        _chmod(root, file_mode)
        return
    _chmod(root, dir_mode)
    for folder, dirs, files in os.walk(root):
        for name in dirs:
            _chmod(Path(folder, name), dir_mode)
        for name in files:
            _chmod(Path(folder, name), file_mode)


def _chmod(path: Path, mode: int) -> None:
    # best effort: a share that refuses chmod (SMB, FAT) must not fail a finished run
    if not path.is_symlink():
        with contextlib.suppress(OSError):
            os.chmod(path, mode)


def _topmost_missing(path: Path) -> Path | None:
    """The highest folder of `path` (itself included) that does not exist yet, or None."""
    missing = None
    for candidate in (path, *path.parents):
        if _exists(candidate):
            break
        missing = candidate
    return missing


@contextlib.contextmanager
def removed_on_failure(
    folder: str | os.PathLike[str] | None, *, keep: Callable[[], bool] | None = None
) -> Iterator[Callable[[], None]]:
    """Remove `folder` (and parents) again if they did not exist before and the block fails.

    A failed command must leave nothing behind, not even the empty output folder it made;
    a folder that existed before is never touched. The block fails by raising, or by calling
    the yielded `failed()` (a command that reports failure by its exit code). `keep()` can
    spare a folder worth keeping (a training run's checkpoint, to resume). After success only
    the folders left empty are removed (every input failed).
    """
    created = _topmost_missing(Path(folder)) if folder is not None else None
    state = {"failed": False}

    def failed() -> None:
        state["failed"] = True

    try:
        yield failed
    except BaseException:
        _remove_created(created, Path(folder) if folder is not None else None, True, keep)
        raise
    _remove_created(created, Path(folder) if folder is not None else None, state["failed"], keep)


def _remove_created(created: Path | None, folder: Path | None, failed: bool, keep: Callable[[], bool] | None) -> None:
    if created is None or folder is None or not created.is_dir() or created.is_symlink():
        return
    if failed and not (keep is not None and keep()):
        shutil.rmtree(created, ignore_errors=True)
        return
    for candidate in (folder, *folder.parents):  # empty leftovers, innermost first
        with contextlib.suppress(OSError):
            candidate.rmdir()
        if candidate == created:
            break


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
