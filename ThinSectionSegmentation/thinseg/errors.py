"""One exception type for every problem a user can fix (bad file, bad option, bad model).

The CLI prints it as a single line and exits non-zero; anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations

import os
from pathlib import Path


class ThinSegError(Exception):
    """A user-facing error: `path` names the file at fault (if any), `problem` says what is wrong."""

    def __init__(self, problem: str, path: str | os.PathLike[str] | None = None) -> None:
        self.problem = problem
        self.path = Path(path) if path is not None else None
        super().__init__(f"{self.path}: {problem}" if self.path is not None else problem)

    @classmethod
    def from_os_error(
        cls, error: OSError, problem: str = "", path: str | os.PathLike[str] | None = None
    ) -> ThinSegError:
        """One line for a system error (a full disk, a vanished folder): `problem: strerror`,
        naming the file the system names, else `path`."""
        detail = error.strerror or str(error)
        return cls(f"{problem}: {detail}" if problem else detail, getattr(error, "filename", None) or path)
