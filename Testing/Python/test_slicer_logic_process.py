"""The panel's background path without Qt: command lines, parsing of the core's output, and
real `thinseg segment` processes started from scene nodes (progress, result import, cancel,
errors in the core's words). The widget only adds a QTimer that calls poll()."""

import os
import sys
import time

import numpy as np
import pytest
import slicer
from helpers import make_bundle, section_images

from ThinSectionSegmentationLib import ThinSectionSegmentationLogic, labelmaps, process, volumes
from thinseg.errors import ThinSegError

MM = 0.00132
TQDM_CHUNKS = [
    "S1:   0%|          | 0/12 [00:00<?, ?tile/s]",
    "\rS1:  42%|████▏     | 5/12 [00:01<00:01,  4.1tile/s, 1.25 MPix/s]",
    "\rS1: 100%|██████████| 12/12 [00:02<00:00,  4.4tile/s, 1.31 MPix/s]\n",
]


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


# -- parsing ------------------------------------------------------------------------------------


def test_tqdm_bars_are_parsed_across_carriage_returns_and_split_chunks():
    parser = process.OutputParser()
    text = "".join(TQDM_CHUNKS)
    events = []
    for i in range(0, len(text), 7):  # arbitrary chunk boundaries, as pipes deliver them
        events += parser.feed(text[i : i + 7])
    events += parser.flush()
    bars = [e for e in events if isinstance(e, process.Progress)]
    assert [(b.name, b.done, b.total) for b in bars] == [("S1", 0, 12), ("S1", 5, 12), ("S1", 12, 12)]
    assert bars[1].fraction == pytest.approx(5 / 12) and bars[1].rate == "1.25 MPix/s"


def test_epochs_errors_messages_and_worker_events_are_told_apart():
    parser = process.OutputParser()
    events = parser.feed(
        "epoch 2/5:  50%|█████     | 1/2 [00:00<00:00,  1.4batch/s, loss=2.79]\r"
        "epoch 2/5: loss 2.7778, 2.8 samples/s, val mean IoU 0.0550 (best: exported)\n"
        "epoch 3/5: loss 2.5000, 3.0 samples/s\n"
        "thinseg: error: /data/x.nc: no PP image\n"
        "model: tiny (/m)\n"
        '@thinseg {"event": "stage", "text": "refining automatically"}\n'
    )
    progress, epoch, epoch3, error, message, stage = events
    assert isinstance(progress, process.Progress) and progress.epoch == 2 and progress.epochs == 5
    assert progress.fraction == pytest.approx((1 + 0.5) / 5)
    assert epoch == process.Epoch(2, 5, 2.7778, 0.055, True)
    assert epoch3.val_mean_iou is None and not epoch3.best
    assert error == process.ErrorLine("/data/x.nc: no PP image")
    assert message == process.Message("model: tiny (/m)")
    assert stage == process.Event("stage", {"text": "refining automatically"})


def test_commands_run_the_thinseg_command_with_the_module_on_the_path(tmp_path):
    cmd = process.segment_command(
        [tmp_path / "in.nc"],
        tmp_path / "out.nc",
        tmp_path / "model",
        device="cpu",
        probabilities=True,
        python="/slicer/bin/PythonSlicer",
    )
    assert cmd[:4] == ["/slicer/bin/PythonSlicer", "-m", "thinseg", "segment"]
    assert cmd[cmd.index("--output") + 1] == str(tmp_path / "out.nc")
    assert cmd[cmd.index("--model") + 1] == str(tmp_path / "model")
    assert "--probabilities" in cmd and "--overwrite" in cmd and cmd[cmd.index("--device") + 1] == "cpu"
    job_cmd = process.worker_command("train", tmp_path / "job.json", python="py")
    assert job_cmd == ["py", "-m", "thinseg.jobs", "train", str(tmp_path / "job.json")]
    env = process.process_environment({"PYTHONPATH": "/other"})
    assert env["PYTHONPATH"].split(os.pathsep) == [str(process.MODULE_DIR), "/other"]
    assert env["PYTHONUNBUFFERED"] == "1"
    assert process.python_executable() == sys.executable  # outside Slicer


# -- real processes -----------------------------------------------------------------------------


def test_background_segmentation_reports_progress_and_imports_the_same_result(scene, model_dir):
    pp, xp = pair(scene, 96, 128)
    logic = ThinSectionSegmentationLogic(scene)
    job = logic.prepareSegmentation(pp, xp, model_dir, device="cpu", confidence=True, python=sys.executable)
    before = scene.GetNumberOfNodes()
    try:
        proc = job.start()
        events = proc.wait(timeout=120)
        assert scene.GetNumberOfNodes() == before  # nothing changes until the result is imported
        proc.check()
        bars = [e for e in events if isinstance(e, process.Progress)]
        assert bars and bars[-1].done == bars[-1].total and bars[-1].name == "S1"
        assert bars[-1].fraction == 1.0
        labelmap = logic.finishSegmentation(job)
    finally:
        logic.discardJob(job)
    assert not job.folder.exists()
    assert labelmap.GetName() == "S1_Segmentation"
    assert logic.lastSegmentation.confidence is not None
    # the separate process computes exactly what the in-process call does
    same = logic.segment(pp, xp, model_dir, device="cpu", show=False)
    assert np.array_equal(volumes.label_array(labelmap), volumes.label_array(same))
    assert labelmaps.labelmap_class_table(labelmap) == labelmaps.labelmap_class_table(same)


def test_cancel_stops_the_process_and_leaves_no_output(scene):
    # the bundled model on small tiles: the tiles take seconds, so Cancel lands mid-run (the
    # tiny test model would finish before the first bar line is read)
    pp, xp = pair(scene, 2048, 2048, name="Big")  # ~2000 tiles: seconds even on a bf16 CPU
    logic = ThinSectionSegmentationLogic(scene)
    before = scene.GetNumberOfNodes()
    job = logic.prepareSegmentation(pp, xp, None, device="cpu", python=sys.executable, tile=64)
    try:
        proc = job.start()
        deadline = time.monotonic() + 120
        while not proc.finished and time.monotonic() < deadline:
            # the first bar line (0 of N tiles) comes when the tiles start: cancel then, as a person
            # would press Cancel while the bar moves
            if any(isinstance(e, process.Progress) for e in proc.poll()):
                proc.cancel(grace=10, wait=False)  # what the Cancel button does: returns at once
            time.sleep(0.02)
        proc.wait(timeout=30)
        assert proc.cancelled and proc.returncode != 0
        with pytest.raises(ThinSegError, match="cancelled"):
            proc.check()
        leftovers = [p.name for p in job.folder.iterdir() if p.name != "Big.nc"]
        assert leftovers == []  # no output.nc, no hidden partial file
    finally:
        logic.discardJob(job)
    assert scene.GetNumberOfNodes() == before


def test_a_failing_process_reports_the_core_message(scene):
    from thinseg.classes.files import default_class_table

    pp, xp = pair(scene, 64, 64)
    empty = labelmaps.create_labelmap(scene, "QEMSCAN", np.zeros((20, 20), np.uint8), default_class_table(), 0.01)
    logic = ThinSectionSegmentationLogic(scene)
    before = scene.GetNumberOfNodes()
    job = logic.prepareRegistration(pp, empty, None, refine=True, xpNode=xp, python=sys.executable)
    try:
        proc = job.start()
        proc.wait(timeout=120)
        assert proc.returncode == 2
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
