"""Turn the command line's INPUT list into sections: PP/XP image pairs or netCDF files.

A thin section's PP and XP photographs share a name and differ by an affix (`_pp`/`_xp`,
`_PP`/`_PX`, `_c1`/`_c2`, `_paralelos`/`_cruzados` ...). The affix decides the role; the
counterpart is the same name with the other affix, looked for in this order:

1. beside the file (the same folder);
2. in the folder given as `xp_dir` (`--xp-dir`), when one is given; otherwise
3. in the folders beside the file's folder (`ppl/` and `xpl/` of one collection), where it
   must be found in one folder only.

One PP image can also be given with its XP image explicitly (`--xp FILE`): then names decide nothing.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
NETCDF_SUFFIXES = (".nc", ".h5", ".hdf5")

#: A PP image's folder with more folders beside it than this is not part of a collection laid
#: out as ppl/, xpl/, masks/ ...: its counterpart is then looked for beside it (or in --xp-dir) only.
MAX_SIBLING_FOLDERS = 8

#: Characters that separate a file name's tokens ("ABC_3200.5-PP" -> ABC, 3200, 5, PP).
_TOKEN = re.compile(r"[A-Za-z0-9]+")


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


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _image_files_in(directory: Path) -> list[Path]:
    return sorted(
        p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES + NETCDF_SUFFIXES
    )


@dataclass
class _Folders:
    """Folder listings read once per pairing run (a folder of N pairs is listed once, not N times)."""

    xp_dir: Path | None = None
    files: dict[Path, dict[str, Path]] = field(default_factory=dict)
    siblings: dict[Path, list[Path] | None] = field(default_factory=dict)

    def images(self, folder: Path) -> dict[str, Path]:
        """Image files of a folder by name (an unreadable folder holds none)."""
        if folder not in self.files:
            try:
                self.files[folder] = {p.name: p for p in folder.iterdir() if p.is_file() and _is_image(p)}
            except OSError:
                self.files[folder] = {}
        return self.files[folder]

    def search_path(self, path: Path, for_xp: bool) -> list[Path]:
        """Where a counterpart of `path` is looked for, beyond its own folder: for an XP image
        `xp_dir` when given, else the folders beside the file's folder (sorted), if they are few
        enough to be one collection's (a home or temp folder's dozens of folders are not searched)."""
        if for_xp and self.xp_dir is not None:
            return [self.xp_dir]
        return self.sibling_folders(path) or []

    def sibling_folders(self, path: Path) -> list[Path] | None:
        """The folders beside `path`'s folder; None when there are more than MAX_SIBLING_FOLDERS."""
        folder = Path(os.path.abspath(path.parent))  # not resolve(): paths keep the links the user gave
        if folder not in self.siblings:
            try:
                found = sorted(
                    p for p in folder.parent.iterdir() if p.is_dir() and p != folder and not p.name.startswith(".")
                )
            except OSError:
                found = []
            self.siblings[folder] = found if len(found) <= MAX_SIBLING_FOLDERS else None
        return self.siblings[folder]


def _in_folder(files: dict[str, Path], wanted_stems: Sequence[str], path: Path) -> Path | None:
    """The file among `files` with one of the stems, any image extension: exact case first."""
    exts = [path.suffix] + [e for e in IMAGE_SUFFIXES if e != path.suffix.lower()]
    for wanted in wanted_stems:
        for ext in exts:
            for variant in (ext, ext.upper()):
                if wanted + variant in files:
                    return files[wanted + variant]
    lowered = {name.lower(): p for name, p in files.items()}
    for wanted in wanted_stems:
        for ext in IMAGE_SUFFIXES:
            if (wanted + ext).lower() in lowered:
                return lowered[(wanted + ext).lower()]
    return None


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
    Returns (file, None), or (None, why not) when it is found in several folders."""
    stems = _swapped_stems(path.stem, match, other_affix)
    beside = _in_folder(folders.images(path.parent), stems, path)
    if beside is not None and beside.resolve() != path.resolve():
        return beside, None
    found = [f for f in (_in_folder(folders.images(d), stems, path) for d in folders.search_path(path, for_xp)) if f]
    if len(found) > 1:
        listed = ", ".join(str(f) for f in found)
        fix = "give the folder with --xp-dir or the file with --xp" if for_xp else "give the PP image as INPUT"
        return None, f"counterpart found in several folders ({listed}): {fix}"
    return (found[0], None) if found else (None, None)


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
    pattern = re.compile(
        re.escape(stem[: match.start()]) + r"([A-Za-z0-9]+)" + re.escape(stem[match.end() :]) + r"$", re.IGNORECASE
    )
    hits: dict[str, Path] = {}
    for folder in [path.parent, *folders.search_path(path, for_xp)]:
        for candidate in sorted(folders.images(folder).values()):
            found = pattern.match(candidate.stem)
            if found is not None and found.group(1).lower() != match.group(0).lower():
                hits.setdefault(found.group(1), candidate)
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


def expand_inputs(inputs: Iterable[str | Path]) -> tuple[list[Path], list[PairingProblem]]:
    """Files as given, directories expanded (sorted, non-recursive); missing paths reported."""
    files: list[Path] = []
    problems: list[PairingProblem] = []
    for raw in inputs:
        path = Path(raw)
        if path.is_dir():
            found = _image_files_in(path)
            if not found:
                problems.append(PairingProblem(path, "folder holds no PNG, JPEG, TIFF or netCDF files"))
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            problems.append(PairingProblem(path, "file not found"))
    return files, problems


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
    the folder holding the XP images (instead of the folders beside the inputs' folder)."""
    if xp is not None:
        return _explicit_pair(inputs, Path(xp), needs_xp)
    files, problems = expand_inputs(inputs)
    folders = _Folders(xp_dir=Path(xp_dir) if xp_dir is not None else None)
    if folders.xp_dir is not None and not folders.xp_dir.is_dir():
        problems.append(PairingProblem(folders.xp_dir, "XP folder (--xp-dir) not found"))
        return [], problems
    sections: list[SectionInput] = []
    used: set[Path] = set()
    for path in files:
        key = path.resolve()
        if key in used:
            continue
        suffix = path.suffix.lower()
        if suffix in NETCDF_SUFFIXES:
            used.add(key)
            sections.append(SectionInput(name=path.stem, netcdf=path))
            continue
        if suffix not in IMAGE_SUFFIXES:
            problems.append(
                PairingProblem(path, f"unsupported file type '{path.suffix}' (PNG, JPEG, TIFF or netCDF expected)")
            )
            continue
        section, problem = _pair_image(path, pp_pattern, xp_pattern, needs_xp, folders)
        if problem is not None:
            problems.append(problem)
            used.add(key)
            continue
        assert section is not None
        if section.xp is None and section.pp is not None and section.pp.resolve() != key:
            # an XP image stood for its PP image (PP-only model): once per PP image
            used.add(key)
            if section.pp.resolve() in used:
                continue
        for member in (section.pp, section.xp):
            if member is not None:
                used.add(member.resolve())
        sections.append(section)
    return sections, problems


def _explicit_pair(
    inputs: Sequence[str | Path], xp: Path, needs_xp: bool
) -> tuple[list[SectionInput], list[PairingProblem]]:
    """One PP image given with its XP image: the input is PP, `xp` is XP, whatever their names."""
    files, problems = expand_inputs(inputs)
    if problems:
        return [], problems
    if len(files) != 1 or not _is_image(files[0]):
        what = f"{len(files)} files" if len(files) != 1 else f"a {files[0].suffix or 'suffix-less'} file"
        where = Path(inputs[0]) if len(inputs) == 1 else xp
        return [], [PairingProblem(where, f"--xp pairs one PP image (PNG, JPEG or TIFF) with XP; INPUT gave {what}")]
    pp = files[0]
    if not xp.is_file():
        return [], [PairingProblem(xp, "XP image file (--xp) not found")]
    if not _is_image(xp):
        return [], [PairingProblem(xp, f"unsupported XP file type '{xp.suffix}' (PNG, JPEG or TIFF expected)")]
    if xp.resolve() == pp.resolve():
        return [], [PairingProblem(xp, "--xp names the PP image itself")]
    if not needs_xp:
        return [], [PairingProblem(xp, "this model takes the PP image only: leave out --xp")]
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
