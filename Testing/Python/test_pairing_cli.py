"""Pairing as a geologist meets it: `thinseg segment` with PP and XP photographs in separate
folders (the real sandstone collection's ppl/ and xpl/), one pair given with `--xp FILE`, and the
message that names the options when the default affixes find nothing. Real files, real model
folders, in-process `main([...])` runs; `register`/`prepare` read the same pairs."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import (
    REAL_DATA,
    data_variables,
    decoded,
    error_lines,
    make_bundle,
    open_nc,
    read_rgb,
    real_field,
    run_main,
    section_images,
    write_image,
)

from thinseg.data.section_images import read_ppxp
from thinseg.io.pairing import pair_inputs
from thinseg.registration.ppxp import estimate_xp_offset

FIELD = "2a"


def rgb(ds, name: str) -> np.ndarray:
    return np.asarray(ds.variables[name][0])


def difference_after_shift(stored: np.ndarray, photo: np.ndarray, shift: tuple[int, int]) -> float:
    """Mean absolute difference of `stored` and `photo` shifted by `shift` (stored[y, x] against
    photo[y - dy, x - dx]), over the interior both cover."""
    (dy, dx), m = shift, 24
    assert abs(dy) < m and abs(dx) < m, shift
    h, w = stored.shape[:2]
    a = stored[m : h - m, m : w - m].astype(np.int16)
    b = photo[m - dy : h - m - dy, m - dx : w - m - dx].astype(np.int16)
    return float(np.abs(a - b).mean())


def test_real_field_in_separate_folders_is_segmented_with_its_xpl_photograph(capsys, tmp_path):
    files = real_field(FIELD)
    code, _, err = run_main(
        capsys,
        "segment",
        files["pp"],
        "--pp-pattern",
        "paralelos",
        "--xp-pattern",
        "cruzados",
        "--output",
        tmp_path,
        "--device",
        "cpu",
        "--quiet",
    )
    assert code == 0, err
    with open_nc(tmp_path / f"{FIELD}_paralelos.nc") as ds:
        assert data_variables(ds) == [f"{FIELD}_paralelos", f"{FIELD}_cruzados", f"{FIELD}_Segmentation"]
        np.testing.assert_array_equal(rgb(ds, f"{FIELD}_paralelos"), read_rgb(files["pp"]))
        stored_xp = rgb(ds, f"{FIELD}_cruzados")
    # XP is the XPL photograph, stored as it is or moved onto PP by a stage shift
    xpl = read_rgb(files["xp"])
    dy, dx, _ = estimate_xp_offset(xpl, stored_xp)
    assert difference_after_shift(stored_xp, xpl, (dy, dx)) < 1.0
    # a check that tells photographs apart: PPL and another field's XPL are nowhere near
    assert difference_after_shift(stored_xp, read_rgb(files["pp"]), (dy, dx)) > 20.0
    assert difference_after_shift(stored_xp, read_rgb(real_field("3a")["xp"]), (dy, dx)) > 20.0


def test_real_ppl_folder_pairs_every_field_with_its_xpl_photograph():
    real_field(FIELD)  # skips without the data
    sections, problems = pair_inputs([REAL_DATA / "ppl"], pp_pattern="paralelos", xp_pattern="cruzados")
    assert problems == []
    fields = sorted(p.name.split("_")[0] for p in (REAL_DATA / "ppl").glob("*_paralelos.jpg"))
    assert len(fields) == 10
    assert sorted((s.pp, s.xp) for s in sections) == sorted(
        (REAL_DATA / "ppl" / f"{f}_paralelos.jpg", REAL_DATA / "xpl" / f"{f}_cruzados.jpg") for f in fields
    )


def test_real_names_without_the_default_affixes_get_the_options_suggested(capsys, tmp_path):
    files = real_field(FIELD)
    code, _, err = run_main(capsys, "segment", files["pp"], "--output", tmp_path, "--quiet")
    assert code == 2
    assert error_lines(err) == [
        f"thinseg: error: {files['pp']}: cannot tell whether this is PP or XP: its name has neither affix 'PP' "
        f"nor 'XP' (see --pp-pattern/--xp-pattern); found xpl/{FIELD}_cruzados.jpg: "
        "use --pp-pattern paralelos --xp-pattern cruzados"
    ]
    assert list(tmp_path.iterdir()) == []


def test_register_and_prepare_find_the_xpl_photograph_the_same_way():
    """`thinseg register`/`prepare` without --xp read XP through the same pairing."""
    files = real_field(FIELD)
    images = read_ppxp(files["pp"], pp_pattern="paralelos", xp_pattern="cruzados")
    assert images.xp_note == f"XP: {files['xp']}"
    np.testing.assert_array_equal(images.xp, read_rgb(files["xp"]))


@pytest.fixture
def tiny_model(tmp_path):
    return make_bundle(tmp_path / "model")


def test_explicit_xp_pairs_files_named_anyhow(capsys, tmp_path, tiny_model):
    pp, xp = section_images()
    pp_file = write_image(tmp_path / "in" / "field 7 plane.png", pp)
    xp_file = write_image(tmp_path / "elsewhere" / "crossed-7.png", xp)
    code, _, err = run_main(
        capsys, "segment", pp_file, "--xp", xp_file, "--model", tiny_model, "--output", tmp_path / "out", "-q"
    )
    assert code == 0, err
    with open_nc(tmp_path / "out" / "field 7 plane.nc") as ds:
        assert data_variables(ds) == ["field 7 plane", "crossed-7", "field 7 plane_Segmentation"]
        np.testing.assert_array_equal(rgb(ds, "field 7 plane"), decoded(pp_file))
        np.testing.assert_array_equal(rgb(ds, "crossed-7"), decoded(xp_file))


def test_explicit_xp_with_several_inputs_is_refused_and_nothing_written(capsys, tmp_path, tiny_model):
    pp_file, xp_file = (write_image(tmp_path / n, a) for n, a in zip(("a.png", "b.png"), section_images()))
    out = tmp_path / "out"
    code, _, err = run_main(
        capsys, "segment", pp_file, xp_file, "--xp", xp_file, "--model", tiny_model, "--output", out, "-q"
    )
    assert code == 2
    assert error_lines(err) == [
        f"thinseg: error: {xp_file}: --xp pairs one PP image (PNG, JPEG or TIFF) with XP; INPUT gave 2 files"
    ]
    assert not out.exists() or list(out.iterdir()) == []


def test_xp_dir_points_at_the_xp_folder(capsys, tmp_path, tiny_model):
    pp, xp = section_images()
    pp_file = write_image(tmp_path / "scans" / "plane" / "S1_PP.png", pp)
    xp_file = write_image(tmp_path / "exports" / "crossed" / "S1_XP.png", xp)
    code, _, err = run_main(
        capsys, "segment", pp_file.parent, "--xp-dir", xp_file.parent, "--model", tiny_model, "-o", tmp_path / "o", "-q"
    )
    assert code == 0, err
    with open_nc(tmp_path / "o" / "S1_PP.nc") as ds:
        np.testing.assert_array_equal(rgb(ds, "S1_XP"), decoded(xp_file))
