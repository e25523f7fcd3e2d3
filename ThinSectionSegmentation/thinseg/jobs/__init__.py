"""Segmentation, registration and training jobs the Slicer panel runs in a child process.

`python -m thinseg.jobs TASK job.json` (TASK: segment, register or train) runs one job folder
and reports on stdout with typed event lines (`thinseg.jobs.events`); the Slicer logic can also
call the same functions in its own process. Nothing here imports Slicer, VTK or Qt.
"""

from thinseg.jobs.events import (
    EVENT_PREFIX,
    EVENT_TYPES,
    SCHEMA_VERSION,
    Emit,
    EpochEvent,
    ErrorEvent,
    EventError,
    JobEvent,
    MessageEvent,
    ProgressEvent,
    ResultEvent,
    StageEvent,
    WarningEvent,
    emit_nothing,
    emit_stdout,
    parse_event,
)
from thinseg.jobs.runner import (
    TASKS,
    landmark_pairs,
    run_register_job,
    run_segment_job,
    run_train_job,
    train_config,
    write_transform,
)

__all__ = [
    "EVENT_PREFIX",
    "EVENT_TYPES",
    "SCHEMA_VERSION",
    "TASKS",
    "Emit",
    "EpochEvent",
    "ErrorEvent",
    "EventError",
    "JobEvent",
    "MessageEvent",
    "ProgressEvent",
    "ResultEvent",
    "StageEvent",
    "WarningEvent",
    "emit_nothing",
    "emit_stdout",
    "landmark_pairs",
    "parse_event",
    "run_register_job",
    "run_segment_job",
    "run_train_job",
    "train_config",
    "write_transform",
]
