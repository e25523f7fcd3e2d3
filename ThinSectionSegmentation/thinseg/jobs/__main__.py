"""`python -m thinseg.jobs TASK job.json`: run one segmentation, registration or training job folder.

Everything the panel needs goes to stdout as event lines: progress while it runs, then a result
event (exit status 0) or an error event with the message the user reads (exit status 2 for a
problem the user can fix, 1 for a bug, whose traceback also goes to stderr). Interrupted
(Cancel): exit status 130 and no event, the panel knows it asked. stderr gets one human line
per problem, for people running a job by hand.
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path

from thinseg.errors import ThinSegError
from thinseg.jobs.events import ErrorEvent, ResultEvent, emit_stdout
from thinseg.jobs.runner import TASKS

EXIT_OK, EXIT_BUG, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130


def _user_error(error: ThinSegError) -> int:
    path = str(error.path) if error.path is not None else None
    emit_stdout(ErrorEvent(str(error), problem=error.problem, path=path))
    print(f"thinseg: error: {error}", file=sys.stderr, flush=True)
    return EXIT_ERROR


def main(argv: list[str] | None = None) -> int:
    """Run the job `argv` names ([TASK, JOB.json]); returns the exit status."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in TASKS:
        print(f"usage: python -m thinseg.jobs {{{','.join(TASKS)}}} JOB.json", file=sys.stderr)
        return EXIT_ERROR
    task, job_file = args[0], Path(args[1])
    try:
        try:
            job = json.loads(job_file.read_text(encoding="utf-8"))
        except ValueError as error:
            raise ThinSegError(f"not a job description: {error}", job_file) from None
        summary = TASKS[task](job, job_file.parent)
    except ThinSegError as error:
        return _user_error(error)
    except OSError as error:
        return _user_error(ThinSegError.from_os_error(error))
    except KeyboardInterrupt:
        print("thinseg: interrupted", file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as error:  # a bug: the panel shows the message, the log keeps the traceback
        detail = traceback.format_exc()
        emit_stdout(ErrorEvent(f"{type(error).__name__}: {error}", detail=detail))
        print(detail, file=sys.stderr, flush=True)
        return EXIT_BUG
    emit_stdout(ResultEvent(task, summary))
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
