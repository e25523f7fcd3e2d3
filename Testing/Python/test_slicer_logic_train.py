"""MRML logic on a real scene: training sections from registered labelmap nodes and netCDF
files, the background training process with its typed epoch and progress events and the live
curve, and the new model folder that the model list then shows and segment() can use."""

import json
import sys
import time

import numpy as np
import pytest
import slicer
from helpers import write_geoslicer_netcdf

from ThinSectionSegmentationLib import ThinSectionSegmentationLogic, hierarchy, labelmaps, models, volumes
from thinseg.classes.files import default_class_table
from thinseg.errors import ThinSegError
from thinseg.jobs import EpochEvent, MessageEvent, ProgressEvent, ResultEvent
from thinseg.synth import generate_section

TINY = dict(
    epochs=2,
    patchSize=64,
    batchSize=2,
    stepsPerEpoch=2,
    valFraction=0.34,
    device="cpu",
    base_channels=4,
    depth=3,
    num_res_units=0,
    warmup_steps=0,
    val_tile=128,
    val_overlap=16,
)


def scene_section(scene, name, seed, with_reference=True):
    s = generate_section(128, 128, seed=seed)
    folder = hierarchy.create_folder(scene, name)
    pp = volumes.create_rgb_volume(scene, f"{name}_PP", s.pp, s.mm_per_pixel)
    xp = volumes.create_rgb_volume(scene, f"{name}_XP", s.xp, s.mm_per_pixel)
    lab = labelmaps.create_labelmap(
        scene, f"{name}_QEMSCAN_registered", s.labels.astype(np.uint8), default_class_table(), reference=pp
    )
    if with_reference:
        labelmaps.set_reference(lab, pp, xp)
    for node in (pp, xp, lab):
        hierarchy.place(node, folder)
    return pp, xp, lab


def test_sections_are_found_from_references_or_the_folder(tmp_path):
    scene = slicer.vtkMRMLScene()
    logic = ThinSectionSegmentationLogic(scene)
    pp, xp, lab = scene_section(scene, "A", 1, with_reference=False)
    assert logic.trainingSectionNodes(lab) == (pp, xp, lab)
    lonely = labelmaps.create_labelmap(scene, "lonely", np.zeros((4, 4), np.uint8), default_class_table(), 0.01)
    with pytest.raises(ThinSegError, match="no PP image is known"):
        logic.trainingSectionNodes(lonely)
    with pytest.raises(ThinSegError, match="at least one registered section"):
        logic.prepareTraining([], "m", tmp_path)


def test_background_training_streams_epochs_and_adds_a_model(tmp_path):
    from thinseg.data.sections import NetcdfSection

    scene = slicer.vtkMRMLScene()
    logic = ThinSectionSegmentationLogic(scene)
    sections = [scene_section(scene, name, seed)[2] for name, seed in (("A", 1), ("B", 2))]
    s = generate_section(128, 128, seed=3)
    nc = write_geoslicer_netcdf(
        tmp_path / "C.nc",
        {"C_PP": s.pp, "C_XP": s.xp},
        labelmaps={"C_labels": s.labels.astype(np.uint8)},
        mm_per_pixel=s.mm_per_pixel,
    )
    root = tmp_path / "models"
    job = logic.prepareTraining(sections + [str(nc)], "well A model", modelsRoot=root, python=sys.executable, **TINY)
    try:
        spec = json.loads((job.folder / "job.json").read_text())
        assert spec["model_dir"] == str(models.multiphase_model_dir(root, "well A model")) and spec["epochs"] == 2
        exported = [job.folder / f for f in spec["sections"][:2]]
        section = NetcdfSection(exported[0])  # what the trainer reads: PP, XP and labels found by name
        assert set(section.vars) == {"PP", "XP"} and section.labels_var == "A_labels"
        assert np.array_equal(section.read_labels(), volumes.label_array(sections[0]))

        proc = logic.startJob(job)
        epochs, bars, messages = [], [], []
        table = chart = None
        while not proc.finished:
            for event in proc.poll():
                if isinstance(event, EpochEvent):
                    epochs.append(event)
                    table, chart = logic.trainingCurve(epochs, table, chart, name="well A")  # the live curve
                elif isinstance(event, ProgressEvent):
                    bars.append(event)
                elif isinstance(event, MessageEvent):
                    messages.append(event.text)
            time.sleep(0.05)
        result = proc.check()
        output = logic.finishTraining(job)
    finally:
        logic.discardJob(job)
    assert [(e.epoch, e.epochs) for e in epochs] == [(1, 2), (2, 2)] and all(e.val_mean_iou is not None for e in epochs)
    assert epochs[0].best and all(e.loss is not None and e.lr is not None and e.seconds > 0 for e in epochs)
    assert [(b.name, b.done, b.total) for b in bars if b.done == b.total] == [("epoch 1/2", 2, 2), ("epoch 2/2", 2, 2)]
    assert bars[-1].fraction == pytest.approx(1.0) and bars[0].epoch == 1 and bars[0].unit == "batches"
    assert any(m.startswith("prepared 2 training sections") for m in messages)  # the trainer's log lines
    assert table.GetTable().GetNumberOfRows() == 2 and chart.GetNumberOfPlotSeriesNodes() == 2
    assert table.GetTable().GetValue(1, 1).ToDouble() == pytest.approx(epochs[1].loss)
    model_dir = output.modelDir
    assert model_dir == models.multiphase_model_dir(root, "well A model")
    assert result == ResultEvent("train", output.summary) and output.summary["best_epoch"] in (1, 2)
    best = max((e for e in epochs if e.best), key=lambda e: e.epoch)
    assert output.summary["best_epoch"] == best.epoch and output.summary["best_mean_iou"] == pytest.approx(
        best.val_mean_iou
    )
    assert (model_dir / "meta.json").is_file() and (model_dir / "training_log.csv").is_file()
    listed = {m.path: m for m in models.list_models([root])}
    assert model_dir in listed and listed[model_dir].title == "well A model"
    # the new model segments straight away
    pp = logic.trainingSectionNodes(sections[0])[0]
    labelmap = logic.segment(
        pp, logic.trainingSectionNodes(sections[0])[1], model_dir, device="cpu", show=False
    ).labelmap
    assert volumes.label_array(labelmap).shape == (128, 128)
