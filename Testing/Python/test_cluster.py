"""Sections on a real Dask LocalCluster (2 worker processes of 1 thread each): a bad input is
reported while the others are written, outputs equal a local run's bit for bit, a worker killed
mid-run loses nothing and writes nothing twice, the model is loaded once per worker, and the
command line's `--cluster` with its one-line errors. Skips where dask.distributed is not
installed (the GeoSlicer stack: `thinseg[cluster]` is an optional extra)."""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

distributed = pytest.importorskip("distributed")

from helpers import data_variables, error_lines, leftovers, open_nc, read_csv, run_main, run_subprocess, write_pair  # noqa: E402

from thinseg.errors import ThinSegError  # noqa: E402
from thinseg.inference.engine import InferenceOptions  # noqa: E402
from thinseg.pipelines import cluster  # noqa: E402
from thinseg.pipelines.segment import RUN_ATTRIBUTE, SegmentOptions, segment_files  # noqa: E402

GOOD = ["S0_PP", "S1_PP", "S2_PP"]
SIDE = 512
#: exact fp32 (precision "auto" is bf16 on CPUs with AMX), with the confidence map
WITH_CONFIDENCE = InferenceOptions(precision="fp32", with_confidence=True)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> Path:
    """Three 512 x 512 PP/XP sections and one whose PP image is not an image."""
    folder = tmp_path_factory.mktemp("inputs")
    for seed, name in zip((0, 1, 4), GOOD):  # seeds whose synthetic XP passes the PP/XP check
        write_pair(folder, name, name.replace("PP", "XP"), height=SIDE, width=SIDE, seed=seed)
    write_pair(folder, "S3_PP", "S3_XP", height=SIDE, width=SIDE, seed=3)
    (folder / "S3_PP.png").write_bytes((folder / "S3_PP.png").read_bytes()[:2000])  # cut short
    return folder


@pytest.fixture(scope="module")
def client():
    """One LocalCluster of 2 worker processes (1 thread each) for the whole module."""
    with cluster.connect("local:2") as c:
        c.wait_for_workers(2, timeout=120)
        yield c


def address(client) -> str:
    return client.scheduler.address


@pytest.fixture(scope="module")
def cluster_batch(client, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("cluster") / "out"
    options = SegmentOptions(cluster=address(client), probabilities=True, inference=WITH_CONFIDENCE)
    bars: list[tuple[int, int]] = []
    names: list[str] = []

    def progress(name, pixels):
        names.append(name)
        return lambda done, total: bars.append((done, total))

    run = segment_files([inputs], options, out, progress=progress)
    return run, out, names, bars


def arrays(path: Path) -> dict[str, np.ndarray]:
    """Every data variable of an output (images, labelmap, confidence), as stored."""
    ds = open_nc(path)
    try:
        return {name: np.array(ds.variables[name][:]) for name in data_variables(ds)}
    finally:
        ds.close()


def test_a_bad_input_is_reported_and_the_other_sections_are_written(cluster_batch, inputs):
    run, out, names, bars = cluster_batch
    assert sorted(r.section.name for r in run.results) == GOOD
    assert [(path.name, "truncated" in why or "corrupt" in why) for path, why in run.failed] == [("S3_PP.png", True)]
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{n}.nc" for n in GOOD] + ["modal_mineralogy.csv"])
    assert {row["section"] for row in read_csv(out / "modal_mineralogy.csv")} == set(GOOD)
    assert names == ["4 sections"] and bars[-1] == (4, 4) and [d for d, _ in bars] == [1, 2, 3, 4]
    assert leftovers(out) == [f"{n}.nc" for n in GOOD]  # no temporaries


def test_cluster_outputs_equal_a_local_runs_bit_for_bit(cluster_batch, inputs, tmp_path):
    import torch

    run, out, _names, _bars = cluster_batch
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers (OMP_NUM_THREADS=1, one thread each)
    try:
        local = segment_files(
            [inputs], SegmentOptions(probabilities=True, inference=WITH_CONFIDENCE), tmp_path / "local"
        )
    finally:
        torch.set_num_threads(threads)
    assert sorted(r.section.name for r in local.results) == GOOD
    for name in GOOD:
        remote, here = arrays(out / f"{name}.nc"), arrays(tmp_path / "local" / f"{name}.nc")
        base = name[: -len("_PP")]
        assert sorted(remote) == sorted(here)
        assert {f"{base}_Confidence", f"{base}_Segmentation"} <= set(here)
        for variable in here:
            assert remote[variable].dtype == here[variable].dtype
            assert np.array_equal(remote[variable], here[variable]), variable
    by_name = {r.section.name: r.mineralogy for r in run.results}
    assert all(by_name[r.section.name] == r.mineralogy for r in local.results)
    assert (tmp_path / "local" / "modal_mineralogy.csv").read_text() == (out / "modal_mineralogy.csv").read_text()


class KillOnce(distributed.WorkerPlugin):
    """Ends the worker process the first time (across all workers: an exclusive marker file) a
    task whose key holds `task` (a section's, or a shared section's part) reaches `finish`:
    "memory" (its output committed, the result not yet sent) or, after `delay_s`, "executing"
    (in the middle of the task)."""

    name = "thinseg-test-kill-once"

    def __init__(self, marker: str, finish: str, delay_s: float = 0.0, task: str = "thinseg-segment") -> None:
        self.marker, self.finish, self.delay_s, self.task = marker, finish, delay_s, task

    def transition(self, key, start, finish, **kwargs):
        if finish != self.finish or self.task not in str(key):
            return
        try:
            os.close(os.open(self.marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return
        if self.delay_s:
            threading.Timer(self.delay_s, os._exit, (1,)).start()
        else:
            os._exit(1)


@pytest.mark.parametrize(("finish", "delay_s"), [("memory", 0.0), ("executing", 0.15)], ids=["after-commit", "mid"])
def test_a_worker_killed_during_a_run_loses_nothing_and_writes_each_section_once(
    client, inputs, tmp_path, finish, delay_s
):
    marker = tmp_path / "killed"
    client.register_plugin(KillOnce(str(marker), finish, delay_s))
    try:
        run = segment_files([inputs], SegmentOptions(cluster=address(client)), tmp_path / "out")
    finally:
        client.unregister_worker_plugin(KillOnce.name)
        client.wait_for_workers(2, timeout=120)
    assert marker.exists()  # a worker was killed
    assert sorted(r.section.name for r in run.results) == GOOD
    assert [p.name for p, _ in run.failed] == ["S3_PP.png"]
    # exactly once: one file per section, no numbered second copy, no temporaries left
    assert leftovers(tmp_path / "out") == [f"{n}.nc" for n in GOOD]
    assert {row["section"] for row in read_csv(tmp_path / "out" / "modal_mineralogy.csv")} == set(GOOD)
    ids = set()
    for name in GOOD:
        ds = open_nc(tmp_path / "out" / f"{name}.nc")
        ids.add(ds.getncattr(RUN_ATTRIBUTE))
        ds.close()
    assert len(ids) == 1
    read_back = [r for r in run.results if any("written before its worker was lost" in m for m in r.messages)]
    if finish == "memory":  # the retry found the committed output and read its result back
        assert len(read_back) == 1 and read_back[0].mineralogy.section_pixels == SIDE * SIDE


#: small tiles, so that a 640-row section has 6 tile rows and is shared in parts of 2
SHARED = InferenceOptions(precision="fp32", with_confidence=True, tile=128, overlap=16)
SHARED_SHAPE = (640, 200)


@pytest.fixture(scope="module")
def big_section(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("big")
    write_pair(folder, "Big_PP", "Big_XP", height=SHARED_SHAPE[0], width=SHARED_SHAPE[1], seed=0)
    return folder


def local_run(inputs, options: SegmentOptions, out: Path):
    """The same batch in this process with one torch thread, as each worker has."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return segment_files(inputs, options, out)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("mm_per_pixel", [None, 0.0019], ids=["model-grid", "resampled"])
def test_one_section_shared_by_the_workers_equals_the_local_run_bit_for_bit(
    client, big_section, tmp_path, mm_per_pixel
):
    """A section shared in parts of tile rows over 2 workers, written in order into one file:
    images, labels and confidence equal a local run's (also resampled to the model's pixel size
    and back)."""
    options = SegmentOptions(
        cluster=address(client), band_rows=200, probabilities=True, mm_per_pixel=mm_per_pixel, inference=SHARED
    )
    bars: list[tuple[int, int]] = []
    run = segment_files(
        [big_section], options, tmp_path / "out", progress=lambda n, p: lambda d, t: bars.append((d, t))
    )
    local = local_run([big_section], replace(options, cluster=None), tmp_path / "local")
    assert [r.section.name for r in run.results] == ["Big_PP"] and not run.failed
    parts = [m for m in run.results[0].messages if "shared by the cluster's workers" in m]
    assert parts == ["Big_PP: shared by the cluster's workers in 3 parts"] if mm_per_pixel is None else len(parts) == 1
    remote, here = arrays(tmp_path / "out" / "Big_PP.nc"), arrays(tmp_path / "local" / "Big_PP.nc")
    assert sorted(remote) == sorted(here) and {"Big_Segmentation", "Big_Confidence"} <= set(here)
    for variable in here:
        assert remote[variable].dtype == here[variable].dtype
        assert np.array_equal(remote[variable], here[variable]), variable
    assert run.results[0].mineralogy == local.results[0].mineralogy
    assert bars[-1] == (1, 1)
    assert leftovers(tmp_path / "out") == ["Big_PP.nc"]


def test_sections_are_shared_when_fewer_than_the_worker_threads_or_when_asked():
    auto, given, never = SegmentOptions(), SegmentOptions(band_rows=512), SegmentOptions(band_rows=0)
    assert cluster.shares_sections(auto, 1, 2) and cluster.shares_sections(given, 100, 2)
    assert not cluster.shares_sections(auto, 2, 2)  # as many sections as threads: one task each
    assert not cluster.shares_sections(never, 1, 64)
    # by default a section is split evenly over the worker threads, in parts of at least 2048 rows
    assert cluster.part_rows(None, 20_000, 2) == 10_000 and cluster.part_rows(None, 20_000, 64) == 2048
    assert cluster.part_rows(512, 20_000, 2) == 512


def test_a_worker_killed_during_a_part_of_a_shared_section_changes_nothing(client, big_section, tmp_path):
    marker = tmp_path / "killed"
    client.register_plugin(KillOnce(str(marker), "executing", 0.05, task="thinseg-part"))
    options = SegmentOptions(cluster=address(client), band_rows=96, inference=SHARED)
    try:
        run = segment_files([big_section], options, tmp_path / "out")
    finally:
        client.unregister_worker_plugin(KillOnce.name)
        client.wait_for_workers(2, timeout=120)
    assert marker.exists()  # a worker was killed
    assert [r.section.name for r in run.results] == ["Big_PP"] and not run.failed
    local_run([big_section], replace(options, cluster=None), tmp_path / "local")
    remote, here = arrays(tmp_path / "out" / "Big_PP.nc"), arrays(tmp_path / "local" / "Big_PP.nc")
    assert np.array_equal(remote["Big_Segmentation"], here["Big_Segmentation"])
    assert leftovers(tmp_path / "out") == ["Big_PP.nc"]


def test_shared_sections_with_a_bad_input_report_it_and_write_the_others(client, inputs, tmp_path):
    options = SegmentOptions(cluster=address(client), band_rows=200, inference=SHARED)
    run = segment_files([inputs], options, tmp_path / "out")
    assert sorted(r.section.name for r in run.results) == GOOD
    assert all(any("in 3 parts" in m for m in r.messages) for r in run.results)
    assert [path.name for path, _ in run.failed] == ["S3_PP.png"]
    assert leftovers(tmp_path / "out") == [f"{n}.nc" for n in GOOD]


def test_cli_band_rows_shares_a_section_and_zero_keeps_one_task(capsys, client, big_section, tmp_path):
    pp = big_section / "Big_PP.png"
    code, out, err = run_main(
        capsys, "segment", pp, "--cluster", address(client), "--band-rows", "200", "--tile", "128", "-o", tmp_path / "a"
    )
    assert code == 0, err
    assert "Big_PP: shared by the cluster's workers in 4 parts" in err  # 7 tile rows of 128 px, 2 a part
    code, out, err = run_main(
        capsys, "segment", pp, "--cluster", address(client), "--band-rows", "0", "--tile", "128", "-o", tmp_path / "b"
    )
    assert code == 0, err
    assert "shared by the cluster's workers" not in err
    a, b = arrays(tmp_path / "a" / "Big_PP.nc"), arrays(tmp_path / "b" / "Big_PP.nc")
    assert np.array_equal(a["Big_Segmentation"], b["Big_Segmentation"])
    with pytest.raises(SystemExit) as refused:
        run_main(capsys, "segment", pp, "--band-rows", "-1", "-o", tmp_path / "c")
    assert refused.value.code == 2 and "argument --band-rows: -1 is outside 0 to 1000000" in capsys.readouterr().err


def test_workers_get_back_glibcs_malloc_thresholds_that_dasks_nanny_turns_off(client):
    """Dask's nanny sets MALLOC_TRIM_THRESHOLD_ in its workers (inference then runs 1.7x slower):
    a worker can undo it, and its first Segmenter does."""
    environ = client.run(lambda: os.environ.get("MALLOC_TRIM_THRESHOLD_"))
    assert set(environ.values()) == {"65536"}  # what the nanny set: the case being undone
    assert set(client.run(cluster.undo_malloc_trim_threshold).values()) == {True}


def test_the_model_is_loaded_once_per_worker(client, inputs, tmp_path):
    """Options not used elsewhere in this module: each worker builds one Segmenter for them, on its
    first section, and no more for any later section or batch."""
    before = client.run(cluster.loaded_models)
    options = SegmentOptions(cluster=address(client), inference=InferenceOptions(tile=256))
    segment_files([inputs], options, tmp_path / "first")
    first = client.run(cluster.loaded_models)
    segment_files([inputs], options, tmp_path / "second")
    second = client.run(cluster.loaded_models)
    assert len(second) == 2 and first == second
    added = sorted(first[w] - before.get(w, 0) for w in first)
    assert added in ([1, 1], [0, 1])  # a worker that ran none of the sections loaded nothing


def test_cli_cluster_local_runs_the_batch_with_one_bar_and_one_error_line(inputs, tmp_path):
    done = run_subprocess("segment", inputs, "--cluster", "local:2", "-o", tmp_path / "out", timeout=240)
    assert done.returncode == 1, done.stderr
    assert [line.split(": ", 3)[2] for line in error_lines(done.stderr)] == [str(inputs / "S3_PP.png")]
    assert "3 section(s) segmented, 1 failed" in done.stderr
    assert "4/4" in done.stderr and "section" in done.stderr  # the one bar over all sections
    assert leftovers(tmp_path / "out") == [f"{n}.nc" for n in GOOD]
    assert all(f"{n}.nc" in done.stdout for n in GOOD)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.parametrize(
    ("spec", "problem"),
    [
        ("local", "--cluster local: give local:N, tcp://HOST:PORT or a scheduler file"),
        ("local:0", "--cluster local:0: give 1 to 256 local workers"),
        ("nowhere/scheduler.json", "--cluster: scheduler file not found"),
        ("tcp://127.0.0.1:PORT", "no scheduler answers"),
    ],
)
def test_cli_refuses_a_bad_or_unreachable_cluster_in_one_line(capsys, monkeypatch, inputs, tmp_path, spec, problem):
    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT_S", 2.0)
    spec = spec.replace("PORT", str(free_port()))
    code, out, err = run_main(capsys, "segment", inputs, "--cluster", spec, "-o", tmp_path / "out", "-q")
    assert code == 2
    lines = error_lines(err)
    assert len(lines) == 1 and problem in lines[0], err
    assert not (tmp_path / "out").exists()  # nothing written, not even the folder


def test_without_dask_the_cluster_option_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "distributed", None)
    with pytest.raises(ThinSegError, match=r"pip install thinseg\[cluster\]"), cluster.connect("local:2"):
        pass
