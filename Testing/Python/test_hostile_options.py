"""Hostile command-line options and landmark files: every numeric option of every command refuses
not-a-number, infinity, negatives, zero where it means nothing and absurd sizes at parsing, in one
`thinseg: error: argument --OPTION: ...` line with exit status 2, before any file is read or any
folder made; a tile the model cannot take, a colour that is not one, duplicated or collinear
landmarks are one line naming the option or the file; `--max-pixels` bounds the sections each
command reads. The sweep runs in-process through `thinseg.cli.main.main` (parsing is all it
exercises); the cases that reach a model or a file run the real `thinseg` in a fresh process.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import MODULE_DIR, make_bundle, section_images, write_geoslicer_netcdf, write_image, write_pair
from hostile import REFUSAL_PEAK_MB, assert_nothing_left, assert_refused, thinseg

from thinseg import limits
from thinseg.cli import options as types
from thinseg.cli.main import build_parser, main
from thinseg.errors import ThinSegError

#: Every value every numeric option refuses ("0" only where zero means nothing: see ZERO_ALLOWED).
HOSTILE = ("nan", "inf", "-inf", "-1", "0", "1e30", "1" + "0" * 40, "x")
#: Options for which 0 is a documented value (none, no overlap, never stop, seed 0 ...).
ZERO_ALLOWED = {
    "--overlap",
    "--overlays",
    "--sheets",
    "--void-border-px",
    "--val-fraction",
    "--test-fraction",
    "--balancing-strength",
    "--patience",
    "--seed",
    "--workers",
    "--average-last",
    "--ema-decay",
    "--band-rows",
}
#: Each command's numeric options, with a value each accepts.
NUMERIC = {
    "segment": {
        "--mm-per-pixel": "0.00132",
        "--tile": "512",
        "--overlap": "32",
        "--batch-size": "4",
        "--band-rows": "2048",
    },
    "register": {"--mm-per-pixel": "0.00132", "--qemscan-mm-per-pixel": "0.01"},
    "prepare": {"--mm-per-pixel": "0.00132"},
    "evaluate": {"--void-border-px": "2", "--overlays": "3"},
    "compare": {"--void-border-px": "2", "--sheets": "3"},
    "train": {
        "--val-fraction": "0.2",
        "--test-fraction": "0.1",
        "--epochs": "5",
        "--steps-per-epoch": "10",
        "--patch-size": "256",
        "--batch-size": "8",
        "--balancing-strength": "0.75",
        "--void-border-px": "2",
        "--lr": "0.001",
        "--patience": "10",
        "--max-minutes": "30",
        "--seed": "7",
        "--workers": "2",
        "--base-channels": "16",
        "--depth": "5",
        "--model-mm-per-pixel": "0.00132",
        "--val-tile": "512",
        "--average-last": "3",
        "--ema-decay": "0.99",
        "--members": "2",
        "--nproc": "2",
    },
}
for _options in NUMERIC.values():
    _options["--max-pixels"] = "2e9"


def command_line(command: str, out: Path) -> list[str]:
    """The smallest command line `command` parses (its inputs need not exist: parsing is first)."""
    return {
        "segment": ["segment", "in_PP.png", "-o", str(out)],
        "register": ["register", "in_PP.png", "in_QEMSCAN.tif", "-o", str(out)],
        "prepare": ["prepare", "in_PP.png", "labels.png", "--classes", "c.csv", "-o", str(out)],
        "evaluate": ["evaluate", "data.nc", "-o", str(out)],
        "compare": ["compare", "data.nc", "--models", "m1", "m2", "-o", str(out)],
        "train": ["train", "data.nc", "-o", str(out)],
    }[command]


def refused_in_process(capsys, argv: list[str]) -> str:
    """Run `thinseg ARGV` in-process; it must stop at parsing with status 2 and end in one
    `thinseg: error:` line (after the usage), no traceback. Returns that line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        main(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("thinseg: error:")]
    assert len(lines) == 1 and err.splitlines()[-1] == lines[0], err
    return lines[0]


def subcommand_actions(command: str) -> list[argparse.Action]:
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return list(commands.choices[command]._actions)


# -- the sweep: every numeric option of every command ----------------------------------------


@pytest.mark.parametrize("command", sorted(NUMERIC))
def test_every_numeric_option_refuses_nan_inf_negative_zero_and_absurd_values(command, capsys, tmp_path):
    out = tmp_path / "out"
    base = command_line(command, out)
    for option in NUMERIC[command]:
        for value in HOSTILE:
            if value == "0" and option in ZERO_ALLOWED:
                continue
            line = refused_in_process(capsys, [*base, f"{option}={value}"])
            assert line.startswith(f"thinseg: error: argument {option}: "), line
            assert not out.exists(), f"{option} {value} made {out}"


@pytest.mark.parametrize("command", sorted(NUMERIC))
def test_every_numeric_option_accepts_a_sensible_value_and_zero_where_documented(command, tmp_path):
    parser = build_parser()
    base = command_line(command, tmp_path / "out")
    for option, value in NUMERIC[command].items():
        args = parser.parse_args([*base, option, value])
        dest = option.lstrip("-").replace("-", "_")
        assert getattr(args, dest) == pytest.approx(float(value)), option
        if option in ZERO_ALLOWED:
            assert getattr(parser.parse_args([*base, option, "0"]), dest) == 0, option


@pytest.mark.parametrize("command", sorted(NUMERIC))
def test_no_numeric_option_is_left_without_a_range(command):
    """A new numeric option must get a range type (and a row in the sweep): a bare int or float
    type lets nan, inf and negatives through."""
    numeric_types = {types.mm_per_pixel, types.max_pixels, types.tile}
    long_names = set()
    for action in subcommand_actions(command):
        assert action.type not in (int, float), f"{command} {action.option_strings} has a bare {action.type}"
        if action.type in numeric_types or getattr(action.type, "__name__", "") in ("whole number", "number"):
            long_names.add(next(o for o in action.option_strings if o.startswith("--")))
    assert long_names == set(NUMERIC[command]), (command, long_names ^ set(NUMERIC[command]))


def test_every_command_that_reads_sections_takes_max_pixels(tmp_path):
    parser = build_parser()
    for command in NUMERIC:
        args = parser.parse_args([*command_line(command, tmp_path / "o"), "--max-pixels", "1e9"])
        assert args.max_pixels == 1_000_000_000
        assert parser.parse_args(command_line(command, tmp_path / "o")).max_pixels is None  # the bound in force


def test_range_types_name_the_bound_they_break():
    with pytest.raises(argparse.ArgumentTypeError, match="outside 16 to 4096"):
        types.tile("8")
    with pytest.raises(argparse.ArgumentTypeError, match="sane range 0.0001 to 1"):
        types.mm_per_pixel("2")
    with pytest.raises(argparse.ArgumentTypeError, match="not a finite number"):
        types.learning_rate("nan")
    with pytest.raises(argparse.ArgumentTypeError, match="not a whole number of pixels"):
        types.max_pixels("1.5")
    assert types.colour("#A0b1C2") == "#a0b1c2" and types.colour("a0b1c2") == "#a0b1c2"
    for bad in ("notacolour", "#12345", "#GGGGGG", "#1234567", "", "# 12345"):
        with pytest.raises(argparse.ArgumentTypeError, match="not a #rrggbb colour"):
            types.colour(bad)


def test_register_background_that_is_not_a_colour_is_one_line(capsys, tmp_path):
    out = tmp_path / "out"
    line = refused_in_process(capsys, [*command_line("register", out), "--background", "notacolour"])
    assert (
        line == "thinseg: error: argument --background: 'notacolour' is not a #rrggbb colour (six hexadecimal digits)"
    )
    assert not out.exists()


def test_training_sizes_each_in_range_but_too_large_together_are_refused_before_work(capsys, tmp_path):
    data = tmp_path / "missing.nc"  # never reached: the sizes are checked first
    cases = [
        (["--patch-size", "4096", "--batch-size", "8"], "--patch-size 4096 with --batch-size 8 is 128 MPix"),
        (["--val-tile", "4096"], "--val-tile 4096: 4 such tiles per validation pass"),
        (["--base-channels", "512", "--depth", "5"], "8192 channels in the deepest level, more than 4096"),
        (["--val-tile", "516", "--depth", "4"], "validation tile 516 (--val-tile) must be a multiple of 8"),
    ]
    for extra, message in cases:
        out = tmp_path / "run"
        capsys.readouterr()
        code = main(["train", str(data), "-o", str(out), *extra])
        err = capsys.readouterr().err
        assert code == 2 and "Traceback" not in err, err
        lines = [line for line in err.splitlines() if line.startswith("thinseg: error:")]
        assert len(lines) == 1 and message in lines[0], (extra, err)
        assert not out.exists()


# -- the engine and the jobs: a tile the model cannot take ---------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("model") / "tiny")


def test_engine_refuses_a_tile_the_network_cannot_take_and_a_pass_too_large(tiny):
    from thinseg.inference.engine import InferenceOptions, Segmenter, size_multiple
    from thinseg.model.bundle import load_bundle
    from thinseg.resources import default_model_dir

    bundle = load_bundle(tiny)  # one stride-2 level: tiles must be even
    assert size_multiple(bundle.network) == 2
    assert size_multiple(load_bundle(default_model_dir()).network) == 16  # four stride-2 levels
    assert Segmenter(bundle, InferenceOptions(tile=24, device="cpu")).tile == (24, 24)
    with pytest.raises(ThinSegError, match=r"tile \(--tile\) 17 px must be a multiple of 2 px for this model"):
        Segmenter(bundle, InferenceOptions(tile=17, device="cpu"))
    for tile in (0, -64, 8, 8192):
        with pytest.raises(ThinSegError, match="outside 16 to 4096 px"):
            Segmenter(bundle, InferenceOptions(tile=tile, device="cpu"))
    with pytest.raises(ThinSegError, match="a batch of 2 x 4096 x 4096 px is more than the 16 MPix"):
        Segmenter(bundle, InferenceOptions(tile=4096, batch_size=2, device="cpu"))


def test_segment_job_with_a_hostile_tile_is_refused_in_one_message(tiny, tmp_path):
    from thinseg.jobs.runner import run_segment_job

    pp, xp = section_images(48, 64)
    write_geoslicer_netcdf(tmp_path / "in.nc", {"S_PP": pp, "S_XP": xp})
    for tile, message in ((17, "must be a multiple of 2 px"), (100000, "outside 16 to 4096 px")):
        job = {"inputs": ["in.nc"], "output": "out.nc", "model_dir": str(tiny), "tile": tile, "device": "cpu"}
        with pytest.raises(ThinSegError, match=message):
            run_segment_job(job, tmp_path, emit=lambda event: None)
        assert not (tmp_path / "out.nc").exists()


def test_train_job_with_hostile_sizes_is_refused_before_any_section_is_read(tmp_path):
    from thinseg.jobs.runner import run_train_job

    base = {"sections": ["missing.nc"], "run_dir": str(tmp_path / "run"), "model_dir": str(tmp_path / "m")}
    base.update(depth=2, base_channels=4, device="cpu", epochs=1)
    cases = [
        ({"patch_size": 100000}, "patch size (--patch-size) 100000 px is outside 16 to 4096 px"),
        ({"patch_size": 2048, "batch_size": 8}, "a batch of 8 x 2048 x 2048 px is more than the 16 MPix"),
        ({"val_tile": 0}, "validation tile (--val-tile) 0 px is outside 16 to 4096 px"),
        ({"val_tile": 4096}, "a batch of 4 x 4096 x 4096 px"),
    ]
    for extra, message in cases:
        with pytest.raises(ThinSegError) as error:
            run_train_job({**base, **extra}, tmp_path, emit=lambda event: None)
        assert message in str(error.value), (extra, error.value)
        assert not (tmp_path / "m").exists()


def test_registration_refuses_nan_or_absurd_pixel_sizes_from_any_caller():
    from thinseg.registration.grids import Geometry

    for bad in (float("nan"), float("inf"), -1.0, 0.0, 1e30):
        with pytest.raises(ThinSegError, match="QEMSCAN pixel size .* outside the sane range"):
            Geometry((10, 10), 0.001, (5, 5), bad)
        with pytest.raises(ThinSegError, match="PP image pixel size .* outside the sane range"):
            Geometry((10, 10), bad, (5, 5), 0.01)


# -- landmark maths ----------------------------------------------------------------------------


def _geometry():
    from thinseg.registration.grids import Geometry

    return Geometry((100, 100), 0.001, (25, 25), 0.004)


def test_duplicate_or_collinear_landmarks_name_the_file_and_the_points(tmp_path):
    from thinseg.registration.landmarks import fit_landmarks

    path = tmp_path / "clicks.csv"
    q = np.array([[2, 2], [20, 3], [5, 20], [2, 2]], float)
    p = np.array([[10, 10], [90, 12], [20, 90], [10, 10]], float)
    names = ["a", "b", "c", "d"]
    for kind in ("tps", "affine", "similarity"):
        with pytest.raises(ThinSegError) as error:
            fit_landmarks(q, p, _geometry(), kind, names=names, path=path)
        assert error.value.path == path
        assert error.value.problem.startswith("landmarks a and d are the same point (10, 10) of the PP image")
    line_q = np.array([[2, 2], [4, 4], [6, 6], [8, 8]], float)
    line_p = np.array([[10, 10], [90, 12], [20, 90], [80, 80]], float)
    for kind, article in (("tps", "a"), ("affine", "an")):
        with pytest.raises(ThinSegError) as error:
            fit_landmarks(line_q, line_p, _geometry(), kind, names=names, path=path)
        assert error.value.path == path
        assert error.value.problem.startswith(f"the landmarks' points on the QEMSCAN map are collinear: {article}")


def test_too_few_landmarks_name_the_file_and_the_count(tmp_path):
    from thinseg.registration.landmarks import fit_landmarks

    path = tmp_path / "clicks.csv"
    q = np.array([[2, 2], [20, 3], [5, 20]], float)
    with pytest.raises(ThinSegError) as error:
        fit_landmarks(q, q * 4, _geometry(), "affine", path=path)
    assert error.value.path == path
    assert error.value.problem == "3 landmark pair(s) given, an affine transform needs at least 4"


def test_thin_plate_spline_through_a_repeated_point_is_a_thinseg_error():
    from thinseg.registration.tps import ThinPlateSpline

    with pytest.raises(ThinSegError, match="two of them are the same point"):
        ThinPlateSpline.fit([[0, 0], [10, 0], [0, 10], [0, 0]], [[0, 0], [1, 0], [0, 1], [0.5, 0.5]])


def test_too_many_or_oversized_landmark_files_are_refused(tmp_path):
    from thinseg.registration.landmark_io import MAX_LANDMARK_FILE_BYTES, read_landmarks
    from thinseg.registration.landmarks import MAX_PAIRS, check_landmarks

    big = tmp_path / "big.csv"
    with big.open("w") as f:
        f.write("qemscan_x,qemscan_y,image_x,image_y\n")
        f.truncate(MAX_LANDMARK_FILE_BYTES + 1)
    with pytest.raises(ThinSegError, match="more than the 10,485,760 landmarks take") as error:
        read_landmarks(big)
    assert error.value.path == big
    rng = np.random.default_rng(0)
    many = rng.uniform(1, 20, (MAX_PAIRS + 1, 2))
    with pytest.raises(ThinSegError, match=f"{MAX_PAIRS + 1} landmark pairs given, more than the {MAX_PAIRS}"):
        check_landmarks(many, many * 4, "similarity", _geometry())
    bad = tmp_path / "bad.mrk.json"
    bad.write_text('{"markups": [{"controlPoints": [{"position": ["x", 1, 0]}]}]}')
    with pytest.raises(ThinSegError, match="malformed"):
        read_landmarks(bad)


# -- the real command line, in fresh processes ------------------------------------------------


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> dict[str, Path]:
    from thinseg.synth import generate_section

    root = tmp_path_factory.mktemp("kit")
    pp, _ = write_pair(root, "S1_PP", "S1_XP", height=48, width=64)
    s = generate_section(128, 128, seed=5)
    write_image(root / "R_PP.png", s.pp)
    write_image(root / "R_XP.png", s.xp)
    lut = np.array(s.qemscan_table.lut(background=(255, 255, 255)), np.uint8)
    write_image(root / "R_QEMSCAN.png", lut[s.qemscan])
    header = "qemscan_x,qemscan_y,image_x,image_y,name\n"
    (root / "dup.csv").write_text(header + "2,2,10,10,a\n20,3,100,12,b\n5,20,20,100,c\n2,2,10,10,d\n")
    (root / "line.csv").write_text(header + "2,2,10,10,a\n4,4,20,20,b\n6,6,30,30,c\n8,8,40,40,d\n")
    return {"root": root, "pp": pp, "model": make_bundle(root / "model")}


QUICK = ["--device", "cpu", "--precision", "fp32", "-q"]


def test_cli_tile_zero_nan_pixel_size_and_bad_colour_are_one_line_in_a_real_process(kit, tmp_path):
    out = tmp_path / "out"
    cases = [
        ("segment", kit["pp"], "--model", kit["model"], "--tile", "0"),
        ("segment", kit["pp"], "--model", kit["model"], "--mm-per-pixel", "nan"),
        ("segment", kit["pp"], "--model", kit["model"], "--batch-size", "1e30"),
        ("train", kit["pp"], "--lr", "inf"),
        ("evaluate", kit["pp"], "--void-border-px", "1e30"),
        ("register", kit["pp"], kit["pp"], "--background", "notacolour"),
    ]
    for command, *rest in cases:
        option = [a for a in rest if isinstance(a, str) and a.startswith("--")][-1]
        run = thinseg(command, *rest, "-o", out)
        assert_refused(run, mentions=[f"argument {option}: "])
        assert run.peak_mb < REFUSAL_PEAK_MB
        assert_nothing_left(tmp_path)


def test_an_option_error_is_reported_before_torch_is_imported(tmp_path):
    """A usage error costs a fraction of a second: no command imports torch before parsing."""
    code = (
        "import sys\n"
        "from thinseg.cli.main import main\n"
        "try:\n"
        "    main(sys.argv[1:])\n"
        "except SystemExit as stop:\n"
        "    print(stop.code, sorted(m for m in ('torch', 'scipy', 'SimpleITK', 'netCDF4') if m in sys.modules))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(MODULE_DIR))
    for argv in (["segment", "x.png", "--tile", "0"], ["train", "x.nc", "-o", str(tmp_path / "r"), "--depth", "nan"]):
        done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=120)
        assert done.stdout.strip() == "2 []", (argv, done.stdout, done.stderr)


def test_segment_help_states_the_engine_default_overlap():
    from thinseg.cli.segment_cmd import DEFAULT_OVERLAP_PX
    from thinseg.inference.engine import DEFAULT_OVERLAP

    assert DEFAULT_OVERLAP_PX == DEFAULT_OVERLAP


def test_cli_tile_the_model_cannot_take_is_one_line_and_leaves_nothing(kit, tmp_path):
    out = tmp_path / "out"
    run = thinseg("segment", kit["pp"], "-o", out, "--tile", "40", *QUICK)  # the bundled model: 16
    assert_refused(run, mentions=["--tile", "40 px must be a multiple of 16 px for this model"])
    assert_nothing_left(tmp_path)


def test_cli_duplicate_landmark_with_tps_names_the_file_and_the_point(kit, tmp_path):
    root = kit["root"]
    for landmarks, kind, text in (
        ("dup.csv", "tps", "landmarks a and d are the same point (10, 10) of the PP image"),
        ("line.csv", "affine", "the landmarks' points on the PP image are collinear"),
    ):
        out = tmp_path / "out"
        run = thinseg(
            "register",
            root / "R_PP.png",
            root / "R_QEMSCAN.png",
            "--landmarks",
            root / landmarks,
            "--transform",
            kind,
            "--no-refine",
            "-o",
            out,
        )
        line = assert_refused(run, mentions=[str(root / landmarks), text])
        assert "LinAlgError" not in line
        assert_nothing_left(tmp_path)


def test_cli_max_pixels_bounds_the_section_and_overrides_the_environment(kit, tmp_path):
    out = tmp_path / "out"
    run = thinseg("segment", kit["pp"], "--model", kit["model"], "-o", out, "--max-pixels", "1000", *QUICK)
    assert_refused(run, mentions=[kit["pp"].name, "more than the"])
    assert_nothing_left(tmp_path)
    small = {limits.MAX_PIXELS_VARIABLE: "1000"}  # refuses the 64 x 48 px section on its own
    run = thinseg("segment", kit["pp"], "--model", kit["model"], "-o", out, "--max-pixels", "1e6", *QUICK, env=small)
    assert run.returncode == 0, run.describe()
    assert (out / "S1_PP.nc").is_file()


@pytest.mark.parametrize("value", ["inf", "1e400", "nan", "-5", "0", "2.5", "lots", float("nan"), float("inf"), True])
def test_every_way_to_give_the_section_bound_refuses_the_same_values(monkeypatch, value):
    """--max-pixels, THINSEG_MAX_PIXELS and a job's max_pixels go through one parser: a value
    that is not a finite whole number of pixels from 1 up is one line, never an OverflowError."""
    from thinseg import limits

    with pytest.raises(ThinSegError, match="pixels"):
        limits.parse_max_pixels(value, "--max-pixels")
    if isinstance(value, str):
        monkeypatch.setenv(limits.MAX_PIXELS_VARIABLE, value)
        with pytest.raises(ThinSegError, match=limits.MAX_PIXELS_VARIABLE):
            limits.max_section_pixels()
    assert limits.parse_max_pixels("1e9", "--max-pixels") == 10**9
