"""What a job process tells the Slicer panel: typed events, one JSON line each on stdout.

A line is `@thinseg {"v": 1, "kind": "<kind>", ...fields}`. The worker writes them with
`emit_stdout(event)`; the panel's reader turns a line back into the same record with
`parse_event(line)`, which checks the schema version, the kind, that every field is known and
that each has its declared type, so the two sides cannot drift apart unnoticed. Output that is
not an event line (library warnings, a crash's traceback) is kept as plain text for the log;
nothing reads progress or errors out of it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

from thinseg.jsonio import dumps

#: Prefix of the event lines on stdout.
EVENT_PREFIX = "@thinseg "
#: Version of the event schema; a reader refuses lines of another version.
SCHEMA_VERSION = 1


class EventError(ValueError):
    """A line that starts like an event but is not a valid one (a bug, never a user's problem)."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_float(value: object) -> bool:
    return _is_int(value) or isinstance(value, float)


def _optional(check: Callable[[object], bool]) -> Callable[[object], bool]:
    return lambda value: value is None or check(value)


#: Checks for the field annotations the event records use (tests keep this list complete).
FIELD_CHECKS: dict[str, Callable[[object], bool]] = {
    "str": lambda value: isinstance(value, str),
    "bool": lambda value: isinstance(value, bool),
    "int": _is_int,
    "float": _is_float,
    "str | None": _optional(lambda value: isinstance(value, str)),
    "int | None": _optional(_is_int),
    "float | None": _optional(_is_float),
    "dict[str, Any]": lambda value: isinstance(value, dict) and all(isinstance(k, str) for k in value),
}


@dataclass(frozen=True)
class JobEvent:
    """Base of the event records: `kind` names the record in the JSON line."""

    kind: ClassVar[str] = ""

    def to_dict(self) -> dict[str, Any]:
        """The JSON object of the line: version, kind, then the fields."""
        return {"v": SCHEMA_VERSION, "kind": self.kind, **{f.name: getattr(self, f.name) for f in fields(self)}}

    def to_json(self) -> str:
        """Standard JSON (NaN and infinity as null)."""
        return dumps(self.to_dict())

    def to_line(self) -> str:
        """The stdout line, without its newline."""
        return EVENT_PREFIX + self.to_json()


@dataclass(frozen=True)
class ProgressEvent(JobEvent):
    """`done` of `total` steps of the work `name`, counted in `unit` ("tiles" of a section,
    "batches" of an epoch); `rate` in `rate_unit` (e.g. MPix/s); training adds its epoch."""

    kind: ClassVar[str] = "progress"
    name: str
    done: int
    total: int
    unit: str = ""
    rate: float | None = None
    rate_unit: str = ""
    epoch: int | None = None
    epochs: int | None = None

    @property
    def fraction(self) -> float:
        """The whole job's progress in 0..1 (earlier epochs counted in)."""
        part = min(1.0, self.done / self.total) if self.total > 0 else 0.0
        if self.epoch is not None and self.epochs:
            return min(1.0, (self.epoch - 1 + part) / self.epochs)
        return part


@dataclass(frozen=True)
class StageEvent(JobEvent):
    """The job moved on to a new step ("reading the images", "refining automatically")."""

    kind: ClassVar[str] = "stage"
    text: str


@dataclass(frozen=True)
class MessageEvent(JobEvent):
    """Something worth a line in the log (the device used, a resampling note)."""

    kind: ClassVar[str] = "message"
    text: str


@dataclass(frozen=True)
class WarningEvent(JobEvent):
    """The job goes on, but the result deserves a look (a poor fit, an XP moved onto PP)."""

    kind: ClassVar[str] = "warning"
    text: str


@dataclass(frozen=True)
class EpochEvent(JobEvent):
    """A finished training epoch: one point of the live curve. `loss` is None when no batch
    gave a finite loss; `val_mean_iou` is None without validation sections."""

    kind: ClassVar[str] = "epoch"
    epoch: int
    epochs: int
    loss: float | None
    val_mean_iou: float | None = None
    best: bool = False
    lr: float | None = None
    samples_per_s: float | None = None
    seconds: float | None = None


@dataclass(frozen=True)
class ResultEvent(JobEvent):
    """The job finished: its summary (also in the job folder's summary.json)."""

    kind: ClassVar[str] = "result"
    task: str
    summary: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ErrorEvent(JobEvent):
    """The job stopped: `message` is what the user reads (a ThinSegError's text: the file, then
    the problem); `detail` holds a bug's traceback, empty for problems the user can fix."""

    kind: ClassVar[str] = "error"
    message: str
    problem: str = ""
    path: str | None = None
    detail: str = ""


#: Every event record by its kind.
EVENT_TYPES: dict[str, type[JobEvent]] = {
    cls.kind: cls
    for cls in (ProgressEvent, StageEvent, MessageEvent, WarningEvent, EpochEvent, ResultEvent, ErrorEvent)
}


def event_from_dict(data: dict[str, Any]) -> JobEvent:
    """The record a decoded JSON object describes; EventError names what does not fit."""
    version = data.get("v")
    if version != SCHEMA_VERSION:
        raise EventError(f"event schema version {version!r}; this reader knows version {SCHEMA_VERSION}")
    kind = data.get("kind")
    cls = EVENT_TYPES.get(kind) if isinstance(kind, str) else None
    if cls is None:
        raise EventError(f"unknown event kind {kind!r}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known) - {"v", "kind"})
    if unknown:
        raise EventError(f"{kind} event: unknown field(s) {', '.join(unknown)}")
    values: dict[str, Any] = {}
    for name, spec in known.items():
        if name not in data:
            if spec.default is MISSING and spec.default_factory is MISSING:
                raise EventError(f"{kind} event: missing field {name}")
            continue
        value = data[name]
        if not FIELD_CHECKS[str(spec.type)](value):
            raise EventError(f"{kind} event: {name} must be {spec.type}, not {value!r}")
        values[name] = float(value) if str(spec.type).startswith("float") and value is not None else value
    return cls(**values)


def event_from_json(text: str) -> JobEvent:
    """The record of one JSON object (the part of a line after EVENT_PREFIX)."""
    try:
        data = json.loads(text)
    except ValueError as error:
        raise EventError(f"event line is not JSON: {error}") from None
    if not isinstance(data, dict):
        raise EventError("event line is not a JSON object")
    return event_from_dict(data)


def parse_event(line: str) -> JobEvent | None:
    """The event on `line`, or None when the line is plain output (not an event line): only a
    line starting with the whole EVENT_PREFIX, its space included, is an event ("@thinsegfoo"
    is output)."""
    text = line.strip()
    if not text.startswith(EVENT_PREFIX):
        return None
    return event_from_json(text[len(EVENT_PREFIX) :])


def finite_or_none(value: float | None) -> float | None:
    """A metric as an event carries it: NaN and infinity become None."""
    return float(value) if value is not None and math.isfinite(value) else None


#: A job's event sink.
Emit = Callable[[JobEvent], None]


def emit_stdout(event: JobEvent) -> None:
    """Write `event` as one line on stdout, flushed at once (the panel reads it while the job runs)."""
    print(event.to_line(), flush=True)


def emit_nothing(event: JobEvent) -> None:
    """An Emit for running a job in-process without anyone listening."""
