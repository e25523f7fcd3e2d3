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

from ThinSectionSegmentationLib import ThinSectionSegmentationLogic, hierarchy, labelmaps, models, parameters, volumes
from thinseg.classes.files import default_class_table
from thinseg.classes.table import ClassTable
from thinseg.cli import train_cmd
from thinseg.cli.main import build_parser, main
from thinseg.errors import ThinSegError
from thinseg.jobs import EpochEvent, MessageEvent, ProgressEvent, ResultEvent, runner
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
    best_iou = output.summary["best_mean_iou"]
    assert output.statusText == f"New model: {model_dir} (epoch {best.epoch}; validation mean IoU {best_iou:.3f})"
    listed = {m.path: m for m in models.list_models([root])}
    assert model_dir in listed and listed[model_dir].title == "well A model"
    # the new model segments straight away
    pp = logic.trainingSectionNodes(sections[0])[0]
    labelmap = logic.segment(
        pp, logic.trainingSectionNodes(sections[0])[1], model_dir, device="cpu", show=False
    ).labelmap
    assert volumes.label_array(labelmap).shape == (128, 128)


# -- the choices `thinseg train` has: classes, mineral mapping, the model's pixel size, PP only ----------

#: The classes of a new model and the mapping of the sections' QEMSCAN minerals onto them (Quartz
#: and Others by name; Mg-Clay minerals left out of the loss).
NEW_CLASSES = ClassTable.from_names_colors(
    ["Carbonate", "Porosity", "Quartz", "Others"], ["#00ffff", "#000000", "#ffff00", "#ffffff"]
)
MAPPING = "mineral,class\nCalcite,Carbonate\nDolomite,Carbonate\nPores,Porosity\nMg-Clay minerals,ignore\n"
MODEL_MM = 0.002  # the sections' pixel is 0.00132 mm: the model works at 0.66x their resolution


def class_file(tmp_path):
    path = tmp_path / "classes.csv"
    path.write_text("name,color\n" + "".join(f"{n},{c}\n" for n, c in zip(NEW_CLASSES.names, NEW_CLASSES.colors)))
    return path


def mapping_file(tmp_path, text=MAPPING, name="mapping.csv"):
    path = tmp_path / name
    path.write_text(text)
    return path


def netcdf_sections(folder, seeds=(11, 12, 13)):
    files = []
    for seed in seeds:
        s = generate_section(128, 128, seed=seed)
        files.append(
            write_geoslicer_netcdf(
                folder / f"S{seed}.nc",
                {f"S{seed}_PP": s.pp, f"S{seed}_XP": s.xp},
                labelmaps={f"S{seed}_labels": s.labels.astype(np.uint8)},
                mm_per_pixel=s.mm_per_pixel,
            )
        )
    return files


def cli_config(argv):
    return train_cmd.train_config(build_parser().parse_args(["train", *map(str, argv)]))


def test_each_choice_reaches_the_trainer_as_thinseg_train_gives_it(tmp_path):
    """job.json -> TrainConfig equals the command line's TrainConfig for the same options: a class
    file or a colour table node (--classes), a mapping (--mapping), the model's pixel size
    (--model-mm-per-pixel) and PP only (--pp-only)."""
    scene = slicer.vtkMRMLScene()
    logic = ThinSectionSegmentationLogic(scene)
    section = scene_section(scene, "A", 1)[2]
    colors = labelmaps.create_color_table(scene, "new classes", NEW_CLASSES)
    classes, mapping = class_file(tmp_path), mapping_file(tmp_path)
    data = netcdf_sections(tmp_path, seeds=(11,))[0]  # the command line wants its DATA to exist
    cli = cli_config(
        [data, "-o", tmp_path / "run"]
        + ["--classes", classes, "--mapping", mapping, "--model-mm-per-pixel", MODEL_MM, "--pp-only"]
    )
    fields = ("class_table", "mapping_csv", "pixels_per_mm", "inputs", "init_from")
    for chosen in (classes, colors):
        job = logic.prepareTraining(
            [section],
            "m",
            tmp_path / "models",
            classes=chosen,
            mappingCsv=mapping,
            modelMmPerPixel=MODEL_MM,
            ppOnly=True,
            workDir=tmp_path,
        )
        try:
            spec = json.loads((job.folder / "job.json").read_text())
            assert spec["classes"] == {"names": NEW_CLASSES.names, "colors": NEW_CLASSES.colors}
            assert spec["mapping_csv"] == str(mapping.resolve()) and spec["inputs"] == ["PP"]
            assert spec["pixels_per_mm"] == pytest.approx(1 / MODEL_MM)
            config = runner.train_config(spec, job.folder)
        finally:
            logic.discardJob(job)
        assert {f: getattr(config, f) for f in fields} == {f: getattr(cli, f) for f in fields}
    # nothing chosen: the defaults of both, and a section without XP still makes a PP-only model
    plain = cli_config([data, "-o", tmp_path / "run"])
    job = logic.prepareTraining([section], "m", tmp_path / "models", workDir=tmp_path)
    try:
        spec = json.loads((job.folder / "job.json").read_text())
        assert not {"classes", "mapping_csv", "pixels_per_mm", "inputs"} & set(spec)
        config = runner.train_config(spec, job.folder)
    finally:
        logic.discardJob(job)
    assert {f: getattr(config, f) for f in fields} == {f: getattr(plain, f) for f in fields}
    lonely_pp = volumes.create_rgb_volume(scene, "B_PP", generate_section(64, 64, seed=4).pp, 0.00132)
    no_xp = labelmaps.create_labelmap(
        scene, "B_registered", np.ones((64, 64), np.uint8), default_class_table(), reference=lonely_pp
    )
    labelmaps.set_reference(no_xp, lonely_pp)
    job = logic.prepareTraining([no_xp], "m", tmp_path / "models", workDir=tmp_path)
    try:
        assert json.loads((job.folder / "job.json").read_text())["inputs"] == ["PP"]
    finally:
        logic.discardJob(job)
    assert logic.messages[-1] == "a section has no XP image: the new model takes the PP image only"


def test_a_choice_that_cannot_work_fails_before_anything_is_written(tmp_path):
    scene = slicer.vtkMRMLScene()
    logic = ThinSectionSegmentationLogic(scene)
    section = scene_section(scene, "A", 1)[2]
    work, root = tmp_path / "work", tmp_path / "models"
    work.mkdir()
    bundled = logic.defaultModelDir()
    empty = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "empty")
    empty.SetTypeToUser()
    empty.SetNumberOfColors(1)
    missing = tmp_path / "no-such-classes.csv"
    bad_mapping = mapping_file(tmp_path, "Calcite,Feldspar\n", "bad-mapping.csv")
    cases = [
        (dict(classes=missing), f"{missing}: class file not found"),
        (dict(classes=class_file(tmp_path), initFrom=bundled), "keeps the classes of the model it starts from"),
        (dict(ppOnly=True, initFrom=bundled), "keeps the inputs of the model it starts from"),
        (dict(classes=empty), "colour table 'empty' lists no classes"),
        (dict(classes=42), "a class file or a colour table node, not int"),
        (
            dict(classes=class_file(tmp_path), mappingCsv=bad_mapping),
            f"{bad_mapping}: mapping table sends 'calcite' to 'Feldspar', which is not a model class "
            "(Carbonate, Porosity, Quartz, Others)",
        ),
        (dict(mappingCsv=bad_mapping), "which is not a model class (Calcite, Dolomite, Mg-Clay minerals,"),
        (dict(mappingCsv=bad_mapping, initFrom=bundled), "which is not a model class (Calcite, Dolomite,"),
        (dict(mappingCsv=tmp_path / "none.csv"), str(tmp_path / "none.csv")),
        (dict(modelMmPerPixel=-0.01), "the model's pixel size must be positive, not -0.01 mm"),
        (dict(recipe="fast"), "unknown training recipe 'fast' (known: unet, small-data)"),
    ]
    for options, message in cases:
        with pytest.raises(ThinSegError) as caught:
            logic.prepareTraining([section], "m", root, workDir=work, **options)
        assert message in str(caught.value), (options, str(caught.value))
    assert list(work.iterdir()) == [] and not root.exists()
    # job.json written by hand: the same conflicts as the command line, named after the file
    with pytest.raises(ThinSegError, match="job.json: 'inputs' and 'init_from'"):
        runner.train_config({"sections": [], "run_dir": "r", "inputs": ["PP"], "init_from": str(bundled)}, work)
    with pytest.raises(ThinSegError, match="job.json: 'classes' needs names and #rrggbb colours"):
        runner.train_config({"sections": [], "run_dir": "r", "classes": {"names": ["A"]}}, work)


#: The TrainConfig fields a recipe sets (recipes.py), and the sizes the panel sends with every job.
RECIPE_FIELDS = (
    "recipe",
    "network",
    "pretrained",
    "encoder_lr_scale",
    "lr",
    "weight_decay",
    "warmup_steps",
    "schedule",
    "balancing_strength",
    "patience",
    "average_last",
    "ema_decay",
    "test_time_augmentation",
    "augment",
    "epochs",
    "steps_per_epoch",
    "patch_size",
    "batch_size",
    "members",
    "member_split",
)


def test_the_panel_recipe_reaches_the_trainer_as_thinseg_train_recipe_gives_it(tmp_path):
    """The job written with the panel's values after choosing a recipe makes the TrainConfig of
    `thinseg train --recipe` (no training is run: the small-data network is slow to train)."""
    scene = slicer.vtkMRMLScene()
    logic = ThinSectionSegmentationLogic(scene)
    section = scene_section(scene, "A", 1)[2]
    data = netcdf_sections(tmp_path, seeds=(11,))[0]
    configs = {}
    for recipe in parameters.TrainingRecipe:
        params = parameters.get_parameter_node(slicer.vtkMRMLScene())
        parameters.choose_recipe(params, recipe)  # what picking it in the panel does
        job = logic.prepareTraining(
            [section],
            "m",
            tmp_path / "models",
            epochs=params.epochs,
            patchSize=params.patchSize,
            batchSize=params.batchSize,
            stepsPerEpoch=params.stepsPerEpoch,
            recipe=params.trainingRecipe.value,
            workDir=tmp_path,
        )
        try:
            spec = json.loads((job.folder / "job.json").read_text())
            configs[recipe.value] = runner.train_config(spec, job.folder)
        finally:
            logic.discardJob(job)
        assert spec["recipe"] == recipe.value
        cli = cli_config([data, "-o", tmp_path / "run", "--recipe", recipe.value])
        cli_epochs = cli.epochs if recipe.value != "unet" else 20  # unet: the panel's 20, TrainConfig's 50
        assert configs[recipe.value].epochs == cli_epochs
        fields = [f for f in RECIPE_FIELDS if f != "epochs"]
        assert {f: getattr(configs[recipe.value], f) for f in fields} == {f: getattr(cli, f) for f in fields}
    small, unet = configs["small-data"], configs["unet"]
    assert (small.network, small.pretrained, small.recipe, unet.network, unet.recipe) == (
        "LiteUNet",
        True,
        "small-data",
        "UNet",
        "unet",
    )
    # the user's own epochs win over the recipe's; a job without "recipe" (an older panel) is the U-Net
    job = logic.prepareTraining([section], "m", tmp_path / "models", epochs=3, recipe="small-data", workDir=tmp_path)
    try:
        spec = json.loads((job.folder / "job.json").read_text())
        assert (spec["recipe"], runner.train_config(spec, job.folder).epochs) == ("small-data", 3)
        del spec["recipe"]
        assert runner.train_config(spec, job.folder).network == "UNet"
    finally:
        logic.discardJob(job)


def test_a_model_trained_on_scene_sections_with_a_colour_table_has_its_classes_and_resolution(tmp_path):
    """Colour table node + mapping + the model's pixel size + PP only, trained from labelmap nodes:
    meta.json says so, and the model segments a PP image alone into those classes."""
    scene = slicer.vtkMRMLScene()
    logic = ThinSectionSegmentationLogic(scene)
    sections = [scene_section(scene, name, seed)[2] for name, seed in (("A", 1), ("B", 2), ("C", 3))]
    colors = labelmaps.create_color_table(scene, "new classes", NEW_CLASSES)
    mapping = mapping_file(tmp_path)
    options = dict(TINY, epochs=1)
    output = logic.train(
        sections,
        "carbonates",
        tmp_path / "models",
        classes=colors,
        mappingCsv=mapping,
        modelMmPerPixel=MODEL_MM,
        ppOnly=True,
        **options,
    )
    meta = json.loads((output.modelDir / "meta.json").read_text())
    y = meta["outputs"]["y"]
    assert (y["class_names"], y["class_colors"]) == (NEW_CLASSES.names, [c.upper() for c in NEW_CLASSES.colors])
    assert meta["pixels_per_mm"] == pytest.approx(1 / MODEL_MM) and list(meta["inputs"]) == ["PP"]
    assert meta["training"]["data"]["mapping_csv"] == str(mapping.resolve())
    counts = meta["training"]["data"]["train_class_pixels"]
    assert list(counts) == NEW_CLASSES.names and counts["Carbonate"] > 0 and counts["Porosity"] > 0
    pp = logic.trainingSectionNodes(sections[0])[0]
    labelmap = logic.segment(pp, None, output.modelDir, device="cpu", show=False).labelmap
    assert volumes.label_array(labelmap).shape == (128, 128)
    assert labelmaps.labelmap_class_table(labelmap).names == NEW_CLASSES.names


def test_the_logic_and_thinseg_train_make_the_same_model_for_the_same_choices(tmp_path):
    """Class file + mapping + the model's pixel size + PP only, on the same netCDF sections: the
    model meta.json of the logic and of `thinseg train` agree on classes, colours, resolution,
    inputs, split and the mapped class pixels."""
    files = netcdf_sections(tmp_path / "data")
    classes, mapping = class_file(tmp_path), mapping_file(tmp_path)
    logic = ThinSectionSegmentationLogic(slicer.vtkMRMLScene())
    output = logic.train(
        [str(f) for f in files],
        "from the panel",
        tmp_path / "models",
        classes=str(classes),
        mappingCsv=str(mapping),
        modelMmPerPixel=MODEL_MM,
        ppOnly=True,
        **dict(TINY, epochs=1),
    )
    argv = ["train", *map(str, files), "-o", str(tmp_path / "run"), "--quiet", "--device", "cpu"]
    argv += ["--epochs", "1", "--steps-per-epoch", "2", "--patch-size", "64", "--batch-size", "2"]
    argv += ["--val-fraction", "0.34", "--base-channels", "4", "--depth", "3", "--val-tile", "128"]
    argv += ["--classes", str(classes), "--mapping", str(mapping), "--model-mm-per-pixel", str(MODEL_MM), "--pp-only"]
    assert main(argv) == 0
    panel = json.loads((output.modelDir / "meta.json").read_text())
    cli = json.loads((tmp_path / "run" / "model" / "meta.json").read_text())
    for key in ("pixels_per_mm", "inputs", "outputs", "input_roi_shape"):
        assert panel[key] == cli[key], key
    assert panel["outputs"]["y"]["class_names"] == NEW_CLASSES.names and list(panel["inputs"]) == ["PP"]
    assert panel["pixels_per_mm"] == pytest.approx(1 / MODEL_MM)
    for key in ("train_sections", "val_sections", "train_class_pixels", "mapping_csv"):
        assert panel["training"]["data"][key] == cli["training"]["data"][key], key
    assert panel["training"]["channels"] == cli["training"]["channels"] == ["PP"]


def test_an_ensemble_trained_from_the_panel_reports_each_training(tmp_path):
    """The small-data recipe averages several trainings: the job's summary and the panel's status
    line give each one's validation score (not member 1's epoch as the model's), and the model
    folder keeps every member's log and curves."""
    scene = slicer.vtkMRMLScene()
    logic = ThinSectionSegmentationLogic(scene)
    sections = [scene_section(scene, name, seed)[2] for name, seed in (("A", 1), ("B", 2), ("C", 3))]
    tiny = {key: TINY[key] for key in ("patchSize", "batchSize", "stepsPerEpoch", "valFraction", "device")}
    job = logic.prepareTraining(
        sections, "lite pair", modelsRoot=tmp_path / "models", recipe="small-data", epochs=1, workDir=tmp_path, **tiny
    )
    try:
        spec = json.loads((job.folder / "job.json").read_text())
        spec.update(members=2, warmup_steps=1, val_tile=96, val_overlap=16)
        (job.folder / "job.json").write_text(json.dumps(spec))
        events: list = []
        summary = runner.run_train_job(spec, job.folder, emit=events.append)
        output = logic.finishTraining(job)
    finally:
        logic.discardJob(job)
    # the members' epochs follow one another on the panel's curve: 1 of 2, then 2 of 2
    assert [(e.epoch, e.epochs) for e in events if isinstance(e, EpochEvent)] == [(1, 2), (2, 2)]
    scores = summary["member_val_mean_iou"]
    assert output.summary == summary and summary["best_epoch"] is None and len(scores) == 2
    assert summary["best_mean_iou"] == pytest.approx(sum(scores) / 2)
    meta = json.loads((output.modelDir / "meta.json").read_text())
    assert [m["val_mean_iou"] for m in meta["ensemble"]] == pytest.approx(scores)
    kept = sorted(p.name for p in output.modelDir.iterdir() if p.name.startswith(("training_", "split")))
    assert kept == [
        "split.json",
        "training_curves_member-1.png",
        "training_curves_member-2.png",
        "training_log_member-1.csv",
        "training_log_member-2.csv",
    ]
    shown = f"{scores[0]:.3f}, {scores[1]:.3f}"
    assert output.statusText == f"New model: {output.modelDir} (an average of 2 trainings; validation mean IoU {shown})"
