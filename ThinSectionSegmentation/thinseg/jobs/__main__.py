"""`python -m thinseg.jobs TASK job.json`: run one segmentation, registration or training job folder.

Everything the panel needs goes to stdout as event lines: progress while it runs, then a result
event (exit status 0) or an error event with the message the user reads (exit status 2 for a
problem the user can fix, a system error or a lack of memory; 1 for any other failure, whose
traceback the event carries as `detail` for the log). Interrupted (Cancel, SIGINT): exit status
130 and no event, the panel knows it asked. Terminated (SIGTERM, not asked by the panel): an
error event and exit status 143. Partial outputs are removed in every case. stderr gets one
human line per problem, for people running a job by hand (the traceback too with THINSEG_DEBUG=1).
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path
from typing import Any

from thinseg.allocator import retain_freed_memory
from thinseg.console import EXIT_INTERRUPTED, EXIT_TERMINATED, Terminated, printable_output, sigterm_as_interrupt
from thinseg.errors import ThinSegError, debugging
from thinseg.io.netcdf import end_process_if_files_left_open
from thinseg.jobs.events import ErrorEvent, ResultEvent, emit_stdout
from thinseg.jobs.runner import TASKS
from thinseg.jsonio import loads
from thinseg.limits import parse_max_pixels, section_pixel_limit

EXIT_OK, EXIT_BUG, EXIT_ERROR = 0, 1, 2
#: Tasks whose process keeps freed memory for reuse (thinseg.allocator): a training's steps
#: allocate the same tensors again and again.
RETAINS_FREED_MEMORY = frozenset({"train"})
__all__ = ["EXIT_BUG", "EXIT_ERROR", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_TERMINATED", "main"]


def _user_error(error: ThinSegError) -> int:
    path = str(error.path) if error.path is not None else None
    emit_stdout(ErrorEvent(str(error), problem=error.problem, path=path))
    print(f"thinseg: error: {error}", file=sys.stderr, flush=True)
    return EXIT_ERROR


def _failure(error: Exception) -> int:
    """Any other exception: one error event (its traceback as `detail`, for the log) and one line."""
    detail = "".join(traceback.format_exception(type(error), error, error.__traceback__))
    if isinstance(error, (MemoryError, OSError)):  # the machine, not the code: the user can act on it
        if debugging():
            print(detail, file=sys.stderr, flush=True)
        return _user_error(ThinSegError.from_exception(error))
    message = str(ThinSegError.from_exception(error))
    emit_stdout(ErrorEvent(message, detail=detail))
    if debugging():
        print(detail, file=sys.stderr, flush=True)
    print(f"thinseg: error: {message}", file=sys.stderr, flush=True)
    return EXIT_BUG


def _max_pixels(job: dict[str, Any], job_file: Path) -> int | None:
    """The job's section-size bound (`max_pixels`, as --max-pixels), if it gives one."""
    value = job.get("max_pixels")
    if value is None:
        return None
    if not isinstance(value, (int, float)):
        raise ThinSegError(f"'max_pixels' must be a number of pixels, not {value!r}", job_file)
    try:
        return parse_max_pixels(value, f"'max_pixels' {value!r}")
    except ThinSegError as error:
        raise ThinSegError(error.problem, job_file) from None


def main(argv: list[str] | None = None) -> int:
    """Run the job `argv` names ([TASK, JOB.json]); returns the exit status."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in TASKS:
        print(f"usage: python -m thinseg.jobs {{{','.join(TASKS)}}} JOB.json", file=sys.stderr)
        return EXIT_ERROR
    if argv is None and args[0] in RETAINS_FREED_MEMORY:  # only a process of its own may
        retain_freed_memory()
    with printable_output(), sigterm_as_interrupt():
        code = _run(args[0], Path(args[1]))
    if argv is None:  # the process's own run: HDF5 must not retry a failed close at exit
        end_process_if_files_left_open(code)
    return code


def _run(task: str, job_file: Path) -> int:
    try:
        try:
            job = loads(job_file.read_text(encoding="utf-8"))
        except ValueError as error:
            raise ThinSegError(f"not a job description: {error}", job_file) from None
        if not isinstance(job, dict):
            raise ThinSegError("not a job description: not a JSON object", job_file)
        with section_pixel_limit(_max_pixels(job, job_file)):
            summary = TASKS[task](job, job_file.parent)
    except ThinSegError as error:
        return _user_error(error)
    except Terminated:
        emit_stdout(ErrorEvent("terminated; no partial output was kept", problem="terminated"))
        print("thinseg: terminated; no partial output was kept", file=sys.stderr, flush=True)
        return EXIT_TERMINATED
    except KeyboardInterrupt:
        print("thinseg: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as error:  # every failure becomes one error event
        return _failure(error)
    emit_stdout(ResultEvent(task, summary))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
