"""One background job as the panel follows it, from start to import (no Qt).

`JobSession` starts a prepared job through the logic, hands on what the process reports, keeps
the finished epochs for the live curve, and at the end either imports the result (the logic's
finishX) or reports the job's error; the job folder is always removed. `status_of` turns each
reported item into what the panel shows: the progress bar, the status line, a log line. The
panel adds only a QTimer that calls `poll()`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from thinseg.errors import ThinSegError
from thinseg.jobs import (
    EpochEvent,
    ErrorEvent,
    MessageEvent,
    ProgressEvent,
    ResultEvent,
    StageEvent,
    WarningEvent,
)

from .process import OutputLine, ProcessOutput
from .protocols import JobProcess, PanelLogic

Result = TypeVar("Result")


@dataclass(frozen=True)
class Status:
    """What one reported item changes on the panel: the progress bar (0..1), the status line,
    and a line for the log at `level` (a logging level)."""

    fraction: float | None = None
    text: str | None = None
    log: str | None = None
    level: int = logging.INFO


def status_of(item: ProcessOutput) -> Status:
    """The panel's view of an event or output line."""
    if isinstance(item, ProgressEvent):
        rate = f", {item.rate:.2f} {item.rate_unit}" if item.rate is not None and item.rate_unit else ""
        unit = f" {item.unit}" if item.unit else ""
        return Status(fraction=item.fraction, text=f"{item.name}: {item.done}/{item.total}{unit}{rate}")
    if isinstance(item, EpochEvent):
        loss = f"loss {item.loss:.4f}" if item.loss is not None else "no finite loss"
        iou = f", validation mean IoU {item.val_mean_iou:.3f}" if item.val_mean_iou is not None else ""
        best = " (best so far)" if item.best else ""
        text = f"Epoch {item.epoch}/{item.epochs}: {loss}{iou}{best}"
        return Status(fraction=item.epoch / item.epochs if item.epochs else None, text=text, log=text)
    if isinstance(item, StageEvent):
        return Status(text=item.text[:1].upper() + item.text[1:], log=item.text)
    if isinstance(item, WarningEvent):
        return Status(text=f"Warning: {item.text}", log=item.text, level=logging.WARNING)
    if isinstance(item, MessageEvent):
        return Status(log=item.text)
    if isinstance(item, ErrorEvent):
        return Status(log=item.detail or item.message, level=logging.ERROR)
    if isinstance(item, ResultEvent):
        return Status(fraction=1.0)
    if isinstance(item, OutputLine):
        return Status(log=item.text, level=logging.INFO if item.stream == "stdout" else logging.WARNING)
    return Status()


class JobSession(Generic[Result]):
    """A prepared job (logic.prepareX) run in the background and imported with `finish`
    (logic.finishX) when it succeeds."""

    def __init__(self, logic: PanelLogic, job: Any, finish: Callable[[Any], Result]) -> None:
        self.logic = logic
        self.job = job
        self.finish = finish
        self.process: JobProcess | None = None
        self.epochs: list[EpochEvent] = []

    @property
    def kind(self) -> str:
        return str(getattr(self.job, "kind", "job"))

    def start(self) -> JobSession[Result]:
        try:
            self.process = self.logic.startJob(self.job)
        except BaseException:
            self.logic.discardJob(self.job)
            raise
        return self

    @property
    def finished(self) -> bool:
        return self.process is not None and self.process.finished

    @property
    def cancelled(self) -> bool:
        return self.process is not None and self.process.cancelled

    def poll(self) -> list[ProcessOutput]:
        """What the job reported since the last call (epochs are also kept in `epochs`)."""
        if self.process is None:
            return []
        items = self.process.poll()
        self.epochs += [item for item in items if isinstance(item, EpochEvent)]
        return items

    def cancel(self, wait: bool = False, grace: float = 5.0) -> None:
        """Ask the job to stop; with wait=False this returns at once (poll until `finished`)."""
        if self.process is not None:
            self.process.cancel(grace=grace, wait=wait)

    def stop(self, grace: float = 3.0) -> None:
        """Cancel, wait for the process to end and remove the job folder (the scene is closing)."""
        try:
            self.cancel(wait=True, grace=grace)
        finally:
            self.logic.discardJob(self.job)

    def complete(self) -> Result | None:
        """Once `finished`: the imported result, None if cancelled; ThinSegError with the job's
        message if it failed. The job folder is removed in every case."""
        if self.process is not None and not self.process.finished:
            raise ThinSegError("the job is still running")
        try:
            if self.process is None or self.process.cancelled:
                return None
            self.process.check()
            return self.finish(self.job)
        finally:
            self.logic.discardJob(self.job)
