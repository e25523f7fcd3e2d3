"""All-or-nothing outputs: write to a hidden temporary name, rename at the end.

A segmentation of a gigapixel section takes minutes; if it is interrupted (error, Ctrl-C,
closed Slicer) the user must never find a half-written netCDF under the final name, and an
existing result is never replaced unless the caller asked for it. Files go through
`AtomicOutput`; folders that must appear whole (a model bundle) through `atomic_directory`;
an output folder a failed command created is removed again by `removed_on_failure`.

Runs in parallel never lose each other's results: an output that must not replace anything
(`AtomicOutput(unique=True)`, `commit_unique`) is committed by a hard link, which fails
atomically when the name is taken, and then takes the next free numbered name (`S_1.nc`,
`S_2.nc`, ...). File systems without hard links (FAT, some SMB shares) reserve the name with an
exclusive create and rename onto it.

Temporaries are named `.NAME.HOST.PID.TOKEN.partial` (folders `.NAME.HOST.PID.TOKEN.tmp`): a
process killed outright (kill -9, out of memory) cannot remove them, so the next run writing
into the folder does (`sweep_stale_temporaries`), and only those of processes that are gone.

Outputs get the ordinary permissions of the user's umask (0644 files, 0755 folders under
umask 022): `tempfile.mkdtemp` makes private 0700 folders, which would lock colleagues out of a
shared model or result, so every temporary gets its final mode before it is renamed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from thinseg.errors import ThinSegError
from thinseg.io.locks import HOST, owner_is_gone

PARTIAL_SUFFIX = ".partial"
#: Suffixes of temporaries: files being written, folders being filled, folders set aside.
TEMPORARY_SUFFIXES = (PARTIAL_SUFFIX, ".tmp", ".old")
#: Longest part of a target's name kept in its temporary's name (file names end at 255 bytes).
_NAME_PART = 100
_TEMPORARY = re.compile(
    r"^\.(?P<name>.+)\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>[0-9]+)\.[0-9a-f]{8}\.(?P<kind>partial|tmp|old)$"
)
#: Temporaries of another host or an older version are reported once they are this old.
FOREIGN_REPORT_S = 24 * 3600.0
#: Most numbered names tried for one output before giving up (a folder of 10000 S_n.nc is a mistake).
MAX_NUMBERED = 10000
#: Targets committed inside each active `removed_on_failure` block (innermost last).
_recording: list[set[Path]] = []


def temporary_name(path: Path, kind: str = PARTIAL_SUFFIX) -> Path:
    """A hidden, unique sibling of `path` naming this host and process: same folder, so the
    final rename is atomic; its owner is known, so a dead run's leftover can be cleared."""
    # bytes of the name that are not UTF-8 become "_": libraries such as netCDF4 refuse to open them
    name = os.fsencode(path.name).decode("utf-8", "replace").replace("\ufffd", "_")
    return path.with_name(f".{name[:_NAME_PART]}.{HOST}.{os.getpid()}.{secrets.token_hex(4)}{kind}")


def temporary_owner(name: str) -> tuple[str, int] | None:
    """(host, pid) of a temporary's name made by `temporary_name`; None for any other name."""
    match = _TEMPORARY.match(name)
    return (match["host"], int(match["pid"])) if match else None


def numbered(path: Path, n: int) -> Path:
    """`path` for n = 0, else `stem_n.ext`: the names tried when `path` is taken."""
    return path if n == 0 else path.with_name(f"{path.stem}_{n}{path.suffix}")


class AtomicOutput:
    """Context manager yielding a temporary path that becomes `path` only on success.

    On any exception, KeyboardInterrupt included, the temporary file is removed and `path` is
    left as it was. `commit()` / `discard()` allow the same without a `with` block (the
    netCDF writer keeps one open across method calls). With `unique`, an existing `path` is
    never replaced: the output takes the first free numbered name at commit, atomically even
    against other processes, and `path` is then that name.
    """

    def __init__(self, path: str | os.PathLike[str], *, unique: bool = False) -> None:
        self.path = Path(path)
        self.tmp = temporary_name(self.path)
        self.unique = unique
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
        """Rename the temporary file onto the target (replacing it, unless `unique`) and return
        the name it now has."""
        if self._done:
            return self.path
        if self.unique:
            return commit_unique([self], lambda n: [numbered(self.path, n)])[0]
        self._done = True
        if not self.tmp.exists():
            raise RuntimeError(f"atomic_output: nothing was written to {self.tmp}")
        try:
            apply_umask(self.tmp)
            os.replace(self.tmp, self.path)
        except OSError as error:
            _remove(self.tmp)
            raise ThinSegError(f"cannot write the output file: {error.strerror or error}", self.path) from error
        except BaseException:  # Ctrl-C or SIGTERM in the middle of the commit: no temporary stays
            _remove(self.tmp)
            raise
        _record(self.path)
        return self.path

    def discard(self) -> None:
        """Remove the temporary file; the target is untouched."""
        self._done = True
        _remove(self.tmp)


def atomic_output(path: str | os.PathLike[str], *, unique: bool = False) -> AtomicOutput:
    """`with atomic_output(target) as tmp:` write `tmp`; it is renamed onto `target` on success."""
    return AtomicOutput(path, unique=unique)


def commit_unique(
    outputs: Sequence[AtomicOutput], names: Callable[[int], Sequence[Path]], tries: int = MAX_NUMBERED
) -> list[Path]:
    """Commit `outputs` together under `names(n)` for the smallest n < `tries` whose names are
    all free, replacing nothing, and return those names (also set as each output's `path`).
    No free n: ThinSegError, the temporaries removed.

    Files that belong together (a section's netCDF and its overlay PNG) so keep matching names
    even when another run takes a name between the check and the commit: a name found taken
    while committing undoes this attempt's names and the next n is tried.
    """
    for output in outputs:
        if not output.tmp.exists():
            raise RuntimeError(f"atomic_output: nothing was written to {output.tmp}")
    try:
        for output in outputs:
            apply_umask(output.tmp)
        for n in range(tries):
            targets = [Path(t) for t in names(n)]
            if any(_exists(t) for t in targets):
                continue
            placed: list[tuple[AtomicOutput, Path, bool]] = []
            try:
                for output, target in zip(outputs, targets):
                    placed.append((output, target, _place_exclusive(output.tmp, target)))
            except FileExistsError:
                for output, target, linked in reversed(placed):
                    _unplace(output.tmp, target, linked)
                continue
            for output, target, linked in placed:
                if linked:
                    _remove(output.tmp)  # the final name holds the file now
                output.path, output._done = target, True
                _record(target)
            return targets
    except OSError as error:
        for output in outputs:
            output.discard()
        where = getattr(error, "filename", None) or outputs[0].path
        raise ThinSegError(f"cannot write the output file: {error.strerror or error}", where) from error
    except BaseException:  # Ctrl-C or SIGTERM mid-commit: names already placed hold whole files
        for output in outputs:
            output.discard()
        raise
    for output in outputs:
        output.discard()
    if tries == 1:
        taken = [p.name for p in names(0) if _exists(Path(p))]
        raise ThinSegError(
            f"output exists already ({', '.join(taken[:4]) or 'written meanwhile'}): another run wrote it; "
            "use --overwrite or another --output",
            outputs[0].path.parent,
        )
    raise ThinSegError(f"no free name: {tries} numbered outputs exist already", outputs[0].path)


#: errno values of a link that failed for want of room or rights (not for want of hard links).
_REAL_FAILURES = {
    errno.ENOSPC,
    errno.EROFS,
    errno.ENOENT,
    errno.EACCES,
    getattr(errno, "EDQUOT", errno.ENOSPC),
    errno.EIO,
}


def _place_exclusive(tmp: Path, target: Path) -> bool:
    """Give the file `tmp` the name `target` unless it is taken (FileExistsError). True when
    placed by a hard link (`tmp` still names it too), False when renamed onto a reservation."""
    try:
        os.link(tmp, target)
        return True
    except FileExistsError:
        raise
    except (OSError, AttributeError) as error:
        if isinstance(error, OSError) and error.errno in _REAL_FAILURES:
            raise
    # no hard links here (FAT, some SMB shares): reserve the name, then rename onto it
    os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    os.replace(tmp, target)
    return False


def _unplace(tmp: Path, target: Path, linked: bool) -> None:
    """Undo `_place_exclusive`: the name is freed and the file is under `tmp` again."""
    with contextlib.suppress(OSError):
        if linked:
            if os.path.samefile(tmp, target):
                target.unlink()
        else:
            os.replace(target, tmp)


def _record(path: Path) -> None:
    for written in _recording:
        written.add(path)


def write_bytes_atomic(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write `data` to `path`, all or nothing: readers see the old file or the whole new one."""
    with atomic_output(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> Path:
    """Write UTF-8 `text` to `path`, all or nothing (see `write_bytes_atomic`)."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def _make_temporary_dir(target: Path, kind: str) -> Path:
    for _ in range(100):
        tmp = temporary_name(target, kind)
        try:
            tmp.mkdir(mode=0o700)
        except FileExistsError:
            continue
        return tmp
    raise FileExistsError(f"no free temporary name beside {target}")


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
    tmp = _make_temporary_dir(target, ".tmp")
    try:
        yield tmp
        apply_umask(tmp)
        _swap_into_place(tmp, target, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _record(target)


def _swap_into_place(tmp: Path, target: Path, overwrite: bool) -> None:
    if not target.exists():
        os.rename(tmp, target)
        return
    if not overwrite:
        raise FileExistsError(f"{target} already exists")
    old = _make_temporary_dir(target, ".old")
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
    the folders left empty are removed (every input failed). Only what this process wrote
    goes: another run writing into the same new folder keeps its files.
    """
    created = _topmost_missing(Path(folder)) if folder is not None else None
    state = {"failed": False}
    written: set[Path] = set()
    _recording.append(written)

    def failed() -> None:
        state["failed"] = True

    try:
        yield failed
    except BaseException:
        _recording.remove(written)
        _remove_created(created, Path(folder) if folder is not None else None, True, keep, written)
        raise
    _recording.remove(written)
    _remove_created(created, Path(folder) if folder is not None else None, state["failed"], keep, written)


def _remove_created(
    created: Path | None, folder: Path | None, failed: bool, keep: Callable[[], bool] | None, written: set[Path]
) -> None:
    if created is None or folder is None or not created.is_dir() or created.is_symlink():
        return
    if failed and not (keep is not None and keep()):
        _remove_own(created, written)
    for candidate in (folder, *folder.parents):  # empty leftovers, innermost first
        with contextlib.suppress(OSError):
            candidate.rmdir()
        if candidate == created:
            break


def _remove_own(created: Path, written: set[Path]) -> None:
    """Remove what this process committed under `created`, its temporaries there, and the
    folders left empty; files of other processes stay."""
    mine = os.getpid()
    root = Path(os.path.abspath(created))
    for path in sorted((Path(os.path.abspath(p)) for p in written), key=lambda p: len(p.parts), reverse=True):
        if root in path.parents:
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                _remove(path)
    for here, dirs, files in os.walk(created, topdown=False):
        for name in files + dirs:
            owner = temporary_owner(name)
            if owner is not None and owner == (HOST, mine):
                _remove_any(Path(here, name))
        for name in dirs:
            with contextlib.suppress(OSError):
                Path(here, name).rmdir()


@dataclass
class StaleTemporaries:
    """What `sweep_stale_temporaries` found: temporaries of dead runs removed, and others'
    that look abandoned (another host's or an older version's, over a day old), left alone."""

    removed: list[Path] = field(default_factory=list)
    foreign: list[Path] = field(default_factory=list)

    def notes(self, folder: Path) -> list[str]:
        """Lines for the user (none when nothing was found)."""
        lines = []
        if self.removed:
            lines.append(f"removed {len(self.removed)} stale temporaries of an interrupted run in {folder}")
        if self.foreign:
            lines.append(
                f"{len(self.foreign)} temporaries over a day old in {folder} belong to another machine or an older "
                f"thinseg (e.g. {self.foreign[0].name}): remove them if no run is writing there"
            )
        return lines


def sweep_stale_temporaries(folder: str | os.PathLike[str]) -> StaleTemporaries:
    """Remove the temporaries in `folder` (not below it) of runs on this machine whose process
    is gone (killed before it could clean up); temporaries of running processes and of other
    machines are left alone, and the old ones of other machines are reported.

    A folder a killed run had set aside to swap in a new one (`.old`) is removed only once the
    new one is in place; otherwise it may be the only copy and is left for the user.
    """
    found = StaleTemporaries()
    folder = Path(folder)
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return found
    now = time.time()
    for entry in entries:
        if not entry.name.startswith(".") or not entry.name.endswith(TEMPORARY_SUFFIXES):
            continue
        path = Path(entry.path)
        owner = temporary_owner(entry.name)
        if owner is not None and owner_is_gone(*owner):
            match = _TEMPORARY.match(entry.name)
            if (
                match
                and match["kind"] != "partial"
                and not _exists(folder / match["name"])
                and _has_old(entries, match)
            ):
                continue  # a swap cut short: the set-aside folder may be the only copy
            if _remove_any(path):
                found.removed.append(path)
        elif owner is None or owner[0] != HOST:
            with contextlib.suppress(OSError):
                if (
                    entry.name.endswith(PARTIAL_SUFFIX)
                    and now - entry.stat(follow_symlinks=False).st_mtime > FOREIGN_REPORT_S
                ):
                    found.foreign.append(path)
    return found


def _has_old(entries: Sequence[os.DirEntry[str]], match: re.Match[str]) -> bool:
    """Whether the same process left a set-aside `.old` folder of the same target."""
    prefix = f".{match['name']}.{match['host']}.{match['pid']}."
    return any(e.name.startswith(prefix) and e.name.endswith(".old") for e in entries)


def _remove_any(path: Path) -> bool:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
    except FileNotFoundError:
        return False
    except OSError:
        return False
    return True


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def free_output_path(path: str | os.PathLike[str]) -> Path:
    """`path` if it does not exist, else the first free `stem_1.ext`, `stem_2.ext`, ...

    Only a suggestion: another process may take the name before it is written. Outputs that
    must never replace a file are committed with `AtomicOutput(unique=True)` / `commit_unique`.
    """
    path = Path(path)
    n = 0
    while _exists(numbered(path, n)):
        n += 1
    return numbered(path, n)


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
        try:
            probe.write_bytes(b"")
        finally:  # also when Ctrl-C or SIGTERM comes between the two
            _remove(probe)
    except PermissionError:
        raise ThinSegError("cannot write here: permission denied", directory) from None
    except OSError as error:
        raise ThinSegError(f"cannot write here: {error.strerror or error}", directory) from None
    return directory
