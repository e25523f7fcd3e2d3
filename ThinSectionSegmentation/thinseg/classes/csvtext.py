"""Small CSV tables written by people (class files, mapping tables): read whole, ',' or ';'."""

from __future__ import annotations

import os
from pathlib import Path

from thinseg.errors import ThinSegError


def read_table_text(path: str | os.PathLike[str], what: str) -> tuple[str, str]:
    """(text, delimiter) of a small CSV; `what` names it in the one-line error ("class file")."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ThinSegError(f"{what} cannot be read: {exc.strerror or exc}", path) from None
    # spreadsheets in comma-decimal locales write ';'
    return text, (";" if text.count(";") > text.count(",") else ",")
