"""`thinseg train` on two processes (DistributedDataParallel over gloo, on the CPU): real runs of
real processes on tiny generated sections. The loss falls, the exported bundle loads through the
safe loader and segments, rank 0 alone writes into the run folder (seen by an audit hook in every
process), killing every process after the first epoch leaves a run that --resume finishes, SIGTERM
to the launcher stops every rank with one message, a rank that dies ends the run at once with one
error line, and each rank draws its own reproducible patches.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import MODULE_DIR

from thinseg.classes.files import default_class_table
from thinseg.console import Terminated, signals_held, sigterm_as_interrupt
from thinseg.data.sections import open_section, synthetic_sections
from thinseg.inference.engine import InferenceOptions, Segmenter
from thinseg.io.netcdf import NetcdfWriter
from thinseg.model.bundle import load_bundle
from thinseg.model.safe_load import load_torch_file
from thinseg.synth import generate_section
from thinseg.training.config import AugmentConfig
from thinseg.training.curves import plot_curves
from thinseg.training.dataset import PatchStream
from thinseg.training.sampler import rank_seed
from thinseg.training.targets import prepare_sections

TABLE = default_class_table()
MM = 0.00132
TRAIN = ["--steps-per-epoch", "4", "--patch-size", "64", "--batch-size", "2", "--base-channels", "4"]
TRAIN += ["--depth", "2", "--val-tile", "64", "--lr", "0.05", "--device", "cpu", "--precision", "fp32", "-q"]

#: Loaded by every Python process of a run (through PYTHONPATH): records each file a process opens
#: for writing, one line per file, in AUDIT_DIR/<rank or "launcher">-<pid>.txt.
SITECUSTOMIZE = """
import os, sys

_folder = os.environ.get("THINSEG_TEST_AUDIT_DIR")
if _folder:
    _who = os.environ.get("RANK", "launcher")
    _log = os.path.join(_folder, f"{_who}-{os.getpid()}.txt")
    _busy = []
    open(_log, "a").close()  # this process runs the hook, even if it writes nothing

    def _hook(event, args):
        if event != "open" or _busy or not args or not isinstance(args[0], (str, bytes)):
            return
        mode, flags = (args[1] or ""), (args[2] if len(args) > 2 and isinstance(args[2], int) else 0)
        writing = any(c in str(mode) for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)
        if writing:
            _busy.append(1)
            try:
                with open(_log, "a", encoding="utf-8") as out:
                    out.write(os.fsdecode(args[0]) + "\\n")
            finally:
                _busy.pop()

    sys.addaudithook(_hook)

if os.environ.get("RANK") and os.environ.get("RANK") == os.environ.get("THINSEG_TEST_KILL_RANK"):
    import signal, threading, time

    def _die_after(path):  # as the kernel's out-of-memory killer would end the rank
        while not os.path.exists(path):
            time.sleep(0.02)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=_die_after, args=(os.environ["THINSEG_TEST_KILL_AFTER"],), daemon=True).start()
"""


def write_section(path: Path, seed: int) -> Path:
    """A labelled GeoSlicer netCDF section (PP, XP, labelmap on the PP grid)."""
    s = generate_section(96, 112, seed=seed, mm_per_pixel=MM)
    with NetcdfWriter(path) as writer:
        pp = writer.add_rgb_image(f"{path.stem}_PP", s.pp, MM)
        writer.add_rgb_image(f"{path.stem}_XP", s.xp, MM)
        writer.add_labelmap(f"{path.stem}_labels", s.labels.astype(np.uint8), TABLE, MM, reference=pp)
    return path


@pytest.fixture(scope="module")
def kit(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ddp")
    (root / "data").mkdir()
    hooks = root / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    return {
        "root": root,
        "A": write_section(root / "data" / "A.nc", 21),
        "B": write_section(root / "data" / "B.nc", 22),
        "hooks": hooks,
    }


def environment(kit: dict[str, Path], audit: Path | None = None, **extra: str) -> dict[str, str]:
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", **extra)
    env.pop("OMP_NUM_THREADS", None)  # each rank takes its share of the CPUs
    paths = [str(MODULE_DIR)]
    if audit is not None:
        audit.mkdir(parents=True, exist_ok=True)
        env["THINSEG_TEST_AUDIT_DIR"] = str(audit)
    if audit is not None or extra:
        paths.insert(0, str(kit["hooks"]))
    env["PYTHONPATH"] = os.pathsep.join(paths + [env.get("PYTHONPATH", "")])
    return env


def launch(kit: dict[str, Path], *args: object, **extra: str) -> subprocess.Popen:
    """`python -m thinseg ARGS` in a process group of its own (so the test can kill the group)."""
    return subprocess.Popen(
        [sys.executable, "-m", "thinseg", *[os.fspath(a) if isinstance(a, Path) else str(a) for a in args]],
        env=environment(kit, **extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish(process: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    try:
        out, err = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        out, err = process.communicate()
        pytest.fail(f"the run did not end in {timeout} s\n{out}\n{err}")
    return process.returncode, out, err


def log_rows(run_dir: Path) -> list[dict[str, str]]:
    with open(run_dir / "training_log.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def processes_with(marker: str) -> list[int]:
    """Processes whose command line holds `marker` (the ranks of one run, by its run folder)."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            command = Path("/proc", name, "cmdline").read_bytes()
        except OSError:
            continue
        if marker.encode() in command:
            found.append(int(name))
    return found


def wait_until(condition, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"waited {seconds} s for {what}")
        time.sleep(0.1)


def test_two_processes_train_and_rank_0_alone_writes_a_bundle_that_loads_and_segments(kit):
    run_dir, audit = kit["root"] / "run", kit["root"] / "audit"
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [*launcher, "-m", "thinseg", "train", kit["A"], "--val", kit["B"], "-o", run_dir, "--epochs", "3"]
    run = subprocess.run(
        [os.fspath(a) if isinstance(a, Path) else a for a in [*command, *TRAIN]],
        env=environment(kit, audit),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert run.returncode == 0, run.stderr
    # rank 0 alone printed: one line per epoch, one result
    assert "training on 2 processes (gloo): 2 patches per process and step, 4 in all" in run.stderr
    assert [line.split(":")[0] for line in run.stderr.splitlines() if line.startswith("epoch ")] == [
        "epoch 1/3",
        "epoch 2/3",
        "epoch 3/3",
    ], run.stderr
    assert run.stdout.count("model: ") == 1 and "Traceback" not in run.stderr

    rows = log_rows(run_dir)
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    losses = [float(r["train_loss"]) for r in rows]
    assert losses[-1] < losses[0], losses

    # who wrote what: rank 0 every file of the run folder, rank 1 and the launcher nothing there
    written: dict[str, set[str]] = {}
    for record in audit.iterdir():
        who = record.name.split("-")[0]
        written.setdefault(who, set()).update(record.read_text(encoding="utf-8").split())
    assert set(written) >= {"0", "1"}, written.keys()
    inside = {
        who: {p for p in paths if Path(p).resolve().is_relative_to(run_dir.resolve())} for who, paths in written.items()
    }
    assert inside.pop("0"), "rank 0 wrote nothing: the audit hook saw no writes"
    assert all(not paths for paths in inside.values()), inside
    for name in ("split.json", "training_log.csv", "training_curves.png", "meta.json"):
        assert any(name in Path(p).name for p in written["0"]), (name, written["0"])
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")]  # no temporary, no lock

    # the bundle: single-process format (no DDP "module." prefix), safe loader, segments
    saved = load_torch_file(run_dir / "model" / "model.pth")
    state = saved.get("model_state_dict", saved) if isinstance(saved, dict) else saved
    assert state and not [k for k in state if str(k).startswith("module.")]
    meta = json.loads((run_dir / "model" / "meta.json").read_text(encoding="utf-8"))
    assert meta["training"]["processes"] == 2 and meta["training"]["batch_size"] == 2
    bundle = load_bundle(run_dir / "model")
    section = open_section(kit["B"])
    labels = (
        Segmenter(bundle, InferenceOptions(tile=64, overlap=16, device="cpu"))
        .segment([section.source("PP"), section.source("XP")])
        .labels
    )
    assert labels.shape == (96, 112) and 1 <= labels.max() <= len(TABLE)
    checkpoint = load_torch_file(run_dir / "checkpoint.pt")
    assert checkpoint["epoch"] == 3 and not [k for k in checkpoint["model"] if k.startswith("module.")]


def test_killing_every_process_after_an_epoch_then_resume_finishes_the_run(kit):
    run_dir = kit["root"] / "killed"
    args = ["train", kit["A"], "--val", kit["B"], "-o", run_dir, *TRAIN, "--nproc", "2"]
    process = launch(kit, *args, "--epochs", "60")
    wait_until(lambda: (run_dir / "checkpoint.pt").is_file() or process.poll() is not None, 90, "the first epoch")
    assert process.poll() is None, finish(process)
    os.killpg(process.pid, signal.SIGKILL)  # the launcher and whatever shares its group, all at once
    finish(process)
    # ranks in sessions of their own (recent torch) stop once their launcher is gone
    wait_until(lambda: not processes_with(str(run_dir)), 30, "every rank to end")
    done = int(load_torch_file(run_dir / "checkpoint.pt")["epoch"])
    assert 1 <= done < 60

    code, out, err = finish(launch(kit, *args, "--epochs", str(done + 2), "--resume"))
    assert code == 0, err
    assert f"resuming after epoch {done}" in err and "model: " in out
    assert [int(r["epoch"]) for r in log_rows(run_dir)] == list(range(1, done + 3))
    assert int(load_torch_file(run_dir / "checkpoint.pt")["epoch"]) == done + 2
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")]


def test_sigterm_to_the_launcher_stops_every_rank_with_one_message(kit):
    run_dir = kit["root"] / "terminated"
    process = launch(kit, "train", kit["A"], "--val", kit["B"], "-o", run_dir, *TRAIN, "--epochs", "60", "--nproc", "2")
    wait_until(lambda: (run_dir / "checkpoint.pt").is_file() or process.poll() is not None, 90, "the first epoch")
    process.send_signal(signal.SIGTERM)  # the launcher alone: it passes the signal on
    code, _out, err = finish(process)
    assert code == 143, err
    assert err.strip().splitlines()[-1] == (
        f"thinseg: terminated; finished epochs are kept in {run_dir}: run the same command with --resume to continue"
    )
    assert err.count("thinseg: terminated") == 1 and "Traceback" not in err and "error" not in err, err
    wait_until(lambda: not processes_with(str(run_dir)), 30, "every rank to end")
    assert not [p.name for p in run_dir.iterdir() if p.name.startswith(".")]


def test_a_rank_that_dies_ends_the_run_at_once_with_one_error_line_and_the_checkpoint_kept(kit):
    run_dir = kit["root"] / "rank-died"
    args = ["train", kit["A"], "--val", kit["B"], "-o", run_dir, *TRAIN, "--nproc", "2"]
    started = time.monotonic()
    process = launch(
        kit, *args, "--epochs", "60", THINSEG_TEST_KILL_RANK="1", THINSEG_TEST_KILL_AFTER=str(run_dir / "checkpoint.pt")
    )
    code, _out, err = finish(process, timeout=90)
    assert time.monotonic() - started < 60  # nobody waited for the dead rank
    assert code == 128 + signal.SIGKILL, err
    errors = [line for line in err.splitlines() if line.startswith("thinseg: error:")]
    assert errors == ["thinseg: error: training process 1 was killed by signal SIGKILL"], err
    assert "Traceback" not in err and "ChildFailedError" not in err, err
    wait_until(lambda: not processes_with(str(run_dir)), 30, "every rank to end")
    done = int(load_torch_file(run_dir / "checkpoint.pt")["epoch"])
    kept = f"finished epochs are kept in {run_dir}: run the same command with --resume to continue"
    assert err.count(kept) == 1, err  # rank 0: "terminated" or "stopped because another training process ended"
    assert done >= 1 and not [p.name for p in run_dir.iterdir() if p.name.startswith(".")]


def test_each_rank_draws_its_own_patches_and_redraws_them_exactly():
    generated = synthetic_sections(2, 160, seed=4)
    prepared = prepare_sections(generated, TABLE, patch_size=32, model_mm_per_pixel=generated[0].mm_per_pixel)

    def patches(seed: int) -> list[np.ndarray]:
        stream = PatchStream(
            prepared,
            ("PP", "XP"),
            len(TABLE),
            patch_size=32,
            batch_size=4,
            steps=3,
            balancing_strength=0.75,
            augment=AugmentConfig(),
            seed=seed,
        )
        stream.set_epoch(2)
        return [image.numpy() for image, _target, _jitter in stream.stream()]

    rank0, rank1, rank2 = (patches(rank_seed(7, r)) for r in range(3))
    assert rank_seed(7, 0) == 7  # one process draws what it always drew
    assert all(np.array_equal(a, b) for a, b in zip(rank0, patches(7)))
    assert all(np.array_equal(a, b) for a, b in zip(rank1, patches(rank_seed(7, 1))))  # reproducible
    for one, other in ((rank0, rank1), (rank0, rank2), (rank1, rank2)):
        assert sum(np.array_equal(a, b) for a, b in zip(one, other)) == 0  # ranks never share a patch
    assert len({rank_seed(s, r) for s in range(20) for r in range(8)}) == 160


def test_sigterm_while_the_curves_are_drawn_stops_the_run_once_they_are_written(tmp_path):
    """matplotlib loads its C extensions on the first curves: a SIGTERM there must not turn into
    an ImportError ("initialization failed"); it stops the run right after the file is written."""
    history = [{"epoch": 1, "train_loss": 1.0, "val_mean_iou": 0.5}]
    with pytest.raises(Terminated), sigterm_as_interrupt():
        with signals_held():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)  # the handler would have run by now
            written = plot_curves(tmp_path / "curves.png", history)
        pytest.fail("the held SIGTERM was not delivered at the end of the block")
    assert written == tmp_path / "curves.png" and written.read_bytes()[:4] == b"\x89PNG"


def test_each_process_runs_the_command_line_without_nproc():
    from thinseg.cli.train_cmd import without_nproc

    assert without_nproc(["train", "a.nc", "--nproc", "2", "-o", "r"]) == ["train", "a.nc", "-o", "r"]
    assert without_nproc(["train", "--nproc=3", "a.nc", "--npro", "2", "-o", "r"]) == ["train", "a.nc", "-o", "r"]
    assert without_nproc(["train", "-o", "r", "--", "--nproc"]) == ["train", "-o", "r", "--", "--nproc"]
    assert torch.distributed.is_available()


def test_the_rank_named_is_the_one_killed_not_the_one_the_agent_stopped_after_it(tmp_path):
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    from thinseg.training.distributed import failure_to_report

    def failed(*codes: int) -> ChildFailedError:
        files = [tmp_path / f"error-{rank}.json" for rank in range(len(codes))]  # never written: no rank wrote one
        return ChildFailedError(
            "thinseg",
            {rank: ProcessFailure(rank, 1000 + rank, code, str(f)) for rank, (code, f) in enumerate(zip(codes, files))},
        )

    # rank 1 killed (out of memory, say); rank 0 ended by the agent's SIGTERM before its handler ran
    assert failure_to_report(failed(-signal.SIGTERM, -signal.SIGKILL))[0] == 1
    assert failure_to_report(failed(-signal.SIGKILL, -signal.SIGTERM))[0] == 0
    assert failure_to_report(failed(-signal.SIGTERM, -signal.SIGTERM))[0] == 0  # SIGTERM alone: the first
    assert failure_to_report(failed(1, -signal.SIGSEGV))[0] == 1  # a death by signal before a status
    rank, failure = failure_to_report(failed(2, 0))
    assert (rank, int(failure.exitcode)) == (0, 2)
