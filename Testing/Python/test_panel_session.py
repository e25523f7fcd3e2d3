"""What the panel does with a background job, without Qt: JobSession (start, poll, import or
report, always remove the job folder) on a fake logic and on the real one with a real process,
status_of (what each event shows), and the PanelLogic protocol the panel is written against,
which the real logic must match method for method."""

import inspect
import logging
import sys
import time

import pytest
import slicer
from helpers import make_bundle, section_images

from ThinSectionSegmentationLib import ThinSectionSegmentationLogic, process, volumes
from ThinSectionSegmentationLib.protocols import JobProcess, PanelLogic
from ThinSectionSegmentationLib.scripted_process import ScriptedProcess
from ThinSectionSegmentationLib.session import JobSession, Status, status_of
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


class FakeLogic:
    """Records what the session asks of the logic."""

    def __init__(self, process):
        self.process, self.calls = process, []

    def startJob(self, job):
        self.calls.append(("start", job))
        if isinstance(self.process, Exception):
            raise self.process
        return self.process

    def discardJob(self, job):
        self.calls.append(("discard", job))


def drain(session):
    items = []
    while not session.finished:
        items += session.poll()
    return items


def test_a_finished_job_is_imported_and_its_folder_removed():
    epoch = EpochEvent(1, 2, 0.5, val_mean_iou=0.4, best=True)
    fake = FakeLogic(ScriptedProcess([[ProgressEvent("epoch 1/2", 1, 2)], [epoch], [ResultEvent("train", {})]]))
    imported = []
    session = JobSession(fake, "job", lambda job: imported.append(job) or "model folder").start()
    assert session.poll() == [ProgressEvent("epoch 1/2", 1, 2)] and not session.finished
    with pytest.raises(ThinSegError, match="still running"):
        session.complete()
    assert fake.calls == [("start", "job")]  # a running job keeps its folder
    drain(session)
    assert session.epochs == [epoch]
    assert session.complete() == "model folder"
    assert imported == ["job"] and fake.calls == [("start", "job"), ("discard", "job")]


def test_a_failed_job_reports_its_message_imports_nothing_and_removes_its_folder():
    fake = FakeLogic(ScriptedProcess([[ErrorEvent("S1.nc: no PP image")]], error="S1.nc: no PP image"))
    session = JobSession(fake, "job", lambda job: pytest.fail("nothing may be imported")).start()
    drain(session)
    with pytest.raises(ThinSegError, match="^S1.nc: no PP image$"):
        session.complete()
    assert fake.calls[-1] == ("discard", "job")


def test_cancel_and_stop_import_nothing_and_remove_the_folder():
    fake = FakeLogic(ScriptedProcess([[StageEvent("x")], [StageEvent("y")]]))
    session = JobSession(fake, "job", lambda job: pytest.fail("nothing may be imported")).start()
    session.cancel(wait=False)
    assert session.cancelled and not session.finished
    drain(session)
    assert session.complete() is None and fake.calls[-1] == ("discard", "job")
    closing = FakeLogic(ScriptedProcess([[StageEvent("x")]]))
    JobSession(closing, "job", lambda job: pytest.fail("nothing may be imported")).start().stop()
    assert closing.process.cancelled and closing.calls == [("start", "job"), ("discard", "job")]
    failing = FakeLogic(ThinSegError("cannot start PythonSlicer: not found"))
    with pytest.raises(ThinSegError, match="cannot start"):
        JobSession(failing, "job", lambda job: None).start()
    assert failing.calls == [("start", "job"), ("discard", "job")]


def test_each_event_shows_as_the_panel_expects():
    tiles = ProgressEvent("S1", 5, 12, unit="tiles", rate=1.254, rate_unit="MPix/s")
    assert status_of(tiles) == Status(fraction=5 / 12, text="S1: 5/12 tiles, 1.25 MPix/s")
    batches = ProgressEvent("epoch 2/5", 1, 2, unit="batches", epoch=2, epochs=5)
    assert status_of(batches) == Status(fraction=0.3, text="epoch 2/5: 1/2 batches")
    epoch = status_of(EpochEvent(2, 5, 2.77781, val_mean_iou=0.05504, best=True))
    assert epoch.text == "Epoch 2/5: loss 2.7778, validation mean IoU 0.055 (best so far)" == epoch.log
    assert epoch.fraction == 0.4
    assert status_of(EpochEvent(1, 5, None)).text == "Epoch 1/5: no finite loss"
    assert status_of(StageEvent("refining automatically")) == Status(
        text="Refining automatically", log="refining automatically"
    )
    warning = status_of(WarningEvent("XP was aligned to PP"))
    assert warning.text == "Warning: XP was aligned to PP" and warning.level == logging.WARNING
    assert status_of(MessageEvent("model: tiny")) == Status(log="model: tiny")
    bug = status_of(ErrorEvent("KeyError: 'x'", detail="Traceback ..."))
    assert bug == Status(log="Traceback ...", level=logging.ERROR) and bug.text is None  # the dialog shows it
    assert status_of(ResultEvent("train", {})) == Status(fraction=1.0)
    assert status_of(process.OutputLine("stderr", "UserWarning: x")) == Status(
        log="UserWarning: x", level=logging.WARNING
    )


def test_a_real_segmentation_through_the_session(tmp_path):
    scene = slicer.vtkMRMLScene()
    model = make_bundle(tmp_path / "ThinSectionEnv" / "tiny", inputs=("PP", "PX"))
    pp_rgb, xp_rgb = section_images(64, 96)
    pp = volumes.create_rgb_volume(scene, "S1_PP", pp_rgb, 0.00132)
    xp = volumes.create_rgb_volume(scene, "S1_XP", xp_rgb, 0.00132)
    logic = ThinSectionSegmentationLogic(scene)
    job = logic.prepareSegmentation(pp, xp, model, device="cpu", python=sys.executable)
    session = JobSession(logic, job, logic.finishSegmentation).start()
    seen = []
    deadline = time.monotonic() + 120
    while not session.finished and time.monotonic() < deadline:
        seen += [status_of(item) for item in session.poll()]
        time.sleep(0.02)
    output = session.complete()
    assert not job.folder.exists()
    assert output.labelmap.GetName() == "S1_Segmentation"
    assert seen[-1] == Status(fraction=1.0)  # the result event
    assert "Segmenting S1" in [s.text for s in seen]


def _parameters(function):
    return [p for p in inspect.signature(function).parameters.values() if p.name != "self"]


@pytest.mark.parametrize(
    ("protocol", "real"),
    [(PanelLogic, ThinSectionSegmentationLogic), (JobProcess, process.BackgroundProcess)],
    ids=["logic", "process"],
)
def test_the_real_classes_match_the_protocols_the_panel_uses(protocol, real):
    wanted = [name for name in vars(protocol) if not name.startswith("_")]
    assert wanted, "the protocol lists nothing?"
    for name in wanted:
        assert hasattr(real, name), f"{real.__name__} has no {name}"
        expected = getattr(protocol, name)
        if isinstance(expected, property) or not callable(expected):
            continue
        have = {p.name: p for p in _parameters(getattr(real, name))}
        for parameter in _parameters(expected):
            assert parameter.name in have, f"{real.__name__}.{name} has no parameter {parameter.name}"
            if parameter.default is not inspect.Parameter.empty:
                assert have[parameter.name].default == parameter.default, f"{real.__name__}.{name}({parameter.name})"


def test_a_background_process_has_the_attributes_the_protocol_declares():
    instance = process.BackgroundProcess([sys.executable, "-c", "pass"])
    assert set(JobProcess.__annotations__) == {"cancelled"}
    assert instance.cancelled is False and instance.finished is False
