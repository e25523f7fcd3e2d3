"""The panel's background path without Qt: the job command line, real `python -m thinseg.jobs`
processes started from scene nodes (typed progress events, result import, cancel, errors as
error events), and what happens when a process dies without saying why. Nothing reads progress
or errors out of output text: other output comes back as plain lines for the log."""

import json
import os
import sys
import time

import numpy as np
import pytest
import slicer
from helpers import make_bundle, section_images

from ThinSectionSegmentationLib import ThinSectionSegmentationLogic, labelmaps, process, volumes
from thinseg.errors import ThinSegError
from thinseg.jobs import ErrorEvent, MessageEvent, ProgressEvent, ResultEvent, StageEvent

MM = 0.00132


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("models") / "ThinSectionEnv" / "tiny", inputs=("PP", "PX"))


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


def pair(scene, h, w, name="S1"):
    pp, xp = section_images(h, w, seed=5)
    return (
        volumes.create_rgb_volume(scene, f"{name}_PP", pp, MM),
        volumes.create_rgb_volume(scene, f"{name}_XP", xp, MM),
    )


def python_process(code: str) -> process.BackgroundProcess:
    """A child Python running `code` (for the ways a process can end)."""
    return process.BackgroundProcess([sys.executable, "-c", code]).start()


# -- commands -----------------------------------------------------------------------------------


def test_commands_run_the_job_runner_with_the_module_on_the_path(tmp_path):
    for task in ("segment", "register", "train"):
        cmd = process.worker_command(task, tmp_path / "job.json", python="/slicer/bin/PythonSlicer")
        assert cmd == ["/slicer/bin/PythonSlicer", "-m", "thinseg.jobs", task, str(tmp_path / "job.json")]
    with pytest.raises(ValueError, match="unknown worker task 'evaluate'"):
        process.worker_command("evaluate", tmp_path / "job.json")
    env = process.process_environment({"PYTHONPATH": "/other"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(process.MODULE_DIR), "/other"]
    assert env["PYTHONUNBUFFERED"] == "1"
    assert process.python_executable() == sys.executable  # outside Slicer


# -- real jobs ----------------------------------------------------------------------------------


def test_background_segmentation_reports_typed_progress_and_imports_the_same_result(scene, model_dir):
    pp, xp = pair(scene, 96, 128)
    logic = ThinSectionSegmentationLogic(scene)
    job = logic.prepareSegmentation(pp, xp, model_dir, device="cpu", confidence=True, python=sys.executable, tile=64)
    spec = json.loads((job.folder / "job.json").read_text())
    assert job.command == [sys.executable, "-m", "thinseg.jobs", "segment", str(job.folder / "job.json")]
    assert spec["inputs"] == ["S1.nc"] and spec["probabilities"] is True and spec["tile"] == 64
    before = scene.GetNumberOfNodes()
    try:
        proc = logic.startJob(job)
        received = proc.wait(timeout=120)
        assert scene.GetNumberOfNodes() == before  # nothing changes until the result is imported
        result = proc.check()
        events = [item for item in received if not isinstance(item, process.OutputLine)]
        bars = [e for e in events if isinstance(e, ProgressEvent)]
        assert bars and all(b.name == "S1" and b.unit == "tiles" and b.rate_unit == "MPix/s" for b in bars)
        assert bars[-1].done == bars[-1].total and bars[-1].fraction == 1.0 and bars[-1].rate > 0
        assert StageEvent("segmenting S1") in events
        assert any(isinstance(e, MessageEvent) and e.text.startswith("model: ") for e in events)
        assert events[-1] == result and isinstance(result, ResultEvent) and result.task == "segment"
        assert result.summary["sections"][0]["section"] == "S1"
        output = logic.finishSegmentation(job)
    finally:
        logic.discardJob(job)
    assert not job.folder.exists()
    assert output.labelmap.GetName() == "S1_Segmentation" and output.confidence is not None
    labels = volumes.label_array(output.labelmap)
    table = labelmaps.labelmap_class_table(output.labelmap)
    counts = np.bincount(labels.ravel(), minlength=len(table) + 1)[1:]
    percent = result.summary["sections"][0]["percent"]  # the result event's fractions are the labelmap's
    assert [percent[name] for name in table.names] == pytest.approx(list(100 * counts / counts.sum()))
    # the separate process computes exactly what the in-process call does
    same = logic.segment(pp, xp, model_dir, device="cpu", show=False, tile=64)
    assert np.array_equal(labels, volumes.label_array(same.labelmap))
    assert labelmaps.labelmap_class_table(output.labelmap) == labelmaps.labelmap_class_table(same.labelmap)


def test_cancel_stops_the_process_and_leaves_no_output(scene):
    # the bundled model on small tiles: the tiles take seconds, so Cancel lands mid-run
    pp, xp = pair(scene, 2048, 2048, name="Big")  # ~2000 tiles: seconds even on a bf16 CPU
    logic = ThinSectionSegmentationLogic(scene)
    before = scene.GetNumberOfNodes()
    job = logic.prepareSegmentation(pp, xp, None, device="cpu", python=sys.executable, tile=64)
    try:
        proc = logic.startJob(job)
        deadline = time.monotonic() + 120
        seen = []
        while not proc.finished and time.monotonic() < deadline:
            seen += proc.poll()
            # cancel once the tiles move, as a person would press Cancel while the bar moves
            if any(isinstance(e, ProgressEvent) for e in seen):
                proc.cancel(grace=10, wait=False)  # what the Cancel button does: returns at once
            time.sleep(0.02)
        proc.wait(timeout=30)
        assert proc.cancelled and proc.returncode == 130  # interrupted, not killed
        assert proc.result is None and proc.error is None
        with pytest.raises(ThinSegError, match="cancelled"):
            proc.check()
        leftovers = sorted(p.name for p in job.folder.iterdir() if p.name not in ("Big.nc", "job.json"))
        assert leftovers == []  # no output.nc, no hidden partial file
    finally:
        logic.discardJob(job)
    assert scene.GetNumberOfNodes() == before


def test_a_failing_job_reports_the_core_message_as_an_error_event(scene):
    from thinseg.classes.files import default_class_table

    pp, xp = pair(scene, 64, 64)
    empty = labelmaps.create_labelmap(scene, "QEMSCAN", np.zeros((20, 20), np.uint8), default_class_table(), 0.01)
    logic = ThinSectionSegmentationLogic(scene)
    before = scene.GetNumberOfNodes()
    job = logic.prepareRegistration(pp, empty, None, refine=True, xpNode=xp, python=sys.executable)
    try:
        proc = logic.startJob(job)
        received = proc.wait(timeout=120)
        assert proc.returncode == 2
        assert proc.error == ErrorEvent(
            "the QEMSCAN map has no labelled pixel", problem="the QEMSCAN map has no labelled pixel"
        )
        assert proc.error in received
        with pytest.raises(ThinSegError) as info:
            proc.check()
        assert str(info.value) == "the QEMSCAN map has no labelled pixel"  # the core's words, no traceback
    finally:
        logic.discardJob(job)
    assert scene.GetNumberOfNodes() == before


def test_problems_are_found_before_any_process_starts(scene, model_dir, tmp_path):
    pp, _xp = pair(scene, 32, 32)
    small_xp = volumes.create_rgb_volume(scene, "S1_XP_small", np.zeros((16, 16, 3), np.uint8), MM)
    logic = ThinSectionSegmentationLogic(scene)
    with pytest.raises(ThinSegError, match="needs an XP image"):
        logic.prepareSegmentation(pp, None, model_dir)
    with pytest.raises(ThinSegError, match="must be the same size"):
        logic.prepareSegmentation(pp, small_xp, model_dir)
    with pytest.raises(ThinSegError, match="not a usable model folder"):
        logic.prepareSegmentation(pp, small_xp, tmp_path / "nowhere")
    with pytest.raises(ThinSegError, match="choose a PP image"):
        logic.prepareSegmentation(None, None, model_dir)


# -- how a process can end ------------------------------------------------------------------------


def test_output_text_is_never_read_as_progress_or_error():
    proc = python_process(
        "import sys\n"
        "print('S1:  42%|####      | 5/12 [00:01<00:01, 1.25 MPix/s]')\n"
        "print('thinseg: error: looks like an error', file=sys.stderr)\n"
        'print(\'@thinseg {"v": 1, "kind": "result", "task": "segment", "summary": {}}\')\n'
    )
    received = proc.wait(timeout=60)
    assert process.OutputLine("stdout", "S1:  42%|####      | 5/12 [00:01<00:01, 1.25 MPix/s]") in received
    assert process.OutputLine("stderr", "thinseg: error: looks like an error") in received
    assert not any(isinstance(item, (ProgressEvent, ErrorEvent)) for item in received)
    assert proc.check() == ResultEvent("segment", {})


def test_a_crash_without_an_error_event_is_explained_by_the_exit_status_and_stderr():
    proc = python_process("import sys\nsys.stderr.write('Fatal Python error: Aborted\\nline two\\n')\nsys.exit(134)")
    proc.wait(timeout=60)
    with pytest.raises(ThinSegError) as info:
        proc.check()
    assert str(info.value) == "the process stopped with exit status 134:\nFatal Python error: Aborted\nline two"


@pytest.mark.skipif(os.name == "nt", reason="POSIX signals")
def test_a_killed_process_says_which_signal_stopped_it():
    proc = python_process("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)")
    proc.wait(timeout=60)
    assert proc.error_message() == "the process was stopped by signal 9 and wrote no error message"


def test_exit_status_0_without_a_result_and_a_malformed_event_are_errors():
    quiet = python_process("print('done, I think')")
    quiet.wait(timeout=60)
    with pytest.raises(ThinSegError, match="^the process finished without reporting a result and wrote no error"):
        quiet.check()
    broken = python_process('print(\'@thinseg {"v": 1, "kind": "progress", "name": "S1"}\')\nraise SystemExit(1)')
    received = broken.wait(timeout=60)
    assert received == [process.OutputLine("stdout", '@thinseg {"v": 1, "kind": "progress", "name": "S1"}')]
    assert broken.error_message().startswith(
        "the process stopped with exit status 1:\nprogress event: missing field done: @thinseg"
    )
