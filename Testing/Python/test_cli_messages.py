"""What the command line says to a new user: messages name options as typed on the command
line (never a Python keyword), evaluate and compare take the --precision and --device that
their messages suggest, `--device cuda` without a GPU is a one-line error while `--device auto`
falls back to the CPU with a note, and a run cut short by --max-minutes says so.

Sections are small generated ones and networks tiny (base 4, depth 2, 64 px patches), so each
call runs in seconds on the CPU.
"""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import pytest
import torch
from helpers import error_lines, make_bundle, run_main, run_subprocess

from thinseg.classes.files import default_class_table
from thinseg.cli.main import build_parser
from thinseg.io.netcdf import NetcdfWriter
from thinseg.synth import generate_section

TABLE = default_class_table()
HAS_GPU = torch.cuda.is_available()  # before the tests hide the GPU
MM = 0.00132
THINSEG = Path(__file__).resolve().parents[2] / "ThinSectionSegmentation" / "thinseg"
TINY_TRAIN = [
    "--steps-per-epoch",
    "2",
    "--patch-size",
    "64",
    "--batch-size",
    "2",
    "--base-channels",
    "4",
    "--depth",
    "2",
    "--val-tile",
    "96",
    "--precision",
    "fp32",
    "-q",
]


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Three labelled GeoSlicer netCDF sections (PP, XP, labels) in data/."""
    folder = tmp_path_factory.mktemp("sections") / "data"
    folder.mkdir()
    for name, seed in (("A", 1), ("B", 2), ("C", 3)):
        s = generate_section(96, 96, seed=seed, mm_per_pixel=MM)
        with NetcdfWriter(folder / f"{name}.nc") as writer:
            pp = writer.add_rgb_image(f"{name}_PP", s.pp, MM)
            writer.add_rgb_image(f"{name}_XP", s.xp, MM)
            writer.add_labelmap(f"{name}_labels", s.labels.astype("uint8"), TABLE, MM, reference=pp)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models") / "ThinSectionEnv"
    return [make_bundle(root / "m1", seed=0, title="tiny one"), make_bundle(root / "m2", seed=1, title="tiny two")]


def _command_options() -> set[str]:
    options: set[str] = set()
    for action in build_parser()._subparsers._group_actions:  # type: ignore[union-attr]
        for sub in action.choices.values():
            for a in sub._actions:
                options.update(s for s in a.option_strings if s.startswith("--"))
    return options


def _message_texts() -> list[tuple[str, str]]:
    """Every string literal of the core outside the argparse set-up, with where it is."""
    texts = []
    for path in sorted(THINSEG.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                texts.append((f"{path.relative_to(THINSEG)}:{node.lineno}", node.value))
    return texts


def test_messages_name_command_line_options_not_python_keywords():
    options = _command_options()
    assert {"--overwrite", "--resume", "--max-minutes", "--pp-pattern", "--precision"} <= options
    keyword = re.compile(r"\b(overwrite|resume|max_minutes|pp_pattern|xp_pattern|init_from|pixels_per_mm)=")
    unknown, keywords = [], []
    for where, text in _message_texts():
        if text.startswith("--") and " " not in text:
            continue  # an option's own name, as add_argument or a lookup spells it
        unknown += [f"{where}: {o}" for o in re.findall(r"(?<![\w-])--[a-z][a-z0-9-]*", text) if o not in options]
        if keyword.search(text):
            keywords.append(f"{where}: {text}")
    assert unknown == [] and keywords == []


@pytest.mark.parametrize("command", ["evaluate", "compare"])
def test_evaluate_and_compare_take_precision_and_device(tmp_path, capsys, data, models, command):
    def args(*options):
        if command == "evaluate":
            return [command, *options, "--overlays", "0", "-q", "--model", models[0], data / "A.nc"]
        return [command, *options, "--sheets", "0", "-q", "--models", *models, data / "A.nc"]

    code, stdout, stderr = run_main(
        capsys, *args("--output", tmp_path / "fp32", "--precision", "fp32", "--device", "cpu")
    )
    assert code == 0, stderr
    assert "running in bf16" not in stderr and "mean IoU" in stdout
    assert (tmp_path / "fp32" / f"{'evaluation' if command == 'evaluate' else 'comparison'}.json").is_file()
    # the precision reaches the engine: fp16 on the CPU is the engine's refusal, not argparse's
    code, _, stderr = run_main(capsys, *args("--output", tmp_path / "fp16", "--precision", "fp16", "--device", "cpu"))
    assert code == 2 and error_lines(stderr) == [
        "thinseg: error: fp16 inference needs a CUDA GPU; use fp32 or bf16 on the CPU"
    ]
    assert not (tmp_path / "fp16").exists() or not any((tmp_path / "fp16").iterdir())
    # --device cuda without a GPU: one line, exit 2, nothing written
    code, _, stderr = run_main(capsys, *args("--output", tmp_path / "cuda", "--device", "cuda"))
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("thinseg: error: device cuda needs a CUDA GPU but ") and "choose device auto" in stderr
    assert not (tmp_path / "cuda").exists() or not any((tmp_path / "cuda").iterdir())
    # --device auto: the CPU, with a note
    code, _, stderr = run_main(capsys, *args("--output", tmp_path / "auto", "--device", "auto"))
    assert code == 0, stderr
    notes = [line for line in stderr.splitlines() if "no CUDA GPU" in line]
    expected = ["thinseg: no CUDA GPU found: running on the CPU (device auto)"]
    if command == "compare":
        expected = [f"thinseg: {m}: no CUDA GPU found: running on the CPU (device auto)" for m in ("m1", "m2")]
    assert notes == expected, stderr


def test_train_with_cuda_and_no_gpu_refuses_before_touching_the_run(tmp_path, capsys, data):
    run = tmp_path / "run"
    code, _, stderr = run_main(capsys, "train", data, "--output", run, "--epochs", "1", "--device", "cuda", *TINY_TRAIN)
    assert code == 2 and error_lines(stderr) == stderr.strip().splitlines() and not run.exists(), stderr
    code, _, stderr = run_main(capsys, "train", data, "--output", run, "--epochs", "1", "--device", "cpu", *TINY_TRAIN)
    assert code == 0, stderr
    log_before = (run / "training_log.csv").read_bytes()
    code, _, stderr = run_main(
        capsys, "train", data, "--output", run, "--epochs", "1", "--device", "cuda", "--overwrite", *TINY_TRAIN
    )
    assert code == 2 and len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("thinseg: error: device cuda needs a CUDA GPU")
    assert (run / "checkpoint.pt").is_file() and (run / "training_log.csv").read_bytes() == log_before
    # the same run folder without --resume/--overwrite: the refusal names the options as typed
    code, _, stderr = run_main(capsys, "train", data, "--output", run, "--epochs", "1", "--device", "cpu", *TINY_TRAIN)
    assert code == 2
    assert error_lines(stderr) == [
        f"thinseg: error: {run}: a training run already exists here: continue it with --resume or start again "
        "with --overwrite"
    ]


def test_a_time_budget_summary_says_the_run_was_cut_short(tmp_path, capsys, data):
    run = tmp_path / "run"
    args = ["train", data, "--output", run, "--device", "cpu", *TINY_TRAIN]
    # 0.0001 min (6 ms): every epoch takes longer, so the run stops after its first epoch
    code, stdout, stderr = run_main(capsys, *args, "--epochs", "4", "--max-minutes", "0.0001")
    assert code == 0, stderr
    assert re.search(r"time budget of 0\.0001 min reached after [0-9.]+ min: stopping after epoch 1 of 4", stderr)
    summary = [line for line in stdout.splitlines() if line.startswith("best epoch:")]
    assert summary == [
        "best epoch: 1 of 1 run (stopped by the --max-minutes time budget after 1 of 4 planned epochs; "
        "run the same command with --resume to continue)"
    ], stdout
    assert (run / "model" / "meta.json").is_file()
    code, stdout, stderr = run_main(capsys, *args, "--epochs", "2", "--resume")
    assert code == 0, stderr
    assert re.search(r"^best epoch: [12] of 2 run \(all 2 planned epochs\)$", stdout, re.M), stdout


@pytest.mark.skipif(HAS_GPU, reason="this machine has a CUDA GPU")
def test_device_cuda_without_gpu_in_a_real_process(tmp_path, data, models):
    result = run_subprocess(
        "evaluate", "--model", models[0], "--device", "cuda", "--overlays", "0", "-q", "-o", tmp_path / "ev", data
    )
    assert result.returncode == 2, result.stderr
    assert result.stderr.startswith("thinseg: error: device cuda needs a CUDA GPU but ")
    assert result.stderr.count("\n") == 1 and not (tmp_path / "ev" / "evaluation.json").exists()


def test_an_ensemble_summary_gives_each_training_its_score_in_a_new_run_folder(tmp_path, capsys, data):
    """`--recipe small-data` averages trainings: the summary is theirs, not the first one's epochs."""
    run = tmp_path / "new" / "run"  # not made yet: the split of the pooled sections is saved in it
    tiny = ["--steps-per-epoch", "2", "--patch-size", "64", "--batch-size", "2", "--val-tile", "96"]
    code, stdout, stderr = run_main(
        capsys,
        "train",
        data,
        "--output",
        run,
        "--recipe",
        "small-data",
        "--members",
        "2",
        "--epochs",
        "1",
        "--model-mm-per-pixel",
        str(MM),
        "--device",
        "cpu",
        "--precision",
        "fp32",
        "-q",
        *tiny,
    )
    assert code == 0, stderr
    [average] = [line for line in stdout.splitlines() if line.startswith("an average of")]
    assert re.fullmatch(r"an average of 2 trainings; their validation mean IoU: [0-9.]+, [0-9.]+", average), stdout
    assert f"members (logs, curves, models): {run / 'members'}" in stdout
    assert "best epoch:" not in stdout and (run / "split.json").is_file()
    meta = json.loads((run / "model" / "meta.json").read_text())
    assert [m["seed"] for m in meta["ensemble"]] == [0, 1]
