"""`python -m thinseg.jobs TASK job.json`: run one registration or training job folder.

Exit status: 0 done (a final "done" event carries the summary), 2 a problem the user can fix
(one line "thinseg: error: ..." on stderr), 130 interrupted, 1 a bug (with its traceback).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from thinseg.errors import ThinSegError
from thinseg.jobs.runner import TASKS, emit_stdout


def main(argv: list[str] | None = None) -> int:
    """Run the job `argv` names ([TASK, JOB.json]); returns the exit status."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] not in TASKS:
        print(f"usage: python -m thinseg.jobs {{{','.join(TASKS)}}} JOB.json", file=sys.stderr)
        return 2
    job_file = Path(args[1])
    try:
        job = json.loads(job_file.read_text(encoding="utf-8"))
        summary = TASKS[args[0]](job, job_file.parent)
    except ThinSegError as error:
        print(f"thinseg: error: {error}", file=sys.stderr, flush=True)
        return 2
    except OSError as error:
        print(f"thinseg: error: {ThinSegError.from_os_error(error)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("thinseg: interrupted", file=sys.stderr, flush=True)
        return 130
    emit_stdout("done", summary=summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
