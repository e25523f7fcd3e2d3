"""Turn the command line's INPUT list into sections: PP/XP image pairs or netCDF files.

A thin section's PP and XP photographs share a name and differ by an affix (`_pp`/`_xp`,
`_PP`/`_PX`, `_c1`/`_c2`, `_paralelos`/`_cruzados` ...). The affix decides the role; the
counterpart is the same name with the other affix, looked for in this order:

1. beside the file (the same folder);
2. in the folder given as `xp_dir` (`--xp-dir`), when one is given; otherwise
3. in the folders beside the file's folder (`ppl/` and `xpl/` of one collection), where it
   must be found in one folder only.

One PP image can also be given with its XP image explicitly (`--xp FILE`): then names decide nothing.

Pairing takes time linear in the number of files: every folder is listed once and its files are
looked up by name (and, for the hints of a failure message, by name with one token cut out).
An input that cannot be read (a missing or unreadable folder or file, a broken link) is one
problem and the others are still paired; a file is never its own counterpart (the same file
under two names, a link to it, or an XP affix equal to the PP affix). Names are handled as the
operating system gives them: bytes that are not UTF-8 pair like any other.
"""

from __future__ import annotations

import errno
import os
import re
import stat
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from thinseg.errors import ThinSegError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
NETCDF_SUFFIXES = (".nc", ".h5", ".hdf5")

#: A PP image's folder with more folders beside it than this is not part of a collection laid
#: out as ppl/, xpl/, masks/ ...: its counterpart is then looked for beside it (or in --xp-dir) only.
MAX_SIBLING_FOLDERS = 8

#: Names with more tokens than this are not offered as "found ...: use --xp-pattern" hints: the
#: index behind the hints holds one entry per token, and real photograph names have a dozen at most.
MAX_HINT_TOKENS = 32

#: Characters that separate a file name's tokens ("ABC_3200.5-PP" -> ABC, 3200, 5, PP).
_TOKEN = re.compile(r"[A-Za-z0-9]+")

#: What identifies a file: (device, inode) of what a path leads to, or the resolved path when
#: it cannot be looked at. Two names of one file (a link, a hard link) have one identity.
_Identity = Union[tuple[int, int], str]


@dataclass(frozen=True)
class SectionInput:
    """One section to segment: image files (pp, xp) or one netCDF file (netcdf)."""

    name: str  # output stem
    pp: Path | None = None
    xp: Path | None = None
    netcdf: Path | None = None

    @property
    def primary(self) -> Path:
        """The file this section is reported under."""
        return self.netcdf or self.pp  # type: ignore[return-value]


@dataclass(frozen=True)
class PairingProblem:
    """An input that cannot become a section; reported, and the batch goes on."""

    path: Path
    problem: str


def _affix_regex(affix: str) -> re.Pattern[str]:
    # An affix is a token: not preceded or followed by a letter/digit ("pp" must not match "apple").
    return re.compile(rf"(?<![A-Za-z0-9]){re.escape(affix)}(?![A-Za-z0-9])", re.IGNORECASE)


def find_affix(stem: str, affix: str | None) -> re.Match[str] | None:
    """The last token occurrence of `affix` in a file stem (case-insensitive), or None."""
    if not affix:
        return None
    matches = list(_affix_regex(affix).finditer(stem))
    return matches[-1] if matches else None


def check_affixes(pp_pattern: str | None, xp_pattern: str | None) -> None:
    """Refuse a PP affix equal to the XP affix (case-insensitive): every PP image would be found
    as its own XP image and a section segmented from one photograph twice."""
    if pp_pattern and xp_pattern and pp_pattern.lower() == xp_pattern.lower():
        raise ThinSegError(
            f"--xp-pattern {xp_pattern}: equal to the PP affix (--pp-pattern {pp_pattern}), so every PP image "
            "would be its own XP image; give the affix the XP images carry (e.g. XP, PX or c2)"
        )


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _suffix(name: str) -> str:
    """Path(name).suffix.lower() without building a Path (a folder of 20,000 names is read at once)."""
    return os.path.splitext(name)[1].lower()


# ---------------------------------------------------------------------------------------------
# what the operating system says about a path, in one line


def _os_problem(error: OSError, path: Path, what: str = "") -> str:
    """The one-line problem for `error` met on `path` (`what`: 'folder', 'XP image file (--xp)' ...)."""
    code = error.errno
    if code == errno.ENOENT:
        if os.path.islink(path):
            return f"broken symbolic link (it points to {os.readlink(path)}, which does not exist)"
        return f"{what} not found" if what else "file not found"
    if code == errno.ENOTDIR:
        return f"{what or 'file'} not found: a folder in its path is a file"
    if code == errno.ELOOP:
        return "symbolic link loop (the link leads back to itself)"
    if code == errno.ENAMETOOLONG:
        return "name too long for the file system"
    detail = error.strerror or str(error)
    return f"cannot read {what}: {detail}" if what else f"cannot read: {detail}"


def _stat(path: Path) -> tuple[os.stat_result | None, str | None]:
    """(stat, None), or (None, the problem) when the path leads to nothing readable."""
    try:
        return os.stat(path), None
    except OSError as error:
        return None, _os_problem(error, path)
    except ValueError:  # a NUL byte in the name
        return None, "not a valid file name (it holds a NUL character)"


# ---------------------------------------------------------------------------------------------
# folder listings, read once per pairing run


@dataclass
class _Listing:
    """One folder read once: its image and netCDF files (sorted names), looked up by exact and
    lower-case name; for failure hints also by name with one token cut out (built on first use)."""

    folder: Path
    names: list[str] = field(default_factory=list)  # image and netCDF files, sorted
    unusable: list[tuple[str, str]] = field(default_factory=list)  # (name, why): named like an image, no file
    error: str | None = None
    _paths: dict[str, Path] = field(default_factory=dict)
    _images: set[str] | None = None
    _lowered: dict[str, str] | None = None
    _by_cut: dict[int, list[int]] | None = None

    @classmethod
    def read(cls, folder: Path) -> _Listing:
        listing = cls(folder)
        known = IMAGE_SUFFIXES + NETCDF_SUFFIXES
        try:
            with os.scandir(folder) as entries:
                for entry in entries:
                    if _suffix(entry.name) not in known:
                        continue
                    try:  # d_type answers without a stat call; only links are followed
                        if entry.is_file():
                            listing.names.append(entry.name)
                            continue
                        if entry.is_dir():
                            continue
                    except OSError:
                        pass
                    # a broken link, a link loop, a pipe (reading it would wait forever), a device
                    why = _stat(Path(entry.path))[1] or "not a regular file or folder (a device, pipe or socket)"
                    listing.unusable.append((entry.name, why))
        except OSError as error:
            listing.error = _os_problem(error, folder, "folder")
        except ValueError:
            listing.error = "not a valid folder name (it holds a NUL character)"
        listing.names.sort()
        listing.unusable.sort()
        return listing

    def path(self, name: str) -> Path:
        found = self._paths.get(name)
        if found is None:
            found = self._paths[name] = self.folder / name
        return found

    def files(self) -> list[Path]:
        return [self.path(name) for name in self.names]

    def images(self) -> set[str]:
        """The image files' names."""
        if self._images is None:
            self._images = {name for name in self.names if _suffix(name) in IMAGE_SUFFIXES}
        return self._images

    def lowered(self) -> dict[str, str]:
        """Image names by their lower-case spelling (the first in sorted order wins)."""
        if self._lowered is None:
            self._lowered = {}
            for name in self.names:
                if name in self.images():
                    self._lowered.setdefault(name.lower(), name)
        return self._lowered

    def find(self, wanted_stems: Sequence[str], path: Path) -> Path | None:
        """The image with one of the stems, any image extension: exact case first (the extension
        of `path`, then the others, each as written and upper-case), then ignoring case."""
        exts = [path.suffix] + [e for e in IMAGE_SUFFIXES if e != path.suffix.lower()]
        present = self.images()
        for wanted in wanted_stems:
            for ext in exts:
                for variant in (ext, ext.upper()):
                    if wanted + variant in present:
                        return self.path(wanted + variant)
        lowered = self.lowered()
        for wanted in wanted_stems:
            for ext in IMAGE_SUFFIXES:
                name = lowered.get((wanted + ext).lower())
                if name is not None:
                    return self.path(name)
        return None

    def named_like(self, prefix: str, suffix: str) -> list[tuple[str, Path]]:
        """(token, file) for every image whose stem is `prefix` + one token + `suffix` (ignoring
        case), in name order: one dictionary look-up, not a pass over the folder."""
        if self._by_cut is None:
            self._by_cut = {}
            for index, name in enumerate(self.names):
                if name not in self.images():
                    continue
                stem = os.path.splitext(name)[0]
                tokens = list(_TOKEN.finditer(stem))
                if len(tokens) <= MAX_HINT_TOKENS:
                    for token in tokens:
                        self._by_cut.setdefault(_cut_key(*_cut_text(stem, token)), []).append(index)
        wanted = (prefix.lower(), suffix.lower())
        hits: list[tuple[str, Path]] = []
        for index in self._by_cut.get(_cut_key(*wanted), []):
            name = self.names[index]
            stem = os.path.splitext(name)[0]
            # the key is a hash: take the token whose cut really leaves `wanted`
            for token in _TOKEN.finditer(stem):
                if _cut_text(stem, token) == wanted:
                    hits.append((token.group(0), self.path(name)))
                    break
        return hits


def _cut_text(stem: str, token: re.Match[str]) -> tuple[str, str]:
    """What is left of `stem` around `token`, in lower case (the part two alike names share)."""
    return stem[: token.start()].lower(), stem[token.end() :].lower()


def _cut_key(prefix: str, suffix: str) -> int:
    # a hash keeps the index at one small entry per token, whatever the length of the names
    return hash((prefix, suffix))


@dataclass
class _Folders:
    """Folder listings read once per pairing run (a folder of N pairs is listed once, not N times)."""

    xp_dir: Path | None = None
    listings: dict[Path, _Listing] = field(default_factory=dict)
    siblings: dict[Path, list[Path] | None] = field(default_factory=dict)
    siblings_of: dict[Path, list[Path] | None] = field(default_factory=dict)  # by the folder as written
    identities: dict[Path, _Identity] = field(default_factory=dict)

    def listing(self, folder: Path) -> _Listing:
        """The folder's listing (an unreadable folder lists nothing and says why in `error`)."""
        found = self.listings.get(folder)
        if found is None:
            found = self.listings[folder] = _Listing.read(folder)
        return found

    def identity(self, path: Path) -> _Identity:
        """What `path` leads to: two names of one file (links, hard links) give one identity."""
        found = self.identities.get(path)
        if found is None:
            try:
                info = os.stat(path)
                found = (info.st_dev, info.st_ino)
            except (OSError, ValueError):
                found = os.path.realpath(path)
            self.identities[path] = found
        return found

    def search_path(self, path: Path, for_xp: bool) -> list[Path]:
        """Where a counterpart of `path` is looked for, beyond its own folder: for an XP image
        `xp_dir` when given, else the folders beside the file's folder (sorted), if they are few
        enough to be one collection's (a home or temp folder's dozens of folders are not searched)."""
        if for_xp and self.xp_dir is not None:
            return [self.xp_dir]
        return self.sibling_folders(path) or []

    def sibling_folders(self, path: Path) -> list[Path] | None:
        """The folders beside `path`'s folder; None when there are more than MAX_SIBLING_FOLDERS."""
        if path.parent in self.siblings_of:
            return self.siblings_of[path.parent]
        folder = Path(os.path.abspath(path.parent))  # not resolve(): paths keep the links the user gave
        if folder not in self.siblings:
            found: list[Path] = []
            try:
                with os.scandir(folder.parent) as entries:
                    for entry in entries:
                        if entry.name.startswith(".") or entry.name == folder.name or not _is_dir(entry):
                            continue
                        found.append(folder.parent / entry.name)
                        if len(found) > MAX_SIBLING_FOLDERS:  # not a collection: no need to read on
                            break
            except (OSError, ValueError):
                found = []
            self.siblings[folder] = sorted(found) if len(found) <= MAX_SIBLING_FOLDERS else None
        self.siblings_of[path.parent] = self.siblings[folder]
        return self.siblings[folder]


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------
# counterparts and the hints of a failure message


def _swapped_stems(stem: str, match: re.Match[str], other_affix: str) -> list[str]:
    stems: list[str] = []
    for variant in (other_affix, other_affix.lower(), other_affix.upper()):
        candidate = stem[: match.start()] + variant + stem[match.end() :]
        if candidate not in stems:
            stems.append(candidate)
    return stems


def _counterpart(
    path: Path, match: re.Match[str], other_affix: str, folders: _Folders, for_xp: bool
) -> tuple[Path | None, str | None]:
    """The file named like `path` with the affix swapped: beside it, else in the search path.
    Returns (file, None), or (None, why not) when it is found in several folders or is `path`
    itself under another name."""
    stems = _swapped_stems(path.stem, match, other_affix)
    found = folders.listing(path.parent).find(stems, path)
    if found is None:
        hits = [f for f in (folders.listing(d).find(stems, path) for d in folders.search_path(path, for_xp)) if f]
        if len(hits) > 1:
            listed = ", ".join(str(f) for f in hits)
            fix = "give the folder with --xp-dir or the file with --xp" if for_xp else "give the PP image as INPUT"
            return None, f"counterpart found in several folders ({listed}): {fix}"
        found = hits[0] if hits else None
    if found is not None and folders.identity(found) == folders.identity(path):
        return None, (
            f"counterpart {found} is this same file (a link to it, or the same file under two names): "
            "PP and XP must be two photographs"
        )
    return found, None


def _where_looked(path: Path, folders: _Folders, for_xp: bool) -> str:
    """Where the counterpart was expected: 'beside it', the --xp-dir folder, or why the folders
    beside its folder were not searched."""
    if for_xp and folders.xp_dir is not None:
        return f"beside it or in {folders.xp_dir}"
    if folders.search_path(path, for_xp):
        return "beside it"
    if folders.sibling_folders(path) is None:
        fix = "give the XP folder with --xp-dir" if for_xp else "give the PP image as INPUT"
        return f"beside it; the more than {MAX_SIBLING_FOLDERS} folders beside its folder are not searched: {fix}"
    return "beside it"


def _near_names(path: Path, match: re.Match[str], folders: _Folders, for_xp: bool) -> dict[str, Path]:
    """Image files named like `path` except for the token at `match` (beside it or in the search
    path), by that token: the counterparts a different affix option would find."""
    stem = path.stem
    prefix, suffix = stem[: match.start()], stem[match.end() :]
    hits: dict[str, Path] = {}
    for folder in [path.parent, *folders.search_path(path, for_xp)]:
        for token, candidate in folders.listing(folder).named_like(prefix, suffix):
            if token.lower() != match.group(0).lower():
                hits.setdefault(token, candidate)
    same_type = {token: c for token, c in hits.items() if c.suffix.lower() == path.suffix.lower()}
    # photographs of one collection share a file type; a mask or label file beside them does not
    return same_type if len(same_type) == 1 else hits


def _affix_suggestion(path: Path, match: re.Match[str], folders: _Folders, for_xp: bool) -> str:
    """'; found S1_PX.tif: use --xp-pattern PX' when a file differs from `path` in the affix's token
    only; '' when none does."""
    option = "--xp-pattern" if for_xp else "--pp-pattern"
    hits = _near_names(path, match, folders, for_xp)
    if len(hits) == 1:
        token, candidate = next(iter(hits.items()))
        return f"; found {_shown(candidate, path)}: use {option} {token}"
    if hits:
        return f"; found {_listed(hits, path)}: give the counterpart's affix with {option}"
    return ""


def _role_suggestion(path: Path, folders: _Folders) -> str:
    """For a name carrying neither affix ('2a_paralelos'): the affixes under which a file beside
    it or in the folders beside its folder ('xpl/2a_cruzados.jpg') would be its XP image, or ''."""
    tokens = list(_TOKEN.finditer(path.stem))
    if len(tokens) < 2:
        return ""
    last = tokens[-1]
    hits = _near_names(path, last, folders, True)
    if len(hits) == 1:
        token, candidate = next(iter(hits.items()))
        return f"; found {_shown(candidate, path)}: use --pp-pattern {last.group(0)} --xp-pattern {token}"
    if hits:
        return (
            f"; found {_listed(hits, path)}: if one is its XP image, use --pp-pattern {last.group(0)} "
            "--xp-pattern with that file's affix"
        )
    return ""


def _listed(hits: dict[str, Path], path: Path) -> str:
    shown = [_shown(c, path) for c in list(hits.values())[:4]]
    return ", ".join(shown) + (", ..." if len(hits) > 4 else "")


def _shown(candidate: Path, path: Path) -> str:
    """A counterpart's name as the user finds it: the name beside `path`, else folder/name."""
    return candidate.name if candidate.parent == path.parent else f"{candidate.parent.name}/{candidate.name}"


# ---------------------------------------------------------------------------------------------
# the public functions


def expand_inputs(inputs: Iterable[str | Path]) -> tuple[list[Path], list[PairingProblem]]:
    """Files as given, directories expanded (sorted, non-recursive); every input that cannot be
    read (missing, unreadable, a broken link, not a file or folder) reported on its own."""
    return _expand(inputs, _Folders())


def _expand(inputs: Iterable[str | Path], folders: _Folders) -> tuple[list[Path], list[PairingProblem]]:
    files: list[Path] = []
    problems: list[PairingProblem] = []
    for raw in inputs:
        path = Path(raw)
        info, problem = _stat(path)
        if info is None:
            problems.append(PairingProblem(path, problem or "file not found"))
        elif stat.S_ISDIR(info.st_mode):
            listing = folders.listing(path)
            if listing.error is not None:
                problems.append(PairingProblem(path, listing.error))
                continue
            problems.extend(PairingProblem(path / name, why) for name, why in listing.unusable)
            if not listing.names and not listing.unusable:
                problems.append(PairingProblem(path, "folder holds no PNG, JPEG, TIFF or netCDF files"))
            files.extend(listing.files())
        elif stat.S_ISREG(info.st_mode):
            files.append(path)
        else:
            problems.append(PairingProblem(path, "not a regular file or folder (a device, pipe or socket)"))
    return files, problems


def _xp_dir_problem(xp_dir: Path, folders: _Folders) -> str | None:
    """Why the --xp-dir folder cannot be searched, or None."""
    info, problem = _stat(xp_dir)
    if info is None and problem == "file not found":
        return "XP folder (--xp-dir) not found"
    if info is None:
        return f"XP folder (--xp-dir): {problem}"
    if not stat.S_ISDIR(info.st_mode):
        return "XP folder (--xp-dir) is a file, not a folder"
    error = folders.listing(xp_dir).error
    return f"XP folder (--xp-dir): {error}" if error is not None else None


def _unreadable(path: Path) -> str | None:
    """Why a listed file cannot be opened for reading, or None (checked before any section
    starts, so a batch reports it at once)."""
    return None if os.access(path, os.R_OK) else "cannot read: permission denied"


def pair_inputs(
    inputs: Sequence[str | Path],
    *,
    pp_pattern: str = "PP",
    xp_pattern: str | None = "XP",
    needs_xp: bool = True,
    xp: str | Path | None = None,
    xp_dir: str | Path | None = None,
) -> tuple[list[SectionInput], list[PairingProblem]]:
    """Group inputs into sections. Every file is used once: a counterpart found for one image
    is not processed again when the folder listing reaches it.

    `xp` pairs the single PP image input with this XP image whatever their names; `xp_dir` is
    the folder holding the XP images (instead of the folders beside the inputs' folder). Raises
    ThinSegError when the PP and XP affixes are the same; every other problem is per input."""
    check_affixes(pp_pattern, xp_pattern)
    folders = _Folders(xp_dir=Path(xp_dir) if xp_dir is not None else None)
    if xp is not None:
        return _explicit_pair(inputs, Path(xp), needs_xp, folders)
    files, problems = _expand(inputs, folders)
    if folders.xp_dir is not None:
        why = _xp_dir_problem(folders.xp_dir, folders)
        if why is not None:
            problems.append(PairingProblem(folders.xp_dir, why))
            return [], problems
    sections: list[SectionInput] = []
    used: set[_Identity] = set()
    for path in files:
        key = folders.identity(path)
        if key in used:
            continue
        suffix = path.suffix.lower()
        if suffix in NETCDF_SUFFIXES:
            used.add(key)
            problem = _unreadable(path)
            if problem is not None:
                problems.append(PairingProblem(path, problem))
            else:
                sections.append(SectionInput(name=path.stem, netcdf=path))
            continue
        if suffix not in IMAGE_SUFFIXES:
            problems.append(
                PairingProblem(path, f"unsupported file type '{path.suffix}' (PNG, JPEG, TIFF or netCDF expected)")
            )
            continue
        section, pairing_problem = _pair_image(path, pp_pattern, xp_pattern, needs_xp, folders)
        if pairing_problem is not None:
            problems.append(pairing_problem)
            used.add(key)
            continue
        assert section is not None
        if section.xp is None and section.pp is not None and folders.identity(section.pp) != key:
            # an XP image stood for its PP image (PP-only model): once per PP image
            used.add(key)
            if folders.identity(section.pp) in used:
                continue
        members = [m for m in (section.pp, section.xp) if m is not None]
        for member in members:
            used.add(folders.identity(member))
        unreadable = next(((m, why) for m in members for why in [_unreadable(m)] if why is not None), None)
        if unreadable is not None:
            problems.append(PairingProblem(*unreadable))
            continue
        sections.append(section)
    return sections, problems


def _explicit_pair(
    inputs: Sequence[str | Path], xp: Path, needs_xp: bool, folders: _Folders
) -> tuple[list[SectionInput], list[PairingProblem]]:
    """One PP image given with its XP image: the input is PP, `xp` is XP, whatever their names."""
    files, problems = _expand(inputs, folders)
    if problems:
        return [], problems
    if len(files) != 1 or not _is_image(files[0]):
        what = f"{len(files)} files" if len(files) != 1 else f"a {files[0].suffix or 'suffix-less'} file"
        where = Path(inputs[0]) if len(inputs) == 1 else xp
        return [], [PairingProblem(where, f"--xp pairs one PP image (PNG, JPEG or TIFF) with XP; INPUT gave {what}")]
    pp = files[0]
    info, problem = _stat(xp)
    if info is None:
        why = "XP image file (--xp) not found" if problem == "file not found" else f"XP image file (--xp): {problem}"
        return [], [PairingProblem(xp, why)]
    if not stat.S_ISREG(info.st_mode):
        return [], [PairingProblem(xp, "XP image file (--xp) is not a regular file")]
    if not _is_image(xp):
        return [], [PairingProblem(xp, f"unsupported XP file type '{xp.suffix}' (PNG, JPEG or TIFF expected)")]
    if folders.identity(xp) == folders.identity(pp):
        return [], [PairingProblem(xp, "--xp names the PP image itself")]
    if not needs_xp:
        return [], [PairingProblem(xp, "this model takes the PP image only: leave out --xp")]
    for member in (pp, xp):
        unreadable = _unreadable(member)
        if unreadable is not None:
            return [], [PairingProblem(member, unreadable)]
    return [SectionInput(name=pp.stem, pp=pp, xp=xp)], []


def _pair_image(
    path: Path, pp_pattern: str, xp_pattern: str | None, needs_xp: bool, folders: _Folders
) -> tuple[SectionInput | None, PairingProblem | None]:
    stem = path.stem
    pp_match = find_affix(stem, pp_pattern)
    xp_match = find_affix(stem, xp_pattern)
    if pp_match is not None and (xp_match is None or pp_match.start() >= xp_match.start()):
        pp_path, match = path, pp_match
        if not needs_xp:
            return SectionInput(name=stem, pp=pp_path), None
        if not xp_pattern:
            return None, PairingProblem(
                path, "this model needs an XP image: give --xp-pattern so the counterpart can be found"
            )
        xp_path, why = _counterpart(path, match, xp_pattern, folders, True)
        if why is not None:
            return None, PairingProblem(path, f"XP {why}")
        if xp_path is None:
            expected = stem[: match.start()] + xp_pattern + stem[match.end() :]
            where = _where_looked(path, folders, True)
            hint = _affix_suggestion(path, match, folders, True)
            return None, PairingProblem(
                path, f"XP counterpart not found (expected {expected}{path.suffix} {where}){hint}"
            )
        return SectionInput(name=stem, pp=pp_path, xp=xp_path), None
    if xp_match is not None:
        # An XP image stands for its section: its PP counterpart is found as XP's would be. A PP-only
        # model then segments that PP image alone (and a folder of pairs is no failure).
        pp_found, why = _counterpart(path, xp_match, pp_pattern, folders, False)
        if why is not None:
            return None, PairingProblem(path, f"PP {why}")
        if pp_found is None:
            expected = stem[: xp_match.start()] + pp_pattern + stem[xp_match.end() :]
            needs = "" if needs_xp else "; this PP-only model segments PP images"
            where = _where_looked(path, folders, False)
            hint = _affix_suggestion(path, xp_match, folders, False)
            return None, PairingProblem(
                path, f"PP counterpart not found (expected {expected}{path.suffix} {where}){hint}{needs}"
            )
        return SectionInput(name=pp_found.stem, pp=pp_found, xp=path if needs_xp else None), None
    if not needs_xp:
        return SectionInput(name=stem, pp=path), None
    return None, PairingProblem(
        path,
        f"cannot tell whether this is PP or XP: its name has neither affix '{pp_pattern}' nor '{xp_pattern}' "
        f"(see --pp-pattern/--xp-pattern){_role_suggestion(path, folders)}",
    )


def section_base_name(section: SectionInput, pp_pattern: str) -> str:
    """Name without the PP affix ('ABC_3200.5_pp' -> 'ABC_3200.5'), for derived variable names."""
    match = find_affix(section.name, pp_pattern)
    if match is None:
        return section.name
    base = _strip_separator(section.name[: match.start()]) + (
        "_" + _strip_separator(section.name[match.end() :]) if _strip_separator(section.name[match.end() :]) else ""
    )
    return base or section.name


def _strip_separator(text: str) -> str:
    return text.strip("_-. ")
