"""What a run leaves on disk: a failed command leaves nothing (not even the output folder it
made; a folder that existed before stays as it was), and every output gets the ordinary modes of
the user's umask (0644/0755 under umask 022, 0640/0750 under 027), never the private 0600/0700 of
a temporary file or folder. Every command is run in-process on real files.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import REAL_CLASSES, make_bundle, run_main, section_images, write_image, write_pair
from test_cli_register import write_netcdf_qemscan, write_rgb_qemscan
from test_cli_train_evaluate import TINY_TRAIN, write_section

from thinseg.errors import ThinSegError
from thinseg.io.atomic import (
    apply_umask,
    atomic_directory,
    atomic_output,
    current_umask,
    removed_on_failure,
    write_bytes_atomic,
    write_text_atomic,
)
from thinseg.synth import generate_section

H, W = 100, 140


@pytest.fixture(autouse=True)
def no_gpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture(params=[0o022, 0o027], ids=["umask022", "umask027"])
def umask(request):
    old = os.umask(request.param)
    try:
        yield request.param
    finally:
        os.umask(old)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models") / "ThinSectionEnv"
    return {
        "m1": make_bundle(root / "m1", inputs=("PP", "PX"), seed=0, title="tiny one"),
        "m2": make_bundle(root / "m2", inputs=("PP", "PX"), seed=1, title="tiny two"),
    }


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "data"
    for name, seed in (("A", 10), ("B", 11), ("C", 12)):
        write_section(root / f"{name}.nc", seed)
    return root


def modes(root: Path) -> dict[str, int]:
    """Permission bits of `root` and everything under it, by relative path."""
    found = {".": stat.S_IMODE(root.stat().st_mode)}
    for path in root.rglob("*"):
        found[str(path.relative_to(root))] = stat.S_IMODE(path.lstat().st_mode)
    return found


def check_modes(root: Path, mask: int) -> None:
    expected = {name: (0o777 if (root / name).is_dir() else 0o666) & ~mask for name in modes(root)}
    assert modes(root) == expected
    assert len(expected) > 1  # something was written


def absent(folder: Path) -> None:
    assert not folder.exists() and not folder.is_symlink(), sorted(p.name for p in folder.rglob("*"))


# ---------------------------------------------------------------------------------------------
# the building blocks


def test_umask_is_read_without_changing_it(umask):
    assert current_umask() == umask
    assert current_umask() == umask


def test_atomic_directory_and_files_get_umask_modes(tmp_path, umask):
    target = tmp_path / "bundle"
    with atomic_directory(target) as tmp:
        assert stat.S_IMODE(tmp.stat().st_mode) == 0o700  # mkdtemp: private while written
        (tmp / "meta.json").write_text("{}")
        (tmp / "sub").mkdir(mode=0o700)
        (tmp / "sub" / "w.bin").write_bytes(b"x")
        os.chmod(tmp / "sub" / "w.bin", 0o600)
    check_modes(target, umask)
    assert modes(target)["."] == (0o755 if umask == 0o022 else 0o750)

    with atomic_directory(target, overwrite=True) as tmp:
        (tmp / "meta.json").write_text("{}")
    check_modes(target, umask)

    file = tmp_path / "a.txt"
    with atomic_output(file) as tmp_file:
        tmp_file.write_text("x")
        os.chmod(tmp_file, 0o600)  # as tempfile.mkstemp would leave it
    assert stat.S_IMODE(file.stat().st_mode) == 0o666 & ~umask
    write_text_atomic(tmp_path / "b.txt", "y")
    assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o666 & ~umask


def test_apply_umask_leaves_links_alone(tmp_path):
    outside = tmp_path / "outside.txt"
    outside.write_text("x")
    os.chmod(outside, 0o600)
    folder = tmp_path / "f"
    folder.mkdir(mode=0o700)
    (folder / "link").symlink_to(outside)
    old = os.umask(0o022)
    try:
        apply_umask(folder)
    finally:
        os.umask(old)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o755
    assert stat.S_IMODE(outside.stat().st_mode) == 0o600


def test_removed_on_failure_removes_only_what_the_block_created(tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "old.txt").write_text("keep")
    new = tmp_path / "a" / "b" / "out"

    with pytest.raises(ThinSegError), removed_on_failure(new):
        new.mkdir(parents=True)
        write_bytes_atomic(new / "half.nc", b"x")  # what the block committed goes
        raise ThinSegError("bad second input")
    absent(tmp_path / "a")

    with pytest.raises(KeyboardInterrupt), removed_on_failure(existing / "out"):
        (existing / "out").mkdir()
        raise KeyboardInterrupt
    assert sorted(p.name for p in existing.iterdir()) == ["old.txt"]

    with pytest.raises(ThinSegError), removed_on_failure(existing):
        (existing / "new.txt").write_text("x")
        raise ThinSegError("x")
    assert existing.is_dir()  # existed before: never removed (its files are the command's business)

    with removed_on_failure(new) as failed:  # failure by exit code
        new.mkdir(parents=True)
        write_bytes_atomic(new / "x", b"x")
        failed()
    absent(tmp_path / "a")

    with pytest.raises(ThinSegError), removed_on_failure(new, keep=lambda: (new / "checkpoint.pt").is_file()):
        new.mkdir(parents=True)
        (new / "checkpoint.pt").write_bytes(b"x")
        raise ThinSegError("x")
    assert (new / "checkpoint.pt").is_file()

    other = tmp_path / "c" / "d"
    with removed_on_failure(other):  # success with nothing written: no empty folders left
        other.mkdir(parents=True)
    absent(tmp_path / "c")
    with removed_on_failure(other):  # success with results: kept
        other.mkdir(parents=True)
        (other / "r.nc").write_bytes(b"x")
    assert (other / "r.nc").is_file()


# ---------------------------------------------------------------------------------------------
# segment


def test_segment_failed_run_leaves_no_folder(tmp_path, capsys, models):
    src = tmp_path / "in"
    src.mkdir()
    write_pair(src, "a_PP", "a_XP")
    write_image(src / "a_PP.png", section_images(H, W)[0][..., 1])  # grayscale PP: refused
    _, bad_xp = write_pair(src, "b_PP", "b_XP", seed=2)
    bad_xp.write_bytes(bad_xp.read_bytes()[:200])  # corrupt second input
    out = tmp_path / "new" / "out"
    code, _, stderr = run_main(capsys, "segment", src, "--model", models["m1"], "--output", out, "-q")
    assert code == 2 and "0 section(s) segmented, 2 failed" in stderr, stderr
    absent(tmp_path / "new")
    one = tmp_path / "new2" / "one.nc"
    code, _, stderr = run_main(capsys, "segment", src / "b_PP.png", "--model", models["m1"], "--output", one, "-q")
    assert code == 2 and str(bad_xp) in stderr, stderr
    absent(tmp_path / "new2")

    existing = tmp_path / "existing"
    existing.mkdir()
    code, _, _ = run_main(capsys, "segment", src, "--model", models["m1"], "--output", existing, "-q")
    assert code == 2 and existing.is_dir() and list(existing.iterdir()) == []


def test_segment_partial_run_keeps_its_results(tmp_path, capsys, models):
    src = tmp_path / "in"
    src.mkdir()
    write_pair(src, "a_PP", "a_XP")
    _, bad_xp = write_pair(src, "b_PP", "b_XP", seed=2)
    bad_xp.write_bytes(bad_xp.read_bytes()[:200])
    out = tmp_path / "new" / "out"
    code, _, stderr = run_main(capsys, "segment", src, "--model", models["m1"], "--output", out, "-q")
    assert code == 1, stderr
    assert sorted(p.name for p in out.iterdir()) == ["a_PP.nc", "modal_mineralogy.csv"]


def test_segment_outputs_have_umask_modes(tmp_path, capsys, models, umask):
    src = tmp_path / "in"
    src.mkdir()
    write_pair(src, "a_PP", "a_XP")
    out = tmp_path / "new" / "out"
    code, _, stderr = run_main(
        capsys, "segment", src, "--model", models["m1"], "--output", out, "--overlay", "--probabilities", "-q"
    )
    assert code == 0, stderr
    check_modes(tmp_path / "new", umask)


# ---------------------------------------------------------------------------------------------
# register


@pytest.fixture(scope="module")
def sec():
    return generate_section(384, 384, seed=5)


def test_register_failed_run_leaves_no_folder(tmp_path, capsys, sec):
    pp = write_image(tmp_path / "S1_PP.png", sec.pp)
    write_image(tmp_path / "S1_XP.png", sec.xp)
    unrelated = write_netcdf_qemscan(tmp_path / "other.nc", generate_section(384, 384, seed=6))
    out = tmp_path / "new" / "out"
    code, _, stderr = run_main(capsys, "register", pp, unrelated, "--output", out)
    assert code == 2 and "no match found" in stderr, stderr
    absent(tmp_path / "new")


def test_register_outputs_have_umask_modes(tmp_path, capsys, sec, umask):
    pp = write_image(tmp_path / "S1_PP.png", sec.pp)
    write_image(tmp_path / "S1_XP.png", sec.xp)
    q = write_rgb_qemscan(tmp_path / "S1_QEMSCAN.png", sec)
    out = tmp_path / "new" / "out"
    code, _, stderr = run_main(capsys, "register", pp, q, "--background", "#ffffff", "--output", out)
    assert code == 0, stderr
    assert len(list(out.iterdir())) == 6
    check_modes(tmp_path / "new", umask)


# ---------------------------------------------------------------------------------------------
# prepare


def write_prepare_inputs(folder: Path, mask_shape: tuple[int, int] = (H, W)) -> tuple[Path, Path, Path]:
    pp, xp = write_pair(folder, "s_PP", "s_XP")
    codes = (np.arange(mask_shape[0] * mask_shape[1]).reshape(mask_shape) % 4).astype(np.uint8)
    mask = write_image(folder / "s_mask.tif", codes)
    return pp, xp, mask


def test_prepare_failed_run_leaves_no_folder(tmp_path, capsys):
    pp, xp, _ = write_prepare_inputs(tmp_path)
    small = write_image(tmp_path / "small.tif", np.zeros((10, 10), np.uint8))  # found only after the folder check
    out = tmp_path / "new" / "out"
    code, _, stderr = run_main(capsys, "prepare", pp, small, "--xp", xp, "--classes", REAL_CLASSES, "--output", out)
    assert code == 2 and "label image is 10x10 px" in stderr, stderr
    absent(tmp_path / "new")


def test_prepare_outputs_have_umask_modes(tmp_path, capsys, umask):
    pp, xp, mask = write_prepare_inputs(tmp_path)
    out = tmp_path / "new" / "out"
    code, _, stderr = run_main(
        capsys, "prepare", pp, mask, "--xp", xp, "--no-align", "--classes", REAL_CLASSES, "--output", out
    )
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == ["s.nc", "s_prepared.png"]
    check_modes(tmp_path / "new", umask)


# ---------------------------------------------------------------------------------------------
# evaluate and compare


def _fail_in_reports(monkeypatch):
    """A failure after the report folder was made (a corrupt figure input, a full disk)."""
    from thinseg.reports import plots

    def broken(*args, **kwargs):
        raise ThinSegError("cannot draw the fractions plot")

    monkeypatch.setattr(plots, "plot_fractions_scatter", broken)


def test_evaluate_failed_run_leaves_no_folder(tmp_path, capsys, models, data, monkeypatch):
    _fail_in_reports(monkeypatch)
    out = tmp_path / "new" / "ev"
    code, _, stderr = run_main(capsys, "evaluate", "--model", models["m1"], data, "--output", out, "-q")
    assert code == 2 and "cannot draw the fractions plot" in stderr, stderr
    absent(tmp_path / "new")


def test_evaluate_outputs_have_umask_modes(tmp_path, capsys, models, data, umask):
    out = tmp_path / "new" / "ev"
    code, _, stderr = run_main(
        capsys, "evaluate", "--model", models["m1"], data / "A.nc", "--output", out, "--overlays", "1", "-q"
    )
    assert code == 0, stderr
    check_modes(tmp_path / "new", umask)


def test_compare_failed_run_leaves_no_folder(tmp_path, capsys, models, data, monkeypatch):
    from thinseg.reports import plots

    def broken(*args, **kwargs):
        raise ThinSegError("cannot draw the per-class bars")

    monkeypatch.setattr(plots, "plot_per_class_bars", broken)  # after the sheets and the JSON
    out = tmp_path / "new" / "cmp"
    code, _, stderr = run_main(
        capsys, "compare", "--output", out, "-q", "--models", models["m1"], models["m2"], "--", data
    )
    assert code == 2 and "cannot draw the per-class bars" in stderr, stderr
    absent(tmp_path / "new")


def test_compare_outputs_have_umask_modes(tmp_path, capsys, models, data, umask):
    out = tmp_path / "new" / "cmp"
    code, _, stderr = run_main(
        capsys, "compare", "--output", out, "-q", "--models", models["m1"], models["m2"], "--", data / "A.nc"
    )
    assert code == 0, stderr
    check_modes(tmp_path / "new", umask)


# ---------------------------------------------------------------------------------------------
# train


def test_train_failed_run_leaves_no_folder(tmp_path, capsys, data):
    from helpers import write_geoslicer_netcdf

    src = tmp_path / "in"
    src.mkdir()
    for name in ("A", "B"):
        (src / f"{name}.nc").write_bytes((data / f"{name}.nc").read_bytes())
    s = generate_section(64, 64, seed=40)
    write_geoslicer_netcdf(src / "Z.nc", {"Z_PP": s.pp, "Z_XP": s.xp})  # no labelmap: found while reading
    run = tmp_path / "new" / "run"
    code, _, stderr = run_main(capsys, "train", src, "--output", run, *TINY_TRAIN)
    assert code == 2 and "no labelmap variable" in stderr, stderr
    absent(tmp_path / "new")


def test_trained_model_and_run_folder_have_ordinary_modes(tmp_path, capsys, data):
    old = os.umask(0o022)
    try:
        run = tmp_path / "new" / "run"
        code, _, stderr = run_main(capsys, "train", data, "--output", run, "--val-fraction", "0.34", *TINY_TRAIN)
    finally:
        os.umask(old)
    assert code == 0, stderr
    assert {"meta.json", "model.pth"} <= {p.name for p in (run / "model").iterdir()}
    assert modes(run / "model")["."] == 0o755
    check_modes(tmp_path / "new", 0o022)


@pytest.mark.parametrize("unique", [False, True])
def test_an_interrupt_in_the_middle_of_a_commit_leaves_no_temporary(tmp_path, monkeypatch, unique):
    """SIGTERM (raised as a KeyboardInterrupt) may land inside the commit itself, after the file
    is written and before it has its name: the temporary goes, and nothing half-named stays."""
    import thinseg.io.atomic as atomic

    def interrupted(_path):
        raise KeyboardInterrupt

    output = atomic.AtomicOutput(tmp_path / "S.nc", unique=unique)
    output.tmp.write_bytes(b"a whole result")
    monkeypatch.setattr(atomic, "apply_umask", interrupted)
    with pytest.raises(KeyboardInterrupt):
        output.commit()
    assert sorted(p.name for p in tmp_path.iterdir()) == []
