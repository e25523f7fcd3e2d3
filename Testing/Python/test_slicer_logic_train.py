"""MRML logic on a real scene: training sections from registered labelmap nodes and netCDF
files, the background training process with its live curve, and the new model folder that the
model list then shows and segment() can use."""

import json
import sys

import numpy as np
import pytest
import slicer
from helpers import write_geoslicer_netcdf

from ThinSectionSegmentationLib import ThinSectionSegmentationLogic, hierarchy, labelmaps, models, process, volumes
from thinseg.classes.files import default_class_table
from thinseg.errors import ThinSegError
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
        assert spec["model_dir"] == str(root / "ThinSectionEnv" / "well A model") and spec["epochs"] == 2
        exported = [job.folder / f for f in spec["sections"][:2]]
        section = NetcdfSection(exported[0])  # what the trainer reads: PP, XP and labels found by name
        assert set(section.vars) == {"PP", "XP"} and section.labels_var == "A_labels"
        assert np.array_equal(section.read_labels(), volumes.label_array(sections[0]))

        proc = job.start()
        epochs, bars = [], []
        table = chart = None
        while not proc.finished:
            for event in proc.poll():
                if isinstance(event, process.Epoch):
                    epochs.append(event)
                    table, chart = logic.trainingCurve(epochs, table, chart, name="well A")  # the live curve
                elif isinstance(event, process.Progress):
                    bars.append(event)
        proc.check()
        model_dir = logic.finishTraining(job)
    finally:
        logic.discardJob(job)
    assert [e.epoch for e in epochs] == [1, 2] and all(e.val_mean_iou is not None for e in epochs)
    assert bars and bars[-1].fraction == pytest.approx(1.0)
    assert table.GetTable().GetNumberOfRows() == 2 and chart.GetNumberOfPlotSeriesNodes() == 2
    assert table.GetTable().GetValue(1, 1).ToDouble() == pytest.approx(epochs[1].loss)
    assert model_dir == root / "ThinSectionEnv" / "well A model"
    assert (model_dir / "meta.json").is_file() and (model_dir / "training_log.csv").is_file()
    listed = {m.path: m for m in models.list_models([root])}
    assert model_dir in listed and listed[model_dir].title == "well A model"
    # the new model segments straight away
    pp = logic.trainingSectionNodes(sections[0])[0]
    labelmap = logic.segment(pp, logic.trainingSectionNodes(sections[0])[1], model_dir, device="cpu", show=False)
    assert volumes.label_array(labelmap).shape == (128, 128)
