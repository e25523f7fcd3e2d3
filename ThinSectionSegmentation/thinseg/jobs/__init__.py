"""Registration and training jobs the Slicer panel runs in a child process.

`python -m thinseg.jobs TASK job.json` (TASK: register or train) runs one job folder and
reports on stdout with "@thinseg {json}" event lines; the Slicer logic can also call the same
functions in its own process. Nothing here imports Slicer, VTK or Qt.
"""

from thinseg.jobs.runner import (
    EVENT_PREFIX,
    TASKS,
    emit_stdout,
    landmark_pairs,
    run_register_job,
    run_train_job,
    train_config,
    write_transform,
)

__all__ = [
    "EVENT_PREFIX",
    "TASKS",
    "emit_stdout",
    "landmark_pairs",
    "run_register_job",
    "run_train_job",
    "train_config",
    "write_transform",
]
