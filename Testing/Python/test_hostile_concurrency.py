"""Hostile concurrency: runs racing into one folder, runs killed outright, and what they leave.

Real `thinseg` processes (hostile.start / hostile.thinseg) race for one output name, are killed
with SIGKILL mid-run, and share a training run folder; the promises: no result is ever lost or
replaced, each run names the file it actually wrote, a training run folder has one owner at a
time, and what a killed run left is cleared by the next run.
"""

from __future__ import annotations

import csv
import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import hostile
import numpy as np
import pytest
from helpers import MODULE_DIR, make_bundle, section_images, write_image
from test_cli_train_evaluate import TINY_TRAIN, write_section

from thinseg.errors import ThinSegError
from thinseg.io import atomic, locks
from thinseg.io.atomic import AtomicOutput, commit_unique, numbered, removed_on_failure, sweep_stale_temporaries
from thinseg.io.netcdf import list_variables, read_labelmap
from thinseg.pipelines.outputs import OutputSet

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_bundle(tmp_path_factory.mktemp("model") / "tiny-pp", inputs=("PP",), title="tiny PP only")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """good_PP.png (small) and big_PP.png (a 1024 px square: segmenting it takes a second or two)."""
    folder = tmp_path_factory.mktemp("inputs")
    pp, _ = section_images(100, 140)
    write_image(folder / "good_PP.png", pp)
    write_image(folder / "big_PP.png", np.tile(pp, (11, 8, 1))[:1024, :1024])
    return folder


def _segment(model: Path, image: Path, out: Path, *extra: str) -> subprocess.Popen:
    return hostile.start("segment", image, "--model", model, "--output", out, "--quiet", "--device", "cpu", *extra)


def _finish(process: subprocess.Popen, timeout: float = 240) -> tuple[int, str, str]:
    stdout, stderr = process.communicate(timeout=timeout)
    return process.returncode, stdout.decode(), stderr.decode()


def _written(stdout: str) -> list[Path]:
    return [Path(line.split("-> ", 1)[1]) for line in stdout.splitlines() if line.strip().startswith("-> ")]


def _temporaries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") or p.name.endswith(".partial"))


def _wait_for(condition, timeout: float = 120, interval: float = 0.005) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(interval)


def _labels(path: Path) -> np.ndarray:
    name = next(v.name for v in list_variables(path) if v.name.endswith("_Segmentation"))
    return read_labelmap(path, name)[0]


def _mineralogy_sections(folder: Path) -> set[str]:
    with open(folder / "modal_mineralogy.csv", encoding="utf-8") as f:
        return {row["section"] for row in csv.DictReader(f)}


# -- segment: two runs, one name ------------------------------------------------------------------


def test_two_segment_runs_racing_for_one_name_both_keep_their_result(tmp_path, model, inputs):
    out = tmp_path / "res"
    racers = [_segment(model, inputs / "good_PP.png", out) for _ in range(2)]
    finished = [_finish(p) for p in racers]
    names = []
    for code, stdout, stderr in finished:
        assert code == 0 and "Traceback" not in stderr, stderr
        written = _written(stdout)
        assert len(written) == 1, stdout  # each run names the one file it wrote
        names.append(written[0].name)
    assert sorted(names) == ["good_PP.nc", "good_PP_1.nc"]  # nothing replaced, nothing lost
    reference = _labels(out / "good_PP.nc")
    assert reference.shape == (100, 140)
    np.testing.assert_array_equal(_labels(out / "good_PP_1.nc"), reference)  # both complete, same result
    assert _mineralogy_sections(out) == {"good_PP", "good_PP_1"}  # the table kept both runs' rows
    assert _temporaries(out) == []


def test_a_result_written_by_another_run_mid_run_is_never_replaced(tmp_path, model, inputs):
    out = tmp_path / "res"
    out.mkdir()
    run = _segment(model, inputs / "big_PP.png", out, "--overlay")
    # another run commits big_PP.nc while this one is writing its own (deterministically: the
    # name was free when this run started and is taken when it finishes)
    _wait_for(lambda: any(p.name.endswith(".partial") for p in out.iterdir()))
    (out / "big_PP.nc").write_bytes(b"the other run's result")
    code, stdout, stderr = _finish(run)
    assert code == 0 and "Traceback" not in stderr, stderr
    assert (out / "big_PP.nc").read_bytes() == b"the other run's result"
    assert [p.name for p in _written(stdout)] == ["big_PP_1.nc", "big_PP_1_overlay.png"]  # names still match
    assert _labels(out / "big_PP_1.nc").shape == (1024, 1024)
    assert (out / "big_PP_1_overlay.png").stat().st_size > 0
    assert _mineralogy_sections(out) == {"big_PP_1"}  # the row is named after the file written
    assert _temporaries(out) == []


# -- leftovers of a killed run -----------------------------------------------------------------------


def test_a_segment_run_killed_mid_run_leaves_nothing_after_the_next_run(tmp_path, model, inputs):
    out = tmp_path / "res"
    out.mkdir()
    victim = _segment(model, inputs / "big_PP.png", out)
    # the netCDF's temporary, not the folder's write probe (created and removed at once)
    _wait_for(lambda: any(".big_PP.nc." in p.name and p.name.endswith(".partial") for p in out.iterdir()))
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    left = _temporaries(out)
    assert left and all(f".{victim.pid}." in name for name in left)  # what a kill -9 leaves: this run's only

    # a running process's temporary in the same folder is not touched
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        alive = out / f".other.nc.{locks.HOST}.{sleeper.pid}.0badc0de.partial"
        alive.write_bytes(b"being written")
        run = hostile.thinseg("segment", inputs / "good_PP.png", "--model", model, "--output", out, "--quiet")
        assert run.returncode == 0 and "Traceback" not in run.stderr, run.describe()
        assert f"removed {len(left)} stale temporaries of an interrupted run in {out}" in run.stderr
        assert _temporaries(out) == [alive.name]
    finally:
        sleeper.kill()
        sleeper.wait()
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["good_PP.nc", "modal_mineralogy.csv"]


def test_a_swap_cut_short_keeps_the_set_aside_folder(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    tag = f"{locks.HOST}.{dead.pid}"
    new = tmp_path / f".model.{tag}.00000001.tmp"
    old = tmp_path / f".model.{tag}.00000002.old"
    for folder in (new, old):
        folder.mkdir()
        (folder / "meta.json").write_text("{}")
    stale = tmp_path / f".cache.npy.{tag}.00000003.partial"
    stale.write_bytes(b"x")
    found = sweep_stale_temporaries(tmp_path)
    # killed between "old aside" and "new in place": model/ is missing, both copies stay
    assert found.removed == [stale] and new.is_dir() and old.is_dir()
    (tmp_path / "model").mkdir()  # once the model is back, both are leftovers
    assert sorted(p.name for p in sweep_stale_temporaries(tmp_path).removed) == sorted([new.name, old.name])


# -- training run folders -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sections(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sections")
    for k, name in enumerate("ABCD"):
        write_section(folder / f"{name}.nc", seed=k)
    return folder


def _train(sections: Path, run: Path, *extra: str) -> list[object]:
    return ["train", sections, "--output", run, "--val-fraction", "0.25", "--device", "cpu", "--quiet", *extra]


def _longer(epochs: int) -> list[str]:
    args = list(TINY_TRAIN)
    args[args.index("--epochs") + 1] = str(epochs)
    return args


def test_a_second_train_run_into_a_busy_run_folder_is_refused(tmp_path, sections):
    run = tmp_path / "run"
    first = hostile.start(*_train(sections, run, *_longer(3)))
    try:
        _wait_for(lambda: (run / locks.RUN_LOCK).is_file())
        second = hostile.thinseg(*_train(sections, run, *TINY_TRAIN, "--overwrite"))
        line = hostile.assert_refused(second, code=2, mentions=[str(run), f"in use by pid {first.pid} on"])
        assert "since" in line
        code, stdout, stderr = _finish(first)
    finally:
        if first.poll() is None:
            first.kill()
    assert code == 0 and "Traceback" not in stderr, stderr
    assert "best epoch" in stdout and (run / "model" / "meta.json").is_file()
    with open(run / "training_log.csv", encoding="utf-8") as f:
        assert [row["epoch"] for row in csv.DictReader(f)] == ["1", "2", "3"]  # the first run's, whole
    assert not (run / locks.RUN_LOCK).exists() and _temporaries(run) == []


def test_a_train_run_killed_outright_resumes_over_its_stale_lock(tmp_path, sections):
    run, straight = tmp_path / "run", tmp_path / "straight"
    victim = hostile.start(*_train(sections, run, *TINY_TRAIN))
    uncut = hostile.start(*_train(sections, straight, *TINY_TRAIN))  # the same run, never killed
    try:
        _wait_for(lambda: (run / "checkpoint.pt").is_file())
        victim.send_signal(signal.SIGKILL)
        victim.communicate()
        owner = locks.read_owner(run / locks.RUN_LOCK)
        assert owner is not None and (owner.host, owner.pid) == (locks.HOST, victim.pid)  # left by the kill
        resumed = hostile.thinseg(*_train(sections, run, *TINY_TRAIN, "--resume"))
        assert _finish(uncut)[0] == 0
    finally:
        for process in (victim, uncut):
            if process.poll() is None:
                process.kill()
    assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed.describe()
    assert f"took over the run folder from an interrupted run (pid {victim.pid} on {locks.HOST}" in resumed.stderr
    assert "resuming after epoch 1" in resumed.stderr
    logs = []
    for folder in (run, straight):
        with open(folder / "training_log.csv", encoding="utf-8") as f:
            logs.append([(row["epoch"], float(row["train_loss"])) for row in csv.DictReader(f)])
    assert [epoch for epoch, _ in logs[0]] == ["1", "2"]
    assert [loss for _, loss in logs[0]] == pytest.approx([loss for _, loss in logs[1]], rel=1e-4)  # as if never cut
    assert not (run / locks.RUN_LOCK).exists() and _temporaries(run) == []


def test_a_lock_of_another_host_or_a_live_process_is_never_broken(tmp_path):
    lock = tmp_path / locks.RUN_LOCK
    lock.write_text('{"host": "elsewhere", "pid": 1, "since": "2026-01-01T00:00:00+00:00"}')
    with (
        pytest.raises(ThinSegError, match="in use by pid 1 on elsewhere since 2026-01-01"),
        locks.run_folder_lock(tmp_path),
    ):
        pass
    lock.write_text(f'{{"host": "{locks.HOST}", "pid": {os.getppid()}, "since": "x"}}')  # the test runner's parent
    with (
        pytest.raises(ThinSegError, match=f"in use by pid {os.getppid()} on {locks.HOST}"),
        locks.run_folder_lock(tmp_path),
    ):
        pass
    assert lock.is_file()  # never removed by the refused run
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    lock.write_text(f'{{"host": "{locks.HOST}", "pid": {dead.pid}, "since": "x"}}')
    notes: list[str] = []
    with locks.run_folder_lock(tmp_path, log=notes.append):
        assert locks.read_owner(lock).pid == os.getpid()
    assert notes == [f"took over the run folder from an interrupted run (pid {dead.pid} on {locks.HOST} since x)"]
    assert not lock.exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="zombies are told apart through /proc")
def test_a_lock_of_a_killed_process_nobody_reaped_is_taken_over(tmp_path):
    # a rank killed with its launcher is handed to init; a container init that never reaps leaves
    # a zombie whose pid still answers kill(pid, 0)
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while Path(f"/proc/{zombie.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        assert time.monotonic() < deadline, "the child never ended"
        time.sleep(0.05)
    try:
        os.kill(zombie.pid, 0)  # still there to kill(pid, 0): what made its lock look held
        assert not locks.pid_alive(zombie.pid) and locks.pid_alive(os.getpid())
        lock = tmp_path / locks.RUN_LOCK
        lock.write_text(f'{{"host": "{locks.HOST}", "pid": {zombie.pid}, "since": "x"}}')
        notes: list[str] = []
        with locks.run_folder_lock(tmp_path, log=notes.append):
            assert locks.read_owner(lock).pid == os.getpid()
        assert notes == [f"took over the run folder from an interrupted run (pid {zombie.pid} on {locks.HOST} since x)"]
    finally:
        zombie.wait()


def test_a_table_lock_waits_for_its_holder_and_breaks_a_dead_ones(tmp_path):
    table = tmp_path / "modal_mineralogy.csv"
    code = (
        "import sys, time; from thinseg.io.locks import file_lock\n"
        f"with file_lock({str(table)!r}):\n    print('held', flush=True); time.sleep(1.5)\n"
    )
    env = dict(os.environ, PYTHONPATH=str(MODULE_DIR))
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=env)
    try:
        assert holder.stdout.readline() == b"held\n"
        start = time.monotonic()
        with locks.file_lock(table):
            waited = time.monotonic() - start
            assert holder.poll() is not None or waited > 0.5  # not taken while the holder held it
    finally:
        holder.wait()
    (tmp_path / ".modal_mineralogy.csv.lock").write_text('{"host": "elsewhere", "pid": 1, "since": "x"}')
    with pytest.raises(ThinSegError, match="cannot update: in use by pid 1 on elsewhere"), locks.file_lock(table, 0.2):
        pass


# -- commits that never replace ---------------------------------------------------------------------


def _written_output(path: Path, text: str) -> AtomicOutput:
    output = AtomicOutput(path, unique=True)
    output.tmp.write_text(text)
    return output


@pytest.mark.parametrize("hard_links", [True, False], ids=["hard-links", "no-hard-links"])
def test_commit_never_replaces_with_or_without_hard_links(tmp_path, monkeypatch, hard_links):
    if not hard_links:  # FAT, SMB: link() refused -> exclusive reservation of the name, then rename

        def no_link(src, dst):
            raise PermissionError(errno.EPERM, "Operation not permitted", str(src))

        monkeypatch.setattr(atomic.os, "link", no_link)
    (tmp_path / "S.nc").write_text("first")
    (tmp_path / "S_1_overlay.png").write_text("someone's overlay")
    nc, png = _written_output(tmp_path / "S.nc", "nc"), _written_output(tmp_path / "S_overlay.png", "png")
    # S.nc is taken; S_1.nc is free but S_1_overlay.png is not: both go to S_2
    names = commit_unique(
        [nc, png], lambda n: [numbered(tmp_path / "S.nc", n), tmp_path / f"{numbered(Path('S'), n)}_overlay.png"]
    )
    assert [p.name for p in names] == ["S_2.nc", "S_2_overlay.png"] and (nc.path, png.path) == tuple(names)
    assert (tmp_path / "S.nc").read_text() == "first" and (
        tmp_path / "S_1_overlay.png"
    ).read_text() == "someone's overlay"
    assert (tmp_path / "S_2.nc").read_text() == "nc" and (tmp_path / "S_2_overlay.png").read_text() == "png"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["S.nc", "S_1_overlay.png", "S_2.nc", "S_2_overlay.png"]

    # a name taken between the check and the commit (another run's link): this attempt is undone
    taken_late = _written_output(tmp_path / "T.nc", "mine")
    real_exists = atomic._exists
    monkeypatch.setattr(atomic, "_exists", lambda p: False if p.name == "T.nc" else real_exists(p))
    (tmp_path / "T.nc").write_text("theirs")
    assert taken_late.commit().name == "T_1.nc"
    assert (tmp_path / "T.nc").read_text() == "theirs" and (tmp_path / "T_1.nc").read_text() == "mine"


def test_a_report_set_written_meanwhile_by_another_run_is_refused_not_replaced(tmp_path):
    outputs = OutputSet(tmp_path, overwrite=False)
    report, table = outputs.add("report.json"), outputs.add("table.txt")
    outputs.check()  # free at the start
    report.write_text("mine")
    table.write_text("mine")
    (tmp_path / "table.txt").write_text("theirs")  # another run finished first
    with pytest.raises(ThinSegError, match=r"output exists already \(table.txt\): another run wrote it"):
        outputs.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["table.txt"]  # theirs, whole; nothing of this run
    assert (tmp_path / "table.txt").read_text() == "theirs"


def test_a_failed_run_keeps_what_another_run_wrote_into_the_folder_it_made(tmp_path):
    new = tmp_path / "res"
    code = f"from thinseg.io.atomic import write_text_atomic\nwrite_text_atomic({str(new / 'theirs.nc')!r}, 'x')\n"
    with pytest.raises(ThinSegError), removed_on_failure(new):
        new.mkdir()
        atomic.write_text_atomic(new / "mine.nc", "half")
        subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ, PYTHONPATH=str(MODULE_DIR)))
        raise ThinSegError("a later input was bad")
    assert sorted(p.name for p in new.iterdir()) == ["theirs.nc"]


# -- Slicer panel Cancel -----------------------------------------------------------------------------


def test_cancel_asks_again_with_sigterm_before_it_kills(tmp_path):
    sys.path.insert(0, str(MODULE_DIR))
    from ThinSectionSegmentationLib import process  # deferred: the Slicer logic package, for this test only

    marker = tmp_path / "cleaned"
    code = (
        "import signal, sys, time\n"
        "signal.signal(signal.SIGINT, signal.SIG_IGN)  # stuck in a native call: Ctrl-C is not seen\n"
        f"def term(*_):\n    open({str(marker)!r}, 'w').close(); sys.exit(143)\n"
        "signal.signal(signal.SIGTERM, term)\nprint('ready', flush=True)\ntime.sleep(60)\n"
    )
    proc = process.BackgroundProcess([sys.executable, "-c", code]).start()
    _wait_for(lambda: any("ready" in getattr(o, "text", "") for o in proc.poll()), timeout=30, interval=0.05)
    start = time.monotonic()
    proc.cancel(grace=0.5, wait=True)
    proc.wait(timeout=10)
    assert marker.exists()  # it cleaned up on SIGTERM
    assert proc.returncode == 143 and time.monotonic() - start < process.TERM_GRACE  # not killed
