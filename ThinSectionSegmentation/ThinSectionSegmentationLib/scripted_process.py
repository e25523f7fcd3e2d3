"""A job process that replays scripted events, for testing the panel and its job session.

The in-Slicer Test and the pytest suite both drive the panel's job handling without starting a
worker: this stands in for `process.BackgroundProcess` with the same methods (`JobProcess`).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from thinseg.errors import ThinSegError
from thinseg.jobs import ResultEvent


class ScriptedProcess:
    """Hands out one batch of events per poll and is finished after the last batch; `check`
    raises `error` (or "cancelled" after a cancel) instead of returning the result event."""

    def __init__(self, batches: Iterable[Sequence[object]], error: str | None = None, task: str = "segment") -> None:
        self.batches, self.error, self.task, self.cancelled = list(batches), error, task, False

    @property
    def finished(self) -> bool:
        return not self.batches

    def poll(self) -> list[object]:
        return list(self.batches.pop(0)) if self.batches else []

    def cancel(self, grace: float = 5.0, wait: bool = True) -> None:
        self.cancelled = True
        if wait:
            self.batches = []

    def check(self) -> ResultEvent:
        if self.cancelled:
            raise ThinSegError("cancelled")
        if self.error:
            raise ThinSegError(self.error)
        return ResultEvent(self.task, {})
