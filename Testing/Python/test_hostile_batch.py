"""Hostile batches and stops: whatever one section raises, deep inside and of whatever type, the
batch lists it in one line and finishes the rest (exit 1); a run that cannot do anything says so in
one line (exit 2); SIGTERM stops a run as Ctrl-C does (exit 143, nothing half-written, a training
checkpoint kept); a file name that is not UTF-8 is segmented and printed. Every case runs the real
`thinseg` (or `python -m thinseg.jobs`) in a fresh process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import MODULE_DIR, REPO, make_bundle, section_images, write_image
from hostile import Run, assert_batch_partial, assert_nothing_left, assert_refused, snapshot, start, thinseg

from thinseg.classes.files import default_class_table
from thinseg.io.netcdf import NetcdfWriter

MM = 0.00132
#: A file-size cap (RLIMIT_FSIZE) the small sections fit under and the big noise section does not.
SMALL_DISK = 400_000
#: A memory cap (RLIMIT_AS) a small section runs under (about 1 GB is needed) and a 2048 px tile does not.
MEMORY_CAP = 1500 * 2**20
TRAIN = ["--epochs", "50", "--steps-per-epoch", "2", "--patch-size", "64", "--batch-size", "2"]
TRAIN += ["--base-channels", "4", "--depth", "2", "--val-tile", "64", "--device", "cpu", "--precision", "fp32", "-q"]
QUICK = ["--device", "cpu", "--precision", "fp32", "-q"]
#: The bundled sample: a PP image and the QEMSCAN map that registers onto it.
SAMPLE = REPO / "Resources" / "Sample"


def noise(height: int, width: int, seed: int) -> np.ndarray:
    """Incompressible pixels: their netCDF is as large as the image."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def write_section(path: Path, seed: int = 0, height: int = 64, width: int = 80) -> Path:
    """A labelled GeoSlicer netCDF section (PP, XP, labelmap on the PP grid)."""
    pp, xp = section_images(height, width, seed)
    labels = (np.arange(height * width).reshape(height, width) // 500 % 6 + 1).astype(np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    stem = path.stem
    with NetcdfWriter(path) as writer:
        reference = writer.add_rgb_image(f"{stem}_PP", pp, MM)
        writer.add_rgb_image(f"{stem}_XP", xp, MM)
        writer.add_labelmap(f"{stem}_labels", labels, default_class_table(), MM, reference=reference)
    return path


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> dict[str, Path]:
    """A tiny model, a good PP/XP pair, labelled sections, a mask and its class file."""
    root = tmp_path_factory.mktemp("kit")
    pp, xp = section_images(64, 80, 3)
    kit = {
        "root": root,
        "model": make_bundle(root / "models" / "one", inputs=("PP", "PX"), seed=0),
        "model2": make_bundle(root / "models" / "two", inputs=("PP", "PX"), seed=1),
        "pp": write_image(root / "pair" / "S_PP.png", pp),
        "xp": write_image(root / "pair" / "S_XP.png", xp),
        "A": write_section(root / "data" / "A.nc", 1),
        "B": write_section(root / "data" / "B.nc", 2),
        "mask": write_image(root / "mask.png", (np.arange(64 * 80).reshape(64, 80) // 700 % 3 + 1).astype(np.uint8)),
    }
    classes = root / "classes.csv"
    classes.write_text("value,name,color\n1,Quartz,#ffff00\n2,Calcite,#00ffff\n3,Pores,#0000ff\n", encoding="utf-8")
    kit["classes"] = classes
    return kit


def folder_files(folder: Path) -> set[bytes]:
    """Names in `folder` as bytes (names that are not UTF-8 included)."""
    return set(os.listdir(os.fsencode(folder)))


# -- batches: one bad section, whatever it raises, and the rest finish ----------------------------


def test_a_full_disk_fails_the_big_section_and_the_small_ones_finish(tmp_path, kit):
    """The kernel refuses writes past a size (as a full disk does): netCDF4/HDF5 fails deep inside
    the big section's write; the small sections before and after it are written."""
    inputs = tmp_path / "in"
    for name, seed in (("a", 1), ("c", 2)):
        pp, xp = section_images(64, 80, seed)
        write_image(inputs / f"{name}_PP.png", pp)
        write_image(inputs / f"{name}_XP.png", xp)
    big = noise(300, 400, 1)
    write_image(inputs / "b_PP.png", big)
    write_image(inputs / "b_XP.png", big)
    out = tmp_path / "out"
    run = thinseg("segment", inputs, "--model", kit["model"], "-o", out, *QUICK, max_file_bytes=SMALL_DISK)
    lines = assert_batch_partial(run, ["b_PP"])
    assert [line for line in lines if line.startswith("thinseg: error:")] == [
        line for line in lines if line.startswith("thinseg: error:") and "b_PP" in line
    ], run.describe()
    assert "1 failed" in run.stderr and "2 section(s) segmented" in run.stderr, run.describe()
    assert folder_files(out) == {b"a_PP.nc", b"c_PP.nc", b"modal_mineralogy.csv"}


@pytest.mark.skipif(
    int(torch.__version__.split(".")[0]) < 2,
    reason="the address-space cap is sized for torch 2; torch 1.12 reserves more address space at import",
)
def test_a_section_too_big_for_the_memory_fails_and_the_small_one_finishes(tmp_path, kit):
    """Under a memory cap (RLIMIT_AS) torch's allocator fails deep inside the big section's
    inference (a RuntimeError, not a ThinSegError): that section is listed, the small one is written."""
    inputs = tmp_path / "in"
    pp, xp = section_images(64, 80, 1)
    write_image(inputs / "small_PP.png", pp)
    write_image(inputs / "small_XP.png", xp)
    huge = noise(2048, 2048, 1)
    write_image(inputs / "huge_PP.png", huge)
    write_image(inputs / "huge_XP.png", huge)
    out = tmp_path / "out"
    args = ["segment", inputs, "--model", kit["model"], "-o", out, "--tile", "2048", "--no-align", *QUICK]
    run = finish(launch("thinseg", *args, max_memory_bytes=MEMORY_CAP), [str(a) for a in args], timeout=300)
    assert_batch_partial(run, ["huge_PP"])
    assert [line for line in run.error_lines() if "huge_PP" not in line] == [], run.describe()
    assert folder_files(out) == {b"small_PP.nc", b"modal_mineralogy.csv"}


def test_corrupt_and_odd_inputs_among_good_ones_are_listed_and_the_rest_finish(tmp_path, kit):
    inputs = tmp_path / "in"
    pp, xp = section_images(64, 80, 1)
    write_image(inputs / "good_PP.png", pp)
    write_image(inputs / "good_XP.png", xp)
    truncated = write_image(inputs / "cut_PP.png", noise(64, 80, 3))
    truncated.write_bytes(truncated.read_bytes()[:600])  # a PNG header that promises rows it does not hold
    write_image(inputs / "cut_XP.png", xp)
    (inputs / "empty.nc").write_bytes(b"")
    (inputs / "garbage.nc").write_bytes(b"CDF\x02" + os.urandom(2000))
    out = tmp_path / "out"
    run = thinseg("segment", inputs, "--model", kit["model"], "-o", out, *QUICK)
    assert_batch_partial(run, ["cut_PP.png", "empty.nc", "garbage.nc"])
    assert b"good_PP.nc" in folder_files(out)
    assert not [p for p in folder_files(out) if p.startswith(b".") or p.endswith(b".partial")]
    for name in ("cut_PP.png", "empty.nc", "garbage.nc"):
        named = [line for line in run.error_lines() if name in line]
        assert len(named) == 1, run.describe()  # one line when it failed (and once in the summary)


def test_a_file_name_that_is_not_utf8_is_segmented_and_printed(tmp_path, kit):
    """Linux allows any bytes in a name: the output keeps the input's bytes, the printout shows
    them as \\xff, names inside the files are text."""
    inputs = os.path.join(os.fsencode(tmp_path), b"in")
    os.makedirs(inputs)
    pp, xp = section_images(64, 80, 2)
    write_image(Path(os.fsdecode(os.path.join(inputs, b"good\xff_PP.png"))), pp)
    write_image(Path(os.fsdecode(os.path.join(inputs, b"good\xff_XP.png"))), xp)
    out = tmp_path / "out"
    run = thinseg("segment", os.fsdecode(inputs), "--model", kit["model"], "-o", out, *QUICK)
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.describe()
    assert folder_files(out) == {b"good\xff_PP.nc", b"modal_mineralogy.csv"}
    assert "good\\xff_PP" in run.stdout and f"-> {out}/good\\xff_PP.nc" in run.stdout, run.describe()
    table = (out / "modal_mineralogy.csv").read_text(encoding="utf-8")
    assert "good\\xff_PP,Calcite," in table


# -- every command: one line, exit 2, nothing left --------------------------------------------------


def command(kit: dict[str, Path], name: str, out: Path) -> list[object]:
    """A command line of `name` that works on the kit, writing into `out`."""
    return {
        "segment": ["segment", kit["pp"], "--xp", kit["xp"], "--model", kit["model"], "-o", out, *QUICK],
        "register": [
            "register",
            SAMPLE / "sample_PP.jpg",
            SAMPLE / "sample_QEMSCAN.tif",
            "--colors",
            SAMPLE / "sample_QEMSCAN.csv",
            "-o",
            out,
            "-q",
        ],
        "prepare": ["prepare", kit["pp"], kit["mask"], "--classes", kit["classes"], "--xp", kit["xp"], "-o", out],
        "evaluate": ["evaluate", kit["A"], kit["B"], "--model", kit["model"], "-o", out, *QUICK],
        "compare": ["compare", "-o", out, *QUICK, "--models", kit["model"], kit["model2"], "--", kit["A"], kit["B"]],
        "train": ["train", kit["A"], "--val", kit["B"], "-o", out, *TRAIN[2:], "--epochs", "1"],
    }[name]


@pytest.mark.parametrize("name", ["register", "prepare", "evaluate", "compare", "train"])  # segment: the batches
def test_every_command_on_a_full_disk_says_so_in_one_line_and_keeps_nothing(tmp_path, kit, name):
    """Writes beyond 2 kB fail in the kernel (EFBIG, as ENOSPC from a full disk), wherever they
    happen: netCDF4/HDF5, PNG figures, torch checkpoints."""
    run = thinseg(*command(kit, name, tmp_path / "out"), max_file_bytes=2_000)
    assert_refused(run, code=2, mentions=[str(tmp_path / "out")])
    assert_nothing_left(tmp_path)


def hostile_command(kit: dict[str, Path], name: str, case: str, tmp_path: Path) -> list[object]:
    """`name` with its first input file replaced: missing, a folder, or garbage bytes."""
    suffix = ".nc" if name in ("evaluate", "compare", "train") else ".png"
    target = tmp_path / f"bad_PP{suffix}"
    if case == "folder":
        target.mkdir()
    elif case == "garbage":
        target.write_bytes((b"CDF\x01" if suffix == ".nc" else b"\x89PNG\r\n\x1a\n") + os.urandom(300))
    replaced = SAMPLE / "sample_PP.jpg" if name == "register" else kit["pp"] if suffix == ".png" else kit["A"]
    return [target if item == replaced else item for item in command(kit, name, tmp_path / "out")]


@pytest.mark.parametrize(
    ("name", "case"),
    [
        ("segment", "missing"),
        ("register", "garbage"),
        ("prepare", "folder"),
        ("evaluate", "garbage"),
        ("train", "folder"),
    ],
)
def test_every_command_on_a_missing_odd_or_garbage_input_says_so_in_one_line(tmp_path, kit, name, case):
    args = hostile_command(kit, name, case, tmp_path)
    before = snapshot(tmp_path)
    run = thinseg(*args)
    assert_refused(run, code=2, mentions=["bad_PP"])
    assert_nothing_left(tmp_path, before)


def test_thinseg_debug_prints_the_traceback_as_well_as_the_line(tmp_path, kit):
    args = hostile_command(kit, "prepare", "garbage", tmp_path)
    before = snapshot(tmp_path)
    quiet = thinseg(*args)
    line = assert_refused(quiet, code=2, mentions=["bad_PP.png"])
    loud = thinseg(*args, env={"THINSEG_DEBUG": "1"})
    assert loud.returncode == 2 and "Traceback (most recent call last)" in loud.stderr, loud.describe()
    assert loud.error_lines() == [line] and loud.stderr.strip().splitlines()[-1] == line
    assert_nothing_left(tmp_path, before)


# -- SIGTERM -----------------------------------------------------------------------------------


def wait_for(condition, process: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if process.poll() is not None:
            out, err = process.communicate()
            raise AssertionError(f"finished before the signal ({process.returncode}):\n{out}\n{err}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("the run never got there")
        time.sleep(0.05)


def finish(process: subprocess.Popen, args: list[str], timeout: float = 120.0) -> Run:
    out, err = process.communicate(timeout=timeout)
    return Run(args, process.returncode, out.decode(errors="replace"), err.decode(errors="replace"), 0.0)


def partial_in(folder: Path, target: str) -> bool:
    """Whether the temporary of `folder/target` exists: the run is writing it."""
    return folder.is_dir() and any(f".{target}." in p.name and p.name.endswith(".partial") for p in folder.iterdir())


def test_sigterm_during_segment_keeps_nothing_new_and_the_older_result(tmp_path, kit):
    inputs = tmp_path / "in"
    write_image(inputs / "S_PP.png", noise(1000, 1200, 1))
    write_image(inputs / "S_XP.png", noise(1000, 1200, 2))
    out = tmp_path / "out"
    out.mkdir()
    older = out / "S_PP.nc"
    older.write_bytes(b"an older result")
    before = snapshot(tmp_path)
    args = ["segment", str(inputs), "--model", str(kit["model"]), "-o", str(out), "--overwrite", "--tile", "64"]
    args.append("--no-align")
    process = start(*args, *QUICK)
    wait_for(lambda: partial_in(out, "S_PP.nc"), process)
    process.send_signal(signal.SIGTERM)
    run = finish(process, args)
    assert run.returncode == 143 and "Traceback" not in run.stderr, run.describe()
    assert run.stderr.strip().splitlines()[-1] == "thinseg: terminated; no partial output was kept"
    assert not run.error_lines()
    assert older.read_bytes() == b"an older result"
    assert_nothing_left(tmp_path, before)


def test_sigterm_during_training_keeps_the_checkpoint_and_resume_goes_on(tmp_path, kit):
    run_dir = tmp_path / "run"
    args = ["train", str(kit["A"]), "--val", str(kit["B"]), "-o", str(run_dir), *TRAIN]
    process = start(*args)
    wait_for(lambda: (run_dir / "checkpoint.pt").is_file(), process, timeout=300)
    process.send_signal(signal.SIGTERM)
    run = finish(process, args)
    assert run.returncode == 143 and "Traceback" not in run.stderr, run.describe()
    last = run.stderr.strip().splitlines()[-1]
    assert last == (
        f"thinseg: terminated; finished epochs are kept in {run_dir}: run the same command with --resume to continue"
    )
    assert (run_dir / "checkpoint.pt").is_file()
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")]  # no temporary, no lock
    from thinseg.training.checkpoint import load_checkpoint

    epochs = int(load_checkpoint(run_dir / "checkpoint.pt")["epoch"])
    # the log follows the checkpoint, so a signal between the two leaves it one epoch behind: for
    # the first epoch that is no log file yet
    log = run_dir / "training_log.csv"
    rows = len(log.read_text().splitlines()) - 1 if log.exists() else 0
    assert rows in (epochs, epochs - 1)
    resumed = thinseg(
        "train", kit["A"], "--val", kit["B"], "-o", run_dir, *TRAIN[2:], "--epochs", epochs + 1, "--resume"
    )
    assert resumed.returncode == 0, resumed.describe()
    assert f"resuming after epoch {epochs}" in resumed.stderr


def test_main_in_process_restores_the_signal_handler_and_the_streams(tmp_path, kit, capsys):
    from thinseg.cli.main import main

    handler = signal.getsignal(signal.SIGTERM)
    errors = sys.stderr.errors
    assert main(["prepare", str(tmp_path / "nope_PP.png"), str(kit["mask"]), "--classes", str(kit["classes"])]) == 2
    assert capsys.readouterr().err.count("thinseg: error:") == 1
    assert signal.getsignal(signal.SIGTERM) is handler and sys.stderr.errors == errors


# -- the job runner: one error event, never a traceback on stdout ---------------------------------


def launch(
    module: str, *args: object, max_file_bytes: int | None = None, max_memory_bytes: int | None = None
) -> subprocess.Popen:
    """`python -m MODULE ARGS` in a fresh process, with the kernel capping the size of the files it
    writes (RLIMIT_FSIZE: EFBIG as from a full disk) or its memory (RLIMIT_AS: allocations fail)."""
    environment = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", MALLOC_ARENA_MAX="1")
    environment["PYTHONPATH"] = str(MODULE_DIR) + os.pathsep + environment.get("PYTHONPATH", "")

    def limit() -> None:
        import resource

        if max_file_bytes is not None:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))
        if max_memory_bytes is not None:
            resource.setrlimit(resource.RLIMIT_AS, (max_memory_bytes, max_memory_bytes))

    return subprocess.Popen(
        [sys.executable, "-m", module, *[os.fspath(a) if isinstance(a, os.PathLike) else str(a) for a in args]],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        preexec_fn=limit,
    )


def start_job(task: str, job: Path, max_file_bytes: int | None = None) -> subprocess.Popen:
    return launch("thinseg.jobs", task, job, max_file_bytes=max_file_bytes)


def job_events(run: Run) -> list:
    from thinseg.jobs.events import parse_event

    events = [parse_event(line) for line in run.stdout.splitlines()]
    assert all(event is not None for event in events), run.describe()  # stdout holds event lines only
    return events


def write_job(folder: Path, kit: dict[str, Path], section: np.ndarray | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    pp, xp = (section, section.copy()) if section is not None else section_images(64, 80, 1)
    with NetcdfWriter(folder / "S1.nc") as writer:
        writer.add_rgb_image("S1_PP", pp, MM)
        writer.add_rgb_image("S1_XP", xp, MM)
    job = {"inputs": ["S1.nc"], "output": "out.nc", "model_dir": str(kit["model"]), "device": "cpu", "tile": 64}
    (folder / "job.json").write_text(json.dumps(job), encoding="utf-8")
    return folder / "job.json"


def test_job_on_a_full_disk_ends_with_one_error_event(tmp_path, kit):
    from thinseg.jobs.events import ErrorEvent

    job = write_job(tmp_path / "job", kit, noise(300, 400, 4))
    before = snapshot(tmp_path)
    process = start_job("segment", job, max_file_bytes=SMALL_DISK)
    run = finish(process, ["segment", str(job)])
    assert run.returncode == 2 and "Traceback" not in run.stderr + run.stdout, run.describe()
    events = job_events(run)
    assert isinstance(events[-1], ErrorEvent) and events[-1].path is not None, run.describe()
    assert [e for e in events if isinstance(e, ErrorEvent)] == [events[-1]]
    assert run.stderr.strip() == f"thinseg: error: {events[-1].message}"
    assert_nothing_left(tmp_path, before)


def test_sigterm_during_a_job_is_an_error_event_and_keeps_nothing(tmp_path, kit):
    from thinseg.jobs.events import ErrorEvent

    job = write_job(tmp_path / "job", kit, noise(2000, 2400, 5))
    before = snapshot(tmp_path)
    process = start_job("segment", job)
    lines: list[bytes] = []

    def read_events() -> None:
        for line in iter(process.stdout.readline, b""):
            lines.append(line)  # noqa: PERF402 (appended one by one: the test reads them as they come)

    reader = threading.Thread(target=read_events, daemon=True)
    reader.start()

    def segmenting() -> bool:  # a progress event part way: the run is in the middle of its work
        events = [json.loads(line.split(b" ", 1)[1]) for line in list(lines) if b'"kind": "progress"' in line]
        return any(0 < e["done"] < e["total"] for e in events)

    wait_for(segmenting, process)
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=120)
    reader.join(timeout=10)
    run = Run(
        ["segment", str(job)],
        process.returncode,
        b"".join(lines).decode(errors="replace"),
        process.stderr.read().decode(errors="replace"),
        0.0,
    )
    assert run.returncode == 143 and "Traceback" not in run.stderr + run.stdout, run.describe()
    events = job_events(run)
    assert isinstance(events[-1], ErrorEvent) and events[-1].problem == "terminated", run.describe()
    assert run.stderr.strip().splitlines()[-1] == "thinseg: terminated; no partial output was kept"
    assert_nothing_left(tmp_path, before)


@pytest.mark.parametrize("name", ["prepare", "evaluate"])
def test_a_dead_runs_temporaries_are_swept_and_reported_by_the_next_command(tmp_path, kit, capsys, name):
    """A run killed outright (kill -9, out of memory) leaves its hidden temporaries; the next
    command writing into that folder removes those of dead processes on this machine and says so,
    and leaves a live process's alone."""
    from helpers import run_main

    from thinseg.io import locks

    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = out / f".S.nc.{locks.HOST}.{dead.pid}.0000dead.partial"
    stale.write_bytes(b"half a result")
    alive = out / f".T.nc.{locks.HOST}.{os.getpid()}.0000a11e.partial"
    alive.write_bytes(b"being written")
    args = {
        "prepare": ["prepare", kit["pp"], kit["mask"], "--classes", kit["classes"], "--xp", kit["xp"], "-o", out],
        "evaluate": ["evaluate", "--model", kit["model"], kit["A"], "-o", out, *QUICK],
    }[name]
    code, _, err = run_main(capsys, *args)
    assert code == 0, err
    assert not stale.exists() and alive.read_bytes() == b"being written"
    assert "removed 1 stale temporar" in err and str(out) in err, err
