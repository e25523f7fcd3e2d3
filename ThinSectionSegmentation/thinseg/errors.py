"""One exception type for every problem a user can fix (bad file, bad option, bad model).

The front ends print it as a single line and exit non-zero; any other exception is turned into
one too (`ThinSegError.from_exception`), its traceback printed only with THINSEG_DEBUG=1.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
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

    @classmethod
    def from_exception(cls, error: Exception, path: str | os.PathLike[str] | None = None) -> ThinSegError:
        """Any failure as one line naming a file: a ThinSegError as it is (given `path` when it
        names none), a system error by its reason, a lack of memory as such, anything else as
        `ExceptionType: message`. A batch reports a failed section with it and goes on."""
        if isinstance(error, ThinSegError):
            return error if error.path is not None or path is None else cls(error.problem, path)
        if isinstance(error, MemoryError) or _is_allocation_failure(error):
            return cls(f"not enough memory{_allocation(error)}: free memory, or give smaller inputs or tiles", path)
        if isinstance(error, OSError):
            return cls.from_os_error(error, path=path)
        detail = _one_line(error)
        return cls(f"{type(error).__name__}: {detail}" if detail else type(error).__name__, path)


@contextlib.contextmanager
def failures_named(path: str | os.PathLike[str] | None, doing: str = "") -> Iterator[None]:
    """Within the block any exception but a ThinSegError becomes one (`from_exception`) naming
    `path`, the file being worked on: one line that says where, whatever went wrong deep inside.
    `doing` ("cannot write the output") comes before the reason of a system error."""
    try:
        yield
    except ThinSegError:
        raise
    except OSError as error:
        raise ThinSegError.from_os_error(error, doing, path) from error
    except Exception as error:  # the boundary: one line for any failure
        raise ThinSegError.from_exception(error, path) from error


#: Environment variable that, set to 1, also prints the traceback of a failure.
DEBUG_VARIABLE = "THINSEG_DEBUG"


def debugging() -> bool:
    """Whether $THINSEG_DEBUG asks for tracebacks (any value but empty or 0)."""
    return os.environ.get(DEBUG_VARIABLE, "").strip() not in ("", "0")


def _is_allocation_failure(error: BaseException) -> bool:
    """torch reports a failed allocation as a RuntimeError (CPU) or OutOfMemoryError (GPU)."""
    text = str(error)
    return isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def _allocation(error: BaseException) -> str:
    """` (N MB asked for)` when the message says how much was asked for."""
    found = re.search(r"allocate (\d+) bytes", str(error))
    if found:
        return f" ({int(found.group(1)) / 2**20:,.0f} MB asked for)"
    found = re.search(r"allocate ([0-9.]+ [KMGT]i?B)", str(error))
    return f" ({found.group(1)} asked for)" if found else ""


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split())
