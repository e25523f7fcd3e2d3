"""Pairing PP/XP inputs under hostile and large input.

The promises: an XP affix equal to the PP affix is refused in one line naming the option; a file
is never paired with itself (a link or hard link under the counterpart's name, in --xp-dir or
beside it); every input that cannot be read (a broken link, a path through a file, a name too
long, a link loop, a pipe, an unreadable folder or file) is one error line while the rest is
paired and segmented (exit 1); names that are not UTF-8 pair like any other; and pairing is linear:
ten thousand pairs, or ten thousand refusals with their hints, take seconds.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pytest
from helpers import data_variables, decoded, make_bundle, open_nc, section_images, write_image, write_pair
from hostile import assert_batch_partial, assert_nothing_left, assert_refused, snapshot, thinseg

from thinseg.errors import ThinSegError
from thinseg.io.pairing import pair_inputs

#: CPU seconds that pairing 10,000 pairs must stay under (about 1 s here; quadratic pairing
#: took minutes for 4,000): a functional bound with a wide margin, not a benchmark.
SCALE_CPU_SECONDS = 10.0
SCALE_PAIRS = 10_000


def _permissions_bind() -> bool:
    """Whether this process is refused a file it has no read permission for (root, or any
    process with CAP_DAC_OVERRIDE, reads it anyway: then chmod 000 proves nothing)."""
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        probe = Path(folder) / "probe"
        probe.write_bytes(b"x")
        probe.chmod(0)
        try:
            probe.read_bytes()
        except PermissionError:
            return True
        finally:
            probe.chmod(0o600)
    return False


PERMISSIONS_BIND = _permissions_bind()


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    return make_bundle(tmp_path_factory.mktemp("pairing_model") / "model")


def touch(folder: Path, *names: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        (folder / name).write_bytes(b"x")


def stored_rgb(nc: Path, variable: str) -> np.ndarray:
    with open_nc(nc) as ds:
        return np.asarray(ds.variables[variable][0])


# ---------------------------------------------------------------------------------------------
# a file as its own counterpart


def test_xp_pattern_equal_to_the_pp_affix_is_refused_naming_the_option(tmp_path, model):
    write_pair(tmp_path / "in", "g1_PP", "g1_XP")
    before = snapshot(tmp_path)
    run = thinseg("segment", tmp_path / "in", "--xp-pattern", "PP", "--model", model, "-o", tmp_path / "out", "-q")
    line = assert_refused(run, code=2, mentions=["--xp-pattern PP", "--pp-pattern PP", "its own XP image"])
    assert line.startswith("thinseg: error: --xp-pattern PP: ")
    assert_nothing_left(tmp_path, before)


@pytest.mark.parametrize("pp, xp", [("PP", "pp"), ("c2", "C2"), ("paralelos", "PARALELOS")])
def test_affixes_equal_but_for_case_are_refused_before_any_file_is_read(tmp_path, pp, xp):
    # the folder does not even exist: the options are refused first, whatever the inputs
    with pytest.raises(ThinSegError, match=f"^--xp-pattern {xp}: equal to the PP affix"):
        pair_inputs([tmp_path / "nowhere"], pp_pattern=pp, xp_pattern=xp)


def test_xp_dir_at_the_pp_folder_with_equal_affixes_is_refused(tmp_path):
    """`--xp-dir` naming the PP folder (here through a link) with the PP affix as XP affix found
    each PP image as its own XP image."""
    touch(tmp_path / "ppl", "s1_PP.png", "s2_PP.png")
    (tmp_path / "xpl").symlink_to(tmp_path / "ppl")
    with pytest.raises(ThinSegError, match="^--xp-pattern PP: "):
        pair_inputs([tmp_path / "ppl"], xp_pattern="PP", xp_dir=tmp_path / "xpl")


def test_xp_in_xp_dir_hard_linked_to_the_pp_image_is_refused(tmp_path, model):
    (pp_file,) = [write_image(tmp_path / "ppl" / "s1_PP.png", section_images()[0])]
    (tmp_path / "xpl").mkdir()
    os.link(pp_file, tmp_path / "xpl" / "s1_XP.png")  # one photograph under both names
    before = snapshot(tmp_path)
    run = thinseg("segment", pp_file, "--xp-dir", tmp_path / "xpl", "--model", model, "-o", tmp_path / "out", "-q")
    line = assert_refused(run, code=2, mentions=[str(pp_file), str(tmp_path / "xpl" / "s1_XP.png"), "same file"])
    assert "PP and XP must be two photographs" in line
    assert_nothing_left(tmp_path, before)


@pytest.mark.parametrize("link", ["symlink", "hard link"])
@pytest.mark.parametrize("where", ["beside", "xp_dir"])
def test_a_link_to_the_pp_image_under_the_xp_name_is_never_its_partner(tmp_path, link, where):
    pp = tmp_path / "ppl" / "s1_PP.png"
    touch(pp.parent, pp.name, "s2_PP.png", "s2_XP.png")
    xp = (tmp_path / "ppl" if where == "beside" else tmp_path / "xpl") / "s1_XP.png"
    xp.parent.mkdir(exist_ok=True)
    os.symlink(pp, xp) if link == "symlink" else os.link(pp, xp)
    xp_dir = tmp_path / "xpl" if where == "xp_dir" else None
    sections, problems = pair_inputs([tmp_path / "ppl"], xp_dir=xp_dir)
    # the good pair beside it is still made; the self-pair is one problem, not two
    assert [(s.pp, s.xp) for s in sections] == [(tmp_path / "ppl" / "s2_PP.png", tmp_path / "ppl" / "s2_XP.png")]
    assert [(p.path, p.problem) for p in problems] == [
        (
            pp,
            f"XP counterpart {xp} is this same file (a link to it, or the same file under two names): "
            "PP and XP must be two photographs",
        )
    ]


def test_explicit_xp_hard_linked_to_the_pp_image_is_refused(tmp_path):
    touch(tmp_path, "plane.png")
    os.link(tmp_path / "plane.png", tmp_path / "crossed.png")
    sections, problems = pair_inputs([tmp_path / "plane.png"], xp=tmp_path / "crossed.png")
    assert sections == [] and [p.problem for p in problems] == ["--xp names the PP image itself"]


# ---------------------------------------------------------------------------------------------
# inputs that cannot be read, among good ones


def test_broken_inputs_among_good_ones_are_listed_and_the_good_ones_segmented(tmp_path, model):
    """Situations that stop root as well as anyone: a dangling link, a path through a file, a
    name too long for the file system, a link loop and a named pipe (reading it would hang)."""
    pp_file, xp_file = write_pair(tmp_path / "good", "g1_PP", "g1_XP")
    dangling = tmp_path / "dangling_PP.png"
    dangling.symlink_to(tmp_path / "nowhere_PP.png")
    through_file = pp_file / "inside"
    too_long = tmp_path / ("s" * 300 + "_PP.png")
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    pipe = tmp_path / "pipe_PP.png"
    os.mkfifo(pipe)
    bad = {
        dangling: f"broken symbolic link (it points to {tmp_path / 'nowhere_PP.png'}, which does not exist)",
        through_file: "file not found: a folder in its path is a file",
        too_long: "name too long for the file system",
        loop: "symbolic link loop (the link leads back to itself)",
        pipe: "not a regular file or folder (a device, pipe or socket)",
    }
    out = tmp_path / "out"
    run = thinseg("segment", tmp_path / "good", *bad, "--model", model, "-o", out, "-q", timeout=120)
    assert_batch_partial(run, [str(p) for p in bad])
    assert sorted(run.error_lines()) == sorted(f"thinseg: error: {path}: {why}" for path, why in bad.items())
    np.testing.assert_array_equal(stored_rgb(out / "g1_PP.nc", "g1_XP"), decoded(xp_file))
    assert sorted(p.name for p in out.iterdir()) == ["g1_PP.nc", "modal_mineralogy.csv"]


def test_broken_link_or_pipe_inside_an_input_folder_is_one_problem_and_its_neighbours_pair(tmp_path):
    touch(tmp_path / "in", "a_PP.png", "a_XP.png", "b_XP.png")
    (tmp_path / "in" / "b_PP.png").symlink_to(tmp_path / "gone.png")
    os.mkfifo(tmp_path / "in" / "c_XP.png")  # a pipe named like an image is no file: not opened, not waited on
    touch(tmp_path / "in", "c_PP.png")
    sections, problems = pair_inputs([tmp_path / "in"])
    assert [(s.pp.name, s.xp.name) for s in sections] == [("a_PP.png", "a_XP.png")]
    assert [(p.path.name, p.problem.split(" (")[0]) for p in problems] == [
        ("b_PP.png", "broken symbolic link"),
        ("c_XP.png", "not a regular file or folder"),
        ("b_XP.png", "PP counterpart not found"),
        ("c_PP.png", "XP counterpart not found"),
    ]


@pytest.mark.skipif(
    not PERMISSIONS_BIND,
    reason="this user reads folders and files whatever their permissions (root: chmod 000 proves nothing); "
    "the broken inputs above stop root too",
)
def test_unreadable_folder_and_file_among_good_ones_are_listed_and_the_good_ones_segmented(tmp_path, model):
    pp_file, xp_file = write_pair(tmp_path / "good", "g1_PP", "g1_XP")
    locked_folder = tmp_path / "locked"
    write_pair(locked_folder, "h1_PP", "h1_XP")
    locked_file, _ = write_pair(tmp_path / "some", "k1_PP", "k1_XP")
    out = tmp_path / "out"
    locked_folder.chmod(0)
    locked_file.chmod(0)
    try:
        run = thinseg("segment", tmp_path / "good", locked_folder, locked_file, "--model", model, "-o", out, "-q")
    finally:
        locked_folder.chmod(0o755)
        locked_file.chmod(0o644)
    assert_batch_partial(run, [str(locked_folder), str(locked_file)])
    assert sorted(run.error_lines()) == sorted(
        [
            f"thinseg: error: {locked_folder}: cannot read folder: Permission denied",
            f"thinseg: error: {locked_file}: cannot read: permission denied",
        ]
    )
    np.testing.assert_array_equal(stored_rgb(out / "g1_PP.nc", "g1_XP"), decoded(xp_file))


# ---------------------------------------------------------------------------------------------
# names that are not UTF-8


def test_non_utf8_names_pair_and_segment(tmp_path, model):
    folder = os.fsencode(tmp_path / "in")
    os.mkdir(folder)
    pp, xp = section_images()
    pp_file = Path(os.fsdecode(folder + b"/x\xff_PP.png"))
    xp_file = Path(os.fsdecode(folder + b"/x\xff_XP.png"))
    write_image(pp_file, pp)
    write_image(xp_file, xp)
    write_pair(tmp_path / "in", "y_PP", "y_XP")
    sections, problems = pair_inputs([tmp_path / "in"])
    assert problems == []
    assert [(os.fsencode(s.pp), os.fsencode(s.xp)) for s in sections] == [
        (os.fsencode(pp_file), os.fsencode(xp_file)),
        (os.fsencode(tmp_path / "in" / "y_PP.png"), os.fsencode(tmp_path / "in" / "y_XP.png")),
    ]
    out = tmp_path / "out"
    run = thinseg("segment", tmp_path / "in", "--model", model, "-o", out, "-q")
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.describe()
    assert sorted(os.listdir(os.fsencode(out))) == [b"modal_mineralogy.csv", b"x\xff_PP.nc", b"y_PP.nc"]
    nc = out / "plain-name.nc"  # netCDF4 opens UTF-8 paths only: a second name for the same file
    os.link(os.fsencode(out) + b"/x\xff_PP.nc", nc)
    with open_nc(nc) as ds:
        names = data_variables(ds)
    assert len(names) == 3 and names[2].endswith("_Segmentation")
    np.testing.assert_array_equal(stored_rgb(nc, names[0]), decoded(pp_file))
    np.testing.assert_array_equal(stored_rgb(nc, names[1]), decoded(xp_file))


# ---------------------------------------------------------------------------------------------
# scale: linear in the number of files


def make_pairs(pp_folder: Path, xp_folder: Path, pairs: int) -> None:
    """`pairs` empty PP/XP files (pairing reads names, never pixels)."""
    for folder in {pp_folder, xp_folder}:
        folder.mkdir()
    for i in range(pairs):
        (pp_folder / f"s{i:05d}_PP.png").touch()
        (xp_folder / f"s{i:05d}_XP.png").touch()


@pytest.fixture(scope="module")
def ten_thousand_pairs(tmp_path_factory) -> Path:
    """A folder of SCALE_PAIRS PP/XP pairs, made once for the scale tests."""
    folder = tmp_path_factory.mktemp("scale") / "in"
    make_pairs(folder, folder, SCALE_PAIRS)
    return folder


def timed_pairing(*args, **kwargs):
    wall, cpu = time.perf_counter(), time.process_time()
    sections, problems = pair_inputs(*args, **kwargs)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert cpu < SCALE_CPU_SECONDS and wall < 6 * SCALE_CPU_SECONDS, f"{cpu:.1f} s CPU, {wall:.1f} s wall"
    return sections, problems


def test_ten_thousand_pairs_in_one_folder_are_paired_in_seconds(ten_thousand_pairs):
    """The folder is listed once and every counterpart looked up by name: the work grows with
    the number of files, not with its square."""
    folder = ten_thousand_pairs
    sections, problems = timed_pairing([folder])
    assert problems == [] and len(sections) == SCALE_PAIRS
    assert all(
        (s.pp, s.xp) == (folder / f"s{i:05d}_PP.png", folder / f"s{i:05d}_XP.png") for i, s in enumerate(sections)
    )


def test_ten_thousand_pairs_refused_with_their_hints_in_seconds(ten_thousand_pairs):
    """The wrong XP affix refuses all 20,000 files, each with the hint naming the file that is
    there: the hints come from an index of the folder, not from a pass over it per file."""
    folder = ten_thousand_pairs
    sections, problems = timed_pairing([folder], xp_pattern="PX")
    assert sections == [] and len(problems) == 2 * SCALE_PAIRS
    by_name = {p.path.name: p.problem for p in problems}
    last = f"s{SCALE_PAIRS - 1:05d}"
    assert by_name[f"{last}_PP.png"] == (
        f"XP counterpart not found (expected {last}_PX.png beside it); found {last}_XP.png: use --xp-pattern XP"
    )
    assert by_name[f"{last}_XP.png"] == (
        "cannot tell whether this is PP or XP: its name has neither affix 'PP' nor 'PX' (see "
        f"--pp-pattern/--xp-pattern); found {last}_PP.png: use --pp-pattern XP --xp-pattern PP"
    )


def test_pp_and_xp_folders_side_by_side_pair_in_linear_time(tmp_path):
    make_pairs(tmp_path / "ppl", tmp_path / "xpl", 2000)
    sections, problems = timed_pairing([tmp_path / "ppl"])
    assert problems == [] and [(s.pp, s.xp) for s in sections] == [
        (tmp_path / "ppl" / f"s{i:05d}_PP.png", tmp_path / "xpl" / f"s{i:05d}_XP.png") for i in range(2000)
    ]


def test_many_token_names_keep_pairing_linear(tmp_path):
    """Names of a hundred tokens each (a file name's length allows about that many): the hint
    index holds no entry per token for them, and pairing stays fast."""
    folder = tmp_path / "in"
    folder.mkdir()
    long_stem = "_".join(["a"] * 100)
    for i in range(2000):
        (folder / f"{long_stem}_{i:04d}_PP.png").touch()
        (folder / f"{long_stem}_{i:04d}_PX.png").touch()
    cpu = time.process_time()
    sections, problems = pair_inputs([folder])
    cpu = time.process_time() - cpu
    assert cpu < SCALE_CPU_SECONDS, f"{cpu:.1f} s CPU"
    assert sections == [] and len(problems) == 4000
    assert problems[0].problem.startswith("XP counterpart not found (expected ")
