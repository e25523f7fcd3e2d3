"""Turn the command line's INPUT list into sections: PP/XP image pairs or netCDF files.

A thin section's PP and XP photographs share a name and differ by an affix (`_pp`/`_xp`,
`_PP`/`_PX`, `_c1`/`_c2` ...). Pairing follows the usual lab convention: the affix decides the role, and
the counterpart is the same name with the other affix, in the same folder.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff")
NETCDF_SUFFIXES = (".nc", ".h5", ".hdf5")


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


def _image_files_in(directory: Path) -> list[Path]:
    return sorted(
        p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES + NETCDF_SUFFIXES
    )


def _counterpart(path: Path, match: re.Match[str], other_affix: str) -> Path | None:
    """Same folder, same stem with the affix swapped, any image extension; exact case first."""
    stem = path.stem
    wanted_stems = []
    for variant in (other_affix, other_affix.lower(), other_affix.upper()):
        candidate = stem[: match.start()] + variant + stem[match.end() :]
        if candidate not in wanted_stems:
            wanted_stems.append(candidate)
    siblings = {p.name: p for p in path.parent.iterdir() if p.is_file()}
    exts = [path.suffix] + [e for e in IMAGE_SUFFIXES if e != path.suffix.lower()]
    for wanted in wanted_stems:
        for ext in exts:
            for variant in (ext, ext.upper()):
                if wanted + variant in siblings:
                    return siblings[wanted + variant]
    lowered = {name.lower(): p for name, p in siblings.items()}
    for wanted in wanted_stems:
        for ext in IMAGE_SUFFIXES:
            if (wanted + ext).lower() in lowered:
                return lowered[(wanted + ext).lower()]
    return None


def _strip_separator(text: str) -> str:
    return text.strip("_-. ")


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
) -> tuple[list[SectionInput], list[PairingProblem]]:
    """Group inputs into sections. Every file is used once: a counterpart found for one image
    is not processed again when the folder listing reaches it."""
    files, problems = expand_inputs(inputs)
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
        section, problem = _pair_image(path, pp_pattern, xp_pattern, needs_xp)
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


def _pair_image(
    path: Path, pp_pattern: str, xp_pattern: str | None, needs_xp: bool
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
        xp_path = _counterpart(path, match, xp_pattern)
        if xp_path is None:
            expected = stem[: match.start()] + xp_pattern + stem[match.end() :]
            return None, PairingProblem(path, f"XP counterpart not found (expected {expected}{path.suffix} beside it)")
        return SectionInput(name=stem, pp=pp_path, xp=xp_path), None
    if xp_match is not None:
        # An XP image stands for its section: its PP counterpart is found beside it. A PP-only
        # model then segments that PP image alone (and a folder of pairs is no failure).
        pp_found = _counterpart(path, xp_match, pp_pattern)
        if pp_found is None:
            expected = stem[: xp_match.start()] + pp_pattern + stem[xp_match.end() :]
            needs = "" if needs_xp else "; this PP-only model segments PP images"
            return None, PairingProblem(
                path, f"PP counterpart not found (expected {expected}{path.suffix} beside it){needs}"
            )
        return SectionInput(name=pp_found.stem, pp=pp_found, xp=path if needs_xp else None), None
    if not needs_xp:
        return SectionInput(name=stem, pp=path), None
    return None, PairingProblem(
        path,
        f"cannot tell whether this is PP or XP: its name has neither affix '{pp_pattern}' nor '{xp_pattern}' "
        "(see --pp-pattern/--xp-pattern)",
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
