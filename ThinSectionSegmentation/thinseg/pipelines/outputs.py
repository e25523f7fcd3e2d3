"""Output files of a run: safe names, and sets of files written all or nothing.

`thinseg evaluate`, `compare` and `prepare` write several files per run; either all of them
appear or none does, so a failed or interrupted run never leaves a half-written report that
looks complete. Without overwrite nothing existing is replaced, also when another run writes
the same files meanwhile: the later run is refused at commit and the earlier run's files stay.
Section names become file-name parts through `safe_file_name`, the one sanitiser the command
line and the Slicer logic share.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from thinseg.errors import ThinSegError
from thinseg.io.atomic import AtomicOutput, commit_unique, ensure_writable_dir, sweep_stale_temporaries


def safe_file_name(name: str) -> str:
    """A section name as a file-name part: letters, digits, '.', '-', '_' only."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "section"


def unique_names(names: Sequence[str]) -> list[str]:
    """File-name parts for `names`, made unique with _2, _3, ... (sections in different folders
    may share a stem)."""
    out: list[str] = []
    seen: set[str] = set()
    for name in names:
        base = safe_file_name(name)
        candidate, n = base, 2
        while candidate.lower() in seen:
            candidate, n = f"{base}_{n}", n + 1
        seen.add(candidate.lower())
        out.append(candidate)
    return out


class OutputSet:
    """Files of one run, written under temporary names and renamed together at the end.

    `check()` refuses, before any work, targets that exist (unless overwrite) and clears the
    temporaries of interrupted runs (`notes` says what it found); on any exception (Ctrl-C
    included) `discard()` removes every temporary and the targets stay as they were.
    """

    def __init__(self, folder: Path, overwrite: bool) -> None:
        self.folder = Path(folder)
        self.overwrite = overwrite
        self._outputs: dict[Path, AtomicOutput] = {}
        self.notes: list[str] = []

    def add(self, name: str) -> Path:
        """Reserve `folder/name`; returns the temporary path to write."""
        target = self.folder / name
        if target not in self._outputs:
            self._outputs[target] = AtomicOutput(target)
        return self._outputs[target].tmp

    def check(self) -> None:
        """Make sure the folder is writable and, unless overwrite, that no target exists yet."""
        ensure_writable_dir(self.folder)
        self.notes = sweep_stale_temporaries(self.folder).notes(self.folder)
        if self.overwrite:
            return
        taken = [p.name for p in self._outputs if p.exists() or p.is_symlink()]
        if taken:
            shown = ", ".join(taken[:4]) + (f" and {len(taken) - 4} more" if len(taken) > 4 else "")
            raise ThinSegError(f"output exists already ({shown}); use --overwrite or another --output", self.folder)

    def path(self, name: str) -> Path:
        """Where `name` ends up once committed."""
        return self.folder / name

    def commit(self) -> list[Path]:
        """Rename every written temporary onto its target (reserved files never written are
        dropped). Without overwrite, a target another run made meanwhile refuses the whole set
        (ThinSegError, nothing of this run kept) rather than replacing it."""
        written = [output for output in self._outputs.values() if output.tmp.exists()]
        for output in self._outputs.values():
            if output not in written:
                output.discard()
        if self.overwrite:
            return [output.commit() for output in written]
        if not written:
            return []
        return commit_unique(written, lambda _n: [output.path for output in written], tries=1)

    def discard(self) -> None:
        """Remove every temporary; the targets stay as they were."""
        for output in self._outputs.values():
            output.discard()
