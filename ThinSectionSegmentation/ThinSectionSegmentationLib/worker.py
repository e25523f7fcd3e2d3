"""Run a registration or training job in its own process: `python worker.py TASK JOB.json`.

Started by the panel with Slicer's Python (see process.worker_command). It imports only the
core library (`thinseg` from the module folder on PYTHONPATH) and jobs.py next to it. Exit
status: 0 done, 2 a problem the user can fix (one line "thinseg: error: ..."), 130 interrupted,
1 a bug (with its traceback).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))  # the module folder: `import thinseg`
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import jobs  # noqa: E402  (a sibling module, imported by path so no Slicer package is needed)

TASKS = {"register": jobs.run_register_job, "train": jobs.run_train_job}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in TASKS:
        print(f"usage: worker.py {{{','.join(TASKS)}}} JOB.json", file=sys.stderr)
        return 2
    from thinseg.errors import ThinSegError

    job_file = Path(argv[1])
    try:
        job = json.loads(job_file.read_text(encoding="utf-8"))
        summary = TASKS[argv[0]](job, job_file.parent)
    except ThinSegError as error:
        print(f"thinseg: error: {error}", file=sys.stderr, flush=True)
        return 2
    except OSError as error:
        print(f"thinseg: error: {ThinSegError.from_os_error(error)}", file=sys.stderr, flush=True)
        return 2
    except KeyboardInterrupt:
        print("thinseg: interrupted", file=sys.stderr, flush=True)
        return 130
    jobs.emit_stdout("done", summary=summary)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
