"""The job events: one typed record per kind, written as a JSON line and read back into the same
record, with the schema version, kind, field names and field types checked; what the jobs emit
when run in-process; and how `python -m thinseg.jobs` ends (result or error event, exit status)."""

import json
import re
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
from helpers import make_bundle, section_images

from thinseg.io.netcdf import NetcdfWriter, read_labelmap
from thinseg.jobs import (
    EVENT_PREFIX,
    EVENT_TYPES,
    SCHEMA_VERSION,
    EpochEvent,
    ErrorEvent,
    EventError,
    MessageEvent,
    ProgressEvent,
    ResultEvent,
    StageEvent,
    WarningEvent,
    parse_event,
    run_segment_job,
)
from thinseg.jobs.__main__ import main
from thinseg.jobs.events import FIELD_CHECKS, event_from_dict

EXAMPLES = [
    ProgressEvent("S1", 5, 12, unit="tiles", rate=1.25, rate_unit="MPix/s"),
    ProgressEvent("epoch 2/5", 1, 2, unit="batches", epoch=2, epochs=5),
    StageEvent("refining automatically"),
    MessageEvent("model: tiny (/m)"),
    WarningEvent("XP was aligned to PP"),
    EpochEvent(2, 5, 2.7778, val_mean_iou=0.055, best=True, lr=1e-3, samples_per_s=2.8, seconds=4.5),
    ResultEvent("register", {"kind": "affine", "warnings": [], "metric_final": None}),
    ErrorEvent("/data/x.nc: no PP image", problem="no PP image", path="/data/x.nc"),
]


@pytest.mark.parametrize("event", EXAMPLES, ids=lambda e: e.kind)
def test_every_event_reads_back_as_the_same_record(event):
    line = event.to_line()
    assert line.startswith(EVENT_PREFIX) and "\n" not in line
    data = json.loads(line[len(EVENT_PREFIX) :])
    assert data["v"] == SCHEMA_VERSION and data["kind"] == event.kind
    assert parse_event(line) == event
    assert parse_event("  " + line + "\r\n") == event  # line ends and indentation do not matter


def test_the_kinds_and_field_types_are_complete():
    assert set(EVENT_TYPES) == {"progress", "stage", "message", "warning", "epoch", "result", "error"}
    assert {type(e) for e in EXAMPLES} == set(EVENT_TYPES.values())
    for cls in EVENT_TYPES.values():
        for spec in fields(cls):
            assert str(spec.type) in FIELD_CHECKS, f"{cls.__name__}.{spec.name}: no check for {spec.type}"


def test_not_finite_numbers_travel_as_null_and_come_back_as_none():
    line = EpochEvent(1, 2, float("nan"), val_mean_iou=float("inf")).to_line()
    assert '"loss": null' in line and "NaN" not in line and "Infinity" not in line
    back = parse_event(line)
    assert back.loss is None and back.val_mean_iou is None
    data = EpochEvent(1, 2, 0.5).to_dict()
    data["lr"] = 2  # a JSON integer where a float is declared
    assert event_from_dict(data).lr == 2.0 and isinstance(event_from_dict(data).lr, float)


def test_progress_fraction_counts_earlier_epochs_in():
    assert ProgressEvent("S1", 5, 10).fraction == 0.5
    assert ProgressEvent("epoch 2/5", 1, 2, epoch=2, epochs=5).fraction == pytest.approx(1.5 / 5)
    assert ProgressEvent("S1", 0, 0).fraction == 0.0


def test_plain_output_is_not_an_event():
    for text in ("", "model: tiny (/m)", "S1:  42%|####      | 5/12", "thinseg: error: x", '{"kind": "progress"}'):
        assert parse_event(text) is None
    # the prefix must be whole, its space included: a word that merely starts like it is output
    stage = StageEvent("x").to_json()
    for text in (
        "@thinseg",
        "@thinseg ",
        "@thinsegfoo",
        "@thinsegfoo " + stage,
        "@thinseg" + stage,
        "@thinseg:" + stage,
    ):
        assert parse_event(text) is None, text
    assert parse_event("@thinseg " + stage) == StageEvent("x")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"kind": "stage", "text": "x"}, "event schema version None; this reader knows version 1"),
        ({"v": 2, "kind": "stage", "text": "x"}, "event schema version 2; this reader knows version 1"),
        ({"v": 1, "kind": "progres", "name": "x"}, "unknown event kind 'progres'"),
        ({"v": 1, "kind": "progress", "name": "S1", "done": 1}, "progress event: missing field total"),
        (
            {"v": 1, "kind": "progress", "name": "S1", "done": "1", "total": 2},
            "progress event: done must be int, not '1'",
        ),
        (
            {"v": 1, "kind": "progress", "name": "S1", "done": True, "total": 2},
            "progress event: done must be int, not True",
        ),
        ({"v": 1, "kind": "epoch", "epoch": 1, "epochs": 2, "loss": "low"}, "epoch event: loss must be float | None"),
        ({"v": 1, "kind": "stage", "text": "x", "colour": "red"}, "stage event: unknown field(s) colour"),
        ({"v": 1, "kind": "result", "task": "train", "summary": [1]}, "result event: summary must be dict[str, Any]"),
    ],
)
def test_invalid_events_say_what_is_wrong(data, message):
    with pytest.raises(EventError, match="^" + re.escape(message)):
        event_from_dict(data)
    with pytest.raises(EventError):
        parse_event(EVENT_PREFIX + json.dumps(data))


def test_broken_json_is_an_event_error():
    with pytest.raises(EventError, match="^event line is not JSON"):
        parse_event(EVENT_PREFIX + '{"v": 1, "kind": ')
    with pytest.raises(EventError, match="^event line is not a JSON object"):
        parse_event(EVENT_PREFIX + "[1, 2]")


# -- the jobs -------------------------------------------------------------------------------------


def write_section(path: Path, h: int = 64, w: int = 80) -> Path:
    pp, xp = section_images(h, w, seed=4)
    with NetcdfWriter(path) as writer:
        writer.add_rgb_image("S1_PP", pp, 0.00132)
        writer.add_rgb_image("S1_XP", xp, 0.00132)
    return path


def test_the_segmentation_job_reports_stage_progress_and_a_summary(tmp_path):
    model = make_bundle(tmp_path / "models" / "tiny", inputs=("PP", "PX"))
    write_section(tmp_path / "S1.nc")
    events = []
    job = {"inputs": ["S1.nc"], "output": "output.nc", "model_dir": str(model), "device": "cpu", "tile": 64}
    summary = run_segment_job(job, tmp_path, emit=events.append)
    start = events.index(StageEvent("segmenting S1"))
    assert events[0] == StageEvent("loading the model") and events[1].text == f"model: tiny-6ch ({model})"
    assert {e.kind for e in events[1:start]} == {"message"}  # the model, the device
    assert {e.kind for e in events[start + 1 :]} <= {"progress", "message"}
    bars = [e for e in events if isinstance(e, ProgressEvent)]
    assert bars[0].done <= bars[-1].done == bars[-1].total and bars[-1].rate > 0
    labels, table, _mm, _origin = read_labelmap(tmp_path / "output.nc", "S1_Segmentation")
    counts = np.bincount(labels.ravel(), minlength=len(table) + 1)[1:]
    (section,) = summary["sections"]
    assert section["section"] == "S1" and section["tiles"] == bars[-1].total
    assert [section["percent"][n] for n in table.names] == pytest.approx(list(100 * counts / counts.sum()))
    assert json.loads((tmp_path / "summary.json").read_text()) == json.loads(json.dumps(summary))


def test_the_job_runner_ends_with_a_result_or_an_error_event(tmp_path, capsys):
    model = make_bundle(tmp_path / "models" / "tiny", inputs=("PP", "PX"))
    write_section(tmp_path / "S1.nc")
    good = tmp_path / "job.json"
    good.write_text(json.dumps({"inputs": ["S1.nc"], "output": "out.nc", "model_dir": str(model), "device": "cpu"}))
    assert main(["segment", str(good)]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith(EVENT_PREFIX)]
    last = parse_event(lines[-1])
    assert isinstance(last, ResultEvent) and last.task == "segment" and last.summary["output"] == "out.nc"

    # a problem the user can fix: an error event with the core's message, exit status 2
    missing = tmp_path / "missing.json"
    missing.write_text(json.dumps({"inputs": ["nope.nc"], "output": "o.nc", "model_dir": str(model)}))
    assert main(["segment", str(missing)]) == 2
    out, err = capsys.readouterr()
    error = parse_event(out.splitlines()[-1])
    assert isinstance(error, ErrorEvent) and error.path == str(tmp_path / "nope.nc") and error.detail == ""
    assert error.message == f"{tmp_path / 'nope.nc'}: {error.problem}" and error.problem == "file not found"
    assert err.strip() == f"thinseg: error: {error.message}"

    # a bug (here: a job description without its inputs): the message, and the traceback for the log
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"output": "o.nc"}))
    assert main(["segment", str(broken)]) == 1
    out, err = capsys.readouterr()
    bug = parse_event(out.splitlines()[-1])
    assert bug.message == "KeyError: 'inputs'" and bug.detail.startswith("Traceback") and "KeyError" in err

    not_json = tmp_path / "not.json"
    not_json.write_text("{")
    assert main(["register", str(not_json)]) == 2
    error = parse_event(capsys.readouterr().out.splitlines()[-1])
    assert error.path == str(not_json) and error.problem.startswith("not a job description")
    assert main(["evaluate", str(good)]) == 2 and "usage:" in capsys.readouterr().err
